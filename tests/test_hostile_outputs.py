"""--output against what is already there, and runs stopped by a signal.

* a named pipe or a device node at --output is refused, never replaced (and never blocks);
* ``--output -`` is stdout;
* --output never names a file the run reads: the model, the --input file, a shard of an --input
  folder, the --arch file, through any symlink or hard link;
* new files follow the umask, recalibrated models included;
* SIGINT or SIGTERM during the forward passes or while the output is written leaves no temporary
  file and ends with exit 130 or 143 and one line on stderr.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bn_inspect.boundary.writing import Destination, output_file
from bn_inspect.cli.main import run
from bn_inspect.errors import OutputError
from bn_inspect.model.loading import load_model
from bn_inspect.model.saving import save_like
from tests.helpers import REPO, SAMPLES, deadline

# Left out of the quick subset (`-m "not slow"`): every writer against hostile destinations (about 20 s).
pytestmark = pytest.mark.slow

DIGITS = SAMPLES / "digits_cnn"
DIGITS_TS = DIGITS / "torchscript.pt"
TRAIN = DIGITS / "train_images.npy"
INTERRUPTED = "Error: interrupted; nothing written."

# Each report command with the options that make it run quickly on the digits sample.
REPORT_COMMANDS = {
    "inspect": ["--input", str(TRAIN), "--batches", "1", "--format", "json"],
    "check": ["--input", str(TRAIN), "--batches", "1", "--format", "json"],
    "layers": ["--format", "json"],
    "compare-modes": ["--input", str(TRAIN), "--batches", "1", "--format", "json"],
}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cli(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    with deadline(120):
        code = run(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def recalibrate_argv(output: Path | str) -> list[str]:
    return ["recalibrate", str(DIGITS_TS), "--input", str(TRAIN), "--batches", "2", "--output", str(output)]


def command_argv(command: str, output: Path | str) -> list[str]:
    if command == "recalibrate":
        return [*recalibrate_argv(output), "--force"]
    return [command, str(DIGITS_TS), *REPORT_COMMANDS[command], "--output", str(output)]


# --- non-regular targets ----------------------------------------------------------------------


@pytest.mark.surface("write:result", "hang")
@pytest.mark.surface("write:model", "hang")
@pytest.mark.parametrize("command", [*REPORT_COMMANDS, "recalibrate"])
def test_named_pipe_output_is_refused_without_blocking(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    fifo = tmp_path / "report.fifo"
    os.mkfifo(fifo)
    code, _, err = cli(capsys, command_argv(command, fifo))
    assert code == 2
    assert err.splitlines() == [
        f"Error: --output {fifo} is a named pipe. Give the path of a regular file, or a new one"
    ]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(os.listdir(tmp_path)) == ["report.fifo"]


@pytest.mark.surface("write:result", "traceback")
@pytest.mark.surface("write:model", "traceback")
@pytest.mark.parametrize("command", [*REPORT_COMMANDS, "recalibrate"])
def test_device_node_output_is_refused(capsys: pytest.CaptureFixture[str], command: str) -> None:
    before = os.stat(os.devnull)
    code, _, err = cli(capsys, command_argv(command, os.devnull))
    assert code == 2
    assert err.splitlines() == [
        f"Error: --output {os.devnull} is a character device. Give the path of a regular file, or a new one"
    ]
    after = os.stat(os.devnull)
    assert stat.S_ISCHR(after.st_mode) and (after.st_ino, after.st_rdev) == (before.st_ino, before.st_rdev)


def test_save_like_refuses_a_named_pipe(tmp_path: Path) -> None:
    fifo = tmp_path / "model.fifo"
    os.mkfifo(fifo)
    loaded = load_model(DIGITS_TS)
    with deadline(60), pytest.raises(OutputError, match=r"model\.fifo is a named pipe"):
        save_like(DIGITS_TS, loaded.format, loaded.module, fifo, force=True)
    assert sorted(os.listdir(tmp_path)) == ["model.fifo"]


# --- stdout ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", list(REPORT_COMMANDS))
def test_output_dash_is_stdout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, command_argv(command, "-"))
    assert code in (0, 1), err
    assert json.loads(out)["schema_version"] == 1
    assert os.listdir(tmp_path) == []


def test_recalibrate_refuses_output_dash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, recalibrate_argv("-"))
    assert code == 2
    assert err.splitlines() == [
        "Error: --output - would write the model's bytes to stdout, where the report goes. Give a file path"
    ]
    assert out == "" and os.listdir(tmp_path) == []


# --- files the run reads ----------------------------------------------------------------------


def _inputs(tmp_path: Path) -> dict[str, Path]:
    """A copy of everything a run can read: model, data file, a folder of shards, an --arch file."""
    files = {"model": tmp_path / "model.pt", "data": tmp_path / "images.npy", "arch": tmp_path / "nets.py"}
    shutil.copy(DIGITS / "state_dict.pt", files["model"])
    shutil.copy(TRAIN, files["data"])
    shutil.copy(SAMPLES / "architectures.py", files["arch"])
    shards = tmp_path / "shards"
    shards.mkdir()
    images = np.load(TRAIN)
    np.save(shards / "a.npy", images[:100])
    np.save(shards / "b.npy", images[100:200])
    files["shard"] = shards / "b.npy"
    return files


# (which input --output names, how it names it, which --input the run gets, the role in the error)
PROTECTED_CASES = {
    "model": ("model", "path", "data", "the model file"),
    "model-symlink": ("model", "symlink", "data", "the model file"),
    "model-hardlink": ("model", "hardlink", "data", "the model file"),
    "input-file": ("data", "path", "data", "the --input file"),
    "input-file-symlink": ("data", "symlink", "data", "the --input file"),
    "input-file-hardlink": ("data", "hardlink", "data", "the --input file"),
    "shard-of-input-folder": ("shard", "path", "shards", "a shard of the --input folder"),
    "shard-hardlink": ("shard", "hardlink", "shards", "a shard of the --input folder"),
    "arch-file": ("arch", "path", "data", "the --arch source"),
    "arch-file-symlink": ("arch", "symlink", "data", "the --arch source"),
}


def _spelling(target: Path, how: str, folder: Path) -> Path:
    if how == "path":
        return folder / "." / target.relative_to(folder)
    alias = folder / f"alias-{how}"
    if how == "symlink":
        alias.symlink_to(target)
    else:
        os.link(target, alias)
    return alias


@pytest.mark.surface("write:result", "clobber")
@pytest.mark.surface("write:model", "clobber")
@pytest.mark.parametrize("command", ["inspect", "check", "compare-modes", "recalibrate"])
@pytest.mark.parametrize("case", list(PROTECTED_CASES))
def test_output_never_replaces_a_file_the_run_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, command: str
) -> None:
    files = _inputs(tmp_path)
    named, how, data, role = PROTECTED_CASES[case]
    output = _spelling(files[named], how, tmp_path)
    before = {path: digest(path) for path in tmp_path.rglob("*") if path.is_file()}
    data_path = files["data"] if data == "data" else files["shard"].parent
    argv = [command, str(files["model"]), "--arch", f"{files['arch']}:DigitsCNN", "--input", str(data_path)]
    argv += ["--force"] if command == "recalibrate" else ["--batches", "1"]
    code, _, err = cli(capsys, [*argv, "--output", str(output)])
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: --output {output} is {role} "), err
    assert lines[0].endswith(", which this run reads. Choose another path for the output")
    assert {path: digest(path) for path in tmp_path.rglob("*") if path.is_file()} == before


def test_layers_output_never_replaces_the_model_through_a_hard_link(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "model.pt"
    shutil.copy(DIGITS_TS, model)
    link = tmp_path / "report.json"
    os.link(model, link)
    before = digest(model)
    code, _, err = cli(capsys, ["layers", str(model), "--output", str(link)])
    assert code == 2
    assert err.startswith(f"Error: --output {link} is the model file {model}, which this run reads")
    assert digest(model) == before and link.stat().st_ino == model.stat().st_ino


# --- the one writer ---------------------------------------------------------------------------


@pytest.mark.parametrize("raised", [ValueError("boom"), KeyboardInterrupt()])
def test_output_file_leaves_nothing_when_the_block_fails(tmp_path: Path, raised: BaseException) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(type(raised)), output_file(target, Destination.RESULT, force=True) as stream:
        stream.write(b"new")
        raise raised
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_output_file_turns_an_interrupt_inside_torch_save_back_into_one(tmp_path: Path) -> None:
    # torch's zip writer reports an exception from its write callback as a RuntimeError.
    class InterruptedStream(io.RawIOBase):
        def __init__(self, stream: io.BufferedWriter) -> None:
            self.stream, self.calls = stream, 0

        def writable(self) -> bool:
            return True

        def write(self, data: object) -> int:
            self.calls += 1
            if self.calls == 2:
                raise KeyboardInterrupt
            return self.stream.write(data)  # type: ignore[arg-type]

    target = tmp_path / "model.pt"
    with pytest.raises(KeyboardInterrupt), output_file(target, Destination.MODEL, force=False) as stream:
        torch.save({"x": torch.ones(3)}, InterruptedStream(stream))  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == []


# --- the umask ----------------------------------------------------------------------------------

UMASK_SCRIPT = """
import os, sys
os.umask(0o027)
from bn_inspect.cli.main import run
model, data, folder = sys.argv[1:]
assert run(["recalibrate", model, "--input", data, "--batches", "2", "--output", folder + "/new.pt"]) == 0
assert run(["layers", model, "--output", folder + "/layers.txt"]) == 0
"""


def test_new_files_follow_the_umask(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-c", UMASK_SCRIPT, str(DIGITS_TS), str(TRAIN), str(tmp_path)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert stat.S_IMODE((tmp_path / "new.pt").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "layers.txt").stat().st_mode) == 0o640


# --- signals --------------------------------------------------------------------------------------

# Each patch holds the run at one moment, in a real `python -m bn_inspect` process, and touches
# $BN_TEST_READY when it gets there; the test then sends the signal.
AT_FORWARD_PASSES = """
import bn_inspect.analyses.recalibration as recalibration
original = recalibration.recalibrate

class SlowBatches:
    def __init__(self, batches):
        self.batches = batches
    def __iter__(self):
        for batch in self.batches:
            open(os.environ["BN_TEST_READY"], "w").close()
            time.sleep(0.5)
            yield batch

recalibration.recalibrate = lambda module, batches, **options: original(module, SlowBatches(batches), **options)
"""
AT_FSYNC = """
original = os.fsync
def fsync(descriptor):
    open(os.environ["BN_TEST_READY"], "w").close()
    time.sleep(120)
    original(descriptor)
os.fsync = fsync
"""
IN_TORCH_ZIP_WRITER = """
import torch
original = torch.save

class SlowStream:
    def __init__(self, stream):
        self.stream, self.is_first = stream, True
    def write(self, data):
        # Only the first write waits: the zip writer still writes its end record when it unwinds.
        if self.is_first:
            self.is_first = False
            open(os.environ["BN_TEST_READY"], "w").close()
            time.sleep(120)
        return self.stream.write(data)
    def flush(self):
        self.stream.flush()

torch.save = lambda document, stream, *args, **kwargs: original(document, SlowStream(stream), *args, **kwargs)
"""
LAUNCH = """
import os, runpy, time
{patch}
runpy.run_module("bn_inspect", run_name="__main__", alter_sys=True)
"""

SIGNAL_CASES = {
    "SIGINT-during-forward-passes": (AT_FORWARD_PASSES, signal.SIGINT, "torchscript"),
    "SIGTERM-during-forward-passes": (AT_FORWARD_PASSES, signal.SIGTERM, "torchscript"),
    "SIGTERM-while-writing": (AT_FSYNC, signal.SIGTERM, "torchscript"),
    "SIGINT-while-writing": (AT_FSYNC, signal.SIGINT, "torchscript"),
    "SIGINT-inside-torch-zip-writer": (IN_TORCH_ZIP_WRITER, signal.SIGINT, "state_dict"),
}


def _wait_for(path: Path, process: subprocess.Popen[bytes], seconds: float) -> None:
    until = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, f"exited {process.returncode} before the moment: {process.communicate()}"
        assert time.monotonic() < until, "the run never reached the moment"
        time.sleep(0.02)


@pytest.mark.surface("entry:bn-inspect", "traceback")
@pytest.mark.parametrize("case", list(SIGNAL_CASES))
def test_signal_leaves_no_temporary_file_and_one_line(tmp_path: Path, case: str) -> None:
    patch, signal_number, model_kind = SIGNAL_CASES[case]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    ready = tmp_path / "ready"
    model_options: list[str] = [str(DIGITS / f"{model_kind}.pt")]
    if model_kind == "state_dict":
        model_options += ["--arch", "sample_models.architectures:DigitsCNN"]
    argv = [*model_options, "--input", str(TRAIN), "--batch-size", "256", "--output", str(out_dir / "new.pt")]
    process = subprocess.Popen(
        [sys.executable, "-c", LAUNCH.format(patch=patch), "recalibrate", *argv],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "BN_TEST_READY": str(ready)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for(ready, process, 240)
        process.send_signal(signal_number)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 128 + signal_number, err
    assert err.decode().splitlines() == [INTERRUPTED]
    assert out == b""
    assert os.listdir(out_dir) == []


def test_keyboard_interrupt_through_run_ends_in_the_interrupted_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A program that calls run() keeps its own SIGINT handling: the KeyboardInterrupt, which typer
    # turns into a silent exit 130, still ends in the one error line.
    def interrupted_load(*_args: object, **_kwargs: object) -> object:
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "load", interrupted_load)
    code, out, err = cli(capsys, ["inspect", str(DIGITS_TS), "--input", str(TRAIN)])
    assert (code, out) == (130, "")
    assert err.splitlines() == [INTERRUPTED]
