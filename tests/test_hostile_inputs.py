"""Hostile --input files: pipes, devices, forged or damaged .npz members, sparse and meta tensors,
samples without values. Each ends in exit 2 and one line naming the file and the problem."""

from __future__ import annotations

import io
import math
import os
import re
import resource
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from bn_inspect.data.inputs import open_input
from bn_inspect.data.readers import read_input
from bn_inspect.errors import InputError
from tests.helpers import DIGITS, REPO, deadline, invoke

MODEL = DIGITS / "torchscript.pt"
IMAGES = DIGITS / "test_images.npy"
# Long enough for a cold start that imports torch; a regression that blocks or reads forever is
# killed here instead of hanging the suite.
SUBPROCESS_TIMEOUT_S = 180
# Far below what a forged header claims, far above what bn-inspect needs for the digits sample.
MEMORY_CAP_BYTES = 4 * 2**30


def first_error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    result = invoke(capsys, argv)
    return result.code, result.err.splitlines()[0]


def run_bounded(argv: list[str], cwd: Path) -> tuple[int, str]:
    """bn-inspect in a child with a wall-clock timeout and an address-space cap; (exit code, first stderr line)."""

    def cap_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP_BYTES, MEMORY_CAP_BYTES))

    result = subprocess.run(
        [sys.executable, "-m", "bn_inspect", *argv],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        preexec_fn=cap_memory,
        check=False,
    )
    return result.returncode, (result.stderr.splitlines() or [""])[0]


def npy_bytes(array: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.save(stream, array)
    return stream.getvalue()


def write_npz(path: Path, member: bytes, name: str = "x.npy") -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(name, member)
    return path


def images(count: int) -> np.ndarray:
    return np.random.default_rng(0).random((count, 1, 8, 8)).astype(np.float32)


# --- pipes and devices are refused before anything opens them --------------------------------

NOT_REGULAR_FIX = "Save the data to a regular file and give its path"


@pytest.mark.surface("read:input-file", "hang")
def test_fifo_input_is_refused_without_opening_it(tmp_path: Path) -> None:
    fifo = tmp_path / "images.npy"
    os.mkfifo(fifo)
    code, line = run_bounded(["inspect", str(MODEL), "--input", str(fifo)], tmp_path)
    assert code == 2
    assert line == f"Error: input file {fifo} is a named pipe, not a regular file. {NOT_REGULAR_FIX}"


def test_fifo_input_is_refused_by_the_library(tmp_path: Path) -> None:
    fifo = tmp_path / "images.npy"
    os.mkfifo(fifo)
    with deadline(30), pytest.raises(InputError, match=r"images\.npy is a named pipe, not a regular file"):
        read_input(fifo)


@pytest.mark.surface("read:input-file", "hang")
def test_dev_zero_as_csv_is_refused(tmp_path: Path) -> None:
    table = tmp_path / "zero.csv"
    table.symlink_to("/dev/zero")
    code, line = run_bounded(["inspect", str(MODEL), "--input", str(table)], tmp_path)
    assert code == 2
    assert line == f"Error: input file {table} is a character device, not a regular file. {NOT_REGULAR_FIX}"


@pytest.mark.surface("read:input-shard", "hang")
def test_fifo_shard_in_a_directory_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    np.save(shards / "a.npy", images(4))
    os.mkfifo(shards / "b.npy")
    code, line = first_error_line(capsys, ["inspect", str(MODEL), "--input", str(shards)])
    assert code == 2
    assert line == (f"Error: input shard {shards / 'b.npy'} is a named pipe, not a regular file. {NOT_REGULAR_FIX}")


@pytest.mark.surface("read:input-shard", "hang")
def test_device_shard_in_a_directory_is_refused_by_the_library(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", images(4))
    (tmp_path / "b.npy").symlink_to("/dev/zero")
    with pytest.raises(InputError, match=r"input shard .*b\.npy is a character device, not a regular file"):
        open_input(tmp_path)


# --- .npz members: raw bytes, forged headers, truncation, damage --------------------------------


@pytest.mark.surface("read:input-file", "traceback")
def test_npz_member_of_raw_bytes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    archive = write_npz(tmp_path / "raw.npz", b"these are not the bytes of a .npy array")
    code, line = first_error_line(capsys, ["inspect", str(MODEL), "--input", str(archive)])
    assert code == 2
    assert line == (
        f"Error: array 'x' in {archive} is not a .npy file (no NUMPY header). Save the array with numpy.save"
    )
    with pytest.raises(InputError, match=r"array 'x' in .*raw\.npz is not a \.npy file \(no NUMPY header\)"):
        read_input(archive)


def forged_header(shape: tuple[int, ...]) -> bytes:
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return stream.getvalue()


@pytest.mark.surface("read:input-file", "memory")
def test_npz_header_claiming_10_to_the_12_samples(tmp_path: Path) -> None:
    archive = write_npz(tmp_path / "huge.npz", forged_header((10**12, 1, 8, 8)) + bytes(64))
    code, line = run_bounded(["inspect", str(MODEL), "--input", str(archive)], tmp_path)
    assert code == 2
    assert line == (
        f"Error: cannot read array 'x' in {archive} as a .npy array: its header declares shape "
        "(1000000000000, 1, 8, 8) of float32, 256,000,000,000,000 bytes, but only 64 bytes follow it. "
        "The file is truncated or damaged; save the array again"
    )
    with pytest.raises(InputError, match=r"declares shape \(1000000000000, 1, 8, 8\) of float32"):
        read_input(archive)


@pytest.mark.surface("read:input-file", "memory")
def test_npz_member_claiming_more_than_memory_is_refused_before_reading(tmp_path: Path) -> None:
    # A zip may declare any uncompressed size (a zip bomb's claim); a header that agrees with the
    # claim passes the size check, so the memory check must stop the read.
    shape = (2**34, 1, 8, 8)
    header = forged_header(shape)
    path = tmp_path / "claim.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", header + bytes(1024))
        archive.filelist[0].file_size = len(header) + math.prod(shape) * 4
    with pytest.raises(
        InputError, match=r"array 'x' in .*claim\.npz of shape \(17179869184, 1, 8, 8\) needs 4,096\.0 GiB"
    ):
        read_input(path)


@pytest.mark.surface("read:input-file", "traceback")
def test_npz_truncated_member_says_what_failed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    whole = npy_bytes(images(200))
    archive = write_npz(tmp_path / "short.npz", whole[: len(whole) // 2])
    code, line = first_error_line(capsys, ["inspect", str(MODEL), "--input", str(archive)])
    assert code == 2
    assert line == (
        f"Error: cannot read array 'x' in {archive} as a .npy array: its header declares shape (200, 1, 8, 8) "
        "of float32, 51,200 bytes, but only 25,536 bytes follow it. "
        "The file is truncated or damaged; save the array again"
    )
    with pytest.raises(InputError, match=r"51,200 bytes, but only 25,536 bytes follow it") as caught:
        read_input(archive)
    assert "Python objects" not in str(caught.value)


@pytest.mark.surface("read:input-file", "traceback")
def test_npz_member_with_a_bad_crc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    archive = write_npz(tmp_path / "crc.npz", npy_bytes(images(50)))
    damaged = bytearray(archive.read_bytes())
    damaged[damaged.index(b"\x93NUMPY") + 5000] ^= 0xFF
    archive.write_bytes(bytes(damaged))
    code, line = first_error_line(capsys, ["inspect", str(MODEL), "--input", str(archive)])
    assert code == 2
    assert line == (
        f"Error: cannot read array 'x' in {archive}: the archive is damaged "
        "(BadZipFile: Bad CRC-32 for file 'x.npy'). Re-save it with numpy.savez"
    )
    with pytest.raises(InputError, match=r"the archive is damaged \(BadZipFile: Bad CRC-32"):
        read_input(archive)


def test_npy_file_named_npz_is_not_an_archive(tmp_path: Path) -> None:
    path = tmp_path / "images.npz"
    path.write_bytes(npy_bytes(images(4)))
    with pytest.raises(InputError, match=r"cannot read .*images\.npz as a \.npz archive \(File is not a zip file\)"):
        read_input(path)


def test_intact_npz_still_reads(tmp_path: Path) -> None:
    np.savez_compressed(tmp_path / "x.npz", images=images(6), labels=np.arange(6))
    data = read_input(tmp_path / "x.npz", key="images")
    np.testing.assert_array_equal(np.asarray(data.args[0]), images(6))


# --- tensors without dense CPU values ---------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize(("shape", "layout"), [((4, 1, 8, 8), "sparse_coo"), ((4, 64), "sparse_csr")])
def test_sparse_tensor_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], shape: tuple[int, ...], layout: str
) -> None:
    path = tmp_path / "sparse.pt"
    tensor = torch.zeros(shape)
    torch.save(tensor.to_sparse() if layout == "sparse_coo" else tensor.to_sparse_csr(), path)
    code, line = first_error_line(capsys, ["inspect", str(MODEL), "--input", str(path)])
    assert code == 2
    assert line == (
        f"Error: {path} holds a {layout} tensor of shape {tuple(tensor.shape)}; bn-inspect reads dense tensors. "
        "Save a dense tensor: torch.save(t.to_dense(), ...)"
    )
    with pytest.raises(InputError, match=rf"holds a {layout} tensor .* Save a dense tensor: torch\.save\(t\.to_dense"):
        read_input(path)


@pytest.mark.surface("read:input-file", "traceback")
def test_meta_tensor_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "meta.pt"
    torch.save({"x": torch.zeros(4, 1, 8, 8, device="meta")}, path)
    code, line = first_error_line(capsys, ["inspect", str(MODEL), "--input", str(path)])
    assert code == 2
    assert line == (
        f"Error: {path} holds a tensor of shape (4, 1, 8, 8) on device meta, which has no values. "
        "Save the real tensor with its values: torch.save(t.detach().cpu(), ...)"
    )
    with pytest.raises(InputError, match=r"on device meta, which has no values"):
        read_input(path)


# --- samples without values -------------------------------------------------------------------

NO_VALUES_FIX = "Give data with at least one value per sample: every dim after the first must be at least 1"


@pytest.mark.parametrize("command", ["inspect", "check"])
def test_samples_without_values_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    path = tmp_path / "empty.npy"
    np.save(path, np.zeros((4, 3, 0, 0), np.float32))
    code, line = first_error_line(capsys, [command, str(MODEL), "--input", str(path)])
    assert code == 2
    assert line == (
        f"Error: {path} holds data of shape (4, 3, 0, 0): each sample, of shape (3, 0, 0), has no values. "
        f"{NO_VALUES_FIX}"
    )


def test_tensor_samples_without_values_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.pt"
    torch.save(torch.zeros(4, 3, 0, 0), path)
    with pytest.raises(InputError, match=re.escape("each sample, of shape (3, 0, 0), has no values")):
        read_input(path)


def test_shipped_images_still_read() -> None:
    assert read_input(IMAGES).num_samples == 450
