"""BN205: running statistics accumulated from batches of a few samples (report/small_batch.py), and the
per-sample moments behind it (engine/moments.py's sample_moments)."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import torch
from torch import nn

from bn_inspect.analyses.checking import check_model
from bn_inspect.analyses.inspection import inspect_model
from bn_inspect.analyses.recalibration import recalibrate
from bn_inspect.cli.main import run
from bn_inspect.engine.capture import StatisticsRecorder, hooks_capture
from bn_inspect.engine.moments import sample_moments
from bn_inspect.model.modules import find_layers
from bn_inspect.report.findings import Finding, Severity, departing_past_error
from bn_inspect.report.layer_moments import SampleSpread
from bn_inspect.report.schemas import schema
from bn_inspect.report.small_batch import LEVEL, estimate, estimate_beside, first_layer_departure, layer_gap
from bn_inspect.text import Untrusted
from tests.conftest import state_fingerprint
from tests.test_causes import layer as layer_report


def reference_between_var(x: torch.Tensor) -> torch.Tensor:
    """Float64: each sample's channel mean over the spatial dims, then their biased variance over samples."""
    means = x.double().flatten(2).mean(2)
    return ((means - means.mean(0)) ** 2).mean(0)


@pytest.mark.parametrize(
    ("shape", "mean", "between", "within", "dtype"),
    [
        ((7, 5, 3, 5), 0.0, 1.0, 1.0, torch.float32),  # odd sizes
        ((16, 4, 6, 6), 1e4, 1e-3, 1e-1, torch.float32),  # large means, tiny spread between samples
        ((9, 3, 2, 2, 3), -3.0, 0.5, 2.0, torch.float32),  # 3-D spatial
        ((6, 4, 5, 5), 1e6, 1e-2, 1.0, torch.float64),  # a float64 model's activations
        ((5, 2, 4, 4), 2.0, 1.0, 1.0, torch.bfloat16),
        ((5, 2, 4, 4), 300.0, 1e-2, 1.0, torch.float16),  # summed in float32, without a float32 copy
    ],
)
def test_sample_moments_match_float64(
    shape: tuple[int, ...], mean: float, between: float, within: float, dtype: torch.dtype
) -> None:
    generator = torch.Generator().manual_seed(0)
    offsets = torch.randn(shape[0], shape[1], *[1] * (len(shape) - 2), generator=generator, dtype=torch.float64)
    x64 = mean + between * offsets + within * torch.randn(shape, generator=generator, dtype=torch.float64)
    x = x64.to(dtype)
    found = sample_moments(x)
    assert found.count == shape[0]
    expected = reference_between_var(x)
    torch.testing.assert_close(found.biased_var(), expected, rtol=1e-6, atol=0)


def test_sample_moments_merge_over_uneven_and_empty_batches() -> None:
    generator = torch.Generator().manual_seed(1)
    x = 5.0 + torch.randn(13, 6, 1, 1, generator=generator) + 0.3 * torch.randn(13, 6, 4, 4, generator=generator)
    parts = [x[:5], x[5:5], x[5:12], x[12:]]
    merged = sample_moments(parts[0])
    for part in parts[1:]:
        merged = merged.merge(sample_moments(part))
    assert merged.count == 13
    torch.testing.assert_close(merged.biased_var(), reference_between_var(x), rtol=1e-6, atol=0)


def test_the_recorder_keeps_sample_moments_only_when_asked_and_only_with_spatial_dims() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(5), nn.BatchNorm1d(5))
    model(torch.randn(2, 3, 6, 6))
    model.eval()
    layers, _ = find_layers(model)
    x = torch.randn(8, 3, 6, 6)
    for asked in (False, True):
        recorder = StatisticsRecorder(sample_means=asked)
        with hooks_capture(layers, recorder), torch.no_grad():
            recorder.start_batch()
            model(x)
        kept = {name: record.sample_moments is not None for (name, _), record in recorder.records.items()}
        assert kept == {"1": asked, "4": False}


def _planted(inverse_batch: float, share: float = 0.5, noise_samples: int = 10_000) -> list:
    """Layers whose running variances lack ``inverse_batch`` of their between-sample share: ``share``
    past the first layer, which, as in a conv net on images, varies little between samples (1%)."""
    layers = []
    for index, values_per_sample in enumerate((64, 16, 4)):
        total = [1.0 + 0.5 * c for c in range(8)]
        between = [(share if index else 0.01) * t for t in total]
        running = [t - b * inverse_batch for t, b in zip(total, between, strict=True)]
        made = layer_report(
            f"bn{index}", ([0.0] * 8, running), ([0.0] * 8, total), shape=(noise_samples, 8, values_per_sample, 1)
        )
        made = replace(
            made,
            values_per_channel=noise_samples * values_per_sample,
            sample_spread=SampleSpread(noise_samples, tuple(between)),
        )
        layers.append(made)
    return layers


@pytest.mark.parametrize("batch_size", [1, 2, 3, 8, 64])
def test_the_estimate_reads_the_batch_size_off_planted_statistics(batch_size: int) -> None:
    found = estimate(_planted(1 / batch_size))
    assert found is not None
    assert found.inverse_batch == pytest.approx(1 / batch_size, rel=1e-12)
    assert found.fires is (1 / batch_size - 2 * found.noise >= LEVEL)
    assert found.fires is (batch_size <= 2)


def test_few_samples_make_the_estimate_too_noisy_to_fire() -> None:
    found = estimate(_planted(0.5, noise_samples=8))
    assert found is not None and found.inverse_batch == pytest.approx(0.5) and not found.fires


def test_layers_that_tell_nothing_are_left_out() -> None:
    planted = _planted(0.5)
    without_spread = [replace(layer, sample_spread=None) for layer in planted]
    in_train_mode = [replace(layer, normalizes_with="batch") for layer in planted]
    one_value_per_sample = [
        replace(layer, values_per_channel=layer.sample_spread.num_samples) for layer in planted if layer.sample_spread
    ]
    nonfinite = [replace(layer, running_var=(math.inf,) * 8) for layer in planted]
    for layers in (without_spread, in_train_mode, one_value_per_sample, nonfinite):
        assert estimate(layers) is None
    assert estimate(planted[:1] + nonfinite[1:]) is not None


def test_a_corrupted_layer_is_left_out_of_the_estimate() -> None:
    # A variance stored 16x too small lacks 94% of the data's: beyond any batch size where less than
    # 47% lies between samples (a larger share is left to BN201, whose error level excludes the layer).
    planted = _planted(0.0, share=0.3)
    total = planted[1].batch_var or ()
    corrupted = replace(planted[1], running_var=tuple(v / 16 for v in total))
    assert layer_gap(corrupted) is None
    found = estimate([planted[0], corrupted, planted[2]])
    assert found is not None and len(found.layers) == 2 and not found.fires


def _error(label: str) -> Finding:
    return Finding("BN201", "shifted", Severity.ERROR, Untrusted(label), 0, (), "departs")


def test_layers_departing_past_the_error_level_are_left_out_and_the_first_layer_ends_it() -> None:
    planted = _planted(0.5)
    assert estimate_beside(planted, departing_past_error([_error("bn0")])) is None
    warned = replace(_error("bn2"), severity=Severity.WARNING)
    beside = estimate_beside(planted, departing_past_error([_error("bn1"), warned]))
    assert beside is not None and [gap.label for gap in beside.layers] == ["bn0", "bn2"]
    assert beside.inverse_batch == pytest.approx(0.5, rel=1e-12)


def test_a_first_layer_past_the_info_level_is_reported() -> None:
    # Data that varies more between samples than the training data's leaves the same gap; where the
    # first layer's data departs (0.1 running std off in mean: score 0.77) BN205 names both readings.
    planted = _planted(0.5)
    first = planted[0]
    moved = replace(first, batch_mean=tuple(0.1 * math.sqrt(v) for v in first.running_var or ()))
    assert first_layer_departure(planted) is None
    assert first_layer_departure([moved, *planted[1:]]) == pytest.approx(0.77, abs=0.01)


# --- a conv net whose running statistics come from batches of 2 or of 32 ---------------------------------


def _net() -> nn.Module:
    """One conv and one BatchNorm, whose statistics average every batch (momentum None): what it is
    trained on reaches it unchanged, so the gap is the one the README derives, 1/B of tau^2."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8, momentum=None),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def _images(count: int, seed: int, offset: float) -> torch.Tensor:
    """Images whose channels also vary between samples: an offset per sample and channel of std ``offset``."""
    generator = torch.Generator().manual_seed(seed)
    return offset * torch.randn(count, 3, 1, 1, generator=generator) + torch.randn(count, 3, 8, 8, generator=generator)


def _statistics_from_batches_of(batch_size: int, offset: float) -> nn.Module:
    """The net with running statistics accumulated in train mode from batches of ``batch_size``."""
    model = _net()
    pool = _images(4096, seed=1, offset=offset)
    model.train()
    with torch.no_grad():
        for start in range(0, len(pool), batch_size):
            model(pool[start : start + batch_size])
    return model.eval()


def _bn205(model: nn.Module, data: torch.Tensor, **kwargs: Any) -> list[Finding]:
    return [f for f in check_model(model, [data], **kwargs).findings if f.code == "BN205"]


def test_check_reads_batches_of_two_and_not_of_32() -> None:
    # An offset of 0.6 puts a quarter of the BatchNorm's input variance between samples.
    small, large = _statistics_from_batches_of(2, 0.6), _statistics_from_batches_of(32, 0.6)
    data = _images(1024, seed=3, offset=0.6)
    before = state_fingerprint(small)
    found = _bn205(small, data)
    assert state_fingerprint(small) == before
    assert len(found) == 1 and found[0].severity.value == "warning" and found[0].layer is None
    assert found[0].cause == "small-batch-training"
    assert "batches of 3 samples or fewer (estimated 2." in found[0].message
    assert _bn205(large, data) == []


def test_a_first_layer_that_departs_leaves_the_cause_open() -> None:
    # An offset of 1.0: the first layer's data departs past the info level (score about 0.6), and the
    # gap could as well come from data that varies more between samples than the training data's.
    found = _bn205(_statistics_from_batches_of(2, 1.0), _images(1024, seed=3, offset=1.0))
    assert len(found) == 1 and found[0].cause == "unknown"
    assert "so the data may be the cause" in found[0].message


def test_bn205_needs_real_data_in_eval_mode_and_says_so() -> None:
    small, data = _statistics_from_batches_of(2, 0.6), _images(1024, seed=3, offset=0.6)
    assert _bn205(small, data, data_is_real=False) == []
    assert any("(BN205)" in note for note in check_model(small, [data], data_is_real=False).notes)
    trained = check_model(small, [data], mode="train")
    assert not [f for f in trained.findings if f.code == "BN205"]
    assert any(note.startswith("train mode: the small-batch rule (BN205)") for note in trained.notes)


def test_too_few_samples_to_tell_leave_a_note_instead_of_a_finding() -> None:
    small = _statistics_from_batches_of(2, 0.6)
    few = check_model(small, [_images(64, seed=3, offset=0.6)])
    assert not [f for f in few.findings if f.code == "BN205"]
    assert [note for note in few.notes if note.startswith("BN205 could not tell")] == [
        next(note for note in few.notes if "64 samples leave that much noise" in note)
    ]
    assert not any(note.startswith("BN205") for note in check_model(small, [_images(1024, seed=3, offset=0.6)]).notes)


def test_the_inspect_report_does_not_carry_the_sample_spread() -> None:
    report = inspect_model(_statistics_from_batches_of(2, 0.6), [_images(64, seed=3, offset=0.6)])
    assert all(layer.sample_spread is None for layer in report.layers)
    assert all("sample_spread" not in entry for entry in report.to_dict()["layers"])


def test_the_cli_reports_bn205_in_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_path, data_path = tmp_path / "model.pt", tmp_path / "data.npy"
    torch.jit.save(torch.jit.script(copy.deepcopy(_statistics_from_batches_of(2, 0.6))), model_path)
    np.save(data_path, _images(1024, seed=3, offset=0.6).numpy())
    out = tmp_path / "check.json"
    code = run(["check", str(model_path), "--input", str(data_path), "--format", "json", "--output", str(out)])
    document = json.loads(out.read_text())
    jsonschema.validate(document, schema("check"))
    assert code == 0 and document["passed"]
    found = [f for f in document["findings"] if f["code"] == "BN205"]
    assert len(found) == 1 and found[0]["cause"] == "small-batch-training" and found[0]["layer"] is None
    # The estimate itself, for a pipeline that tracks it (fired or not): the figures the message gives.
    estimated = document["small_batch"]
    assert estimated["fires"] and estimated["first_layer_departure"] is None
    assert f"1/B = {estimated['inverse_batch']:.2f} ± {estimated['noise']:.2f}" in found[0]["message"]
    assert [layer["layer"] for layer in estimated["layers"]] == ["1"]
    assert 0 < estimated["layers"][0]["share"] < 1 and estimated["batch_size"] == 1 / estimated["inverse_batch"]
    capsys.readouterr()


def test_precise_recalibration_in_tiny_batches_says_what_it_leaves_out() -> None:
    # Two BatchNorms: the second's input was normalized with each batch's own statistics.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
    data = _images(64, seed=4, offset=0.6)
    small = recalibrate(copy.deepcopy(model), list(data.split(2)), method="precise")
    assert any("--method precise normalized each batch of about 2 samples" in note for note in small.notes)
    large = recalibrate(copy.deepcopy(model), list(data.split(32)), method="precise")
    assert not any("--method precise normalized" in note for note in large.notes)
    alone = recalibrate(_net(), list(data.split(2)), method="precise")
    assert not any("--method precise normalized" in note for note in alone.notes)
