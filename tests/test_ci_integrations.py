"""The CI integrations, run as their hosts would run them: the pre-commit hook and the GitHub Action (#21)."""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from bn_inspect.cli.each import run_each
from tests.helpers import DIGITS, REPO
from tests.test_hostile_entries import hook_script

# Left out of the quick subset (`-m "not slow"`): runs pre-commit's loader and the hook entry in subprocesses (about 20 s).
pytestmark = pytest.mark.slow

MODEL = DIGITS / "torchscript.pt"
MATCHING = DIGITS / "test_images.npy"
SHIFTED = DIGITS / "test_images_unscaled.npy"


def _environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "160"}


@pytest.fixture(scope="module")
def broken_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits TorchScript model with a negative running variance (BN102)."""
    module = torch.jit.load(str(MODEL))
    with torch.no_grad():
        next(b for name, b in module.named_buffers() if name.endswith("running_var"))[0] = -1.0
    path = tmp_path_factory.mktemp("broken") / "broken.pt"
    torch.jit.save(module, str(path))
    return path


# pre-commit --------------------------------------------------------------------------------------


def _hook() -> dict[str, Any]:
    from pre_commit.clientlib import load_manifest

    hooks = load_manifest(str(REPO / ".pre-commit-hooks.yaml"))
    assert [hook["id"] for hook in hooks] == ["bn-inspect-check"]
    hook: dict[str, Any] = hooks[0]
    return hook


def _run_hook(files: list[Path], args: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """What pre-commit runs for a python hook: the entry's words, the hook's args, then the files."""
    hook = _hook()
    command = shlex.split(hook["entry"]) + (hook["args"] if args is None else args) + [str(f) for f in files]
    return subprocess.run(
        [sys.executable, hook_script(command[0]), *command[1:]],
        capture_output=True,
        text=True,
        env=_environment(),
        timeout=600,
    )


def test_the_hook_manifest_is_valid_and_matches_model_files_only() -> None:
    hook = _hook()
    assert hook["language"] == "python" and hook["pass_filenames"] and hook["require_serial"]
    pattern = re.compile(hook["files"])
    models = ("model.pt", "w.pth", "prog.pt2", "net.ts", "x.safetensors", "last.ckpt", "pytorch_model.bin")
    for name in models:
        assert pattern.search(name), name
    # An export that folded its BatchNorm (the exporters' default in eval mode) has none, and check
    # cannot run on it: a repository whose exports keep BatchNorm adds onnx itself (docs/ci.md).
    for name in ("val.npy", "golden.json", "model.py", "notes.txt", "deployed.onnx"):
        assert not pattern.search(name), name


def test_the_hook_checks_every_changed_file_and_fails_when_one_is_broken(broken_model: Path) -> None:
    healthy = _run_hook([MODEL, DIGITS.parent / "cancer_mlp" / "torchscript.pt"])
    assert healthy.returncode == 0, healthy.stderr
    assert healthy.stdout.count("PASSED") == 2 and healthy.stderr == ""
    mixed = _run_hook([MODEL, broken_model])
    assert mixed.returncode == 1
    assert "BN102" in mixed.stdout and mixed.stdout.count("model ") >= 2


def test_hook_args_before_the_separator_reach_every_file() -> None:
    result = _run_hook([DIGITS / "state_dict.pt"], ["--arch", "sample_models.architectures:DigitsCNN", "--"])
    assert result.returncode == 0, result.stderr
    assert "--arch sample_models.architectures:DigitsCNN" in result.stdout and "without --arch" not in result.stdout
    without = _run_hook([DIGITS / "state_dict.pt"])
    assert without.returncode == 0, without.stderr
    assert "a state_dict without --arch" in without.stdout


def test_the_shipped_hook_checks_bare_state_dicts(tmp_path: Path) -> None:
    # No --arch: the rules on stored buffers run over the state_dict's BatchNorm key groups (#28).
    state_dict = torch.load(DIGITS / "state_dict.pt")
    key = next(k for k in state_dict if k.endswith("running_var"))
    state_dict[key][0] = -1.0
    broken = tmp_path / "broken_state_dict.pt"
    torch.save(state_dict, broken)
    result = _run_hook([DIGITS / "state_dict.pt", broken])
    assert result.returncode == 1, result.stderr
    assert "BN102" in result.stdout and result.stdout.count("PASSED") == 1 and result.stderr == ""


def test_run_each_returns_the_worst_exit_code(
    capsys: pytest.CaptureFixture[str], broken_model: Path, tmp_path: Path
) -> None:
    assert run_each(["check", "--no-data", "--", str(MODEL), str(broken_model)]) == 1
    assert run_each(["check", "--no-data", "--", str(tmp_path / "missing.pt"), str(broken_model)]) == 2
    assert run_each(["check", "--no-data", "--"]) == 0
    assert run_each(["--no-data"]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("Error: no bn-inspect command given.")


# GitHub Action -----------------------------------------------------------------------------------

_EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")


def _value(expression: str, inputs: dict[str, str], outputs: dict[str, dict[str, str]]) -> str:
    """An `inputs.x`, `steps.id.outputs.x` or `github.action_path` reference, as the runner fills it in."""
    parts = expression.split(".")
    if parts[0] == "inputs":
        return inputs[parts[1]]
    if parts[0] == "steps":
        return outputs.get(parts[1], {}).get(parts[3], "")
    assert expression == "github.action_path", expression
    return str(REPO)


def _condition(text: str, inputs: dict[str, str], outputs: dict[str, dict[str, str]]) -> bool:
    """The `if:` expressions the action uses: comparisons of references with quoted strings, joined by &&."""
    clauses = []
    for clause in text.split("&&"):
        left, operator, right = re.fullmatch(r"\s*(\S+)\s*(==|!=)\s*'(.*)'\s*", clause).groups()  # type: ignore[union-attr]
        equal = _value(left, inputs, outputs) == right
        clauses.append(equal if operator == "==" else not equal)
    return all(clauses)


def _run_action(tmp_path: Path, **given: str) -> tuple[int, str, list[tuple[str, dict[str, str]]]]:
    """Run action.yml's steps as a runner would; the job's exit code, its summary, the `uses:` steps run
    (each with its `with:` as the runner fills it in). Each bn-inspect call is logged to tmp_path/calls."""
    action = yaml.safe_load((REPO / "action.yml").read_text())
    inputs = {name: str(spec.get("default", "")) for name, spec in action["inputs"].items()}
    inputs.update(install="false", **given)
    shims = tmp_path / "bin"
    shims.mkdir(parents=True, exist_ok=True)
    shim = shims / "bn-inspect"
    calls = tmp_path / "calls"
    shim.write_text(f'#!/bin/sh\necho "$*" >> "{calls}"\nexec "{sys.executable}" -m bn_inspect "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    # actions/setup-python puts a `python` on the PATH; the action splits its args input with it.
    python = shims / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    summary = tmp_path / "summary.md"
    (tmp_path / "runner").mkdir(exist_ok=True)
    outputs: dict[str, dict[str, str]] = {}
    used = []
    for index, step in enumerate(action["runs"]["steps"]):
        if "if" in step and not _condition(step["if"], inputs, outputs):
            continue
        if "uses" in step:
            filled = {
                k: _EXPRESSION.sub(lambda m: _value(m[1], inputs, outputs), str(v)) for k, v in step["with"].items()
            }
            used.append((step["uses"], filled))
            continue
        output_file = tmp_path / f"output-{index}"
        output_file.write_text("")
        environment = {
            **_environment(),
            "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}",
            "RUNNER_TEMP": str(tmp_path / "runner"),
            "GITHUB_STEP_SUMMARY": str(summary),
            "GITHUB_OUTPUT": str(output_file),
        }
        environment |= {
            k: _EXPRESSION.sub(lambda m: _value(m[1], inputs, outputs), str(v)) for k, v in step.get("env", {}).items()
        }
        assert "${{" not in step["run"], "inputs reach scripts through env, never spliced into them"
        # How a runner runs a bash step: bash --noprofile --norc -eo pipefail {0}.
        done = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
            capture_output=True,
            text=True,
            env=environment,
            cwd=tmp_path,
            timeout=600,
        )
        if "id" in step:
            outputs[step["id"]] = dict(line.split("=", 1) for line in output_file.read_text().splitlines())
        if done.returncode != 0:
            return done.returncode, summary.read_text() if summary.exists() else "", used
    return 0, summary.read_text() if summary.exists() else "", used


def test_the_action_writes_the_markdown_to_the_summary_and_fails_as_the_check_did(tmp_path: Path) -> None:
    code, summary, _ = _run_action(tmp_path, model=str(MODEL), args=f"--input {SHIFTED}")
    assert code == 1
    assert "## bn-inspect check: ❌ failed" in summary and "| error | BN201 shifted |" in summary
    code, summary, _ = _run_action(tmp_path / "ok", model=str(MODEL), args=f"--input {MATCHING}")
    assert code == 0 and "## bn-inspect check: ✅ passed" in summary


def test_the_action_passes_a_baseline_and_propagates_exit_2(tmp_path: Path) -> None:
    golden = tmp_path / "golden.json"
    from bn_inspect.cli.main import run

    assert run(["check", str(MODEL), "--input", str(MATCHING), "--write-baseline", str(golden), "-q"]) == 0
    code, summary, _ = _run_action(
        tmp_path, model=str(MODEL), args=f"--input {SHIFTED} --ignore BN201", baseline=str(golden)
    )
    assert code == 1 and "BN302 data-drift" in summary
    code, summary, _ = _run_action(tmp_path / "missing", model=str(tmp_path / "nothing.pt"))
    assert code == 2 and summary == ""


def test_the_html_report_comes_from_the_same_run_and_is_uploaded(tmp_path: Path) -> None:
    code, summary, used = _run_action(tmp_path, model=str(MODEL), args=f"--input {SHIFTED}", **{"html-report": "true"})
    assert code == 1  # the check's exit code still fails the job
    assert "## bn-inspect check: ❌ failed" in summary
    page = tmp_path / "runner" / "bn-inspect-report.html"
    assert used == [("actions/upload-artifact@v4", {"name": "bn-inspect-report", "path": str(page)})]
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and 'data-kind="check"' in text
    for name in ("features.1", "features.4", "features.8"):
        assert name in text and name in summary
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 1 and "--format markdown" in calls[0] and f"--report {page}" in calls[0]


def test_the_docs_action_example_is_valid_yaml_whose_args_split_into_the_words_meant() -> None:
    text = (REPO / "docs" / "ci.md").read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", text, re.DOTALL) if "OWNER/bn-inspect@" in b)
    steps = yaml.safe_load(block)["jobs"]["batchnorm"]["steps"]
    action = next(step for step in steps if str(step.get("uses", "")).startswith("OWNER/bn-inspect@"))
    assert shlex.split(action["with"]["args"]) == [
        "--arch",
        "mypkg.models:net",
        "--arch-kwargs",
        '{"num_classes": 4}',
        "--input",
        "data/val set.npy",
    ]


def test_the_args_input_is_split_as_a_shell_splits_words(tmp_path: Path) -> None:
    # A JSON --arch-kwargs and a path with spaces, quoted as in the README: one word each.
    data = tmp_path / "val data" / "test images.npy"
    data.parent.mkdir()
    data.write_bytes(MATCHING.read_bytes())
    args = f"""--arch sample_models.architectures:DigitsCNN --arch-kwargs '{{"num_classes": 10}}' --input "{data}" --fail-on 'warning'"""
    code, summary, _ = _run_action(tmp_path, model=str(DIGITS / "state_dict.pt"), args=args)
    assert code == 0 and "## bn-inspect check: ✅ passed" in summary, summary
    calls = (tmp_path / "calls").read_text()
    assert '--arch-kwargs {"num_classes": 10} --input ' + str(data) + " --fail-on warning" in calls


def test_args_that_are_not_shell_words_are_one_error_line(tmp_path: Path) -> None:
    code, summary, _ = _run_action(tmp_path, model=str(MODEL), args="""--arch-kwargs '{"num_classes": 4}""")
    assert code == 2 and summary == "" and not (tmp_path / "calls").exists()


@pytest.mark.surface("entry:github-action", "execution")
def test_the_args_input_expands_and_runs_nothing(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    hostile = (
        f"--input $(touch {work}/dollar) `touch {work}/backtick` ; touch {work}/semicolon && touch {work}/and "
        f"| touch {work}/pipe > {work}/redirect $HOME ${{PATH}} '$(touch {work}/quoted)'"
    )
    code, summary, _ = _run_action(tmp_path, model=str(MODEL), args=hostile)
    assert sorted(p.name for p in work.iterdir()) == []
    assert code == 2 and summary == ""
    # bn-inspect got the words as written, none of them expanded.
    call = (tmp_path / "calls").read_text()
    assert f"$(touch {work}/dollar)" in call and f"`touch {work}/backtick`" in call and " ; " in call
    assert "$HOME ${PATH} $(touch" in call


def test_without_html_report_nothing_is_uploaded(tmp_path: Path) -> None:
    code, _, used = _run_action(tmp_path, model=str(MODEL), args=f"--input {MATCHING}")
    assert code == 0 and used == [] and not (tmp_path / "runner" / "bn-inspect-report.html").exists()
    code, summary, used = _run_action(
        tmp_path / "missing", model=str(tmp_path / "nothing.pt"), **{"html-report": "true"}
    )
    assert code == 2 and summary == "" and used == []  # no page from a run that could not run


def test_the_docs_local_hook_is_the_shipped_hook() -> None:
    # docs/ci.md's `repo: local` hook (for a repository that has bn-inspect installed) runs the same entry.
    text = (REPO / "docs" / "ci.md").read_text(encoding="utf-8")
    block = re.search(r"```yaml\n(repos:\n  - repo: local\n.*?)```", text, re.DOTALL)
    assert block is not None
    local = yaml.safe_load(block[1])["repos"][0]["hooks"][0]
    shipped = _hook()
    for key in ("id", "entry", "args", "files", "require_serial"):
        assert local[key] == shipped[key], key


def test_the_docs_say_what_owner_stands_for() -> None:
    for path in (REPO / "docs" / "ci.md", REPO / "action.yml", REPO / ".pre-commit-hooks.yaml"):
        text = path.read_text(encoding="utf-8")
        assert "OWNER" in text and re.search(r"replace\s+(`?OWNER`?|it)\s+with\s+the\s+GitHub\s+account", text), path
    assert "- uses: ./" in (REPO / "docs" / "ci.md").read_text(encoding="utf-8")
