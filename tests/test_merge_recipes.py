"""docs/merging.md's recipes run as written: a Slurm array's tasks, Ray Data, torchrun across two nodes.

Each ends in a report equal to one process over all the shards (statistics to a relative 1e-12).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import DIGITS, REPO
from tests.test_merge import _assert_same
from tests.test_torchrun import free_port

DOC = REPO / "docs" / "merging.md"
SHARD_SIZES = (150, 130, 170)
TIMEOUT_S = 300
pytestmark = pytest.mark.slow


def _section_blocks(heading: str) -> list[str]:
    """The fenced code blocks of the doc's section ``## heading``."""
    text = DOC.read_text().partition(f"\n## {heading}\n")[2].partition("\n## ")[0]
    return re.findall(r"```(?:sh|python)\n(.*?)```", text, flags=re.DOTALL)


def _env() -> dict[str, str]:
    """This checkout's bn_inspect first on the path, and its interpreter's bin (bn-inspect) on PATH."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "BN_INSPECT_DIST_TIMEOUT": "60",
    }


def _run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture
def job(tmp_path: Path) -> Path:
    """A job folder as the doc's recipes expect it: model.pt, shards/shard-N.npy, val.npy, parts/."""
    shutil.copy(DIGITS / "torchscript.pt", tmp_path / "model.pt")
    images = np.load(DIGITS / "test_images.npy")
    (tmp_path / "shards").mkdir()
    for index, shard in enumerate(np.split(images, np.cumsum(SHARD_SIZES)[:-1])):
        np.save(tmp_path / "shards" / f"shard-{index}.npy", shard)
    np.save(tmp_path / "val.npy", images[:100])
    (tmp_path / "parts").mkdir()
    return tmp_path


def _one_run(job: Path) -> dict:
    """One process over every shard, as the recipes' batches (--batch-size 64)."""
    command = ["bn-inspect", "inspect", "model.pt", "--input", "shards", "--batch-size", "64", "--format", "json"]
    return json.loads(_run(command, job).stdout)


def test_the_slurm_array_tasks_and_the_merge_job_give_one_run(job: Path) -> None:
    task, submit = _section_blocks("A Slurm array")
    for index in range(len(SHARD_SIZES)):
        _run(["bash", "-c", task], job, {**_env(), "SLURM_ARRAY_TASK_ID": str(index)})
    merge = re.search(r"--wrap \\\n  '(.*)'", submit)
    assert merge is not None
    _run(["bash", "-c", merge.group(1)], job)
    merged = json.loads((job / "all.json").read_text())
    _assert_same(_one_run(job), merged)
    assert [part["path"] for part in merged["merged_from"]] == [f"parts/part-{i}.json" for i in range(3)]


def test_the_ray_data_recipe_gives_one_run(job: Path) -> None:
    pytest.importorskip("ray.data")
    (block,) = _section_blocks("Ray Data")
    _run([sys.executable, "-c", block], job)
    _assert_same(_one_run(job), json.loads((job / "all.json").read_text()))


def test_torchrun_on_two_nodes_gives_one_run(job: Path) -> None:
    (block,) = _section_blocks("torchrun across nodes")
    port = str(free_port())
    launches = []
    for line in block.replace("\\\n", " ").splitlines():
        if line.startswith("torchrun"):
            line = line.replace("--nproc-per-node 8", "--nproc-per-node 1").replace("29500", port)
            words = line.replace("host0", "127.0.0.1").split()
            launches.append([sys.executable, "-m", "torch.distributed.run", *words[1:]])
    assert len(launches) == 2
    env = _env()
    nodes = [
        subprocess.Popen(launch, cwd=job, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for launch in launches
    ]
    for node in nodes:
        _, err = node.communicate(timeout=TIMEOUT_S)
        assert node.returncode == 0, err[-3000:]
    report = json.loads((job / "all.json").read_text())
    assert report["distributed"]["world_size"] == 2
    _assert_close(_one_run(job), report)
    # A torchrun report is a part like any other: merged with one more shard, it is one run over all.
    np.save(job / "shards" / "shard-3.npy", np.load(job / "val.npy"))
    inspect = ["bn-inspect", "inspect", "model.pt", "--batch-size", "64", "--format", "json", "--quiet"]
    _run([*inspect, "--input", "shards/shard-3.npy", "--output", "parts/part-3.json"], job)
    _run(["bn-inspect", "merge", "all.json", "parts/part-3.json", "--output", "more.json"], job)
    merged = json.loads((job / "more.json").read_text())
    assert "distributed" not in merged
    _assert_close(_one_run(job), merged)


def _assert_close(one: dict, other: dict) -> None:
    assert other["input"]["num_samples"] == one["input"]["num_samples"]
    for a, b in zip(one["layers"], other["layers"], strict=True):
        assert a["values_per_channel"] == b["values_per_channel"]
        np.testing.assert_allclose(a["batch_mean"], b["batch_mean"], rtol=1e-12)
        np.testing.assert_allclose(a["batch_var"], b["batch_var"], rtol=1e-12)
