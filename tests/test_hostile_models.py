"""Hostile model files and --arch specs: no hang, no unbounded work, no shadowed import, one error line.

Each case ends in exit 2 and one ``Error:`` line naming the file; a deadline (SIGALRM, or a
subprocess timeout) proves that nothing blocks or inflates without end.
"""

from __future__ import annotations

import io
import os
import resource
import struct
import subprocess
import sys
import uuid
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from bn_inspect.cli.main import run
from bn_inspect.errors import ModelFileError
from bn_inspect.model.files import FileKind, detect_file_kind
from bn_inspect.model.state_dict import validate_state_dict
from tests.helpers import DIGITS, REPO, deadline, invoke

BN_ARCH = ["--arch", "torch.nn:BatchNorm1d", "--arch-kwargs", '{"num_features": 3}']


def first_error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    """Run the CLI with a deadline; return its exit code and its one stderr line."""
    with deadline(60):
        result = invoke(capsys, argv)
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert "Traceback" not in result.err + result.out
    return result.code, lines[0]


# --- non-regular files ------------------------------------------------------------------------


@pytest.mark.surface("read:model", "hang")
def test_named_pipe_is_refused_without_being_opened(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    code, line = first_error_line(capsys, ["layers", str(fifo)])
    assert code == 2
    assert line == f"Error: model file {fifo} is a named pipe, not a regular file. Give the path of a saved model file"


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_DATA, (2**31, 2**31))


@pytest.mark.surface("read:model", "hang")
@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_character_device_is_refused_without_being_read(tmp_path: Path) -> None:
    # In a child with bounded memory: reading /dev/zero as a zip grows without end, faster than a
    # deadline can stop it.
    argv = [sys.executable, "-P", "-m", "bn_inspect", "inspect", "/dev/zero", *BN_ARCH, "--shape", "2,3"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        argv, cwd=tmp_path, env=env, preexec_fn=_limit_memory, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        "Error: model file /dev/zero is a character device, not a regular file. Give the path of a saved model file"
    ]


def test_symlink_to_a_model_file_still_loads(tmp_path: Path) -> None:
    link = tmp_path / "model.pt"
    link.symlink_to(DIGITS / "state_dict.pt")
    assert detect_file_kind(link) is FileKind.TORCH_SAVE


# --- zip bombs ------------------------------------------------------------------------------------

BOMB_SIZE = 200 * 2**20


def _deflated_zeros(size: int) -> tuple[bytes, int]:
    """Raw deflate of ``size`` zero bytes (about size / 1030 bytes) and their CRC-32."""
    chunk = bytes(2**20)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts, crc = [], 0
    for _ in range(size // len(chunk)):
        parts.append(compressor.compress(chunk))
        crc = zlib.crc32(chunk, crc)
    parts.append(compressor.flush())
    return b"".join(parts), crc


def zip_bomb(num_records: int) -> bytes:
    """One deflated 200 MB entry, and ``num_records`` central-directory records that all point at it.

    zipfile writes neither overlapping records nor lying sizes, so the directory is written by hand.
    """
    payload, crc = _deflated_zeros(BOMB_SIZE)
    first = b"bomb/data.pkl"
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0, crc, len(payload), BOMB_SIZE, len(first), 0)
    body = local + first + payload
    directory = io.BytesIO()
    for index in range(num_records):
        name = first if index == 0 else f"bomb/data/{index}".encode()
        directory.write(
            struct.pack(
                "<IHHHHHHIIIHHHHHII",
                0x02014B50,
                20,
                20,
                0,
                8,
                0,
                0,
                crc,
                len(payload),
                BOMB_SIZE,
                len(name),
                0,
                0,
                0,
                0,
                0,
                0,  # every record's local header is the first one
            )
        )
        directory.write(name)
    records = directory.getvalue()
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, num_records, num_records, len(records), len(body), 0)
    return body + records + end


@pytest.fixture(scope="module")
def bomb_payload() -> bytes:
    return zip_bomb(500)


@pytest.mark.surface("read:model", "memory")
def test_zip_bomb_of_overlapping_records_is_refused_before_inflating(
    tmp_path: Path, bomb_payload: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    assert len(bomb_payload) < 300_000  # the 230 KB archive: 500 records over one 200 MB entry
    path = tmp_path / "bomb.pt"
    path.write_bytes(bomb_payload)
    with deadline(60), pytest.raises(ModelFileError, match=r"malformed zip archive: entries bomb/\S+ and \S+ overlap"):
        detect_file_kind(path)
    code, line = first_error_line(capsys, ["layers", str(path)])
    assert code == 2
    assert line.startswith(f"Error: model file {path} is a malformed zip archive: entries bomb/")


@pytest.mark.surface("read:model", "memory")
def test_single_entry_inflating_far_past_the_file_size_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bomb.pt"
    path.write_bytes(zip_bomb(1))
    size = path.stat().st_size
    code, line = first_error_line(capsys, ["inspect", str(path), *BN_ARCH, "--shape", "2,3"])
    assert code == 2
    assert line == (
        f"Error: model file {path} is a zip archive whose compressed entries declare {BOMB_SIZE} bytes "
        f"in a file of {size} bytes, more than a checkpoint holds (a zip bomb?). "
        "Give a file written by torch.save, which stores tensors uncompressed"
    )


def test_deflated_checkpoint_passes_the_bounded_crc_check(tmp_path: Path) -> None:
    # A checkpoint re-zipped with compression (a tool's doing, not torch's) is still a checkpoint.
    source = DIGITS / "state_dict.pt"
    path = tmp_path / "deflated.pt"
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as copy:
        for entry in original.infolist():
            copy.writestr(entry.filename, original.read(entry))
    assert detect_file_kind(path) is FileKind.TORCH_SAVE


# --- state_dicts that load_state_dict would choke on or misread ------------------------------------


def _with(key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    state = dict(nn.BatchNorm1d(3).state_dict())
    state[key] = value
    return state


def _bad_version() -> OrderedDict[str, torch.Tensor]:
    state = nn.BatchNorm1d(3).state_dict()
    state._metadata = OrderedDict({"": {"version": "2"}})  # type: ignore[attr-defined]
    return state


STATE_DICT_CASES: dict[str, tuple[Callable[[], object], str]] = {
    "non-string key": (lambda: {0: torch.zeros(3)}, "the state_dict has a key 0 of type int"),
    "metadata version": (
        _bad_version,
        "the state_dict's _metadata gives module '' the version '2', not an integer",
    ),
    "sparse": (
        lambda: _with("running_mean", torch.zeros(3).to_sparse()),
        "state_dict entry running_mean is a torch.sparse_coo tensor, not a dense one",
    ),
    "meta": (
        lambda: _with("running_var", torch.ones(3, device="meta")),
        "state_dict entry running_var is on the meta device and holds no values",
    ),
    "complex": (
        lambda: _with("running_mean", torch.zeros(3, dtype=torch.complex64)),
        "state_dict entry running_mean is complex (torch.complex64), not real",
    ),
    "nan count": (
        lambda: _with("num_batches_tracked", torch.tensor(float("nan"))),
        "state_dict entry num_batches_tracked is not a finite count",
    ),
    "nested checkpoint": (
        lambda: {"state_dict": _with("module.num_batches_tracked", torch.tensor(float("inf")))},
        "state_dict entry module.num_batches_tracked is not a finite count",
    ),
}


@pytest.mark.surface("read:model", "traceback")
@pytest.mark.parametrize("case", sorted(STATE_DICT_CASES))
@pytest.mark.parametrize("command", ["layers", "inspect"])
def test_unusable_state_dict_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, command: str
) -> None:
    build, problem = STATE_DICT_CASES[case]
    path = tmp_path / "model.pt"
    torch.save(build(), path)
    argv = [command, str(path)] + ([*BN_ARCH, "--shape", "2,3"] if command == "inspect" else [])
    code, line = first_error_line(capsys, argv)
    assert code == 2
    assert line == f"Error: {path}: {problem}. Re-save the model's state_dict() with torch.save or safetensors"


def test_a_huge_key_is_cut_short_in_the_error(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=r"has a key \('xxx\S*\.\.\. of type tuple") as raised:
        validate_state_dict({("x" * 100_000,): torch.zeros(3)}, tmp_path / "model.pt")
    assert len(str(raised.value)) < 300


def test_valid_metadata_still_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "model.pt"
    torch.save(nn.BatchNorm1d(3).state_dict(), path)
    assert run(["layers", str(path), *BN_ARCH, "--format", "json"]) == 0
    capsys.readouterr()


# --- --arch imports ----------------------------------------------------------------------------------


@pytest.mark.surface("read:arch-code", "execution")
def test_arch_prefers_the_installed_package_to_a_folder_of_that_name(tmp_path: Path) -> None:
    # A cloned or checked-out jsonschema/ in the working directory must not be what --arch imports.
    canary = tmp_path / "canary"
    fake = tmp_path / "jsonschema"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        f"open({str(canary)!r}, 'w').close()\nimport torch\ndef build():\n    return torch.nn.BatchNorm1d(3)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # -P: the interpreter itself puts no folder first, as with the bn-inspect console script.
    argv = [sys.executable, "-P", "-m", "bn_inspect", "inspect", "--arch", "jsonschema:build", "--shape", "2,3"]
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert not canary.exists()
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[0].startswith(
        "Error: --arch 'jsonschema:build': jsonschema has no attribute 'build'"
    )


def _local_module(folder: Path) -> str:
    name = f"bn_inspect_local_arch_{uuid.uuid4().hex}"
    (folder / f"{name}.py").write_text("import torch\ndef build():\n    return torch.nn.BatchNorm1d(3)\n")
    return name


def test_arch_module_found_only_in_the_current_folder_still_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    name = _local_module(tmp_path)
    try:
        assert run(["inspect", "--arch", f"{name}:build", "--shape", "2,3", "-q"]) == 0
        assert run(["inspect", "--arch", f"{name}.py:build", "--shape", "2,3", "-q"]) == 0
    finally:
        sys.modules.pop(name, None)
    assert str(tmp_path) not in sys.path
    capsys.readouterr()
