"""The watch's sampled statistics: read back from BatchNorm's own update in training mode, from the input otherwise."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from torch import nn

import bn_inspect
from bn_inspect.engine.watch_statistics import MIN_UPDATE_FACTOR, update_factor
from tests.training import MEAN_RTOL, VAR_RTOL, TwiceNet, assert_read_back, new_net, records


class OwnForward(nn.BatchNorm2d):
    """A subclass with a forward of its own: the watch cannot know what its update holds."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 1.0


def _bn(momentum: float | None = 0.1, **kwargs: object) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(3, momentum=momentum, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make", "factor"),
    [
        (lambda: _bn(0.1), 0.1),
        (lambda: _bn(0.01), 0.01),
        (lambda: _bn(2 * MIN_UPDATE_FACTOR), 2 * MIN_UPDATE_FACTOR),
        (lambda: _bn(MIN_UPDATE_FACTOR / 2), None),
        (lambda: _bn(0.0), None),
        (lambda: _bn(None), 1 / 5),
        (lambda: _bn(0.1).eval(), None),
        (lambda: _bn(0.1, track_running_stats=False), None),
        (lambda: _bn(0.1).to(torch.bfloat16), None),
        (lambda: _bn(0.1).double(), 0.1),
        (lambda: OwnForward(3), None),
        (lambda: nn.SyncBatchNorm(3), 0.1),
    ],
    ids=[
        "momentum-0.1",
        "momentum-0.01",
        "above-the-floor",
        "below-the-floor",
        "momentum-0",
        "cumulative",
        "eval",
        "untracked",
        "bf16-buffers",
        "float64-buffers",
        "own-forward",
        "syncbn-one-process",
    ],
)
def test_which_calls_are_read_back_from_their_update(make: Callable[[], nn.Module], factor: float | None) -> None:
    module = make()
    if getattr(module, "momentum", 0.1) is None:
        module.num_batches_tracked.fill_(4)  # type: ignore[operator]
    got = update_factor(module)
    assert got == (pytest.approx(factor) if factor is not None else None)


def _watch_inputs(
    model: nn.Module, path: Path, inputs: list[torch.Tensor], *, autocast: bool = False
) -> tuple[list[list[torch.Tensor]], list[list[tuple[np.ndarray, np.ndarray]]], list[dict[str, object]]]:
    """Run ``inputs`` through ``model`` in training mode under a watch sampling every forward; return
    each step's layer inputs, each call's running buffers before and after, and the sampled details."""
    layer = next(m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    seen: list[list[torch.Tensor]] = [[] for _ in inputs]
    buffers: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in inputs]
    at = {"step": 0}

    def before(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen[at["step"]].append(args[0].detach().clone())
        buffers[at["step"]].append(
            (layer.running_mean.double().numpy().copy(), layer.running_var.double().numpy().copy())
        )

    def after(_m: nn.Module, _args: object, _out: object) -> None:
        buffers[at["step"]].append(
            (layer.running_mean.double().numpy().copy(), layer.running_var.double().numpy().copy())
        )

    handles = [layer.register_forward_pre_hook(before), layer.register_forward_hook(after)]
    model.train()
    with bn_inspect.watch(model, path, every=1, detail_every=1), torch.no_grad():
        for step, x in enumerate(inputs):
            at["step"] = step
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                model(x)
    for handle in handles:
        handle.remove()
    details = [d for r in records(path) if r["record"] == "sample" for d in r["detail"]]
    return seen, buffers, details


def _hard_batches(shape: tuple[int, ...], steps: int, channels_last: bool = False) -> list[torch.Tensor]:
    """Large means and small spreads, different per channel (0.001 to 10 around -3 to 1,000)."""
    generator = torch.Generator().manual_seed(1)
    channels = shape[1]
    view = (1, channels, *[1] * (len(shape) - 2))
    scale = torch.logspace(-3, 1, channels).reshape(view)
    centre = torch.linspace(-3.0, 1000.0, channels).reshape(view)
    out = [torch.randn(shape, generator=generator) * scale + centre for _ in range(steps)]
    return [x.contiguous(memory_format=torch.channels_last) for x in out] if channels_last else out


@pytest.mark.parametrize("momentum", [0.1, None, 2 * MIN_UPDATE_FACTOR], ids=["0.1", "cumulative", "near-the-floor"])
@pytest.mark.parametrize(
    ("cls", "shape", "channels_last"),
    [
        (nn.BatchNorm1d, (37, 5), False),
        (nn.BatchNorm1d, (3, 5, 11), False),
        (nn.BatchNorm2d, (3, 5, 7, 9), False),
        (nn.BatchNorm2d, (3, 5, 7, 9), True),
        (nn.BatchNorm3d, (2, 5, 3, 4, 5), False),
        (nn.SyncBatchNorm, (3, 5, 7, 9), False),
    ],
    ids=["1d-nc", "1d-ncl", "2d-odd", "2d-nhwc", "3d", "syncbn-one-process"],
)
def test_statistics_read_back_match_a_float64_reference_within_the_documented_tolerance(
    cls: type[nn.Module], shape: tuple[int, ...], channels_last: bool, momentum: float | None, tmp_path: Path
) -> None:
    model = nn.Sequential(cls(5, momentum=momentum))
    seen, buffers, details = _watch_inputs(model, tmp_path / "w.jsonl", _hard_batches(shape, 12, channels_last))
    assert len(details) == 12
    for step, detail in enumerate(details):
        factor = momentum if momentum is not None else 1 / (step + 1)
        assert_read_back(seen[step][0], detail, buffers[step][0], buffers[step][1], factor)


def test_below_the_floor_the_input_is_read_to_its_own_precision(tmp_path: Path) -> None:
    # The read-back tolerance at this factor (6e-8 / 5e-4 of a running variance near 1) would pass a
    # batch variance of 1e-6 twenty times over; the input's own float32 reduction does not.
    model = nn.Sequential(nn.BatchNorm2d(5, momentum=MIN_UPDATE_FACTOR / 2))
    seen, _, details = _watch_inputs(model, tmp_path / "w.jsonl", _hard_batches((3, 5, 7, 9), 4))
    for step, detail in enumerate(details):
        values = seen[step][0].double().transpose(0, 1).reshape(5, -1)
        np.testing.assert_allclose(detail["batch_mean"], values.mean(1).numpy(), rtol=MEAN_RTOL)
        np.testing.assert_allclose(detail["batch_var"], values.var(1, unbiased=False).numpy(), rtol=VAR_RTOL)


def test_a_layer_called_twice_reads_back_each_call(tmp_path: Path) -> None:
    model = new_net(cls=TwiceNet)
    batches = [torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(s)) * 0.1 + 3.0 for s in range(3)]
    seen, buffers, details = _watch_inputs(model, tmp_path / "w.jsonl", batches)
    assert [d["call"] for d in details] == [0, 1] * 3
    for step in range(3):
        # Buffers around the two calls: before the first, after it (before the second), after the second.
        around = [buffers[step][0], buffers[step][1], buffers[step][3]]
        for call in (0, 1):
            assert_read_back(seen[step][call], details[2 * step + call], around[call], around[call + 1], 0.1)


def test_under_bf16_autocast_the_layers_own_statistics_of_its_bf16_input(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4))
    batches = [torch.randn(4, 2, 9, 9, generator=torch.Generator().manual_seed(s)) + 2.0 for s in range(4)]
    seen, buffers, details = _watch_inputs(model, tmp_path / "w.jsonl", batches, autocast=True)
    assert seen[0][0].dtype == torch.bfloat16
    for step, detail in enumerate(details):
        assert_read_back(seen[step][0], detail, buffers[step][0], buffers[step][1], 0.1)


def test_the_nonfinite_count_of_a_sampled_call_read_back(tmp_path: Path) -> None:
    model = nn.Sequential(nn.BatchNorm2d(3))
    batches = [torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    batches[1][0, 1, 2, 2] = math.nan
    batches[1][3, 2, 0, 4] = math.inf
    path = tmp_path / "w.jsonl"
    _watch_inputs(model, path, batches)
    samples = [r for r in records(path) if r["record"] == "sample"]
    assert [s["layers"][0]["nonfinite"] for s in samples] == [0, 2, 0]


class Counted(torch.Tensor):
    """An input that records the reductions the watch would run over it."""

    reads: ClassVar[list[str]] = []  # reset by each test

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in (torch.var_mean, torch.isfinite):
            cls.reads.append(func.__name__)
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize(("momentum", "reads"), [(0.1, []), (MIN_UPDATE_FACTOR / 2, ["var_mean", "isfinite"] * 3)])
def test_a_sampled_training_call_reads_its_input_only_below_the_floor(
    momentum: float, reads: list[str], tmp_path: Path
) -> None:
    model = nn.Sequential(nn.BatchNorm2d(3, momentum=momentum)).train()
    Counted.reads = []
    with bn_inspect.watch(model, tmp_path / "w.jsonl", every=1), torch.no_grad():
        for seed in range(3):
            model(torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(seed)).as_subclass(Counted))
    assert Counted.reads == reads
