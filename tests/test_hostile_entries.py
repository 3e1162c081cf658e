"""Entry points that file names and the working folder cannot steer (#25, cases 1-2).

The repository being checked is hostile: it holds Python files that, if imported, would run
(``evil.py``, and a ``typer.py`` and ``torch.py`` that shadow what bn-inspect imports), and a model
file whose name reads as an option. Every entry point (the console scripts, the pre-commit hook as
pre-commit runs it, the GitHub Action's bash step) runs with that repository as its working folder;
the canaries' marker must not appear.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from tests.helpers import DIGITS, REPO, Result, assert_one_error_line
from tests.hostile import canary_code, file_hashes, run_bounded

# Left out of the quick subset (`-m "not slow"`): runs every entry point in subprocesses against hostile inputs (about 15 s).
pytestmark = pytest.mark.slow

MODEL = DIGITS / "torchscript.pt"
OPTION_NAMED = "--arch=evil.py:net.pt"


def hook_script(name: str) -> str:
    """The installed console script ``name`` (``bn-inspect``, ``bn-inspect-each``) beside this Python; skip without it."""
    folder = Path(sysconfig.get_path("scripts"))
    candidate = folder / name
    found = str(candidate) if candidate.is_file() else shutil.which(name)
    if found is None:
        pytest.skip(f"the console script {name} is not installed (pip install -e . creates it)")
    return found


def _hostile_repository(tmp_path: Path) -> tuple[Path, Path]:
    """A repository whose code must never run: the folder and the marker its canaries would create."""
    repository = tmp_path / "repo"
    repository.mkdir()
    marker = tmp_path / "ran"
    for module in ("evil", "typer", "torch", "numpy", "bn_inspect"):
        (repository / f"{module}.py").write_text(canary_code(marker))
    (repository / OPTION_NAMED).write_bytes(b"")
    shutil.copyfile(MODEL, repository / "model.pt")
    return repository, marker


def _environment() -> dict[str, str]:
    # The tree under test first; the working folder is not on PYTHONPATH (an empty entry would put it there).
    return {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "160"}


def _script(name: str, argv: list[str], cwd: Path) -> Result:
    return run_bounded(argv, cwd, program=(hook_script(name),), env=_environment())


@pytest.mark.surface("entry:bn-inspect-each", "execution", "traceback")
def test_each_passes_a_file_named_like_an_option_as_a_model_path(tmp_path: Path) -> None:
    repository, marker = _hostile_repository(tmp_path)
    before = file_hashes(repository)
    result = _script("bn-inspect-each", ["check", "--no-data", "--", OPTION_NAMED], repository)
    assert not marker.exists()
    assert result.code == 2
    assert_one_error_line(result, f"model file {OPTION_NAMED} is empty")
    assert file_hashes(repository) == before


@pytest.mark.surface("entry:bn-inspect-each", "execution", "traceback")
def test_each_without_a_separator_refuses_a_name_that_reads_as_an_option(tmp_path: Path) -> None:
    repository, marker = _hostile_repository(tmp_path)
    result = _script("bn-inspect-each", ["check", OPTION_NAMED, "model.pt"], repository)
    assert not marker.exists()
    assert_one_error_line(
        result,
        f"Error: {OPTION_NAMED} would be read as a file name; put the options before -- and the files after it.",
        "Usage: bn-inspect-each COMMAND [OPTIONS] -- FILE...",
    )
    assert result.out == ""
    result = _script("bn-inspect-each", ["layers", "model.pt"], repository)
    assert result.code == 0 and "model.pt" in result.out, result.err


@pytest.mark.surface("entry:bn-inspect-each", "clobber")
@pytest.mark.parametrize(
    "written",
    [
        ["check", "--no-data", "--format", "json", "--output", "other.pt", "--force"],
        ["check", "--no-data", "--report=other.pt", "--force"],
        ["recalibrate", "--input", str(DIGITS / "test_images.npy"), "--output", "other.pt", "--force"],
    ],
    ids=["output", "report", "recalibrated-model"],
)
def test_each_never_writes_over_a_file_of_the_same_call(tmp_path: Path, written: list[str]) -> None:
    # One run's output would replace the next run's model, then the next run's output the last one's.
    repository, _ = _hostile_repository(tmp_path)
    shutil.copyfile(MODEL, repository / "other.pt")
    before = file_hashes(repository)
    result = _script("bn-inspect-each", [*written, "--", "model.pt", "other.pt"], repository)
    option = "--report" if "--report=other.pt" in written else "--output"
    assert_one_error_line(result, f"Error: {option} would be written once per file")
    assert file_hashes(repository) == before


@pytest.mark.surface("entry:bn-inspect", "traceback")
@pytest.mark.surface("entry:bn-inspect-each", "traceback")
def test_a_file_named_debug_does_not_turn_on_tracebacks(tmp_path: Path) -> None:
    (tmp_path / "--debug").write_bytes(b"")
    for script, argv in (("bn-inspect", ["check", "--no-data"]), ("bn-inspect-each", ["check", "--no-data"])):
        result = _script(script, [*argv, "--", "--debug"], tmp_path)
        assert_one_error_line(result, "Error: model file --debug is empty")


@pytest.mark.surface("entry:bn-inspect-each", "traceback")
def test_each_without_a_command_is_one_line(tmp_path: Path) -> None:
    repository, marker = _hostile_repository(tmp_path)
    result = _script("bn-inspect-each", ["--arch=evil.py:net", "--", "model.pt"], repository)
    assert not marker.exists()
    assert result.code == 2
    assert_one_error_line(result, "no bn-inspect command given", "bn-inspect-each COMMAND")


@pytest.mark.surface("entry:pre-commit", "execution")
def test_pre_commit_runs_the_hook_without_running_the_repository_code(tmp_path: Path) -> None:
    if shutil.which("git") is None:
        pytest.skip("pre-commit needs git")
    repository, marker = _hostile_repository(tmp_path)
    hook = dict(yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text())[0])
    # The shipped hook as a `repo: local` one (docs/ci.md): pre-commit runs its entry from PATH, as it
    # would from the hook's own environment, with the repository as the working folder.
    hook.update(language="system")
    hook_script("bn-inspect-each")
    (repository / ".pre-commit-config.yaml").write_text(yaml.safe_dump({"repos": [{"repo": "local", "hooks": [hook]}]}))
    environment = {
        **_environment(),
        "PATH": f"{sysconfig.get_path('scripts')}{os.pathsep}{os.environ['PATH']}",
        "PRE_COMMIT_HOME": str(tmp_path / "cache"),
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_CONFIG_NOSYSTEM": "1",
    }
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "hostile"]):
        subprocess.run([*git, *command], cwd=repository, env=environment, check=True, capture_output=True)
    pre_commit = shutil.which("pre-commit", path=environment["PATH"])
    assert pre_commit is not None
    done = subprocess.run(
        [pre_commit, "run", "--all-files"],
        cwd=repository,
        env=environment,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert not marker.exists(), done.stdout
    assert done.returncode == 1, done.stdout + done.stderr  # the empty file fails the hook
    assert f"Error: model file {OPTION_NAMED} is empty" in done.stdout, done.stdout


def _action_check_step() -> dict[str, object]:
    action = yaml.safe_load((REPO / "action.yml").read_text())
    step: dict[str, object] = next(s for s in action["runs"]["steps"] if s.get("id") == "check")
    return step


@pytest.mark.surface("entry:github-action", "execution")
def test_the_action_passes_the_model_after_the_separator(tmp_path: Path) -> None:
    repository, marker = _hostile_repository(tmp_path)
    calls = tmp_path / "argv"
    shims = tmp_path / "bin"
    shims.mkdir()
    shim = shims / "bn-inspect"
    # Records each argument on its own line, then runs the real console script.
    shim.write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$@" > "{calls}"\nexec "{sys.executable}" "{hook_script("bn-inspect")}" "$@"\n'
    )
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    # actions/setup-python's `python`, which splits the args input.
    python = shims / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    (tmp_path / "runner").mkdir()
    step = _action_check_step()
    environment = {
        **_environment(),
        "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}",
        "RUNNER_TEMP": str(tmp_path / "runner"),
        "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md"),
        "GITHUB_OUTPUT": str(tmp_path / "output"),
        "MODEL": OPTION_NAMED,
        "EXTRA_ARGS": "--no-data",
        "BASELINE": "",
        "HTML_REPORT": "false",
    }
    done = subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", str(step["run"])],
        cwd=repository,
        env=environment,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert not marker.exists()
    argv = calls.read_text().splitlines()
    assert argv[0] == "check" and argv[-2:] == ["--", OPTION_NAMED], argv
    assert (tmp_path / "output").read_text().strip() == "exit-code=2", done.stderr
    assert_one_error_line(Result(2, done.stdout, done.stderr), OPTION_NAMED)


@pytest.mark.surface("entry:bn-inspect", "execution")
def test_the_console_script_does_not_import_from_the_working_folder(tmp_path: Path) -> None:
    repository, marker = _hostile_repository(tmp_path)
    before = file_hashes(repository)
    result = _script("bn-inspect", ["layers", "model.pt"], repository)
    assert not marker.exists()
    assert result.code == 0, result.err
    assert "features.1" in result.out and result.err == ""
    assert file_hashes(repository) == before


@pytest.mark.surface("entry:bn-inspect", "traceback")
@pytest.mark.surface("render:stderr", "inert")
def test_a_hostile_missing_path_is_one_inert_error_line(tmp_path: Path) -> None:
    repository, marker = _hostile_repository(tmp_path)
    name = "x\x1b[31m\x07\n::error::pwned\u202e.pt"
    result = _script("bn-inspect", ["check", "--no-data", "--", name], repository)
    assert not marker.exists()
    assert result.code == 2
    assert_one_error_line(result, "\\x1b[31m\\x07", "::error::pwned\\u202e.pt")
    assert not any(c in result.err for c in "\x1b\x07\u202e")
