"""The departure score (report/departure.py) against an independent float64 reference, its tiers and its edges."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from bn_inspect.analyses.inspection import inspect_model
from bn_inspect.report.departure import ERROR, INFO, WARNING, WITHIN, Thresholds, channel_distances, departure


def _reference_distances(x: np.ndarray, running_mean: np.ndarray, running_var: np.ndarray, eps: float) -> np.ndarray:
    """W2 per channel in running stds from the raw data, in float64 with numpy."""
    reduced = tuple(d for d in range(x.ndim) if d != 1)
    batch_mean = x.mean(axis=reduced)
    batch_std = np.sqrt(x.var(axis=reduced) + eps)
    running_std = np.sqrt(running_var + eps)
    return np.sqrt((batch_mean - running_mean) ** 2 + (batch_std - running_std) ** 2) / running_std


def _bn(channels: int, dims: int, running_mean: np.ndarray, running_var: np.ndarray, dtype: torch.dtype) -> nn.Module:
    layer = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](channels).to(dtype)
    with torch.no_grad():
        layer.running_mean.copy_(torch.from_numpy(running_mean))
        layer.running_var.copy_(torch.from_numpy(running_var))
    return layer.eval()


@pytest.mark.parametrize(
    ("shape", "dtype", "scale", "offset"),
    [
        ((37, 5), torch.float64, 1.0, 0.0),
        ((13, 3, 7), torch.float64, 1e-3, 1e4),  # large means, tiny variances
        ((9, 4, 5, 3), torch.float32, 2.0, 50.0),
        ((5, 2, 3, 2, 3), torch.float64, 0.1, -7.0),
    ],
)
def test_the_score_matches_a_float64_reference(
    shape: tuple[int, ...], dtype: torch.dtype, scale: float, offset: float
) -> None:
    rng = np.random.default_rng(len(shape))
    channels = shape[1]
    x = rng.standard_normal(shape) * scale * rng.uniform(0.5, 2.0, channels).reshape(1, -1, *[1] * (len(shape) - 2))
    x += offset + rng.standard_normal(channels).reshape(1, -1, *[1] * (len(shape) - 2)) * scale
    running_mean = offset + rng.standard_normal(channels) * scale * 0.7
    running_var = (scale * rng.uniform(0.3, 3.0, channels)) ** 2
    data = torch.from_numpy(x).to(dtype)
    layer = _bn(channels, max(1, len(shape) - 2), running_mean, running_var, dtype)
    report = inspect_model(nn.Sequential(layer), [data[: shape[0] // 2], data[shape[0] // 2 :]])
    found = departure(report.layers[0])
    assert found is not None and found.samples == shape[0]
    distances = _reference_distances(data.double().numpy(), running_mean, running_var, layer.eps)
    expected = float(distances.mean() / (0.1 + 3 / math.sqrt(shape[0])))
    tolerance = 1e-9 if dtype == torch.float64 else 1e-5
    assert found.score == pytest.approx(expected, rel=tolerance)
    # The DataFrame (and so the CSV) carries each channel's distance and the layer's score.
    frame = report.to_dataframe()
    assert frame["distance"].tolist() == pytest.approx(distances.tolist(), rel=tolerance)
    assert set(frame["departure"]) == {found.score}


def test_a_mean_shift_and_a_variance_ratio_give_their_distances() -> None:
    eps = 0.0
    # A shift of z running stds gives |z|; a variance ratio r gives |sqrt(r) - 1|.
    assert channel_distances([3.0], [4.0], [1.0], [4.0], eps) == pytest.approx((1.0,))
    assert channel_distances([0.0], [9.0], [0.0], [1.0], eps) == pytest.approx((2.0,))
    assert channel_distances([0.0], [0.0], [0.0], [1.0], eps) == pytest.approx((1.0,))
    assert channel_distances([1.0], [1.0], [0.0], [0.0], eps)[0] == math.inf
    assert math.isnan(channel_distances([math.nan], [1.0], [0.0], [1.0], eps)[0])


def _single_layer(mean_shift: float, samples: int) -> float:
    """The score of a BatchNorm1d(4) whose data sits ``mean_shift`` running stds off, on ``samples`` samples."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((samples, 4))
    x = (x - x.mean(axis=0)) / x.std(axis=0) + mean_shift
    layer = _bn(4, 1, np.zeros(4), np.full(4, 1.0 - 1e-5), torch.float64)
    found = departure(inspect_model(nn.Sequential(layer), [torch.from_numpy(x)]).layers[0])
    assert found is not None
    return found.score


def test_the_allowance_grows_as_samples_shrink() -> None:
    # The same shift scores lower on fewer samples: sampling noise explains more of it.
    assert _single_layer(0.5, 16) < _single_layer(0.5, 400) < _single_layer(0.5, 10_000)
    assert _single_layer(0.5, 10_000) == pytest.approx(0.5 / (0.1 + 3 / 100), rel=1e-9)


def test_tiers_follow_the_thresholds() -> None:
    limits = Thresholds()
    assert [limits.tier(s) for s in (0.1, 0.5, 0.83, 1.69, 1.7, math.inf, math.nan)] == [
        WITHIN,
        INFO,
        WARNING,
        WARNING,
        ERROR,
        ERROR,
        ERROR,
    ]


def test_layers_without_samples_or_running_statistics_are_not_scored() -> None:
    layer = _bn(3, 1, np.zeros(3), np.ones(3), torch.float32)
    report = inspect_model(nn.Sequential(layer), [torch.zeros(0, 3)])
    assert departure(report.layers[0]) is None
    plain = nn.BatchNorm1d(3, track_running_stats=False).eval()
    assert departure(inspect_model(nn.Sequential(plain), [torch.randn(8, 3)]).layers[0]) is None


def test_a_nonfinite_channel_is_an_error_named_by_channel() -> None:
    layer = _bn(3, 1, np.zeros(3), np.ones(3), torch.float32)
    x = torch.randn(8, 3)
    x[0, 1] = math.inf
    found = departure(inspect_model(nn.Sequential(layer), [x]).layers[0])
    assert found is not None and found.tier == ERROR and found.nonfinite == (1,)
    assert "NaN or infinite" in found.describe()


def test_the_api_gives_each_layer_its_departure_and_the_model_its_worst() -> None:
    model = nn.Sequential(
        _bn(3, 1, np.zeros(3), np.ones(3), torch.float64), _bn(3, 1, np.full(3, 5.0), np.ones(3), torch.float64)
    )
    report = inspect_model(model, [torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))])
    first, second = (layer.departure for layer in report.layers)
    assert first is not None and second is not None and second.score > first.score
    worst = report.worst_departure()
    assert worst is not None and worst[0] is report.layers[1] and worst[1] == second
    assert report.first_divergent() is report.layers[1]
