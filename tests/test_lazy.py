"""Lazy norm layers materialized by the inspection's own first forward: what they normalize with,
what they are left holding, and the inputs PyTorch refuses to materialize them from."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from bn_inspect.analyses.inspection import inspect_model
from bn_inspect.errors import BnInspectError
from tests.test_stats import float64_input, instance_reference, reference

LAZY_CASES = [
    (nn.LazyBatchNorm1d, (16, 3)),
    (nn.LazyBatchNorm1d, (6, 3, 7)),
    (nn.LazyBatchNorm2d, (4, 3, 5, 6)),
    (nn.LazyBatchNorm3d, (2, 3, 4, 5, 3)),
    (nn.LazyInstanceNorm1d, (6, 3, 7)),
    (nn.LazyInstanceNorm2d, (4, 3, 5, 6)),
    (nn.LazyInstanceNorm3d, (2, 3, 4, 5, 3)),
]
IDS = [f"{cls.__name__}{shape}" for cls, shape in LAZY_CASES]


def lazy_model(cls: type[nn.Module], **kwargs: object) -> nn.Sequential:
    return nn.Sequential(cls(track_running_stats=True, **kwargs)).double()


def materialized_twin(twin: nn.Sequential, x: torch.Tensor) -> nn.Sequential:
    """``twin`` as its first forward materializes it, before any update of its statistics.

    (A lazy module cannot be deep-copied, so the twin is built alongside.)
    """
    with torch.no_grad():
        twin(x)
    norm = twin[0]
    assert isinstance(norm, nn.modules.batchnorm._NormBase)
    norm.reset_running_stats()
    return twin


@pytest.mark.parametrize(("cls", "shape"), LAZY_CASES, ids=IDS)
def test_eval_mode_normalizes_with_the_freshly_materialized_running_statistics(
    cls: type[nn.Module], shape: tuple[int, ...]
) -> None:
    x = float64_input(shape, mean=3.0, std=2.0)
    report = inspect_model(lazy_model(cls).eval(), [x], materialize_lazy=True)
    entry = report.layers[0]
    assert entry.normalizes_with == "running"
    assert "no-running-stats" not in entry.flags and "lazy" in entry.flags
    assert entry.type.raw == cls.__name__ and entry.num_channels == 3
    assert entry.running_mean == (0.0, 0.0, 0.0) and entry.running_var == (1.0, 1.0, 1.0)
    assert entry.num_batches_tracked == 0
    ref_mean, ref_var = (instance_reference if "Instance" in cls.__name__ else reference)(x)
    np.testing.assert_allclose(entry.batch_mean, ref_mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(entry.batch_var, ref_var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("cls", "shape"), LAZY_CASES, ids=IDS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_model_comes_out_as_materialized_without_the_runs_updates(
    cls: type[nn.Module], shape: tuple[int, ...], mode: str
) -> None:
    x = float64_input(shape, mean=3.0, std=2.0)
    model = lazy_model(cls, affine=True)
    model.train(mode == "train")
    twin = materialized_twin(lazy_model(cls, affine=True).train(mode == "train"), x)
    report = inspect_model(model, [x, x + 1.0], mode=mode, materialize_lazy=True)
    assert report.layers[0].normalizes_with == ("batch" if mode == "train" else "running")
    assert type(model[0]) is type(twin[0])
    assert model[0].training == (mode == "train") and model.training == (mode == "train")
    for (name, buffer), (_, expected) in zip(model.state_dict().items(), twin.state_dict().items(), strict=True):
        assert torch.equal(buffer, expected), name


@pytest.mark.parametrize("cls", [nn.LazyInstanceNorm1d, nn.LazyInstanceNorm2d, nn.LazyInstanceNorm3d])
@pytest.mark.parametrize("affine", [False, True])
def test_an_unbatched_input_pytorch_cannot_materialize_from_is_refused_in_one_line(
    cls: type[nn.Module], affine: bool
) -> None:
    # PyTorch takes a lazy layer's channel count from dim 1, which an unbatched input does not hold.
    shape = {nn.LazyInstanceNorm1d: (3, 5), nn.LazyInstanceNorm2d: (3, 4, 5), nn.LazyInstanceNorm3d: (3, 4, 5, 2)}
    x = float64_input((1, *shape[cls]), mean=0.0, std=1.0)[0]
    with pytest.raises((ValueError, RuntimeError)), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # without affine terms PyTorch warns of the mismatch first
        lazy_model(cls, affine=affine).eval()(x)
    with pytest.raises(BnInspectError) as refused:
        inspect_model(lazy_model(cls, affine=affine).eval(), [x], materialize_lazy=True)
    message = str(refused.value)
    assert "\n" not in message
    assert "dim 1 (" in message and "batched input" in message


def test_an_unbatched_input_whose_dims_agree_materializes_as_in_pytorch() -> None:
    x = float64_input((1, 4, 4), mean=0.0, std=1.0)[0]
    expected = lazy_model(nn.LazyInstanceNorm1d).eval()(x)
    model = lazy_model(nn.LazyInstanceNorm1d).eval()
    report = inspect_model(model, [x], materialize_lazy=True)
    assert report.layers[0].normalizes_with == "running" and report.layers[0].num_channels == 4
    assert torch.equal(model(x), expected)
