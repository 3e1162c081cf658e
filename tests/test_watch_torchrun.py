"""bn_inspect.watch under torchrun (2 CPU ranks, gloo, loopback): per-rank timelines and BN504 for DDP with broadcast_buffers=False."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.test_torchrun import free_port
from tests.training import records

SCRIPT = """
import sys
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import bn_inspect
from tests.training import batches, new_net

dist.init_process_group("gloo")
rank = dist.get_rank()
model = DistributedDataParallel(new_net(), broadcast_buffers=sys.argv[2] == "broadcast")
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
with bn_inspect.watch(model, sys.argv[1], every=5):
    for x, y in batches(32, 20, seed=rank):
        # Each rank sees data of its own scale and offset.
        loss = F.cross_entropy(model(x * (1 + rank) + rank), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
dist.destroy_process_group()
"""


def launch(tmp_path: Path, buffers: str) -> Path:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    path = tmp_path / f"{buffers}.jsonl"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        str(script),
        str(path),
        buffers,
    ]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return path


@pytest.mark.slow
def test_ranks_that_keep_their_own_buffers_are_found_at_the_first_sample_after_they_part(tmp_path: Path) -> None:
    path = launch(tmp_path, "own")
    for rank, file in ((0, path), (1, tmp_path / "own.rank1.jsonl")):
        lines = records(file)
        assert lines[0]["rank"] == rank and lines[0]["world_size"] == 2
        found = [(r["step"], r["code"], r["layer"], r["values"]["buffer"]) for r in lines if r["record"] == "event"]
        # Step 0 starts from the same initial buffers; by step 5 each rank has averaged its own data.
        assert [(step, code, layer) for step, code, layer, _ in found] == [
            (5, "BN504", "bn1"),
            (5, "BN504", "bn2"),
            (5, "BN504", "bn3"),
        ]
        assert all(r["values"]["max_abs_diff"] > 0 for r in lines if r["record"] == "event")
        assert all(r["rank"] == rank for r in lines)


@pytest.mark.slow
def test_broadcast_buffers_keep_the_ranks_equal_and_no_event_fires(tmp_path: Path) -> None:
    path = launch(tmp_path, "broadcast")
    for file in (path, tmp_path / "broadcast.rank1.jsonl"):
        lines = records(file)
        assert [r for r in lines if r["record"] == "event"] == []
        assert lines[-1]["record"] == "end" and lines[-1]["samples"] == 4
