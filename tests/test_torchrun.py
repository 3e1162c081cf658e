"""`torchrun ... -m bn_inspect inspect` on 2 CPU ranks (gloo, loopback only) equals one process."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SAMPLES = Path(__file__).parent.parent / "sample_models"
MODEL = str(SAMPLES / "digits_cnn" / "torchscript.pt")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def inspect(args: list[str], output: Path, ranks: int) -> dict:
    tail = ["inspect", MODEL, *args, "--format", "json", "--output", str(output), "--quiet"]
    if ranks == 1:
        command = [sys.executable, "-m", "bn_inspect", *tail]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={ranks}",
            "--master-addr=127.0.0.1",
            f"--master-port={free_port()}",
            "-m",
            "bn_inspect",
            *tail,
        ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(output.read_text())


@pytest.mark.parametrize(
    "args",
    [
        ["--input", str(SAMPLES / "digits_cnn" / "test_images.npy"), "--batch-size", "70"],
        ["--shape", "9,1,8,8", "--batches", "5"],
    ],
    ids=["file", "random"],
)
def test_two_ranks_equal_one_process(args: list[str], tmp_path: Path) -> None:
    single = inspect(args, tmp_path / "single.json", 1)
    double = inspect(args, tmp_path / "double.json", 2)
    assert single["input"] == double["input"]
    for a, b in zip(single["layers"], double["layers"], strict=True):
        assert a["values_per_channel"] == b["values_per_channel"]
        np.testing.assert_allclose(a["batch_mean"], b["batch_mean"], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(a["batch_var"], b["batch_var"], rtol=1e-12)
