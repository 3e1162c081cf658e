"""bn_inspect.watch never changes training, works with the ways people train, refuses what it cannot watch, survives a kill."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bn_inspect
from bn_inspect.errors import WatchError
from tests.helpers import REPO
from tests.training import TwiceNet, assert_read_back, batches, new_net, records, train


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("options", [{}, {"autocast": True}, {"channels_last": True}], ids=["fp32", "bf16", "nhwc"])
def test_training_is_bitwise_the_same_with_and_without_the_watch(options: dict[str, bool], tmp_path: Path) -> None:
    plain = new_net()
    train(plain, 25, **options)
    watched = new_net()
    # every=1 and detail at every sample: the most the watch ever does at a step.
    with bn_inspect.watch(watched, tmp_path / "w.jsonl", every=1, detail_every=1):
        train(watched, 25, **options)
    before, after = state(plain), state(watched)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    samples = [r for r in records(tmp_path / "w.jsonl") if r["record"] == "sample"]
    assert len(samples) == 25
    assert all(entry["departure"] is not None for r in samples for entry in r["layers"])


def test_the_hooks_are_removed_and_the_file_ended_when_the_loop_raises(tmp_path: Path) -> None:
    model = new_net()

    def explode(step: int, _model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if step == 7:
            raise RuntimeError("loader failed")
        return x

    with pytest.raises(RuntimeError, match="loader failed"), bn_inspect.watch(model, tmp_path / "w.jsonl", every=5):
        train(model, 20, before_step=explode)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert records(tmp_path / "w.jsonl")[-1] == {
        "record": "end",
        "step": 6,
        "rank": 0,
        "steps": 7,
        "samples": 2,
        "events": 0,
        "exception": {"type": "RuntimeError", "message": "loader failed"},
    }


def test_no_autograd_graph_is_kept(tmp_path: Path) -> None:
    model = new_net()
    with bn_inspect.watch(model, tmp_path / "w.jsonl", every=1) as watch:
        train(model, 3)
        hooks = watch._hooks
        held = [t for saved in hooks._snapshots.values() for t in saved]
        assert hooks._first_bad is not None
        held.append(hooks._first_bad)
    assert held and all(not t.requires_grad and t.grad_fn is None for t in held)


@pytest.mark.parametrize("layer", ["bn1", "bn2", "bn3"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_recorded_statistics_match_a_float64_reference(channels_last: bool, layer: str, tmp_path: Path) -> None:
    model = new_net()
    watched = getattr(model, layer)
    inputs: dict[int, list[torch.Tensor]] = {}
    around: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    step = {"n": -1}

    def buffers(module: nn.Module) -> tuple[np.ndarray, np.ndarray]:
        return module.running_mean.double().numpy().copy(), module.running_var.double().numpy().copy()

    def keep_input(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        inputs.setdefault(step["n"], []).append(args[0].detach().clone())
        around.setdefault(step["n"], []).append(buffers(module))

    def keep_running(module: nn.Module, _args: object, _out: object) -> None:
        around[step["n"]].append(buffers(module))

    def count(current: int, _model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        step["n"] = current
        # Large means and small spreads at bn1 (conv1 has no bias): a one-pass float32 variance would
        # lose digits there.
        return x * 0.01 + 50.0

    handles = [watched.register_forward_pre_hook(keep_input), watched.register_forward_hook(keep_running)]
    with bn_inspect.watch(model, tmp_path / "w.jsonl", every=4, detail_every=1):
        train(model, 9, before_step=count, channels_last=channels_last)
    for handle in handles:
        handle.remove()
    details = {
        r["step"]: next(d for d in r["detail"] if d["layer"] == layer)
        for r in records(tmp_path / "w.jsonl")
        if r["record"] == "sample"
    }
    assert sorted(details) == [0, 4, 8]
    for at, detail in details.items():
        # Training mode: read back from the layer's own update (momentum 0.1), to its documented precision.
        old, new = around[at]
        assert_read_back(inputs[at][0], detail, old, new, 0.1)


def test_a_layer_called_twice_is_two_calls(tmp_path: Path) -> None:
    model = new_net(cls=TwiceNet)
    with bn_inspect.watch(model, tmp_path / "w.jsonl", every=5) as watch:
        train(model, 10)
    samples = [r for r in records(tmp_path / "w.jsonl") if r["record"] == "sample"]
    assert [[(e["layer"], e["call"]) for e in s["layers"]] for s in samples] == [[("bn", 0), ("bn", 1)]] * 2
    assert watch.events == []


def test_gradient_accumulation_with_the_trainers_step(tmp_path: Path) -> None:
    model = new_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with bn_inspect.watch(model, tmp_path / "w.jsonl", every=2) as watch:
        for index, (x, y) in enumerate(batches(16, 24)):
            global_step = index // 4
            if index % 4 == 0:
                watch.step(global_step)
            (F.cross_entropy(model(x), y) / 4).backward()
            if index % 4 == 3:
                optimizer.step()
                optimizer.zero_grad()
    lines = records(tmp_path / "w.jsonl")
    # One sample per sampled step, at its first forward; the forwards are still counted.
    assert [r["step"] for r in lines if r["record"] == "sample"] == [0, 2, 4]
    assert lines[-1]["steps"] == 24 and lines[-1]["step"] == 5


def test_a_compiled_model_is_refused_in_one_line(tmp_path: Path) -> None:
    compiled = torch.compile(new_net())
    with pytest.raises(WatchError) as caught:
        bn_inspect.watch(compiled, tmp_path / "w.jsonl")
    assert caught.value.line() == (
        "the model is compiled (torch.compile), and its compiled graphs skip the hooks the watch adds. "
        "Watch the uncompiled model (model._orig_mod) while diagnosing"
    )
    assert not (tmp_path / "w.jsonl").exists()


class Bypass(nn.Module):
    """Owns a BatchNorm but normalizes with its buffers through the functional form: no hook of it fires."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, 0.1, bn.eps)


def test_a_training_forward_that_no_layer_hook_saw_is_an_error_not_silence(tmp_path: Path) -> None:
    model = Bypass()
    with (
        pytest.raises(WatchError, match="none of its BatchNorm layers was called"),
        bn_inspect.watch(model, tmp_path / "w.jsonl"),
    ):
        model(torch.randn(4, 1, 3, 3))


def test_a_block_without_any_training_forward_is_an_error(tmp_path: Path) -> None:
    model = new_net().eval()
    with pytest.raises(WatchError, match="saw no training-mode forward"), bn_inspect.watch(model, tmp_path / "w.jsonl"):
        model(torch.randn(4, 1, 8, 8))
    assert records(tmp_path / "w.jsonl")[-1]["record"] == "end"


@pytest.mark.parametrize(
    ("kwargs", "line"),
    [
        ({"every": 0}, "every must be a whole number of at least 1, not 0. Pass every=50"),
        ({"detail_every": 2.5}, "detail_every must be a whole number of at least 1, not 2.5. Pass detail_every=50"),
    ],
)
def test_bad_settings_are_one_line(kwargs: dict[str, object], line: str, tmp_path: Path) -> None:
    with pytest.raises(WatchError) as caught:
        bn_inspect.watch(new_net(), tmp_path / "w.jsonl", **kwargs)  # type: ignore[arg-type]
    assert caught.value.line() == line


def test_a_model_without_batchnorm_is_refused(tmp_path: Path) -> None:
    with pytest.raises(WatchError, match="no BatchNorm layer to watch"):
        bn_inspect.watch(nn.Linear(3, 3), tmp_path / "w.jsonl")


KILLED = """
import sys, time, torch
sys.path.insert(0, {repo!r})
import bn_inspect
from tests.training import new_net, batches
import torch.nn.functional as F
model = new_net()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
with bn_inspect.watch(model, {path!r}, every=1, detail_every=3):
    for x, y in batches(32, 100000):
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
"""


def test_a_killed_run_leaves_a_file_whose_every_complete_line_parses(tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl"
    script = KILLED.format(repo=str(REPO), path=str(path))
    process = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not path.exists() or path.read_bytes().count(b"\n") < 30):
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    text = path.read_bytes()
    lines = text.split(b"\n")
    complete, rest = lines[:-1], lines[-1]
    assert len(complete) >= 30
    parsed = [json.loads(line) for line in complete]
    assert parsed[0]["record"] == "header" and all(r["record"] != "end" for r in parsed)
    # What follows the last newline is at most one partial line.
    assert b"\n" not in rest
    assert all(math.isfinite(r.get("step", 0)) for r in parsed)


def test_data_parallel_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(WatchError) as caught:
        bn_inspect.watch(nn.DataParallel(new_net()), tmp_path / "w.jsonl")
    assert caught.value.line().startswith("DataParallel runs copies of the model in threads")
