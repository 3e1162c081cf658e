"""Safe with untrusted files, exact under bad input, never changes what it inspects.

* every command leaves the model file byte for byte (and inode for inode) as it was, also when
  the run fails halfway;
* the Python API leaves the in-memory model exactly as it was (buffers, flags, hooks), also when
  its forward raises after a BatchNorm updated its buffers, and for TorchScript;
* every file bn-inspect writes is replaced whole or not at all, even under SIGKILL;
* statistics stay exact for extreme values, low-precision inputs, constant, NaN and Inf channels;
* the malicious-pickle corpus runs nothing under any command.

A new command joins every test here by one line in ``COMMANDS``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import warnings
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import typer.main
from torch import nn

from bn_inspect.analyses.checking import check_model
from bn_inspect.analyses.inspection import find_working_shape, inspect_model
from bn_inspect.errors import BnInspectError, ForwardError
from bn_inspect.model.loading import load_model
from bn_inspect.report.records import LayerReport, Report
from tests.conftest import state_fingerprint
from tests.helpers import REPO, SAMPLES, assert_one_error_line, invoke
from tests.malicious import ATTACKS, CARRIERS, disguise_as_torchscript

# Left out of the quick subset (`-m "not slow"`): every command against interrupted and hostile runs, with subprocesses (about 40 s).
pytestmark = pytest.mark.slow

# The options of inspect that the tests give; a command that lacks one is run without it, and
# skips the tests and scenarios that need it.
SHARED_OPTIONS = frozenset({"--shape", "--input", "--batches", "--mode", "--output"})


@dataclass(frozen=True)
class Command:
    """How to run one bn-inspect command in these tests.

    Attributes:
        formats: its --format values whose report --output writes (json, when there, is the default here).
        ok_codes: exit codes of a run that worked (check exits 1 when a finding fails its gate).
        accepts: which of SHARED_OPTIONS it takes (besides MODEL, --arch and --trust-pickle).
        extra: any other options every run of the command needs.
    """

    formats: tuple[str, ...]
    ok_codes: frozenset[int] = frozenset({0})
    accepts: frozenset[str] = SHARED_OPTIONS
    extra: tuple[str, ...] = ()

    def options(self, fmt: str | None = None) -> list[str]:
        """The extra options, with --format (json unless ``fmt`` is given)."""
        fmt = fmt or ("json" if "json" in self.formats else (self.formats or (None,))[0])
        return [*self.extra, *(["--format", fmt] if fmt else [])]

    def keep(self, options: list[str]) -> list[str]:
        """``options`` (flag and value pairs from SHARED_OPTIONS) without those this command does not take."""
        pairs = zip(options[::2], options[1::2], strict=True)
        return [
            item
            for flag, value in pairs
            if flag not in SHARED_OPTIONS or flag in self.accepts
            for item in (flag, value)
        ]


# Every bn-inspect command. Add a command here, in one line, and every test below runs it.
# (recalibrate, which needs --input data and writes a model to a required --output, is not here yet.)
COMMANDS: dict[str, Command] = {
    "inspect": Command(("table", "json", "csv", "markdown")),
    "check": Command(("table", "json", "markdown", "junit"), frozenset({0, 1})),
    "layers": Command(("table", "json", "markdown"), accepts=frozenset({"--output"})),
    "compare-modes": Command(("table", "json", "markdown"), accepts=SHARED_OPTIONS - {"--mode"}),
}


def commands_taking(*flags: str) -> list[str]:
    return sorted(name for name, command in COMMANDS.items() if set(flags) <= command.accepts)


@dataclass(frozen=True)
class Sample:
    """A shipped sample model: its --arch, a --shape it runs, and one that makes its forward raise."""

    arch: str
    good: str
    bad: str


SAMPLE_MODELS = {
    # bad: digits fails in its last MaxPool after all three BatchNorms ran; the others at or before a layer.
    "digits_cnn": Sample("sample_models.architectures:DigitsCNN", "4,1,8,8", "2,1,3,3"),
    "cancer_mlp": Sample("sample_models.architectures:CancerMLP", "8,30", "8,29"),
    "signal_cnn1d": Sample("sample_models.architectures:SignalCNN1d", "4,1,64", "4,2,64"),
    "volume_cnn3d": Sample("sample_models.architectures:VolumeCNN3d", "2,1,8,8,8", "2,1,8,8"),
}
FILE_KINDS = ("state_dict", "torchscript", "pickle")


def kind_options(sample: Sample, kind: str) -> list[str]:
    """What a model file of this kind needs: the architecture, or trust for a whole pickled model."""
    return {"state_dict": ["--arch", sample.arch], "torchscript": [], "pickle": ["--trust-pickle"]}[kind]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_identity(path: Path) -> tuple[str, int, int, int]:
    """Bytes, inode, size and modification time: a file rewritten with the same bytes still differs."""
    info = path.stat()
    return sha256(path), info.st_ino, info.st_size, info.st_mtime_ns


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def fast_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """Build the Typer app's click command once instead of on every run() (~20 ms each).

    run() still parses every argv and invokes the real command; only the deterministic translation
    of the command signatures into click parameters is reused.
    """
    built: dict[int, Any] = {}
    original = typer.main.get_command

    def cached(app: typer.Typer) -> Any:
        if id(app) not in built:
            built[id(app)] = original(app)
        return built[id(app)]

    monkeypatch.setattr(typer.main, "get_command", cached)


# --- 1. the model file never changes, whatever the command and however the run ends -----------


@dataclass(frozen=True)
class Scenario:
    """One way to run a command against a model file: its options and the exit codes it may end with.

    ``options`` gets the sample, the model path and a scratch folder for outputs; ``codes`` is None
    for the command's own ok codes; a command that does not take ``needs`` skips the scenario.
    """

    options: Callable[[Sample, Path, Path], list[str]]
    codes: frozenset[int] | None = None
    needs: frozenset[str] = frozenset()


def _hardlink(model: Path, scratch: Path) -> Path:
    link = scratch / "hardlink-to-model.json"
    os.link(model, link)
    return link


def _symlink(model: Path, scratch: Path) -> Path:
    link = scratch / "symlink-to-model.json"
    link.symlink_to(model)
    return link


CANNOT_RUN = frozenset({2})
SHAPE, MODE, INPUT, OUTPUT = (frozenset({flag}) for flag in ("--shape", "--mode", "--input", "--output"))
SCENARIOS: dict[str, Scenario] = {
    "eval": Scenario(lambda s, m, o: ["--shape", s.good]),
    "train": Scenario(lambda s, m, o: ["--shape", s.good, "--mode", "train"], needs=MODE),
    "inferred-shape": Scenario(lambda s, m, o: []),
    "forward-raises": Scenario(lambda s, m, o: ["--shape", s.bad], CANNOT_RUN, SHAPE),
    "forward-raises-in-train-mode": Scenario(
        lambda s, m, o: ["--shape", s.bad, "--mode", "train"], CANNOT_RUN, SHAPE | MODE
    ),
    "output-is-the-model": Scenario(lambda s, m, o: ["--shape", s.good, "--output", str(m)], CANNOT_RUN, OUTPUT),
    "output-is-a-symlink-to-the-model": Scenario(
        lambda s, m, o: ["--shape", s.good, "--output", str(_symlink(m, o))], CANNOT_RUN, OUTPUT
    ),
    # A hard link is another name for the model's inode: refused like the model's own path.
    "output-is-a-hardlink-to-the-model": Scenario(
        lambda s, m, o: ["--shape", s.good, "--output", str(_hardlink(m, o))], CANNOT_RUN, OUTPUT
    ),
    "output-folder-missing": Scenario(
        lambda s, m, o: ["--shape", s.good, "--output", str(o / "missing" / "report.json")], CANNOT_RUN, OUTPUT
    ),
    "input-is-the-model": Scenario(lambda s, m, o: ["--input", str(m)], CANNOT_RUN, INPUT),
}


@pytest.mark.parametrize("kind", FILE_KINDS)
@pytest.mark.parametrize("sample_name", sorted(SAMPLE_MODELS))
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_model_file_is_never_changed(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    fast_cli: None,
    command: str,
    sample_name: str,
    kind: str,
) -> None:
    sample = SAMPLE_MODELS[sample_name]
    folder = tmp_path / "models"
    folder.mkdir()
    model = folder / f"{kind}.pt"
    shutil.copy(SAMPLES / sample_name / f"{kind}.pt", model)
    model.chmod(0o644)
    before, files = file_identity(model), listing(folder)
    failures = []
    spec = COMMANDS[command]
    for name, scenario in SCENARIOS.items():
        if not scenario.needs <= spec.accepts:
            continue
        scratch = tmp_path / name
        scratch.mkdir()
        options = spec.keep(scenario.options(sample, model, scratch))
        result = invoke(capsys, [command, str(model), *kind_options(sample, kind), *options, *spec.options()])
        codes = scenario.codes or spec.ok_codes
        if result.code not in codes:
            failures.append(f"{name}: exit {result.code}, expected one of {sorted(codes)}: {result.err[-500:]}")
        if result.code == 2 and len(result.err.splitlines()) != 1:
            failures.append(f"{name}: exit 2 with more than one stderr line: {result.err[-500:]!r}")
        if file_identity(model) != before:
            failures.append(f"{name}: the model file changed")
        if listing(folder) != files:
            failures.append(f"{name}: the model's folder changed: {listing(folder)}")
    assert not failures, "\n".join(failures)


ARCH_SOURCE = """
import os
import shutil

import torch
from torch import nn


class DeletesOutputFolder(nn.Module):
    \"\"\"Removes the folder named by $BN_INSPECT_TEST_DOOMED during its forward: --output fails late.\"\"\"

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        shutil.rmtree(os.environ["BN_INSPECT_TEST_DOOMED"], ignore_errors=True)
        return self.bn(x)
"""


@pytest.fixture
def late_output_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, Path]:
    """An architecture file, its state_dict and an --output whose folder vanishes during the forward."""
    arch_file = tmp_path / "doomed_arch.py"
    arch_file.write_text(ARCH_SOURCE)
    model = tmp_path / "weights.pt"
    bn = nn.BatchNorm1d(4)
    with torch.no_grad():
        bn.running_mean.fill_(0.5)
        bn.running_var.fill_(2.0)
        bn.num_batches_tracked.fill_(10)
    torch.save({f"bn.{k}": v for k, v in bn.state_dict().items()}, model)
    doomed = tmp_path / "reports"
    doomed.mkdir()
    monkeypatch.setenv("BN_INSPECT_TEST_DOOMED", str(doomed))
    return arch_file, model, doomed / "report.json"


@pytest.mark.parametrize("command", commands_taking("--shape", "--output"))
def test_output_folder_vanishing_mid_run_leaves_the_model_alone(
    capsys: pytest.CaptureFixture[str], late_output_failure: tuple[Path, Path, Path], command: str
) -> None:
    arch_file, model, output = late_output_failure
    before = file_identity(model)
    argv = [
        command,
        str(model),
        "--arch",
        f"{arch_file}:DeletesOutputFolder",
        "--shape",
        "8,4",
        "--output",
        str(output),
    ]
    result = invoke(capsys, [*argv, *COMMANDS[command].options()])
    assert result.code != 0
    assert file_identity(model) == before
    assert not output.parent.exists()
    assert sorted(p.name for p in model.parent.iterdir()) == ["doomed_arch.py", "weights.pt"]


@pytest.mark.surface("write:result", "traceback")
@pytest.mark.parametrize("command", commands_taking("--shape", "--output"))
def test_output_folder_vanishing_mid_run_is_one_error_line(
    capsys: pytest.CaptureFixture[str], late_output_failure: tuple[Path, Path, Path], command: str
) -> None:
    arch_file, model, output = late_output_failure
    argv = [
        command,
        str(model),
        "--arch",
        f"{arch_file}:DeletesOutputFolder",
        "--shape",
        "8,4",
        "--output",
        str(output),
    ]
    result = invoke(capsys, [*argv, *COMMANDS[command].options()])
    assert result.code == 2
    assert_one_error_line(result, str(output))


# --- 2. the in-memory model never changes (Python API) -----------------------------------------


def _load_sample(sample_name: str, kind: str) -> nn.Module:
    path = SAMPLES / sample_name / f"{kind}.pt"
    sample = SAMPLE_MODELS[sample_name]
    if kind == "state_dict":
        return load_model(path, arch=sample.arch).module
    return load_model(path, trust_pickle=kind == "pickle").module


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.split(","))


@pytest.mark.parametrize("kind", FILE_KINDS)
@pytest.mark.parametrize("sample_name", sorted(SAMPLE_MODELS))
def test_api_leaves_sample_models_unchanged(sample_name: str, kind: str) -> None:
    model = _load_sample(sample_name, kind)
    sample = SAMPLE_MODELS[sample_name]
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(_shape(sample.good), generator=generator) * 3 + 1 for _ in range(3)]
    before = state_fingerprint(model)
    for mode in ("eval", "train"):
        inspect_model(model, batches, mode=mode)
        assert state_fingerprint(model) == before, f"inspect_model, mode {mode}"
        check_model(model, batches, mode=mode)
        assert state_fingerprint(model) == before, f"check_model, mode {mode}"
        with pytest.raises(BnInspectError):
            inspect_model(model, [batches[0], torch.randn(_shape(sample.bad))], mode=mode)
        assert state_fingerprint(model) == before, f"inspect_model with a failing forward, mode {mode}"
    check_model(model, None)
    assert state_fingerprint(model) == before, "check_model without data"


class BatchNormThenRaises(nn.Module):
    """Runs a BatchNorm (updating its buffers in train mode), then fails on a batch of exactly 3 samples."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn2 = nn.BatchNorm2d(4, momentum=None)  # cumulative average: num_batches_tracked matters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv(self.bn1(x)))
        if y.size(0) == 3:
            raise RuntimeError("deliberate failure after two batch norms")
        return y


def _trained(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator))
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.num_batches_tracked.fill_(42)
    return model


def _scripted(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted: nn.Module = torch.jit.script(model)
    return scripted


FLAG_SETUPS: dict[str, Callable[[nn.Module], None]] = {
    "saved-in-eval": lambda m: m.eval(),
    "saved-in-train": lambda m: m.train(),
    "mixed-flags": lambda m: (m.train(), m.bn2.eval()),
}


@pytest.mark.parametrize("flags", sorted(FLAG_SETUPS))
@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "torchscript"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_forward_raising_after_batch_norms_restores_everything(mode: str, scripted: bool, flags: str) -> None:
    model = _trained(BatchNormThenRaises())
    FLAG_SETUPS[flags](model)
    if scripted:
        model = _scripted(model)
    good, failing = torch.randn(4, 3, 5, 5) * 2 + 3, torch.randn(3, 3, 5, 5) * 2 + 3
    before = state_fingerprint(model)
    flags_before = [m.training for m in model.modules()]
    buffers_before = {k: v.clone() for k, v in model.state_dict().items()}
    # The first batch runs whole (in train mode its BatchNorms update their buffers); the second
    # raises after both BatchNorms ran again.
    with pytest.raises(ForwardError, match="after layer bn2 ran"):
        inspect_model(model, [good, failing], mode=mode)
    assert state_fingerprint(model) == before
    with pytest.raises(ForwardError):
        check_model(model, [good, good, failing], mode=mode)
    assert state_fingerprint(model) == before
    assert [m.training for m in model.modules()] == flags_before
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, buffers_before[name]), name
    # And a run that succeeds, to be sure the failing one did update buffers before restoring them.
    report = inspect_model(model, [good, good], mode=mode)
    assert state_fingerprint(model) == before
    assert [entry.normalizes_with for entry in report.layers] == ["batch" if mode == "train" else "running"] * 2


def test_torchscript_forward_failure_names_its_cause(capsys: pytest.CaptureFixture[str]) -> None:
    model = _scripted(_trained(BatchNormThenRaises()).eval())
    with pytest.raises(ForwardError, match="deliberate failure after two batch norms"):
        inspect_model(model, [torch.randn(3, 3, 5, 5)])
    result = invoke(capsys, ["inspect", str(SAMPLES / "digits_cnn" / "torchscript.pt"), "--shape", "2,1,3,3"])
    assert result.code == 2
    assert_one_error_line(result, "Output size is too small")


def test_train_mode_really_updates_the_buffers_that_are_restored() -> None:
    # Pins the test above: without bn-inspect's protection this forward changes the running statistics.
    model = _trained(BatchNormThenRaises()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad(), pytest.raises(RuntimeError, match="deliberate"):
        model(torch.randn(3, 3, 5, 5) + 5)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "bn1.running_mean" in changed and "bn2.num_batches_tracked" in changed


def test_shape_trials_leave_the_model_unchanged() -> None:
    model = _trained(BatchNormThenRaises()).train()
    model.bn2.eval()
    before = state_fingerprint(model)
    assert find_working_shape(model, [(4, 2, 5, 5), (4, 3, 6, 6)]) == (4, 3, 6, 6)
    assert state_fingerprint(model) == before


class ReassignsItsBuffer(nn.Module):
    """A hand-written running mean (as in many tutorials) that assigns a new tensor in train mode."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("moving_mean", torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.moving_mean = 0.9 * self.moving_mean + 0.1 * x.mean(0)
        return x - self.moving_mean


class WithHandWrittenNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.custom = ReassignsItsBuffer(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.custom(self.bn(x))


def test_train_mode_restores_a_buffer_the_forward_reassigns() -> None:
    model = WithHandWrittenNorm().eval()
    before = state_fingerprint(model)
    inspect_model(model, [torch.randn(8, 4) + 3], mode="train")
    assert state_fingerprint(model) == before


# --- 3. atomic writes -------------------------------------------------------------------------

DIGITS_TS = SAMPLES / "digits_cnn" / "torchscript.pt"
DIGITS_DATA = SAMPLES / "digits_cnn" / "test_images_unscaled.npy"
GARBAGE = "GARBAGE that must not survive\n" * 100_000  # 3 MB, longer than any report


def _validate(fmt: str, text: str) -> None:
    """The report is whole: it parses, or ends as the renderer ends it."""
    assert "GARBAGE" not in text
    if fmt == "json":
        assert json.loads(text)["schema_version"] == 1
    elif fmt == "junit":
        ElementTree.fromstring(text)
    elif fmt == "csv":
        rows = text.splitlines()
        assert len(rows) > 16 and all(row.count(",") == rows[0].count(",") for row in rows[:3])
    else:
        assert "features.1" in text


OUTPUT_CASES = [(command, fmt) for command in commands_taking("--output") for fmt in COMMANDS[command].formats]


@pytest.mark.parametrize(("command", "fmt"), OUTPUT_CASES, ids=[f"{c}-{f}" for c, f in OUTPUT_CASES])
def test_output_replaces_an_existing_file_whole(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, fmt: str
) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / f"report.{fmt}"
    target.write_text(GARBAGE)
    spec = COMMANDS[command]
    base = [command, str(DIGITS_TS), *spec.keep(["--input", str(DIGITS_DATA), "--batches", "2"]), *spec.options(fmt)]
    written = invoke(capsys, [*base, "--output", str(target), "--force"])
    assert written.code in spec.ok_codes, written.err
    assert written.out == ""
    assert listing(out_dir) == [target.name], "a temporary file was left behind"
    text = target.read_text()
    _validate(fmt, text)
    if fmt != "table":  # the table is laid out for the terminal on stdout, for 160 columns in a file
        printed = invoke(capsys, base)
        assert text == printed.out
    # Again over the report just written: same result, still one file.
    again = invoke(capsys, [*base, "--output", str(target), "--force"])
    assert again.code == written.code
    assert target.read_text() == text
    assert listing(out_dir) == [target.name]


def test_refused_output_leaves_the_existing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A run that fails before writing must not touch a report from an earlier run.
    target = tmp_path / "report.json"
    target.write_text("earlier report\n")
    before = file_identity(target)
    for argv in (["--shape", "2,1,3,3"], ["--shape", "2,5,8,8"], ["--input", str(tmp_path / "missing.npy")]):
        result = invoke(capsys, ["inspect", str(DIGITS_TS), *argv, "--format", "json", "--output", str(target)])
        assert result.code == 2, result.err
        assert file_identity(target) == before
    assert listing(tmp_path) == ["report.json"]


@pytest.mark.parametrize("command", commands_taking("--input", "--output"))
def test_output_never_overwrites_the_input_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    data = tmp_path / "images.npy"
    shutil.copy(DIGITS_DATA, data)
    before = file_identity(data)
    for output in (data, tmp_path / "." / data.name):
        result = invoke(
            capsys,
            [command, str(DIGITS_TS), "--input", str(data), "--output", str(output), *COMMANDS[command].options()],
        )
        assert result.code == 2
        assert_one_error_line(result, "--output")
        assert file_identity(data) == before
    assert listing(tmp_path) == ["images.npy"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_output_gets_the_permissions_of_an_ordinary_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    new = tmp_path / "new.json"
    argv = ["inspect", str(DIGITS_TS), "--shape", "2,1,8,8", "--format", "json", "--output"]
    assert invoke(capsys, [*argv, str(new)]).code == 0
    existing = tmp_path / "existing.json"
    existing.write_text("old")
    existing.chmod(0o640)
    assert invoke(capsys, [*argv, str(existing), "--force"]).code == 0
    assert stat.S_IMODE(new.stat().st_mode) == 0o666 & ~_umask()
    assert stat.S_IMODE(existing.stat().st_mode) == 0o640


# A long-lived Python with bn-inspect imported forks one child per run, which the test kills with
# SIGKILL at a random moment. A cold `python -m bn_inspect` spends ~10 s of a 2-core runner
# importing torch before it does anything worth interrupting; the forked child is the same code
# (run(), as __main__ calls it) from the first instruction that matters, in its own process.
KILL_SERVER = r"""
import contextlib
import json
import os
import sys
import time

import torch

torch.set_num_threads(1)  # no OpenMP pool in the parent: forked children stay safe

from bn_inspect.cli.main import run

started = {}


def reply(message):
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


for line in sys.stdin:
    request = json.loads(line)
    if request["op"] == "warm":
        start = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            code = run(request["argv"])
        reply({"code": code, "seconds": time.perf_counter() - start})
    elif request["op"] == "spawn":
        pid = os.fork()
        if pid == 0:
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            try:
                code = run(request["argv"])
            except BaseException:
                code = 99
            os._exit(code)
        started[pid] = time.perf_counter()
        reply({"pid": pid})
    elif request["op"] == "wait":
        _, status = os.waitpid(request["pid"], 0)
        reply({
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            "seconds": time.perf_counter() - started.pop(request["pid"]),
        })
"""

WIDE_ARCH = """
from torch import nn


class Wide(nn.Module):
    \"\"\"8 BatchNorm1d of 1,024 channels: a 1.6 MB JSON report, so that writing it takes a while.\"\"\"

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(*[nn.BatchNorm1d(1024) for _ in range(8)])

    def forward(self, x):
        return self.body(x)
"""


class KillServer:
    def __init__(self, log: Path) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        self._log = log.open("w")
        self._process = subprocess.Popen(
            [sys.executable, "-u", "-c", KILL_SERVER],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )

    def ask(self, **request: Any) -> dict[str, Any]:
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()
        line = self._process.stdout.readline()
        assert line, "the kill server died; see its log"
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self._process.stdin is not None:
                self._process.stdin.close()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._log.close()


@contextlib.contextmanager
def kill_server(log: Path) -> Iterator[KillServer]:
    server = KillServer(log)
    try:
        yield server
    finally:
        server.close()


@dataclass
class KillStats:
    killed_leaving_no_temporary: int = 0  # before the write began (or after the rename)
    killed_during_write: int = 0  # a temporary file was left
    completed: int = 0
    outcomes: list[str] = field(default_factory=list)


def _after_kill(out_dir: Path, target: Path, original: str, temporary: re.Pattern[str], label: str) -> list[str]:
    """Check OUT after a (possibly) killed run: old or whole new report, only temporary files beside it.

    Returns the leftover temporary files, after removing them.
    """
    names = listing(out_dir)
    leftovers = [name for name in names if name != target.name]
    assert all(temporary.match(name) for name in leftovers), f"{label}: stray files {leftovers}"
    assert target.name in names, f"{label}: {target.name} vanished"
    text = target.read_text()
    if text != original:
        try:
            assert json.loads(text)["schema_version"] == 1
        except (json.JSONDecodeError, KeyError, AssertionError) as error:
            pytest.fail(f"{label}: torn report ({error}): {text[:80]!r}...{text[-80:]!r}")
    for name in leftovers:
        (out_dir / name).unlink()
    return leftovers


def _wait_for_temporary(folder: Path, temporary: re.Pattern[str], until: float, running: Callable[[], bool]) -> bool:
    while time.monotonic() < until and running():
        if any(temporary.match(name) for name in os.listdir(folder)):
            return True
        time.sleep(0.0002)
    return False


def test_sigkill_leaves_the_old_report_or_the_new_one_never_a_torn_one(tmp_path: Path) -> None:
    """Runs killed with SIGKILL at random moments: OUT is always whole, the old one or a new one.

    One cold ``python -m bn_inspect`` killed the moment its temporary file appears, and 30 runs
    forked from a warm interpreter (see KILL_SERVER) killed at random moments, a third of them
    as their temporary file appears. A SIGKILL can leave the hidden temporary file
    ``.OUT.<random>.tmp`` beside OUT (nothing runs after SIGKILL to remove it); it never replaces
    OUT. Any other leftover, a missing OUT or a torn one fails the test.
    """
    rng = random.Random(1234)
    (tmp_path / "wide_arch.py").write_text(WIDE_ARCH)
    original = '{"an": "earlier report"}\n'
    argv = [
        "inspect",
        "--arch",
        f"{tmp_path / 'wide_arch.py'}:Wide",
        "--shape",
        "4,1024",
        "--format",
        "json",
        "--force",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.monotonic()

    cold_dir = tmp_path / "cold"
    cold_dir.mkdir()
    cold_target = cold_dir / "report.json"
    cold_target.write_text(original)
    cold_temporary = re.compile(rf"^\.{re.escape(cold_target.name)}\..+\.tmp$")
    cold = subprocess.Popen(
        [sys.executable, "-m", "bn_inspect", *argv, "--output", str(cold_target)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stats = KillStats()
    try:
        with kill_server(tmp_path / "server.log") as server:
            # The cold run imports torch while the server does; kill it when it starts writing.
            seen = _wait_for_temporary(cold_dir, cold_temporary, time.monotonic() + 60, lambda: cold.poll() is None)
            cold.send_signal(signal.SIGKILL)
            cold.wait()
            cold_leftovers = _after_kill(cold_dir, cold_target, original, cold_temporary, "cold run")
            stats.outcomes.append(f"cold: temporary seen {seen}, exit {cold.returncode}, leftovers {cold_leftovers}")

            out_dir = tmp_path / "out"
            out_dir.mkdir()
            target = out_dir / "report.json"
            temporary = re.compile(rf"^\.{re.escape(target.name)}\..+\.tmp$")
            warm = server.ask(op="warm", argv=[*argv, "--output", str(tmp_path / "warm.json")])
            assert warm["code"] == 0, (tmp_path / "server.log").read_text()[-2000:]
            # One uninterrupted child: how long a run takes, and that it writes a whole report.
            target.write_text(original)
            pid = server.ask(op="spawn", argv=[*argv, "--output", str(target)])["pid"]
            done = server.ask(op="wait", pid=pid)
            assert done["code"] == 0, done
            assert json.loads(target.read_text())["schema_version"] == 1
            run_seconds = done["seconds"]
            for attempt in range(30):
                target.write_text(original)
                pid = server.ask(op="spawn", argv=[*argv, "--output", str(target)])["pid"]
                spawned = time.monotonic()
                strategy = ("anytime", "near-the-end", "when-the-temporary-file-appears")[attempt % 3]
                if strategy == "anytime":
                    time.sleep(rng.uniform(0, 1.2 * run_seconds))
                elif strategy == "near-the-end":
                    time.sleep(rng.uniform(0.7, 1.05) * run_seconds)
                else:
                    _wait_for_temporary(out_dir, temporary, spawned + 3 * run_seconds + 1, lambda: True)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                status = server.ask(op="wait", pid=pid)
                label = f"attempt {attempt} ({strategy})"
                is_new = target.read_text() != original
                leftovers = _after_kill(out_dir, target, original, temporary, label)
                if status["signal"] is None:
                    assert status["code"] == 0 and is_new, (label, status)
                    stats.completed += 1
                elif leftovers:
                    stats.killed_during_write += 1
                else:
                    stats.killed_leaving_no_temporary += 1
                stats.outcomes.append(f"{label}: {'new' if is_new else 'old'} report, leftovers {leftovers}")
    finally:
        if cold.poll() is None:
            cold.kill()
            cold.wait()
    print(
        f"SIGKILL test: {stats.killed_leaving_no_temporary} killed leaving no temporary file, "
        f"{stats.killed_during_write} while writing, {stats.completed} completed; one warm run takes "
        f"{run_seconds:.2f} s; {time.monotonic() - start:.0f} s in all; {stats.outcomes[0]}"
    )
    assert stats.killed_leaving_no_temporary + stats.killed_during_write > 0, stats.outcomes


# --- 4. extreme numbers -----------------------------------------------------------------------


def reference(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """float64 mean and biased variance per channel (dim 1), by numpy."""
    values = np.moveaxis(x.double().numpy(), 1, 0).reshape(x.shape[1], -1)
    with np.errstate(invalid="ignore", over="ignore"):
        return values.mean(axis=1), values.var(axis=1)


@contextlib.contextmanager
def inputs_seen_by(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Every input ``module`` receives inside the block, as the layer received it (dtype included)."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        yield seen
    finally:
        handle.remove()


def inspect_layer(model: nn.Module, batches: list[torch.Tensor], **kwargs: Any) -> tuple[LayerReport, torch.Tensor]:
    """inspect_model on a one-BatchNorm model: its report row and the input the layer really got."""
    before = state_fingerprint(model)
    with inputs_seen_by(model.bn) as seen:
        report: Report = inspect_model(model, batches, **kwargs)
    assert state_fingerprint(model) == before
    (entry,) = report.layers
    return entry, torch.cat(seen)


class OneBN(nn.Module):
    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        self.bn = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x)


def one_bn(bn: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    model = OneBN(bn).to(dtype).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.linspace(-1, 1, bn.num_features))
        bn.running_var.copy_(torch.linspace(0.5, 2, bn.num_features))
        bn.num_batches_tracked.fill_(100)
    return model


def data(shape: tuple[int, ...], mean: float, std: float, seed: int = 0) -> torch.Tensor:
    """float64 normal data, a different offset per channel."""
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.randn(shape[1], generator=generator, dtype=torch.float64).view(1, -1, *[1] * (len(shape) - 2))
    return mean + std * (torch.randn(shape, generator=generator, dtype=torch.float64) + 3 * offsets)


def assert_exact(
    entry: LayerReport, seen: torch.Tensor, channels: list[int], *, var_rtol: float, mean_ulps: float = 0.0
) -> None:
    """Mean and variances of ``channels`` match the float64 reference of what the layer saw.

    The mean may be off by 1e-6 of the channel's standard deviation, plus ``mean_ulps`` units in the
    last place of the mean in the input's dtype.
    """
    assert entry.batch_mean is not None and entry.batch_var is not None and entry.batch_var_unbiased is not None
    ref_mean, ref_var = reference(seen)
    n = seen.numel() // seen.shape[1]
    assert entry.values_per_channel == n
    for c in channels:
        assert math.isfinite(entry.batch_mean[c]) and math.isfinite(entry.batch_var[c]), c
        spread = math.sqrt(ref_var[c]) or abs(ref_mean[c]) * 1e-7
        ulp = float(np.spacing(np.abs(ref_mean[c]).astype(torch.empty(0, dtype=seen.dtype).numpy().dtype)))
        tolerance = spread * 1e-6 + mean_ulps * ulp
        assert abs(entry.batch_mean[c] - ref_mean[c]) <= tolerance, (c, entry.batch_mean[c], ref_mean[c])
        assert entry.batch_var[c] == pytest.approx(ref_var[c], rel=var_rtol, abs=1e-300), c
        assert entry.batch_var_unbiased[c] == pytest.approx(ref_var[c] * n / (n - 1), rel=var_rtol, abs=1e-300), c


def test_float64_model_large_mean_tiny_spread() -> None:
    # mean 1e6, std 1e-3: float32 spacing at 1e6 is 0.0625, so only float64 holds this spread.
    model = one_bn(nn.BatchNorm1d(4), torch.float64)
    batches = [data((32, 4, 16), 1e6, 1e-3, seed) for seed in range(3)]
    entry, seen = inspect_layer(model, batches)
    assert seen.dtype == torch.float64
    assert_exact(entry, seen, [0, 1, 2, 3], var_rtol=1e-7)
    _, ref_var = reference(seen)
    assert ref_var.min() > 0.5e-6  # the spread really survived


def test_float32_model_large_mean_small_spread() -> None:
    model = one_bn(nn.BatchNorm2d(3))
    batches = [data((16, 3, 8, 8), 1e4, 1e-2, seed).float() for seed in range(3)]
    entry, seen = inspect_layer(model, batches)
    assert seen.dtype == torch.float32
    assert_exact(entry, seen, [0, 1, 2], var_rtol=3e-5)


@pytest.mark.parametrize(
    ("dtype", "mean", "std"),
    [
        (torch.bfloat16, 3.0, 0.5),
        (torch.bfloat16, 300.0, 2.0),
        (torch.float16, 3.0, 0.5),
        (torch.float16, 1e3, 0.5),
        (torch.float64, 1e4, 1e-2),  # a float64 input is rounded to the float32 model's dtype
    ],
    ids=["bf16", "bf16-large-mean", "fp16", "fp16-large-mean", "fp64-into-fp32"],
)
def test_other_input_dtypes_are_cast_to_the_model_dtype(dtype: torch.dtype, mean: float, std: float) -> None:
    model = one_bn(nn.BatchNorm2d(3))
    batches = [data((8, 3, 9, 9), mean, std, seed).to(dtype) for seed in range(2)]
    entry, seen = inspect_layer(model, batches)
    assert seen.dtype == torch.float32  # what the layer saw: the input cast to the model's dtype
    assert torch.equal(seen, torch.cat(batches).float())
    assert_exact(entry, seen, [0, 1, 2], var_rtol=3e-5)


@pytest.mark.parametrize(
    ("dtype", "value"), [(torch.float32, 10000.5), (torch.float64, 1e6 + 1e-3)], ids=["float32", "float64"]
)
@pytest.mark.parametrize("fallback", [False, True], ids=["shifted-sums", "two-pass-fallback"])
def test_constant_channel_has_exactly_zero_variance(dtype: torch.dtype, value: float, fallback: bool) -> None:
    model = one_bn(nn.BatchNorm2d(3), dtype)
    batches = []
    for seed in range(3):
        x = data((8, 3, 5, 5), 5.0, 1e-3, seed).to(dtype)
        x[:, 0] = value
        if fallback:  # the first value of channel 2 is the shift; a 1e5-sigma outlier defeats it
            x[0, 2, 0, 0] = 1e2
        batches.append(x)
    entry, seen = inspect_layer(model, batches)
    assert entry.batch_mean is not None and entry.batch_var is not None and entry.batch_var_unbiased is not None
    assert entry.batch_mean[0] == float(torch.tensor(value, dtype=dtype))
    assert entry.batch_var[0] == 0.0 and entry.batch_var_unbiased[0] == 0.0
    # The fallback rounds every channel's mean to the input's dtype, which also blurs the merged
    # variance (see the xfail test below).
    assert_exact(entry, seen, [1, 2], var_rtol=1e-3 if fallback else 3e-5, mean_ulps=0.5 if fallback else 0.0)


def test_outlier_in_one_channel_keeps_the_other_means_exact() -> None:
    model = one_bn(nn.BatchNorm2d(3))
    batches = [data((16, 3, 8, 8), 1e4, 1e-2, seed).float() for seed in range(4)]
    for x in batches:
        x[0, 2, 0, 0] = 2e4  # the shift of channel 2: a 1e6-sigma outlier
    entry, seen = inspect_layer(model, batches)
    assert_exact(entry, seen, [0, 1], var_rtol=3e-5)


def test_all_nan_channel_is_nan_and_leaves_the_others_exact() -> None:
    model = one_bn(nn.BatchNorm2d(4))
    batches = []
    for seed in range(3):
        x = data((6, 4, 5, 5), 2.0, 0.5, seed).float()
        x[:, 1] = float("nan")
        batches.append(x)
    batches[1][2, 3, 1, 1] = float("nan")  # one NaN value in channel 3 of the second batch only
    entry, seen = inspect_layer(model, batches)
    assert entry.batch_mean is not None and entry.batch_var is not None
    assert entry.mean_shift_z is not None and entry.var_ratio is not None
    for c in (1, 3):
        assert math.isnan(entry.batch_mean[c]) and math.isnan(entry.batch_var[c]), c
        assert math.isnan(entry.mean_shift_z[c]), c
    assert_exact(entry, seen, [0, 2], var_rtol=3e-5)
    assert all(math.isfinite(entry.mean_shift_z[c]) for c in (0, 2))
    assert "nonfinite-input" in entry.flags


def test_nan_channel_report_round_trips_through_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    x = np.load(SAMPLES / "digits_cnn" / "test_images.npy")[:40].copy()
    x[:, :, 2, 3] = np.nan
    path = tmp_path / "nan.npy"
    np.save(path, x)
    result = invoke(
        capsys,
        ["inspect", str(DIGITS_TS), "--input", str(path), "--batch-size", "16", "--format", "json"],
    )
    assert result.code == 0
    assert "40 input values are NaN or infinite" in result.err
    document = json.loads(result.out)
    assert document["input"]["num_nonfinite_values"] == 40
    assert all("nonfinite-input" in entry["flags"] for entry in document["layers"])


@pytest.mark.parametrize("value", [float("inf"), float("-inf")], ids=["+inf", "-inf"])
@pytest.mark.parametrize("where", [(0, 2, 0, 0), (3, 2, 1, 2)], ids=["first-value", "later-value"])
def test_infinite_value_makes_only_its_channel_nonfinite(value: float, where: tuple[int, ...]) -> None:
    model = one_bn(nn.BatchNorm2d(3))
    batches = [data((6, 3, 5, 5), 1e3, 0.1, seed).float() for seed in range(3)]
    batches[1][where] = value
    entry, seen = inspect_layer(model, batches)
    assert entry.batch_mean is not None and entry.batch_var is not None
    assert not math.isfinite(entry.batch_mean[2]) and not math.isfinite(entry.batch_var[2])
    assert_exact(entry, seen, [0, 1], var_rtol=3e-5)
    assert "nonfinite-input" in entry.flags


def test_infinite_channel_mean_does_not_depend_on_position_or_batch_order() -> None:
    model = one_bn(nn.BatchNorm2d(3))
    clean = [data((6, 3, 5, 5), 1e3, 0.1, seed).float() for seed in range(2)]
    means = {}
    for where in ((0, 2, 0, 0), (3, 2, 1, 2)):
        damaged = clean[0].clone()
        damaged[where] = float("inf")
        for order in ("damaged-first", "damaged-last"):
            batches = [damaged, clean[1]] if order == "damaged-first" else [clean[1], damaged]
            entry, _ = inspect_layer(model, batches)
            assert entry.batch_mean is not None
            means[(where, order)] = entry.batch_mean[2]
    assert all(mean == float("inf") for mean in means.values()), means


def test_huge_but_finite_activations_have_a_finite_variance() -> None:
    model = one_bn(nn.BatchNorm2d(3))
    batches = [data((16, 3, 8, 8), 0.0, 1e18, seed).float() for seed in range(2)]
    assert all(torch.isfinite(x).all() for x in batches)
    entry, seen = inspect_layer(model, batches)
    assert "nonfinite-input" not in entry.flags
    assert_exact(entry, seen, [0, 1, 2], var_rtol=3e-5)


# --- 5. malicious files under every command ---------------------------------------------------

# Every attack in one packing, and every packing with one attack.
MALICIOUS_CASES = sorted(
    {(attack, "torch-zip") for attack in ATTACKS} | {("os.system", carrier) for carrier in CARRIERS}
)


@pytest.mark.surface("read:model", "execution")
@pytest.mark.parametrize(("attack_name", "carrier"), MALICIOUS_CASES, ids=[f"{a}-{c}" for a, c in MALICIOUS_CASES])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_malicious_pickle_runs_nothing_under_any_command(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: str,
    attack_name: str,
    carrier: str,
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))  # lets the import_module payload work, were it run
    monkeypatch.chdir(tmp_path)  # and a payload that imports from the current directory
    attack = ATTACKS[attack_name](tmp_path)
    path = CARRIERS[carrier](attack.payload, tmp_path)
    before = file_identity(path)
    spec = COMMANDS[command]
    argv = [command, str(path), "--arch", SAMPLE_MODELS["digits_cnn"].arch, *spec.keep(["--shape", "2,1,8,8"])]
    result = invoke(capsys, [*argv, *spec.options()])
    assert result.code == 2
    assert_one_error_line(result, f"{path} is a pickle that imports ", attack.global_name, "--trust-pickle")
    assert not attack.ran()
    assert file_identity(path) == before


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_pickle_disguised_as_torchscript_runs_nothing_under_any_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    attack = ATTACKS["builtins.exec"](tmp_path)
    path = disguise_as_torchscript(attack.payload, tmp_path)
    spec = COMMANDS[command]
    result = invoke(capsys, [command, str(path), *spec.keep(["--shape", "2,1,8,8"]), *spec.options()])
    assert result.code == 2
    assert_one_error_line(result, str(path))
    assert not attack.ran()
