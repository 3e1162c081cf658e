"""Hostile files for every reader: each is opened once through the boundary's opener, judged by its
descriptor (a regular file, within its budget) and recorded in the run's manifest (#25).

Pipes and devices end in one line without blocking (given directly, or swapped in after a scan),
files over a reader's budget are refused before a byte is read, malformed contents are one line,
and no code runs that the user did not name.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bn_inspect.boundary.reading import Source, identity_of, run_manifest
from bn_inspect.boundary.writing import Destination, check_output_target
from bn_inspect.cli.main import run as run_cli
from bn_inspect.data.images import MAX_FOLDER_DEPTH, find_images
from bn_inspect.data.inputs import DirectoryData, open_input
from bn_inspect.errors import InputError, ModelFileError, OutputError
from bn_inspect.model.files import file_kind, open_model_file
from bn_inspect.report.diff import diff_reports
from bn_inspect.report.reading import REPORT_BUDGET, load_report, report_from_dict
from bn_inspect.report.records import Report
from bn_inspect.text import Untrusted
from tests.helpers import DIGITS, GOLDEN, Result, assert_one_error_line, deadline, invoke
from tests.hostile import canary_code, file_hashes, run_bounded

MODEL = DIGITS / "torchscript.pt"
IMAGES = DIGITS / "test_images.npy"
# A valid inspect report of the digits model (schema version 1).
REPORT = GOLDEN / "reports" / "digits_older.json"
RUN = ["inspect", str(MODEL), "--input", str(IMAGES)]
HANG_S = 20


def _cli(capsys: pytest.CaptureFixture[str], argv: list[str | Path]) -> Result:
    """The CLI in this process, killed by the deadline if it blocks."""
    with deadline(HANG_S):
        return invoke(capsys, argv)


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _device(path: Path) -> Path:
    path.symlink_to("/dev/zero")
    return path


def _sparse(path: Path, size: int, head: bytes = b"") -> Path:
    """A file of ``size`` bytes that takes no disk: ``head``, then a hole."""
    with path.open("wb") as stream:
        stream.write(head)
        stream.truncate(size)
    return path


def _document() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(REPORT.read_text())
    return document


# --- read:model --------------------------------------------------------------------------------


@pytest.mark.surface("read:model", "hang")
@pytest.mark.parametrize(("make", "kind"), [(_fifo, "a named pipe"), (_device, "a character device")])
def test_a_model_that_is_a_pipe_or_device_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Any, kind: str
) -> None:
    model = make(tmp_path / "model.pt")
    result = _cli(capsys, ["inspect", model, "--input", IMAGES])
    assert result.code == 2
    assert_one_error_line(result, f"model file {model} is {kind}, not a regular file")


@pytest.mark.surface("read:model", "hang")
def test_the_model_swapped_for_a_pipe_after_it_was_opened_is_still_the_file_read(tmp_path: Path) -> None:
    from bn_inspect.model.loading import read_model_file

    model = tmp_path / "model.pt"
    model.write_bytes(MODEL.read_bytes())
    with deadline(HANG_S), open_model_file(model) as opened:
        model.unlink()
        _fifo(model)
        assert file_kind(opened).value == "torchscript"
    with deadline(HANG_S), pytest.raises(ModelFileError, match="is a named pipe"):
        read_model_file(model)


@pytest.mark.surface("read:model", "memory")
def test_a_zip_bomb_model_is_refused_before_anything_is_inflated(tmp_path: Path) -> None:
    import zipfile

    bomb = tmp_path / "model.pt"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\0" * (200 * 2**20))
    result = run_bounded(["inspect", bomb, "--input", IMAGES], tmp_path)
    assert result.code == 2
    assert_one_error_line(result, "whose compressed entries declare 209715200 bytes", "(a zip bomb?)")


@pytest.mark.surface("read:model", "traceback")
def test_a_model_of_random_bytes_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model.pt"
    model.write_bytes(os.urandom(4096).replace(b"PK", b"pk").replace(b"\x80", b"\x00"))
    result = _cli(capsys, ["inspect", model, "--input", IMAGES])
    assert result.code == 2
    assert_one_error_line(result, f"{model} is not a PyTorch or ONNX model file")


class _Payload:
    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (self.code,))


@pytest.mark.surface("read:model", "execution")
@pytest.mark.surface("read:input-file", "execution")
@pytest.mark.parametrize("flag", ["model", "--input"])
def test_a_pickle_never_runs_its_code(tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str) -> None:
    import torch

    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"x": _Payload(canary_code(marker))}, evil)
    argv: list[str | Path] = (
        ["inspect", evil, "--input", IMAGES] if flag == "model" else ["inspect", MODEL, "--input", evil]
    )
    result = _cli(capsys, argv)
    assert result.code == 2 and not marker.exists()
    assert_one_error_line(result, "builtins.exec" if flag == "model" else "needs code to unpickle")


# --- read:input-file ---------------------------------------------------------------------------


@pytest.mark.surface("read:input-file", "hang")
@pytest.mark.parametrize(
    ("name", "make", "kind"),
    [("x.npy", _fifo, "a named pipe"), ("x.pt", _device, "a character device"), ("x.csv", _fifo, "a named pipe")],
)
def test_an_input_that_is_a_pipe_or_device_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, make: Any, kind: str
) -> None:
    data = make(tmp_path / name)
    result = _cli(capsys, ["inspect", MODEL, "--input", data])
    assert result.code == 2
    assert_one_error_line(result, f"input file {data} is {kind}, not a regular file")


@pytest.mark.surface("read:input-file", "memory")
def test_a_table_over_its_budget_is_refused_before_it_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = _sparse(tmp_path / "big.csv", 2**30 + 1, b"a,b\n1,2\n")
    result = _cli(capsys, ["inspect", MODEL, "--input", table])
    assert result.code == 2
    assert_one_error_line(result, f"input file {table} is 1,073,741,825 bytes, over the 1,073,741,824-byte budget")


@pytest.mark.surface("read:input-file", "traceback")
@pytest.mark.parametrize("name", ["x.pt", "x.npy", "x.npz", "x.parquet"])
def test_an_input_of_random_bytes_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    data = tmp_path / name
    data.write_bytes(os.urandom(2048))
    result = _cli(capsys, ["inspect", MODEL, "--input", data])
    assert result.code == 2
    assert_one_error_line(result, str(data))


# --- read:input-shard --------------------------------------------------------------------------


def _shards(folder: Path) -> Path:
    folder.mkdir()
    for name in ("a.npy", "b.npy"):
        np.save(folder / name, np.load(IMAGES)[:8])
    return folder


@pytest.mark.surface("read:input-shard", "hang")
@pytest.mark.parametrize(("make", "kind"), [(_fifo, "a named pipe"), (_device, "a character device")])
def test_a_shard_that_is_a_pipe_or_device_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Any, kind: str
) -> None:
    folder = _shards(tmp_path / "shards")
    (folder / "b.npy").unlink()
    make(folder / "b.npy")
    result = _cli(capsys, ["inspect", MODEL, "--input", folder])
    assert result.code == 2
    assert_one_error_line(result, f"input shard {folder / 'b.npy'} is {kind}, not a regular file")


@pytest.mark.surface("read:input-shard", "hang")
def test_a_shard_swapped_for_a_pipe_after_the_scan_is_one_error(tmp_path: Path) -> None:
    folder = _shards(tmp_path / "shards")
    data = open_input(folder)
    assert isinstance(data, DirectoryData)
    (folder / "b.npy").unlink()
    _fifo(folder / "b.npy")
    with deadline(HANG_S), pytest.raises(InputError, match=r"input shard .*b\.npy is a named pipe"):
        list(data.batches(4, None))


@pytest.mark.surface("read:input-shard", "memory")
def test_a_shard_whose_header_asks_for_terabytes_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _shards(tmp_path / "shards")
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000, 1, 8, 8), }".ljust(117) + "\n"
    (folder / "b.npy").write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode())
    result = _cli(capsys, ["inspect", MODEL, "--input", folder])
    assert result.code == 2
    assert_one_error_line(result, "b.npy as a .npy array: its header declares shape (1000000000000, 1, 8, 8)")


@pytest.mark.surface("read:input-shard", "traceback")
def test_a_shard_of_random_bytes_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _shards(tmp_path / "shards")
    (folder / "b.pt").write_bytes(os.urandom(2048))
    result = _cli(capsys, ["inspect", MODEL, "--input", folder])
    assert result.code == 2
    assert_one_error_line(result, str(folder / "b.pt"))


def test_every_shard_is_in_the_runs_manifest(tmp_path: Path) -> None:
    folder = _shards(tmp_path / "shards")
    with run_manifest() as manifest:
        open_input(folder)
        for name in ("a.npy", "b.npy"):
            entry = manifest.entry_for(identity_of(folder / name) or (0, 0))
            assert entry is not None and entry.source is Source.INPUT_SHARD


# --- read:arch-code and read:data-code ---------------------------------------------------------


def _package(root: Path, marker: Path) -> str:
    """A package whose __init__ leaves ``marker`` when imported; returns its (unique) name."""
    name = f"hostile_{uuid.uuid4().hex[:12]}"
    (root / name).mkdir()
    (root / name / "__init__.py").write_text(canary_code(marker))
    return name


@pytest.mark.surface("read:arch-code", "execution")
def test_a_module_is_located_without_importing_its_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bn_inspect.model.arch import locate_module

    marker = tmp_path / "ran"
    package = _package(tmp_path, marker)
    module = tmp_path / package / "net.py"
    module.write_text("class Net:\n    pass\n")
    monkeypatch.chdir(tmp_path)
    with run_manifest() as manifest:
        assert locate_module(f"{package}.net", "--arch") == module.resolve()
        entry = manifest.entry_for(identity_of(module) or (0, 0))
        assert entry is not None and entry.source is Source.ARCH_CODE
    assert not marker.exists() and package not in sys.modules


@pytest.mark.surface("read:arch-code", "execution")
def test_a_module_inside_namespace_packages_is_located_and_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Folders without __init__.py, two deep (benchmarks/faults/nets.py): the path finder alone raised
    # KeyError for the inner one, whose parent was never imported, and the CLI ended in a traceback.
    from bn_inspect.model.arch import locate_module

    top = f"ns_{uuid.uuid4().hex[:12]}"
    module = tmp_path / top / "inner" / "net.py"
    module.parent.mkdir(parents=True)
    module.write_text("import torch\ndef build():\n    return torch.nn.BatchNorm1d(3)\n")
    monkeypatch.chdir(tmp_path)
    try:
        with run_manifest() as manifest:
            assert locate_module(f"{top}.inner.net", "--arch") == module.resolve()
            entry = manifest.entry_for(identity_of(module) or (0, 0))
            assert entry is not None and entry.source is Source.ARCH_CODE
        assert top not in sys.modules
        assert run_cli(["inspect", "--arch", f"{top}.inner.net:build", "--shape", "2,3", "-q"]) == 0
    finally:
        for name in [n for n in sys.modules if n == top or n.startswith(f"{top}.")]:
            sys.modules.pop(name)
    capsys.readouterr()


@pytest.mark.surface("read:arch-code", "execution")
def test_an_unused_arch_is_recorded_and_not_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bn_inspect.model.loading import load_model

    marker = tmp_path / "ran"
    package = _package(tmp_path, marker)
    module = tmp_path / package / "net.py"
    module.write_text(canary_code(marker))
    monkeypatch.chdir(tmp_path)
    with run_manifest() as manifest:
        # A TorchScript file holds its architecture: --arch is not run, but no output may replace it.
        assert load_model(MODEL, arch=f"{package}.net:Net").format == "torchscript"
        entry = manifest.entry_for(identity_of(module) or (0, 0))
        assert entry is not None and entry.source is Source.ARCH_CODE
    assert not marker.exists() and package not in sys.modules


@pytest.mark.surface("read:arch-code", "hang")
@pytest.mark.surface("read:data-code", "hang")
@pytest.mark.parametrize("flag", ["--arch", "--data"])
def test_a_module_that_is_a_pipe_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, flag: str
) -> None:
    package = f"hostile_{uuid.uuid4().hex[:12]}"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    _fifo(tmp_path / package / "net.py")
    monkeypatch.chdir(tmp_path)
    argv: list[str | Path] = (
        ["inspect", DIGITS / "state_dict.pt", "--input", IMAGES, "--arch", f"{package}.net:Net"]
        if flag == "--arch"
        else ["inspect", MODEL, "--data", f"{package}.net:batches"]
    )
    result = _cli(capsys, argv)
    sys.modules.pop(package, None)
    assert result.code == 2
    assert_one_error_line(result, f"{flag} '{package}.net:", f"module '{package}.net' cannot be imported")


@pytest.mark.surface("read:arch-code", "hang")
@pytest.mark.surface("read:data-code", "hang")
@pytest.mark.parametrize("flag", ["--arch", "--data"])
@pytest.mark.parametrize(("make", "kind"), [(_fifo, "a named pipe"), (_device, "a character device")])
def test_a_code_file_that_is_a_pipe_or_device_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, make: Any, kind: str
) -> None:
    code = make(tmp_path / "code.py")
    spec = f"{code}:Net"
    # A state_dict needs --arch, and reads it.
    argv: list[str | Path] = (
        ["inspect", DIGITS / "state_dict.pt", "--input", IMAGES] if flag == "--arch" else ["inspect", MODEL]
    )
    result = _cli(capsys, [*argv, flag, spec])
    assert result.code == 2
    assert_one_error_line(result, f"{flag} {spec!r}: file {code} is {kind}, not a regular file")


@pytest.mark.surface("read:data-code", "memory")
@pytest.mark.surface("read:arch-code", "traceback")
def test_a_code_file_over_its_budget_is_refused_before_it_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _sparse(tmp_path / "data.py", 16 * 2**20 + 1, b"def batches():\n    return []\n#")
    result = _cli(capsys, ["inspect", MODEL, "--data", f"{code}:batches"])
    assert result.code == 2
    assert_one_error_line(result, f"file {code} is 16,777,217 bytes, over the 16,777,216-byte budget")


@pytest.mark.surface("read:arch-code", "traceback")
@pytest.mark.surface("read:data-code", "traceback")
@pytest.mark.parametrize("flag", ["--arch", "--data"])
def test_code_that_does_not_compile_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str) -> None:
    code = tmp_path / "code.py"
    code.write_bytes(b"def broken(:\n\x00")
    argv: list[str | Path] = (
        ["inspect", DIGITS / "state_dict.pt", "--input", IMAGES] if flag == "--arch" else ["inspect", MODEL]
    )
    result = _cli(capsys, [*argv, flag, f"{code}:Net"])
    assert result.code == 2
    assert_one_error_line(result, f"importing {code} raised")


def test_the_code_sources_are_in_the_runs_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bn_inspect.model.arch import resolve_callable

    package = _package(tmp_path, tmp_path / "imported")
    (tmp_path / package / "net.py").write_text("def batches():\n    return []\n")
    (tmp_path / "data.py").write_text("def batches():\n    return []\n")
    monkeypatch.chdir(tmp_path)
    with run_manifest() as manifest:
        resolve_callable(f"{package}.net:batches", "--data")
        resolve_callable(f"{tmp_path / 'data.py'}:batches", "--data")
        for path in (tmp_path / package / "net.py", tmp_path / "data.py"):
            entry = manifest.entry_for(identity_of(path) or (0, 0))
            assert entry is not None and entry.source is Source.DATA_CODE
    sys.modules.pop(f"{package}.net", None)
    sys.modules.pop(package, None)


# --- read:baseline and read:diff-side ----------------------------------------------------------


@pytest.mark.surface("read:baseline", "hang")
@pytest.mark.parametrize(("make", "kind"), [(_fifo, "a named pipe"), (_device, "a character device")])
def test_a_baseline_that_is_a_pipe_or_device_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Any, kind: str
) -> None:
    baseline = make(tmp_path / "golden.json")
    result = _cli(capsys, ["check", MODEL, "--input", IMAGES, "--baseline", baseline])
    assert result.code == 2
    assert_one_error_line(result, f"report {baseline} is {kind}, not a regular file")


@pytest.mark.surface("read:diff-side", "hang")
@pytest.mark.parametrize("side", ["OLD", "NEW"])
@pytest.mark.parametrize(("make", "kind"), [(_fifo, "a named pipe"), (_device, "a character device")])
def test_a_diff_side_that_is_a_pipe_or_device_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], side: str, make: Any, kind: str
) -> None:
    hostile = make(tmp_path / "side.json")
    sides = [hostile, REPORT] if side == "OLD" else [REPORT, hostile]
    result = _cli(capsys, ["diff", *sides])
    assert result.code == 2
    assert_one_error_line(result, f"{side} file {hostile} is {kind}, not a regular file")


@pytest.mark.surface("read:diff-side", "traceback")
def test_a_report_with_leading_blanks_is_a_report_to_diff(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blank = tmp_path / "blank.json"
    blank.write_text("\n" * 200 + " \t" * 50 + REPORT.read_text())
    result = _cli(capsys, ["diff", blank, REPORT, "--format", "json"])
    assert result.code == 0, result.err
    assert json.loads(result.out)["kind"] == "diff"


@pytest.mark.surface("read:diff-side", "memory")
@pytest.mark.surface("read:baseline", "memory")
@pytest.mark.parametrize("command", ["diff", "check"])
def test_a_report_over_its_budget_is_refused_before_it_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    big = _sparse(tmp_path / "big.json", 120 * 10**6, b'{"schema_version": 1, "layers": [')
    argv: list[str | Path] = (
        ["diff", big, REPORT] if command == "diff" else ["check", MODEL, "--input", IMAGES, "--baseline", big]
    )
    result = _cli(capsys, argv)
    assert result.code == 2
    assert_one_error_line(result, f"report {big} is 120,000,000 bytes, over the {REPORT_BUDGET:,}-byte budget")


def _long_integer(document: dict[str, Any]) -> str:
    return json.dumps(document).replace('"num_samples": 450', '"num_samples": ' + "7" * 5001)


def _long_integer_as_float(document: dict[str, Any]) -> str:
    text = json.dumps(document)
    eps = json.dumps(document["layers"][0]["eps"])
    return text.replace(f'"eps": {eps}', '"eps": ' + "9" * 400, 1)


def _short_list(document: dict[str, Any]) -> str:
    document["layers"][1]["running_var"] = document["layers"][1]["running_var"][:15]
    return json.dumps(document)


def _wrong_type(document: dict[str, Any]) -> str:
    document["layers"][0]["num_channels"] = "sixteen"
    return json.dumps(document)


def _huge_float(document: dict[str, Any]) -> str:
    return json.dumps(document).replace('"eps": ', '"eps": 1e999, "was": ', 1)


@pytest.mark.surface("read:diff-side", "traceback")
@pytest.mark.surface("read:baseline", "traceback")
@pytest.mark.parametrize("command", ["diff", "check"])
@pytest.mark.parametrize(
    ("spoil", "fragment"),
    [
        (_long_integer, "holds an integer of 5,001 digits (777777777777...), larger than any report holds"),
        (_long_integer_as_float, "holds an integer of 400 digits"),
        (_short_list, "field layers[1].running_var holds 15 values, and layers[1].num_channels is 32"),
        (_wrong_type, "field layers[0].num_channels should be an integer, not 'sixteen'"),
        (_huge_float, 'field layers[0].eps should be a finite number (or "nan", "inf", "-inf"), not inf'),
    ],
    ids=["5001-digit-int", "400-digit-float", "short-list", "wrong-type", "huge-float"],
)
def test_a_report_that_breaks_its_schema_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, spoil: Any, fragment: str
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(spoil(_document()))
    argv: list[str | Path] = (
        ["diff", REPORT, bad] if command == "diff" else ["check", MODEL, "--input", IMAGES, "--baseline", bad]
    )
    result = _cli(capsys, argv)
    assert result.code == 2
    assert_one_error_line(result, fragment)


class _CountedName(Untrusted):
    """A layer name that counts how often it is compared: the work of matching, without a clock."""

    comparisons = 0

    def __eq__(self, other: object) -> bool:
        _CountedName.comparisons += 1
        return super().__eq__(other)

    __hash__ = Untrusted.__hash__


def _renamed_layers(count: int, prefix: str) -> Report:
    report = load_report(REPORT)
    return replace(
        report,
        layers=tuple(
            # Distinct objects for equal class names: every comparison of two layers' shapes is counted.
            replace(layer, name=_CountedName(f"{prefix}{i}"), type=_CountedName(layer.type.raw))
            for i, layer in enumerate([report.layers[0]] * count)
        ),
    )


@pytest.mark.surface("read:diff-side", "hang")
def test_ten_thousand_unmatched_layers_are_matched_in_linear_work() -> None:
    count = 10_000
    old, new = _renamed_layers(count, "old"), _renamed_layers(count, "new")
    _CountedName.comparisons = 0
    diff = diff_reports(old, new)
    # Issue #25 case 9: matching renames by scanning compared every pair (5,000 layers took 57 s).
    # Counting comparisons rather than seconds keeps the test true on any machine.
    assert _CountedName.comparisons < 4 * count, _CountedName.comparisons
    assert len(diff.layers) == count and {layer.status for layer in diff.layers} == {"renamed"}
    assert diff.layers[0].label == "old0 → new0" and diff.layers[-1].label == "old9999 → new9999"


def test_a_report_is_recorded_in_the_manifest_as_its_role(tmp_path: Path) -> None:
    with run_manifest() as manifest:
        load_report(REPORT)
        entry = manifest.entry_for(identity_of(REPORT) or (0, 0))
        assert entry is not None and entry.source is Source.BASELINE
    assert report_from_dict(_document()).layers


# --- read:config -------------------------------------------------------------------------------


def _check_here(capsys: pytest.CaptureFixture[str]) -> Result:
    return _cli(capsys, ["check", MODEL, "--input", IMAGES])


@pytest.mark.surface("read:config", "hang")
@pytest.mark.parametrize(("make", "kind"), [(_fifo, "a named pipe"), (_device, "a character device")])
def test_a_pyproject_that_is_a_pipe_or_device_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, make: Any, kind: str
) -> None:
    make(tmp_path / "pyproject.toml")
    monkeypatch.chdir(tmp_path)
    result = _check_here(capsys)
    assert result.code == 2
    assert_one_error_line(result, f"pyproject.toml is {kind}, not a regular file")


@pytest.mark.surface("read:config", "memory")
def test_a_pyproject_over_its_budget_is_refused_before_it_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _sparse(tmp_path / "pyproject.toml", 2**20 + 1, b"[tool.bn-inspect]\n#")
    monkeypatch.chdir(tmp_path)
    result = _check_here(capsys)
    assert result.code == 2
    assert_one_error_line(result, "is 1,048,577 bytes, over the 1,048,576-byte budget")


@pytest.mark.surface("read:config", "traceback")
def test_a_deeply_nested_pyproject_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "pyproject.toml").write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    monkeypatch.chdir(tmp_path)
    result = _check_here(capsys)
    assert result.code == 2
    assert_one_error_line(result, "pyproject.toml: it is nested too deeply")


# --- read:image: the folder walk ---------------------------------------------------------------


def _png(path: Path) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), 7).save(path)
    return path


def _nest(root: Path, depth: int) -> None:
    """Folders root/d/d/... ``depth`` deep, made through descriptors: the path is longer than PATH_MAX."""
    descriptor = os.open(root, os.O_RDONLY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=descriptor)
        inner = os.open("d", os.O_RDONLY, dir_fd=descriptor)
        os.close(descriptor)
        descriptor = inner
    os.close(descriptor)


def _unnest(root: Path, depth: int) -> None:
    """Remove what ``_nest`` made, deepest first (shutil.rmtree recurses once per level)."""
    chain = [os.open(root, os.O_RDONLY)]
    for _ in range(depth - 1):
        chain.append(os.open("d", os.O_RDONLY, dir_fd=chain[-1]))
    while chain:
        descriptor = chain.pop()
        os.rmdir("d", dir_fd=descriptor)
        os.close(descriptor)


@pytest.mark.surface("read:image", "traceback")
def test_fifteen_hundred_nested_folders_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "val"
    _png(root / "cat" / "1.png")
    _nest(root, 1_500)
    try:
        result = _cli(capsys, ["inspect", MODEL, "--input", root, "--grayscale"])
    finally:
        _unnest(root, 1_500)
    assert result.code == 2
    assert_one_error_line(result, f"input directory {root} nests folders more than {MAX_FOLDER_DEPTH} levels deep")


@pytest.mark.surface("read:image", "hang")
def test_a_symlinked_folder_loop_is_not_followed(tmp_path: Path) -> None:
    root = tmp_path / "val"
    image = _png(root / "cat" / "1.png")
    (root / "cat" / "again").symlink_to(root, target_is_directory=True)
    (root / "loop").symlink_to(root / "cat", target_is_directory=True)
    with deadline(HANG_S):
        found, others = find_images(root)
    assert found == [image] and others == []


@pytest.mark.surface("write:result", "clobber")
def test_every_image_found_however_deep_is_in_the_runs_manifest(tmp_path: Path) -> None:
    root = tmp_path / "val"
    deep = _png(root / "cat" / "a" / "b" / "c" / "1.png")
    shallow = _png(root / "dog" / "2.png")
    with run_manifest() as manifest:
        found, _ = find_images(root)
        assert found == [deep, shallow]
        for image in found:
            entry = manifest.entry_for(identity_of(image) or (0, 0))
            assert entry is not None and entry.source is Source.IMAGE
        before = file_hashes(root)
        # Issue #25 case 4 (--input val --output val/cat/1.png): the writer policy consults the manifest.
        with pytest.raises(OutputError, match=r"is an image of the --input folder .*1\.png, which this run reads"):
            check_output_target(deep, Destination.RESULT, force=True)
    assert file_hashes(root) == before


@pytest.mark.surface("read:model", "traceback")
def test_a_regular_file_that_fails_to_read_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    # /proc/self/mem opens and is a regular file of size 0, but reading its start fails (EIO).
    result = _cli(capsys, ["check", "/proc/self/mem", "--no-data"])
    assert_one_error_line(result, "Error: cannot read model file /proc/self/mem: Input/output error")
