"""Exactness sweep: every normalization class x options x input kind x mode x dtype against float64.

Each case inspects ``nn.Sequential(layer)`` with bn-inspect and compares every reported field to an
independent numpy float64 reference. The reference itself is pinned to PyTorch's kernels: the mean
and variance a train-mode BatchNorm normalized with are recovered from its float64 output. Whether a
configuration is legal at all is decided by PyTorch: a twin of the layer is run first, and where
PyTorch raises, bn-inspect must raise one BnInspectError instead of reporting numbers.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jsonschema
import numpy as np
import pytest
import torch
from torch import nn

import bn_inspect
from bn_inspect.errors import BnInspectError
from bn_inspect.report.schemas import schema
from tests.conftest import state_fingerprint

# Left out of the quick subset (`-m "not slow"`): over a thousand parametrized exactness cases (about 75 s on 2 cores).
pytestmark = pytest.mark.slow

CHANNELS = 3
# Large mean, small spread: the case where one-pass or float32 reductions lose every digit.
MEAN, STD = 100.0, 0.01

LayerFactory = Callable[[bool, bool, float | None], nn.Module]


@dataclass(frozen=True)
class LayerSpec:
    name: str
    family: str  # "batch", "instance" or "own" (group, layer and RMS norms: no per-channel moments)
    make: LayerFactory
    shape: tuple[int, ...]  # ordinary input, N first
    has_running: bool  # the class has track_running_stats
    unbatched: bool  # the class reads an input without N as one sample (C, ...) or (*normalized_shape)
    lazy: bool = False


def _batch(cls: Any) -> LayerFactory:
    return lambda affine, track, momentum: cls(CHANNELS, affine=affine, track_running_stats=track, momentum=momentum)


def _lazy(cls: Any) -> LayerFactory:
    return lambda affine, track, momentum: cls(affine=affine, track_running_stats=track, momentum=momentum)


SPECS = [
    LayerSpec("BatchNorm1d", "batch", _batch(nn.BatchNorm1d), (4, CHANNELS, 5), True, False),
    LayerSpec("BatchNorm2d", "batch", _batch(nn.BatchNorm2d), (4, CHANNELS, 2, 3), True, False),
    LayerSpec("BatchNorm3d", "batch", _batch(nn.BatchNorm3d), (2, CHANNELS, 2, 2, 3), True, False),
    LayerSpec("SyncBatchNorm", "batch", _batch(nn.SyncBatchNorm), (4, CHANNELS, 2, 3), True, False),
    LayerSpec("LazyBatchNorm1d", "batch", _lazy(nn.LazyBatchNorm1d), (4, CHANNELS, 5), True, False, True),
    LayerSpec("LazyBatchNorm2d", "batch", _lazy(nn.LazyBatchNorm2d), (4, CHANNELS, 2, 3), True, False, True),
    LayerSpec("LazyBatchNorm3d", "batch", _lazy(nn.LazyBatchNorm3d), (2, CHANNELS, 2, 2, 3), True, False, True),
    LayerSpec("InstanceNorm1d", "instance", _batch(nn.InstanceNorm1d), (4, CHANNELS, 5), True, True),
    LayerSpec("InstanceNorm2d", "instance", _batch(nn.InstanceNorm2d), (4, CHANNELS, 2, 3), True, True),
    LayerSpec("InstanceNorm3d", "instance", _batch(nn.InstanceNorm3d), (2, CHANNELS, 2, 2, 3), True, True),
    LayerSpec("LazyInstanceNorm1d", "instance", _lazy(nn.LazyInstanceNorm1d), (4, CHANNELS, 5), True, True, True),
    LayerSpec("LazyInstanceNorm2d", "instance", _lazy(nn.LazyInstanceNorm2d), (4, CHANNELS, 2, 3), True, True, True),
    LayerSpec("LazyInstanceNorm3d", "instance", _lazy(nn.LazyInstanceNorm3d), (2, CHANNELS, 2, 2, 3), True, True, True),
    LayerSpec(
        "GroupNorm",
        "own",
        lambda affine, _t, _m: nn.GroupNorm(1, CHANNELS, affine=affine),
        (4, CHANNELS, 2, 3),
        False,
        False,
    ),
    LayerSpec(
        "LayerNorm",
        "own",
        lambda affine, _t, _m: nn.LayerNorm([2, 3], elementwise_affine=affine),
        (4, CHANNELS, 2, 3),
        False,
        True,
    ),
    LayerSpec(
        "RMSNorm",
        "own",
        lambda affine, _t, _m: nn.RMSNorm([2, 3], elementwise_affine=affine),
        (4, CHANNELS, 2, 3),
        False,
        True,
    ),
]


@dataclass(frozen=True)
class Case:
    spec: LayerSpec
    affine: bool
    track: bool
    momentum: float | None
    kind: str  # "ordinary", "unbatched" or "empty"
    mode: str
    dtype: torch.dtype

    @property
    def id(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{self.spec.name}-affine{int(self.affine)}-track{int(self.track)}-m{self.momentum}-{self.kind}-{self.mode}-{dtype}"

    def shape(self) -> tuple[int, ...]:
        if self.kind == "unbatched":
            return self.spec.shape[1:] if self.spec.family != "own" else self.spec.shape[2:]
        if self.kind == "empty":
            return (0, *self.spec.shape[1:])
        return self.spec.shape

    def make(self) -> nn.Module:
        torch.manual_seed(0)
        layer = self.spec.make(self.affine, self.track, self.momentum)
        if not self.spec.lazy:
            self._perturb(layer)
        return layer

    def _perturb(self, layer: nn.Module) -> None:
        """Trained-looking parameters and running buffers, so no value in the report is a default."""
        with torch.no_grad():
            for name, tensor in [*layer.named_parameters(), *layer.named_buffers()]:
                if name == "running_var":
                    tensor.copy_(torch.rand_like(tensor) + 0.5)
                elif name == "num_batches_tracked":
                    tensor.fill_(7)
                else:
                    tensor.copy_(torch.randn_like(tensor))
        layer.to(self.dtype)

    def data(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(1)
        values = torch.randn(self.shape(), generator=generator, dtype=torch.float64) * STD + MEAN
        return values.to(self.dtype)


def _cases() -> Iterator[Case]:
    for spec in SPECS:
        tracks = (False, True) if spec.has_running else (False,)
        momenta: tuple[float | None, ...] = (0.1, None) if spec.has_running else (0.1,)
        kinds = ("ordinary", "empty", "unbatched")
        for affine in (False, True):
            for track in tracks:
                for momentum in momenta:
                    for kind in kinds:
                        for mode in ("eval", "train"):
                            for dtype in (torch.float32, torch.float64):
                                yield Case(spec, affine, track, momentum, kind, mode, dtype)


def _params() -> list[Any]:
    return [pytest.param(case, id=case.id) for case in _cases()]


# ---------------------------------------------------------------------------------------------
# The float64 reference


def _channel_moments(case: Case, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Per-channel (mean, biased var, unbiased var) as bn-inspect defines them, in float64."""
    if values.size == 0 or case.spec.family == "own":
        return None
    if case.spec.family == "batch":
        # An input without N is read as (N, C, ...) by PyTorch too: dim 1 holds the channels.
        per_channel = np.moveaxis(values, 1, 0).reshape(values.shape[1], -1)
        n = per_channel.shape[1]
        mean = per_channel.mean(axis=1)
        var = ((per_channel - mean[:, None]) ** 2).mean(axis=1)
        return mean, var, var * n / (n - 1)
    # InstanceNorm: per-instance moments over the spatial dims, averaged over the samples.
    batched = values if case.kind != "unbatched" else values[None]
    instances = batched.reshape(batched.shape[0], CHANNELS, -1)
    n = instances.shape[2]
    mean = instances.mean(axis=2)
    var = ((instances - mean[..., None]) ** 2).mean(axis=2)
    return mean.mean(axis=0), var.mean(axis=0), (var * n / (n - 1)).mean(axis=0)


def _values_per_channel(case: Case, shape: tuple[int, ...]) -> int | None:
    if case.spec.family == "own":
        return None
    channels = shape[0] if case.kind == "unbatched" and case.spec.unbatched else shape[1]
    return int(np.prod(shape)) // channels


def _reduced_axes(case: Case, shape: tuple[int, ...]) -> list[int]:
    rank = len(shape)
    if case.spec.family == "batch":
        return [0, *range(2, rank)]
    if case.spec.family == "instance":
        first_spatial = 1 if case.kind == "unbatched" else 2
        return list(range(first_spatial, rank))
    if case.spec.name == "GroupNorm":
        return list(range(1, rank))
    return [rank - 2, rank - 1]  # normalized_shape [2, 3]: the two trailing dims


def _normalizes_with(case: Case) -> str:
    """PyTorch's rule (BN-FACTS): eval uses batch statistics only where there are no running buffers."""
    if case.mode == "train" or case.spec.family == "own" or not case.track:
        return "batch"
    return "running"


def _torch_refuses(case: Case) -> bool:
    layer = case.make()
    layer.train(case.mode == "train")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # A lazy layer without parameters or buffers warns that its num_features (0) is unused.
            warnings.simplefilter("ignore", UserWarning)
            layer(case.data())
    except (ValueError, RuntimeError, IndexError):
        return True
    return False


# ---------------------------------------------------------------------------------------------
# Comparisons


def _tolerances(case: Case) -> tuple[float, float]:
    """(relative tolerance of means, of variances)."""
    return (1e-12, 1e-10) if case.dtype == torch.float64 else (1e-6, 1e-6)


def _close(actual: Any, expected: Any, rtol: float, field: str) -> None:
    if expected is None:
        assert actual is None, f"{field}: expected None, got {actual}"
        return
    assert actual is not None, f"{field}: expected {expected}, got None"
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, rtol=rtol, atol=0, err_msg=field)


def _expected_state(case: Case, data: torch.Tensor) -> dict[str, torch.Tensor]:
    """The layer's state after inspection: as before, with a lazy one materialized as PyTorch would."""
    twin = case.make()
    if case.spec.lazy:
        twin.eval()
        with torch.no_grad():
            twin(data)
        twin.to(case.dtype)
    return {name: tensor.clone() for name, tensor in twin.state_dict().items()}


def _check_report(case: Case, layer_report: dict[str, Any], before: dict[str, torch.Tensor]) -> None:
    values = case.data().to(torch.float64).numpy()
    shape = tuple(values.shape)
    mean_rtol, var_rtol = _tolerances(case)
    moments = _channel_moments(case, values)
    assert layer_report["type"] == case.spec.name
    assert list(layer_report["input_shape"]) == list(shape)
    assert layer_report["values_per_channel"] == _values_per_channel(case, shape)
    assert list(layer_report["reduced_axes"]) == _reduced_axes(case, shape)
    assert layer_report["normalizes_with"] == _normalizes_with(case)
    assert layer_report["affine"] is case.affine
    _close(layer_report["batch_mean"], None if moments is None else moments[0], mean_rtol, "batch_mean")
    _close(layer_report["batch_var"], None if moments is None else moments[1], var_rtol, "batch_var")
    _close(layer_report["batch_var_unbiased"], None if moments is None else moments[2], var_rtol, "batch_var_unbiased")
    running = case.spec.has_running and case.track
    assert layer_report["track_running_stats"] is running
    for field in ("running_mean", "running_var"):
        expected = before[field].double().numpy() if running else None
        _close(layer_report[field], expected, 0.0 if case.dtype == torch.float64 else 1e-7, field)
    for field in ("weight", "bias"):
        expected = before[field].double().numpy().reshape(-1) if field in before else None
        _close(layer_report[field], expected, 1e-7, field)
    if case.spec.family == "batch" and running:
        assert layer_report["num_batches_tracked"] == int(before["num_batches_tracked"])
    untrained = running and bool(torch.all(before["running_mean"] == 0) and torch.all(before["running_var"] == 1))
    assert ("untrained" in layer_report["flags"]) is untrained, layer_report["flags"]


@pytest.mark.parametrize("case", _params())
def test_sweep(case: Case) -> None:
    model = nn.Sequential(case.make())
    data = case.data()
    refused = _torch_refuses(case)
    fingerprint = None if case.spec.lazy else state_fingerprint(model)
    if refused:
        with pytest.raises(BnInspectError) as raised:
            bn_inspect.inspect_model(model, [data], mode=case.mode, materialize_lazy=True)
        assert "\n" not in str(raised.value)
        assert fingerprint is None or state_fingerprint(model) == fingerprint
        return
    report = bn_inspect.inspect_model(model, [data], mode=case.mode, materialize_lazy=True)
    document = json.loads(json.dumps(report.to_dict()))
    jsonschema.validate(document, schema("inspect"))
    assert document["mode"] == case.mode
    [layer_report] = document["layers"]
    expected_state = _expected_state(case, data)
    _check_report(case, layer_report, expected_state)
    # The model after the run: nothing changed (a lazy one only materialized, its buffers fresh).
    assert model.training is True and model[0].training is True
    if fingerprint is not None:
        assert state_fingerprint(model) == fingerprint
    state = model[0].state_dict()
    assert sorted(state) == sorted(expected_state)
    for name, tensor in state.items():
        assert torch.equal(tensor, expected_state[name]), name


# ---------------------------------------------------------------------------------------------
# The reference against PyTorch's own kernel


@pytest.mark.parametrize("shape", [(4, CHANNELS, 5), (2, CHANNELS, 2, 3), (3, CHANNELS, 2, 2, 2), (6, CHANNELS)])
def test_reference_matches_what_batch_norm_normalized_with(shape: tuple[int, ...]) -> None:
    """Recover mean and var from a float64 train-mode BatchNorm output: y = (x - mean) / sqrt(var + eps)."""
    case = Case(SPECS[0], False, True, 0.1, "ordinary", "train", torch.float64)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * STD + MEAN
    layer = nn.BatchNorm1d if len(shape) <= 3 else nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm3d
    norm = layer(CHANNELS, affine=False, eps=1e-12, dtype=torch.float64).train()
    with torch.no_grad():
        y = norm(x)
    xs = np.moveaxis(x.numpy(), 1, 0).reshape(CHANNELS, -1)
    ys = np.moveaxis(y.numpy(), 1, 0).reshape(CHANNELS, -1)
    # y is affine in x per channel: slope 1/sqrt(var + eps), intercept -mean * slope.
    centered = xs - xs.mean(axis=1, keepdims=True)
    slope = (centered * (ys - ys.mean(axis=1, keepdims=True))).sum(axis=1) / (centered**2).sum(axis=1)
    recovered_mean = xs.mean(axis=1) - ys.mean(axis=1) / slope
    recovered_var = 1 / slope**2 - 1e-12
    reference = _channel_moments(case, x.numpy())
    assert reference is not None
    np.testing.assert_allclose(recovered_mean, reference[0], rtol=1e-12, atol=0)
    np.testing.assert_allclose(recovered_var, reference[1], rtol=1e-8, atol=0)
    # And the running update PyTorch made used the unbiased variance of the reference.
    np.testing.assert_allclose(norm.running_var.numpy(), 0.9 + 0.1 * reference[2], rtol=1e-12, atol=0)
