"""Hostile outputs: every writer of the writer policy against what is already at its target.

The writers are --output (a result), --report (a page), check's --write-baseline and recalibrate's
model (tests/surfaces.py: write:result, write:page, write:baseline, write:model). For each:

* clobber: no output replaces a file the run reads, however it is named (a symlink, a hard link,
  an image one folder deep in --input, the --arch or --data source), nor an existing file without
  --force, even one created while the run goes on; an interrupt names exactly the outputs in place;
* hang: a named pipe as the target is refused without being opened;
* traceback: a missing or unwritable folder and a directory as the target are one line, exit 2.

Every refusal leaves every file as it was (hashes) and no temporary file behind.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bn_inspect.boundary.reading import run_manifest
from bn_inspect.boundary.writing import Destination, OutputSet, run_outputs, write_output
from bn_inspect.cli.main import run
from bn_inspect.errors import Interrupted, OutputError
from tests.helpers import DIGITS, Result, deadline, invoke
from tests.hostile import file_hashes

DIGITS_TS = DIGITS / "torchscript.pt"
TRAIN = DIGITS / "train_images.npy"
FIX_READ = "Choose another path for the output"
FIX_EXISTS = "Pass --force to replace it, or choose another path"

# Each writer: the command that writes it and the option that names it.
WRITERS = {
    "write:result": ("inspect", "--output"),
    "write:page": ("inspect", "--report"),
    "write:baseline": ("check", "--write-baseline"),
    "write:model": ("recalibrate", "--output"),
}

NET = """
import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(3)

    def forward(self, x):
        return self.bn(x)
"""
DATA = """
import torch


def batches():
    for _ in range(2):
        yield torch.randn(8, 3)
"""


def each_writer(*hazards: str, names: Sequence[str] = tuple(WRITERS)) -> list[object]:
    """The writers (all four, or ``names``) as parameters, each marked with its surface and ``hazards``."""
    return [pytest.param(name, marks=pytest.mark.surface(name, *hazards), id=name) for name in names]


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """A copy of the digits model and its data, so that their hashes are the test's to check."""
    model, data = tmp_path / "model.pt", tmp_path / "images.npy"
    shutil.copy(DIGITS_TS, model)
    np.save(data, np.load(TRAIN)[:64])
    return {"model": model, "data": data}


def writer_argv(surface: str, files: dict[str, Path], target: Path | str, *extra: str) -> list[str]:
    command, option = WRITERS[surface]
    model, data = files["model"], files["data"]
    return [command, str(model), "--input", str(data), "--batches", "1", option, str(target), *extra]


def refused(capsys: pytest.CaptureFixture[str], argv: Sequence[str], folder: Path, line: str) -> Result:
    """Run ``argv``: exit 2, stderr exactly ``Error: line``, every file under ``folder`` unchanged, nothing added."""
    before = file_hashes(folder)
    with deadline(120):
        result = invoke(capsys, argv)
    assert (result.code, result.err) == (2, f"Error: {line}\n"), result.err
    assert "Traceback" not in result.out
    assert file_hashes(folder) == before
    return result


# --- clobber: the files the run reads --------------------------------------------------------


@pytest.mark.parametrize("surface", each_writer("clobber"))
@pytest.mark.parametrize("spelling", ["symlink", "hardlink"])
def test_an_output_never_replaces_the_input_through_a_link(
    surface: str, spelling: str, files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / f"alias-{spelling}"
    if spelling == "symlink":
        target.symlink_to(files["data"])
    else:
        os.link(files["data"], target)
    option = WRITERS[surface][1]
    line = f"{option} {target} is the --input file {files['data']}, which this run reads. {FIX_READ}"
    refused(capsys, writer_argv(surface, files, target, "--force"), tmp_path, line)


@pytest.mark.parametrize("surface", each_writer("clobber"))
def test_an_output_never_replaces_the_model_through_a_symlink(
    surface: str, files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "new.pt"
    target.symlink_to(files["model"])
    option = WRITERS[surface][1]
    line = f"{option} {target} is the model file {files['model']}, which this run reads. {FIX_READ}"
    refused(capsys, writer_argv(surface, files, target), tmp_path, line)


@pytest.mark.parametrize("surface", each_writer("clobber"))
def test_an_existing_file_is_replaced_only_with_force(
    surface: str, files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "earlier"
    target.write_text("an earlier output")
    option = WRITERS[surface][1]
    refused(capsys, writer_argv(surface, files, target), tmp_path, f"{option} {target} already exists. {FIX_EXISTS}")
    with deadline(120):
        replaced = invoke(capsys, writer_argv(surface, files, target, "--force"))
    assert replaced.code in (0, 1), replaced.err
    assert target.read_bytes() != b"an earlier output"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["earlier", "images.npy", "model.pt"]


def _image_folder(tmp_path: Path) -> Path:
    """val/cat/1.png and val/dog/2.png: 8×8 grayscale images the digits model takes."""
    folder = tmp_path / "val"
    for name in ("cat/1.png", "dog/2.png"):
        (folder / name).parent.mkdir(parents=True)
        Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), mode="L").save(folder / name)
    return folder


# The walk of an --input folder records the images it finds; recalibrate's walk (analyses/sources.py)
# records them once the readers' side of the boundary lands, so write:model is not here yet.
@pytest.mark.parametrize("surface", each_writer("clobber", names=("write:result", "write:page", "write:baseline")))
def test_an_output_never_replaces_an_image_one_folder_deep(
    surface: str, files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 25, case 4: ``--input val --output val/cat/1.png``."""
    folder = _image_folder(tmp_path)
    image = folder / "cat" / "1.png"
    command, option = WRITERS[surface]
    argv = [command, str(files["model"]), "--input", str(folder), "--grayscale", option, str(image), "--force"]
    refused(
        capsys,
        argv,
        tmp_path,
        f"{option} {image} is an image of the --input folder {image}, which this run reads. {FIX_READ}",
    )
    # Without --force the early check already refuses it: it exists.
    refused(capsys, argv[:-1], tmp_path, f"{option} {image} already exists. {FIX_EXISTS}")


@pytest.fixture
def code_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """net3.py (an architecture) and data.py (its batches) in the working folder, as a user's repository."""
    (tmp_path / "net3.py").write_text(NET)
    (tmp_path / "data.py").write_text(DATA)
    monkeypatch.chdir(tmp_path)
    return tmp_path


CODE_CASES = {
    # Issue 25, case 5: (argv, the one error line).
    "report-onto-the-data-file": (
        ["inspect", "--arch", "net3.py:Net", "--data", "data.py:batches", "--report", "data.py"],
        f"--report data.py is the --data source data.py, which this run reads. {FIX_READ}",
    ),
    "baseline-onto-the-data-file": (
        ["check", "--arch", "net3.py:Net", "--data", "data.py:batches", "--write-baseline", "data.py", "--force"],
        f"--write-baseline data.py is the --data source data.py, which this run reads. {FIX_READ}",
    ),
    "output-onto-the-arch-file": (
        ["inspect", "--arch", "net3.py:Net", "--data", "data.py:batches", "--output", "net3.py", "--force"],
        f"--output net3.py is the --arch source net3.py, which this run reads. {FIX_READ}",
    ),
    "output-onto-the-data-module-without-force": (
        ["inspect", "--arch", "net3.py:Net", "--data", "data:batches", "--output", "data.py"],
        f"--output data.py already exists. {FIX_EXISTS}",
    ),
    "output-onto-the-arch-module-without-force": (
        ["inspect", "--arch", "net3:Net", "--data", "data.py:batches", "--output", "net3.py"],
        f"--output net3.py already exists. {FIX_EXISTS}",
    ),
}
SURFACE_OF = {"--report": "write:page", "--write-baseline": "write:baseline", "--output": "write:result"}


def _code_case(name: str) -> object:
    argv, _ = CODE_CASES[name]
    option = next(flag for flag in SURFACE_OF if flag in argv)
    return pytest.param(name, marks=pytest.mark.surface(SURFACE_OF[option], "clobber"), id=name)


@pytest.mark.parametrize("case", [_code_case(name) for name in CODE_CASES])
def test_an_output_never_replaces_the_users_code(
    case: str, code_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, line = CODE_CASES[case]
    refused(capsys, argv, code_folder, line)


# Module-form sources are located (without importing) and recorded in the manifest under the path
# the import system finds, which the message gives in full.
MODULE_CASES = {
    "data-module": (["--arch", "net3.py:Net", "--data", "data:batches"], "data.py", "the --data source"),
    "arch-module": (["--arch", "net3:Net", "--data", "data.py:batches"], "net3.py", "the --arch source"),
}


@pytest.mark.surface("write:result", "clobber")
@pytest.mark.parametrize("case", list(MODULE_CASES))
def test_an_output_never_replaces_a_module_the_run_imports_even_with_force(
    case: str, code_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    options, target, role = MODULE_CASES[case]
    argv = ["inspect", *options, "--output", target, "--force"]
    line = f"--output {target} is {role} {code_folder / target}, which this run reads. {FIX_READ}"
    refused(capsys, argv, code_folder, line)


# --- clobber: races ----------------------------------------------------------------------------

RACING_DATA = """
import pathlib
import torch


def batches():
    # Someone else creates the baseline while the check runs.
    pathlib.Path("golden.json").write_text("someone else's")
    for _ in range(2):
        yield torch.randn(8, 3)
"""


@pytest.mark.surface("write:baseline", "clobber")
def test_a_baseline_created_during_the_run_is_not_replaced(
    code_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 25, case 6: the target did not exist at the early check; it does when the run ends."""
    (code_folder / "racing.py").write_text(RACING_DATA)
    argv = ["check", "--arch", "net3.py:Net", "--data", "racing.py:batches", "--write-baseline", "golden.json"]
    with deadline(120):
        result = invoke(capsys, argv)
    assert (result.code, result.err) == (2, f"Error: --write-baseline golden.json already exists. {FIX_EXISTS}\n")
    assert (code_folder / "golden.json").read_text() == "someone else's"
    assert sorted(path.name for path in code_folder.iterdir() if path.name != "__pycache__") == [
        "data.py",
        "golden.json",
        "net3.py",
        "racing.py",
    ]


@pytest.mark.surface("write:baseline", "clobber")
@pytest.mark.surface("write:model", "clobber")
@pytest.mark.parametrize("destination", [Destination.BASELINE, Destination.MODEL])
def test_a_target_created_between_the_commits_checks_and_its_rename_is_not_replaced(
    tmp_path: Path, destination: Destination
) -> None:
    """The commit links a new file into place: a file created after every check still wins."""
    first, racing = tmp_path / "first.md", tmp_path / "golden.json"

    def someone_else(placed: Path) -> None:
        if placed == first:
            racing.write_text("someone else's")

    with run_manifest(), run_outputs(OutputSet(on_placed=someone_else)) as outputs:
        write_output(first, "md", Destination.RESULT, force=False)
        write_output(racing, "ours", destination, force=False)
        with pytest.raises(OutputError) as raised:
            outputs.commit()
    option = destination.option
    assert raised.value.line() == f"{option} {racing} already exists; written before that: {first}. {FIX_EXISTS}"
    assert racing.read_text() == "someone else's" and first.read_text() == "md"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["first.md", "golden.json"]


@pytest.mark.surface("write:page", "clobber")
def test_a_page_created_during_the_commit_is_not_replaced_through_the_cli(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, page = tmp_path / "out.md", tmp_path / "page.html"

    def someone_else(placed: Path) -> None:
        if placed == out:
            page.write_text("someone else's")

    argv = writer_argv("write:result", files, out, "--format", "markdown", "--report", str(page))
    with deadline(120):
        code = run(argv, outputs=OutputSet(on_placed=someone_else))
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"Error: --report {page} already exists; written before that: {out}. {FIX_EXISTS}\n"
    assert page.read_text() == "someone else's" and out.read_text().startswith("#")


# --- clobber: what an interrupt says ------------------------------------------------------------


def interrupt_after(count: int) -> Callable[[Path], None]:
    """An observer of the commit that delivers SIGTERM (as the CLI's handler raises it) after ``count`` outputs."""
    placed: list[Path] = []

    def observe(path: Path) -> None:
        placed.append(path)
        if len(placed) == count:
            raise Interrupted(signal.SIGTERM)

    return observe


@pytest.mark.surface("write:result", "clobber")
@pytest.mark.surface("write:page", "clobber")
@pytest.mark.surface("write:baseline", "clobber")
@pytest.mark.surface("entry:bn-inspect", "clobber")
def test_an_interrupt_during_the_commit_names_exactly_the_outputs_in_place(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 25, case 7: check --output out.md --report page.html --write-baseline golden.json."""
    out, page, golden = tmp_path / "out.md", tmp_path / "page.html", tmp_path / "golden.json"
    argv = [*writer_argv("write:baseline", files, golden), "--format", "markdown", "--output", str(out)]
    argv += ["--report", str(page), "--quiet"]
    with deadline(120):
        code = run(argv, outputs=OutputSet(on_placed=interrupt_after(1)))
    err = capsys.readouterr().err
    # The baseline is staged during the run, the result and the page after it: the commit keeps that order.
    assert (code, err) == (143, f"Error: interrupted; written before the interrupt: {golden}; nothing else.\n")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["golden.json", "images.npy", "model.pt"]


@pytest.mark.surface("write:model", "clobber")
@pytest.mark.surface("write:page", "clobber")
@pytest.mark.parametrize("count", [1, 2])
def test_recalibrates_model_and_page_commit_together_and_an_interrupt_names_them(
    count: int, files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    new, page = tmp_path / "new.pt", tmp_path / "page.html"
    argv = [*writer_argv("write:model", files, new), "--report", str(page)]
    with deadline(120):
        code = run(argv, outputs=OutputSet(on_placed=interrupt_after(count)))
    err = capsys.readouterr().err
    placed = [new, page][:count]
    assert (code, err) == (
        143,
        f"Error: interrupted; written before the interrupt: {', '.join(map(str, placed))}; nothing else.\n",
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        ["images.npy", "model.pt", *(p.name for p in placed)]
    )


INTERRUPTING_DATA = """
import signal
import torch
from bn_inspect.errors import Interrupted


def batches():
    yield torch.randn(8, 3)
    raise Interrupted(signal.SIGTERM)  # what the CLI's handler raises on SIGTERM
"""


@pytest.mark.surface("write:result", "clobber")
@pytest.mark.surface("write:page", "clobber")
@pytest.mark.surface("write:baseline", "clobber")
def test_an_interrupt_during_the_run_writes_nothing_and_says_so(
    code_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (code_folder / "stopping.py").write_text(INTERRUPTING_DATA)
    argv = ["check", "--arch", "net3.py:Net", "--data", "stopping.py:batches", "--write-baseline", "golden.json"]
    argv += ["--output", "out.md", "--report", "page.html"]
    before = file_hashes(code_folder)
    with deadline(120):
        result = invoke(capsys, argv)
    assert (result.code, result.err) == (143, "Error: interrupted; nothing written.\n")
    assert file_hashes(code_folder) == before


@pytest.mark.surface("write:result", "clobber")
def test_a_failed_check_still_commits_its_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.json"
    shifted = np.load(TRAIN)[:64] * 5 + 3
    np.save(tmp_path / "shifted.npy", shifted)
    argv = ["check", str(DIGITS_TS), "--input", str(tmp_path / "shifted.npy"), "--format", "json", "--output", str(out)]
    with deadline(120):
        result = invoke(capsys, argv)
    assert result.code == 1, result.err
    assert '"kind": "check"' in out.read_text()


# --- hang and traceback: targets that are no file to write --------------------------------------


@pytest.mark.parametrize("surface", each_writer("hang"))
def test_a_named_pipe_as_the_target_is_refused_without_blocking(
    surface: str, files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    option = WRITERS[surface][1]
    line = f"{option} {fifo} is a named pipe. Give the path of a regular file, or a new one"
    refused(capsys, writer_argv(surface, files, fifo, "--force"), tmp_path, line)


def _unwritable_line(option: str, target: Path) -> str:
    folder = target.parent.resolve()
    if os.access(folder, os.W_OK):
        # root may write anywhere the mode bits forbid; /proc still refuses it the file.
        return f"cannot write {option} {target}: No such file or directory. Check the folder and free space"
    return f"{option} {target}: folder {folder} is not writable. Choose a writable folder"


@pytest.mark.parametrize("surface", each_writer("traceback"))
@pytest.mark.parametrize("problem", ["missing-folder", "unwritable-folder", "directory"])
def test_a_target_that_cannot_be_written_is_one_line(
    surface: str, problem: str, files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    option = WRITERS[surface][1]
    if problem == "missing-folder":
        target = tmp_path / "missing" / "out"
        line = f"{option} {target}: folder {target.parent} does not exist. Create it or choose another path"
    elif problem == "unwritable-folder":
        target = Path("/proc/self/out")
        line = _unwritable_line(option, target)
    else:
        target = tmp_path / "folder"
        target.mkdir()
        line = f"{option} {target} is a directory. Give a file path"
    refused(capsys, writer_argv(surface, files, target, "--force"), tmp_path, line)


@pytest.mark.surface("write:result", "clobber")
def test_an_output_never_replaces_code_the_run_imported_even_with_force(
    code_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The --arch file is in the manifest; the helper module it imports is read by Python's import
    # system. A name of this test's own, since the modules of one test process outlive a test.
    helper = f"helper_{code_folder.name.replace('-', '_')}"
    (code_folder / f"{helper}.py").write_text(NET)
    (code_folder / "arch_file.py").write_text(f"from {helper} import Net\n")
    argv = ["inspect", "--arch", "arch_file.py:Net", "--data", "data.py:batches", "--output", f"{helper}.py", "--force"]
    line = f"--output {helper}.py is the source of the Python module {helper}, which this run imported. {FIX_READ}"
    refused(capsys, argv, code_folder, line)
