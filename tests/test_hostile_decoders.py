"""Hostile images, model preprocessing, --data batches and worker processes: the decoders' budgets hold.

Each case builds its own corpus in tmp_path: image files that lie about their format or size, a
TorchScript model whose ``pretrained_cfg`` asks for too much, --data code that yields tensors
without values or never ends, and runs whose decoding workers are interrupted or killed.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from bn_inspect.analyses.recipes import timm_recipe
from bn_inspect.data.decode import MAX_PIXELS, Preprocessing, planned_shape
from bn_inspect.data.images import open_images
from bn_inspect.errors import InputError
from tests.helpers import REPO, Result, assert_one_error_line, deadline, invoke
from tests.hostile import MEMORY_CAP_BYTES, file_hashes, run_bounded

# Left out of the quick subset (`-m "not slow"`): decodes hostile image files, some in subprocesses (about 25 s).
pytestmark = pytest.mark.slow

INTERRUPTED = "Error: interrupted; nothing written."
# A file of a format Pillow knows but bn-inspect does not decode, each named like a PNG.
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
NOT_DECODED = {
    "eps": EPS,
    "gif": b"GIF89a\x01\x00\x01\x00\x00\x00\x00;",
    "pdf": b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n",
    "ppm": b"P6\n1 1\n255\n\x00\x00\x00",
}


def _encoded(image_format: str) -> bytes:
    """A real 64×64 image file's bytes, for cutting and damaging."""
    encoded = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(encoded, image_format)
    return encoded.getvalue()


def png_declaring(path: Path, width: int, height: int) -> Path:
    """A valid grayscale PNG of ``width``×``height`` black pixels: a few hundred KB at most, whatever it declares."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    packer = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0, then the row's pixels
    pixels = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))
    return path


def photo(path: Path, size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def bn_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "bn.pt"
    torch.jit.save(torch.jit.script(nn.Sequential(nn.BatchNorm2d(3)).eval()), path)
    return path


# --- read:image: formats, pipes, bombs, damaged files ------------------------------------------


@pytest.mark.surface("read:image", "execution")
def test_a_postscript_photo_never_reaches_ghostscript(tmp_path: Path, bn_model: Path) -> None:
    marker = tmp_path / "ghostscript-ran"
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "gs").write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    (tools / "gs").chmod(0o755)
    (tmp_path / "photo.png").write_bytes(EPS)
    before = file_hashes(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{tools}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = run_bounded(["inspect", bn_model, "--input", "photo.png", "--workers", "0"], tmp_path, env=env)
    assert result.code == 2
    assert_one_error_line(result, "image photo.png is not a JPEG, PNG, BMP, WebP or TIFF image", "Fix or replace")
    assert not marker.exists()
    assert file_hashes(tmp_path) == before


@pytest.mark.surface("read:image", "execution", "traceback")
def test_files_of_other_formats_in_a_folder_are_skipped_by_name(
    tmp_path: Path, bn_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "images"
    photo(folder / "good.png")
    for name, content in NOT_DECODED.items():
        (folder / f"{name}.png").write_bytes(content)
    result = invoke(capsys, ["inspect", bn_model, "--input", folder, "--workers", "0", "--format", "json"])
    assert result.code == 0
    assert result.err.splitlines() == [
        f"warning: 4 files skipped as not decodable, e.g. {folder / 'eps.png'} (is not a JPEG, PNG, BMP, WebP or TIFF "
        "image); --strict-data stops at such a file instead"
    ]
    strict = invoke(capsys, ["inspect", bn_model, "--input", folder, "--workers", "0", "--strict-data"])
    assert strict.code == 2
    assert_one_error_line(strict, f"image {folder / 'eps.png'} is not a JPEG, PNG, BMP, WebP or TIFF image")


@pytest.mark.surface("read:image", "hang")
def test_an_image_swapped_for_a_named_pipe_after_the_scan_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "images"
    photo(folder / "a.png")
    swapped = photo(folder / "b.png")
    # The model is built after the folder scan: its factory swaps an image for a FIFO in between.
    (tmp_path / "swap.py").write_text(
        textwrap.dedent(f"""
        import os
        from torch import nn

        def net():
            os.unlink({str(swapped)!r})
            os.mkfifo({str(swapped)!r})
            return nn.Sequential(nn.BatchNorm2d(3))
        """)
    )
    with deadline(30):
        result = invoke(
            capsys, ["inspect", "--arch", tmp_path / "swap.py:net", "--input", folder, "--workers", "0", "--crop", "8"]
        )
    assert result.code == 2
    assert_one_error_line(result, f"image {swapped} is a named pipe, not a regular file", "Replace it")


@pytest.mark.surface("read:image", "hang")
def test_a_named_pipe_decoded_by_a_worker_is_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    photo(folder / "a.png")
    swapped = photo(folder / "b.png")
    files = open_images(folder, Preprocessing(), workers=1)
    swapped.unlink()
    os.mkfifo(swapped)
    with deadline(30), pytest.raises(InputError, match="is a named pipe, not a regular file"):
        list(files.batches(2, None))


@pytest.mark.surface("read:image", "memory")
@pytest.mark.parametrize(
    ("size", "flags", "fragment"),
    [
        ((12000, 12000), [], "declares 144,000,000 pixels, over the budget of 67,108,864 pixels per image"),
        (
            (70000, 1),
            ["--resize", "224", "--crop", "224"],
            "is 70000×1: resized to 224 on its shorter side it would be 15,680,000×224 = 3,512,320,000 pixels",
        ),
    ],
    ids=["144-megapixels", "70000x1-resized"],
)
def test_decompression_bombs_are_refused_before_decoding(
    tmp_path: Path, bn_model: Path, size: tuple[int, int], flags: list[str], fragment: str
) -> None:
    bomb = png_declaring(tmp_path / "bomb.png", *size)
    assert bomb.stat().st_size < 500_000
    result = run_bounded(["inspect", bn_model, "--input", bomb, "--workers", "0", *flags], tmp_path)
    assert result.code == 2
    assert_one_error_line(result, f"image {bomb} {fragment}", "Fix or replace the file")


@pytest.mark.surface("read:image", "memory")
def test_a_bomb_in_a_folder_is_skipped_under_pillows_own_limit_too(
    tmp_path: Path, bn_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "images"
    photo(folder / "a.png")
    bomb = png_declaring(folder / "b.png", 9000, 9000)  # 81 Mpx: Pillow would decode it silently
    assert MAX_PIXELS < 9000 * 9000
    result = invoke(capsys, ["inspect", bn_model, "--input", folder, "--workers", "0", "--strict-data"])
    assert result.code == 2
    assert_one_error_line(result, f"image {bomb} declares 9000×9000 = 81,000,000 pixels, over the budget")
    skipping = invoke(capsys, ["inspect", bn_model, "--input", folder, "--workers", "0", "--format", "json"])
    assert skipping.code == 0
    assert skipping.err.startswith(f"warning: 1 file skipped as not decodable, e.g. {bomb} (declares 9000×9000")


@pytest.mark.surface("read:image", "memory")
@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--resize", "9000"], "--resize 9000 is over 8,192, the longest side bn-inspect decodes images to"),
        (["--crop", "100000"], "--crop 100000 is over 8,192"),
    ],
)
def test_resize_and_crop_past_the_budget_are_refused_before_any_image(
    tmp_path: Path, bn_model: Path, capsys: pytest.CaptureFixture[str], flags: list[str], fragment: str
) -> None:
    photo(tmp_path / "images" / "a.png")
    result = invoke(capsys, ["inspect", bn_model, "--input", tmp_path / "images", "--workers", "0", *flags])
    assert result.code == 2
    assert_one_error_line(result, fragment, "or less")


@pytest.mark.surface("read:image", "traceback")
def test_a_folder_of_nothing_decodable_is_one_line(
    tmp_path: Path, bn_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for name, content in NOT_DECODED.items():
        (folder / f"{name}.png").write_bytes(content)
    result = invoke(capsys, ["inspect", bn_model, "--input", folder, "--crop", "8"])
    assert result.code == 2
    assert_one_error_line(
        result,
        f"none of the 4 images read from {folder} could be decoded, e.g. {folder / 'eps.png'} "
        "(is not a JPEG, PNG, BMP, WebP or TIFF image)",
    )


@pytest.mark.surface("read:image", "memory", "hang")
def test_a_batch_is_sized_from_the_headers_before_anything_is_decoded(tmp_path: Path) -> None:
    bomb = png_declaring(tmp_path / "bomb.png", 12000, 9000)
    os.mkfifo(tmp_path / "pipe.png")
    with deadline(30):
        assert planned_shape(bomb, Preprocessing()) == (3, 9000, 12000)
        assert planned_shape(bomb, Preprocessing(resize=224, grayscale=True)) == (1, 224, 298)
        assert planned_shape(tmp_path / "pipe.png", Preprocessing()) is None
        assert planned_shape(tmp_path / "pipe.png", Preprocessing(crop=8)) == (3, 8, 8)


@pytest.mark.surface("read:image", "traceback")
@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"", "is not a JPEG, PNG, BMP, WebP or TIFF image"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "cannot be decoded"),
        (b"\xff\xd8\xff\xe0" + bytes(64), "is not a JPEG, PNG, BMP, WebP or TIFF image"),
        (os.urandom(512), "is not a JPEG, PNG, BMP, WebP or TIFF image"),
        (b"II*\x00\x08\x00\x00\x00\xff\xff", "is not a JPEG, PNG, BMP, WebP or TIFF image"),
        (_encoded("PNG")[:-40], "cannot be decoded"),
        (_encoded("JPEG")[:200], "cannot be decoded"),
        (_encoded("PNG").replace(b"IDAT", b"IDAT\xff\xff", 1), "cannot be decoded"),
    ],
    ids=[
        "empty",
        "png-header-only",
        "jpeg-header-only",
        "noise",
        "tiff-with-65535-tags",
        "cut-png",
        "cut-jpeg",
        "bad-crc",
    ],
)
def test_damaged_images_are_one_line(
    tmp_path: Path, bn_model: Path, capsys: pytest.CaptureFixture[str], content: bytes, fragment: str
) -> None:
    folder = tmp_path / "images"
    photo(folder / "a.png")
    (folder / "b.png").write_bytes(content)
    result = invoke(capsys, ["inspect", bn_model, "--input", folder, "--workers", "0", "--strict-data"])
    assert result.code == 2
    assert_one_error_line(result, f"image {folder / 'b.png'} {fragment}")


# --- worker processes: Ctrl-C and a dead worker -----------------------------------------------

SLOW_MODEL = """
import time
from torch import nn


class Slow(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        time.sleep(0.05)
        return self.bn(x)
"""


def _children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _run_with_workers_until(tmp_path: Path, signal_number: int, *, to_worker: bool) -> Result:
    """bn-inspect decoding 400 images with 2 workers; once both workers run, ``signal_number`` goes
    to the whole process group (a Ctrl-C on a terminal) or to one worker."""
    folder = tmp_path / "images"
    first = photo(folder / "000.png", 32)
    for index in range(1, 400):
        os.link(first, folder / f"{index:03d}.png")
    (tmp_path / "slow.py").write_text(SLOW_MODEL)
    argv = ["inspect", "--arch", "slow.py:Slow", "--input", "images", "--workers", "2", "--batch-size", "4"]

    def cap_memory() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP_BYTES, MEMORY_CAP_BYTES))

    process = subprocess.Popen(
        [sys.executable, "-m", "bn_inspect", *argv],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=cap_memory,
    )
    try:
        started = time.monotonic()
        while len(_children(process.pid)) < 2 and process.poll() is None and time.monotonic() - started < 60:
            time.sleep(0.01)
        workers = _children(process.pid)
        assert len(workers) >= 2, "the workers never started"
        time.sleep(0.3)  # the run is underway: batches are being decoded and run
        if to_worker:
            os.kill(workers[0], signal_number)
        else:
            os.killpg(process.pid, signal_number)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return Result(process.returncode, out, err)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the workers through /proc")
@pytest.mark.surface("entry:bn-inspect", "traceback")
@pytest.mark.surface("read:image", "traceback")
def test_ctrl_c_with_decode_workers_is_one_line(tmp_path: Path) -> None:
    result = _run_with_workers_until(tmp_path, signal.SIGINT, to_worker=False)
    assert result.code == 130
    assert result.err.splitlines() == [INTERRUPTED]
    assert result.out == ""


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the workers through /proc")
@pytest.mark.surface("read:image", "traceback")
def test_a_killed_decode_worker_is_one_line(tmp_path: Path) -> None:
    result = _run_with_workers_until(tmp_path, signal.SIGKILL, to_worker=True)
    assert result.code == 2
    assert_one_error_line(result, "a worker process decoding images ended unexpectedly", "--workers 0")


# --- read:model: the preprocessing a model file brings -----------------------------------------


class _Configured(nn.Module):
    def __init__(self, config: dict[str, list[float]] | dict[str, list[int]]) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.pretrained_cfg = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x)


def configured_model(path: Path, config: dict[str, list[float]] | dict[str, list[int]]) -> Path:
    """A TorchScript file whose ``pretrained_cfg`` is ``config``: read without --trust-pickle."""
    torch.jit.save(torch.jit.script(_Configured(config)), path)
    return path


@pytest.mark.surface("read:model", "memory")
def test_an_input_size_of_60000_is_one_line(tmp_path: Path) -> None:
    model = configured_model(tmp_path / "huge.pt", {"input_size": [3, 60000, 60000]})
    photo(tmp_path / "images" / "a.png")
    result = run_bounded(["inspect", model, "--input", "images", "--workers", "0"], tmp_path)
    assert result.code == 2
    assert_one_error_line(
        result,
        f"the pretrained_cfg of model file {model} gives input_size [3, 60000, 60000], "
        "whose sizes are not all whole numbers from 1 to 8,192",
    )


@pytest.mark.surface("read:model", "traceback")
@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"input_size": [3.0, 8.0, 8.0], "crop_pct": [1.0]}, "gives crop_pct [1.0], which is not a finite number"),
        (
            {"input_size": [3.0, 8.0, 8.0], "mean": [0.5], "std": [0.0]},
            "gives std [0.0], which has a value that is not positive",
        ),
        (
            {"input_size": [3.0, 8.0, 8.0], "mean": [0.5, 0.5, 0.5], "std": [-1.0, 1.0, 1.0]},
            "gives std [-1.0, 1.0, 1.0], which has a value that is not positive",
        ),
        (
            {"input_size": [3.0, 8.0, 8.0], "mean": [float("nan")], "std": [1.0]},
            "gives mean [nan], which has a value that is not a finite number",
        ),
        (
            {"input_size": [3.0, 8.0, 8.0], "mean": [0.5, 0.5], "std": [1.0, 1.0]},
            "gives mean [0.5, 0.5], which is not a list of 3 numbers (one per channel) or of one",
        ),
        (
            {"input_size": [3.0, 8.0, 8.0], "mean": [0.5], "std": [1.0, 1.0, 1.0]},
            "gives std [1.0, 1.0, 1.0], which has 3 values and the mean 1",
        ),
        ({"input_size": [3.0, 8.5, 8.5]}, "gives input_size [3.0, 8.5, 8.5], whose sizes are not all whole"),
        ({"input_size": [3.0, 8.0]}, "gives input_size [3.0, 8.0], which is not [channels, height, width]"),
    ],
)
def test_a_bad_pretrained_cfg_is_one_line_naming_the_field_and_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], config: dict[str, list[float]], fragment: str
) -> None:
    model = configured_model(tmp_path / "cfg.pt", config)
    photo(tmp_path / "images" / "a.png")
    before = file_hashes(tmp_path)
    result = invoke(capsys, ["inspect", model, "--input", tmp_path / "images", "--workers", "0"])
    assert result.code == 2
    assert_one_error_line(result, f"the pretrained_cfg of model file {model} {fragment}", "Correct that field")
    assert file_hashes(tmp_path) == before


@pytest.mark.surface("read:model", "memory", "traceback")
@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("crop_pct", 0, "gives crop_pct 0, which is not in (0, 1]"),
        ("crop_pct", 1.5, "gives crop_pct 1.5, which is not in (0, 1]"),
        ("crop_pct", 1e-9, "gives crop_pct 1e-09, which makes a resize of 8,000,000,000 pixels, over 8,192"),
        ("crop_pct", 5e-324, "gives crop_pct 5e-324, which makes a resize of inf pixels, over 8,192"),
        ("crop_pct", True, "gives crop_pct True, which is not a finite number"),
        ("crop_pct", "0.9", "gives crop_pct '0.9', which is not a finite number"),
        ("mean", "abc", "gives mean 'abc', which is not a list of 3 numbers"),
        ("input_size", 224, "gives input_size 224, which is not [channels, height, width]"),
        ("input_size", (3, 10**400, 10**400), "gives input_size (3, 1000000000000000000000000000000000000000"),
        ("std", (10**5000,), "gives std (a tuple too long to show), which has a value that is not a finite number"),
    ],
)
def test_every_field_of_a_pretrained_cfg_is_checked_like_its_flag(field: str, value: object, fragment: str) -> None:
    config = {"input_size": (3, 8, 8), "mean": (0.5,), "std": (0.5,), field: value}
    with pytest.raises(InputError, match=re.escape(f"the pretrained_cfg of model file m.pt {fragment}")):
        timm_recipe(config, "model file m.pt")


# --- read:data-code: what --data yields ---------------------------------------------------------

DATA_CODE = """
import itertools
import torch


def meta():
    return [torch.empty(4, 3, 8, 8, device="meta")]


def meta_in_a_dict():
    return [{"image": torch.empty(4, 3, 8, 8, device="meta")}]


def huge_sparse():
    # 64×3×50000×50000 declared, one value stored: densified, 1.9 TB.
    index = torch.zeros(4, 1, dtype=torch.long)
    return [torch.sparse_coo_tensor(index, torch.ones(1), (64, 3, 50000, 50000))]


def endless():
    return (torch.randn(2, 3, 4, 4) for _ in itertools.count())


class _SignalsOfWorkers(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, index):
        import os
        import signal

        if os.getpid() == PARENT:
            raise RuntimeError("not loaded in a worker process")
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            raise RuntimeError("a worker would answer Ctrl-C itself")
        return torch.randn(3, 4, 4)


def dataset():
    return _SignalsOfWorkers()


import os

PARENT = os.getpid()
"""


@pytest.fixture
def data_code(tmp_path: Path) -> Path:
    path = tmp_path / "data.py"
    path.write_text(DATA_CODE)
    return path


@pytest.mark.surface("read:data-code", "traceback")
@pytest.mark.parametrize("function", ["meta", "meta_in_a_dict"])
def test_meta_tensors_from_data_are_one_line(
    data_code: Path, bn_model: Path, capsys: pytest.CaptureFixture[str], function: str
) -> None:
    result = invoke(capsys, ["inspect", bn_model, "--data", f"{data_code}:{function}"])
    assert result.code == 2
    assert_one_error_line(
        result,
        "a --data batch holds a tensor of shape (4, 3, 8, 8) on device meta, which has no values",
        "Give tensors that hold their values",
    )


@pytest.mark.surface("read:data-code", "memory", "traceback")
def test_a_huge_sparse_tensor_from_data_is_one_line(data_code: Path, bn_model: Path) -> None:
    result = run_bounded(["inspect", bn_model, "--data", f"{data_code.name}:huge_sparse"], data_code.parent)
    assert result.code == 2
    assert_one_error_line(
        result,
        "a --data batch holds a sparse_coo tensor of shape (64, 3, 50000, 50000); bn-inspect reads dense tensors",
        "Give dense tensors",
    )


@pytest.mark.surface("read:data-code", "traceback")
def test_workers_loading_a_data_dataset_leave_ctrl_c_to_the_parent(
    data_code: Path, bn_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = invoke(
        capsys, ["inspect", bn_model, "--data", f"{data_code}:dataset", "--workers", "1", "--batch-size", "4"]
    )
    assert result.code == 0, result.err
    assert result.err == ""


@pytest.mark.surface("read:data-code", "hang")
def test_an_endless_data_iterable_says_it_is_alive_off_a_terminal(data_code: Path, bn_model: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "bn_inspect", "inspect", bn_model, "--data", "data.py:endless"],
        cwd=data_code.parent,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert process.stderr is not None
        with deadline(120):
            first = process.stderr.readline()
        process.send_signal(signal.SIGINT)
        out, rest = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert first.startswith("progress: 100 batches so far (")
    assert "the data has no length, so the run goes on until it ends, --batches N is reached, or Ctrl-C" in first
    assert process.returncode == 130
    assert rest.splitlines()[-1] == INTERRUPTED
    assert all(line.startswith("progress: ") for line in rest.splitlines()[:-1])
    assert out == ""


@pytest.mark.surface("read:image", "memory")
def test_a_batch_of_images_is_sized_against_the_memory_limit_of_the_process(tmp_path: Path, bn_model: Path) -> None:
    # Each image is within the pixel budget; eight together (6 GiB as float32 RGB) are not within the
    # 4 GiB address space run_bounded allows, though the machine has more free memory than that.
    folder = tmp_path / "images"
    folder.mkdir()
    png_declaring(folder / "0.png", 8192, 8192)
    for index in range(1, 8):
        shutil.copyfile(folder / "0.png", folder / f"{index}.png")
    result = run_bounded(["inspect", bn_model, "--input", folder, "--batch-size", "8", "--workers", "0"], tmp_path)
    assert_one_error_line(result, "one batch of shape (8, 3, 8192, 8192) needs 6.0 GiB, more than half of the")
