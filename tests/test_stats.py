"""Per-channel moments against an independent float64 reference (numpy), and their exact merge."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bn_inspect.engine.moments import ChannelMoments, channel_moments, instance_moments, two_pass_moments
from tests.models import make_input


def reference(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """float64 mean and biased variance over every axis but 1, computed by numpy."""
    values = np.moveaxis(x.double().numpy(), 1, 0).reshape(x.shape[1], -1)
    return values.mean(axis=1), values.var(axis=1)


SHAPES = [(64, 16), (7, 5, 33), (3, 6, 17, 19), (2, 4, 5, 6, 7), (5, 3, 2, 2, 2, 2), (1, 3, 5, 5)]
DATA = [(0.0, 1.0), (1e4, 1e-2), (1e6, 1.0), (-3.0, 1e-4), (1e3, 1e-3)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(("mean", "std"), DATA, ids=lambda v: f"{v:g}")
def test_channel_moments_match_float64_reference(shape: tuple[int, ...], mean: float, std: float) -> None:
    x = make_input(shape, mean=mean, std=std, seed=len(shape))
    ref_mean, ref_var = reference(x)
    moments = channel_moments(x)
    n = x.numel() // x.shape[1]
    assert moments.count == n
    # The float32 input itself is the data: the reference sees exactly the same values.
    np.testing.assert_allclose(moments.mean.numpy(), ref_mean, rtol=1e-7, atol=np.sqrt(ref_var).max() * 1e-6)
    np.testing.assert_allclose(moments.biased_var().numpy(), ref_var, rtol=2e-5, atol=1e-30)
    np.testing.assert_allclose(moments.unbiased_var().numpy(), ref_var * n / (n - 1), rtol=2e-5, atol=1e-30)


@pytest.mark.parametrize(
    "shape",
    [(4, 3, 256, 256), (300, 5, 9, 9), (1, 2, 700, 700), (3, 8, 130, 130)],
    ids=str,
)
def test_many_values_per_channel_keep_float32_sums_accurate(shape: tuple[int, ...]) -> None:
    # Hundreds of thousands of values per channel, spread over several cache-sized pieces: a
    # naive float32 accumulation (or vector_norm's) drifts by 1e-4 here; cascade sums stay near 1e-6.
    x = make_input(shape, mean=0.3, std=0.5, seed=3)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    ref_mean, ref_var = reference(x)
    for data in (x, channels_last):
        moments = channel_moments(data)
        np.testing.assert_allclose(moments.mean.numpy(), ref_mean, rtol=1e-7, atol=np.sqrt(ref_var).max() * 1e-6)
        np.testing.assert_allclose(moments.biased_var().numpy(), ref_var, rtol=5e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_low_and_high_precision_inputs_are_reduced_exactly(dtype: torch.dtype) -> None:
    x = make_input((8, 4, 9, 9), mean=3.0, std=0.5).to(dtype)
    ref_mean, ref_var = reference(x)
    moments = channel_moments(x)
    np.testing.assert_allclose(moments.mean.numpy(), ref_mean, rtol=1e-6)
    np.testing.assert_allclose(moments.biased_var().numpy(), ref_var, rtol=1e-5)


def test_outlier_shift_falls_back_to_two_pass_and_stays_exact() -> None:
    # The first value of each channel is the shift; making it a 1e4-sigma outlier defeats the shifted sums.
    x = make_input((16, 3, 8, 8), mean=5.0, std=1e-3)
    x[0, :, 0, 0] = 1e2
    ref_mean, ref_var = reference(x)
    moments = channel_moments(x)
    np.testing.assert_allclose(moments.biased_var().numpy(), ref_var, rtol=1e-5)
    np.testing.assert_allclose(moments.mean.numpy(), ref_mean, rtol=1e-7)


def test_constant_and_nan_channels() -> None:
    x = make_input((4, 3, 5, 5))
    x[:, 0] = 7.25
    x[:, 2] = float("nan")
    moments = channel_moments(x)
    assert moments.mean[0].item() == 7.25
    assert moments.biased_var()[0].item() == 0.0
    assert torch.isnan(moments.mean[2]) and torch.isnan(moments.biased_var()[2])
    assert torch.isfinite(moments.biased_var()[1])


def test_one_value_per_channel_has_no_unbiased_variance() -> None:
    moments = channel_moments(torch.tensor([[1.0, 2.0, 3.0]]))
    assert moments.count == 1
    assert moments.biased_var().tolist() == [0.0, 0.0, 0.0]
    assert torch.isnan(moments.unbiased_var()).all()


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=6),
    mean=st.sampled_from([0.0, 1e4, -250.0, 1e6]),
    std=st.sampled_from([1.0, 1e-2, 30.0]),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_merge_of_uneven_batches_equals_population_statistics(
    sizes: list[int], mean: float, std: float, seed: int
) -> None:
    batches = [make_input((n, 3, 4), mean=mean, std=std, seed=seed + i) for i, n in enumerate(sizes)]
    merged = ChannelMoments(0, torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    for batch in batches:
        merged = merged.merge(channel_moments(batch))
    ref_mean, ref_var = reference(torch.cat(batches))
    assert merged.count == sum(sizes) * 4
    np.testing.assert_allclose(merged.mean.numpy(), ref_mean, rtol=1e-9, atol=std * 1e-6)
    np.testing.assert_allclose(merged.biased_var().numpy(), ref_var, rtol=2e-5, atol=(std * 1e-6) ** 2)


def test_merge_is_not_an_average_of_batch_variances() -> None:
    low, high = torch.zeros(10, 1), torch.ones(10, 1)
    merged = channel_moments(low).merge(channel_moments(high))
    assert merged.biased_var().item() == pytest.approx(0.25)
    assert merged.mean.item() == pytest.approx(0.5)


def test_instance_moments_average_per_instance_statistics() -> None:
    x = make_input((6, 4, 5, 7), mean=2.0, std=3.0)
    flat = x.double().numpy().reshape(6, 4, -1)
    moments = instance_moments(x[:2]).merge(instance_moments(x[2:]))
    np.testing.assert_allclose(moments.mean.numpy(), flat.mean(axis=2).mean(axis=0), rtol=1e-7)
    np.testing.assert_allclose(moments.biased_var().numpy(), flat.var(axis=2).mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(moments.unbiased_var().numpy(), flat.var(axis=2, ddof=1).mean(axis=0), rtol=1e-5)


def _cuda_batch_norm_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What CUDA's torch.batch_norm_stats returns, in float32: mean and InvStd(var, eps).

    torch's InvStd functor gives 0 when var == 0 and eps == 0, and 1 / sqrt(var + eps) otherwise.
    """
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(x.double(), dim=dims, correction=0)
    var = var.float()  # the kernel accumulates in float32: a huge variance overflows to inf
    zero_stays_zero = (var == 0) & (eps == 0)
    invstd = torch.where(zero_stays_zero, torch.zeros_like(var), 1 / (var + eps).sqrt())
    return mean.float(), invstd.float()


def test_cuda_statistics_give_zero_variance_for_constant_channels(monkeypatch: pytest.MonkeyPatch) -> None:
    # The CUDA path cannot run here; the kernel's contract can. A dead channel must read as
    # variance 0 (not inf), an overflowed one as inf, and the others keep float32 accuracy.
    from bn_inspect.engine.moments import welford_moments

    monkeypatch.setattr(torch, "batch_norm_stats", _cuda_batch_norm_stats)
    x = make_input((8, 4, 5, 5), mean=2.0, std=0.5)
    x[:, 0] = 0.0
    x[:, 1] = 1e3
    x[:, 2] *= 1e-12
    moments = welford_moments(x, x.numel() // x.shape[1])
    ref_mean, ref_var = reference(x)
    var = moments.biased_var().numpy()
    assert var[0] == 0 and var[1] == 0
    np.testing.assert_allclose(var[2:], ref_var[2:], rtol=1e-6)
    np.testing.assert_allclose(moments.mean.numpy(), ref_mean, rtol=1e-6, atol=1e-30)
    huge = make_input((2, 1, 3, 3)) * 3e19
    assert np.isinf(welford_moments(huge, 18).biased_var().numpy()).all()


def float64_input(shape: tuple[int, ...], *, mean: float, std: float, seed: int = 0) -> torch.Tensor:
    """float64 data that float32 cannot hold: a large mean, a tiny spread, an offset per channel."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * std + mean
    return x + torch.randn(shape[1], generator=generator, dtype=torch.float64).view(1, -1, *[1] * (len(shape) - 2))


def instance_reference(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """float64 average over samples of each (sample, channel)'s mean and biased variance, by numpy."""
    values = x.numpy().reshape(x.shape[0], x.shape[1], -1)
    return values.mean(axis=2).mean(axis=0), values.var(axis=2).mean(axis=0)


FLOAT64_DATA = [(1e3, 1e-2), (1e5, 1e-3), (0.5, 1.0)]


@pytest.mark.parametrize("shape", [(6, 3, 700), (4, 5, 9, 11), (2, 3, 4, 5, 6)], ids=str)
@pytest.mark.parametrize(("mean", "std"), FLOAT64_DATA, ids=str)
def test_float64_input_is_reduced_in_float64(shape: tuple[int, ...], mean: float, std: float) -> None:
    x = float64_input(shape, mean=mean, std=std)
    ref_mean, ref_var = reference(x)
    moments = channel_moments(x)
    np.testing.assert_allclose(moments.mean.numpy(), ref_mean, rtol=1e-12)
    np.testing.assert_allclose(moments.biased_var().numpy(), ref_var, rtol=1e-12)
    # The exact fallback (taken when shifted sums cancel) is as precise.
    fallback = two_pass_moments(x, [0, *range(2, x.dim())], moments.count)
    np.testing.assert_allclose(fallback.mean.numpy(), ref_mean, rtol=1e-12)
    np.testing.assert_allclose(fallback.biased_var().numpy(), ref_var, rtol=1e-12)
    ref_instance_mean, ref_instance_var = instance_reference(x)
    instances = instance_moments(x)
    np.testing.assert_allclose(instances.mean.numpy(), ref_instance_mean, rtol=1e-12)
    np.testing.assert_allclose(instances.biased_var().numpy(), ref_instance_var, rtol=1e-12)
