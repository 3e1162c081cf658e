"""Causes named from a departure's pattern (report/causes.py), on reports built by hand.

Each test builds the statistics a cause leaves (worked out here from what the fault does to a layer's
input, not from the rules' code) and checks the code named, the pattern its sentence cites, and that
the look-alikes it cannot tell apart get no wrong name.
"""

from __future__ import annotations

import json
import math
import random
import re
import struct
from collections.abc import Sequence
from dataclasses import replace

import pytest

from bn_inspect.report.cause_codes import CAUSES
from bn_inspect.report.causes import model_cause, state_cause, with_causes
from bn_inspect.report.findings import Finding, Severity
from bn_inspect.report.records import InputInfo, LayerReport, LayerState, ModelInfo, Report
from bn_inspect.report.schemas import schema
from bn_inspect.text import Untrusted
from tests.helpers import REPO

C = 16


def stats(seed: int, count: int = C) -> tuple[list[float], list[float]]:
    """Trained running statistics: means in [-1, 1], variances in [0.5, 2]."""
    rng = random.Random(seed)
    return [rng.uniform(-1, 1) for _ in range(count)], [rng.uniform(0.5, 2) for _ in range(count)]


def layer(
    name: str,
    running: tuple[Sequence[float], Sequence[float]],
    batch: tuple[Sequence[float], Sequence[float]],
    *,
    shape: tuple[int, ...] = (64, C, 8, 8),
    num_batches_tracked: int = 1000,
    momentum: float | None = 0.1,
) -> LayerReport:
    reduced = (0, *range(2, len(shape)))
    values = math.prod(shape[d] for d in reduced) * 8
    return LayerReport(
        name=Untrusted(name),
        call=0,
        type=Untrusted("BatchNorm2d" if len(shape) == 4 else "BatchNorm1d"),
        family="batch",
        num_channels=shape[1],
        input_shape=shape,
        axis_names=None,
        reduced_axes=reduced,
        values_per_channel=values,
        eps=1e-5,
        momentum=momentum,
        affine=True,
        track_running_stats=True,
        num_batches_tracked=num_batches_tracked,
        normalizes_with="running",
        batch_mean=tuple(batch[0]),
        batch_var=tuple(batch[1]),
        batch_var_unbiased=tuple(batch[1]),
        running_mean=tuple(running[0]),
        running_var=tuple(running[1]),
        weight=None,
        bias=None,
        explanation=Untrusted(""),
    )


def near(running: tuple[Sequence[float], Sequence[float]], seed: int = 7) -> tuple[list[float], list[float]]:
    """Batch statistics of in-distribution data: within a few percent of the running ones."""
    rng = random.Random(seed)
    means, variances = running
    return (
        [m + rng.gauss(0, 0.02) * math.sqrt(v) for m, v in zip(means, variances, strict=True)],
        [v * rng.uniform(0.97, 1.03) for v in variances],
    )


def model(*layers: LayerReport, input_shape: tuple[int, ...] = (64, 1, 8, 8)) -> Report:
    data = InputInfo(Untrusted("x.npy"), input_shape, Untrusted("float32"), 8, 450)
    return Report(ModelInfo.of("m.pt", "state_dict"), data, Untrusted("eval"), Untrusted("cpu"), tuple(layers))


def first_layer_only(
    batch: tuple[Sequence[float], Sequence[float]], running: tuple[Sequence[float], Sequence[float]], **kw: object
) -> Report:
    input_shape = kw.pop("input_shape", (64, 1, 8, 8))
    return model(layer("features.1", running, batch, **kw), input_shape=input_shape)  # type: ignore[arg-type]


def named(
    report: Report, departed: Sequence[str] = ("features.1",), states: Sequence[LayerState] = ()
) -> tuple[str, str]:
    cause = model_cause(report, states, set(departed))
    assert cause is not None
    return cause.code, cause.sentence


def affine_input(
    running: tuple[Sequence[float], Sequence[float]],
    scale: float,
    offsets: Sequence[float],
    jitter: float = 0.01,
    seed: int = 3,
) -> tuple[list[float], list[float]]:
    """What x -> scale * x + c does to a bias-free conv's output channels: spread x |scale|, mean moved."""
    rng = random.Random(seed)
    means, variances = running
    return (
        [scale * m + o for m, o in zip(means, offsets, strict=True)],
        [scale**2 * v * rng.uniform(1 - jitter, 1 + jitter) for v in variances],
    )


def test_a_large_common_factor_in_the_first_layer_is_the_input_scale() -> None:
    running = stats(1)
    report = first_layer_only(affine_input(running, 16.0, [0.0] * C), running)
    code, sentence = named(report)
    assert code == "input-scale"
    assert "all 16 channels of the first layer, features.1," in sentence and "16x the spread" in sentence


def test_a_moderate_common_factor_on_one_input_channel_is_the_normalization() -> None:
    # A missing (x - 0.3) / 0.4: spread x0.4 in every channel, means moved by the offset times the filter sum.
    running = stats(2)
    offsets = [0.3 * s for s in random.Random(4).choices((-1.0, 1.0), k=C)]
    code, sentence = named(first_layer_only(affine_input(running, 0.4, offsets), running))
    assert code == "input-normalization"
    assert "2.5x less spread" in sentence and "one common factor" in sentence


def test_a_channel_structured_factor_of_a_colour_input_is_the_channel_order() -> None:
    # Swapped colour channels change each input channel differently: the factor varies over channels.
    running = stats(3)
    factors = [1.3 + 1.3 * c / (C - 1) for c in range(C)]
    batch = (list(running[0]), [f**2 * v for f, v in zip(factors, running[1], strict=True)])
    code, sentence = named(first_layer_only(batch, running, input_shape=(64, 3, 8, 8)))
    assert code == "channel-order"
    assert "varies from channel to channel" in sentence and "3 of them" in sentence


def test_the_same_structure_on_a_one_channel_input_is_not_named() -> None:
    # One input channel has no order; a varying factor there matches no cause well enough.
    running = stats(3)
    factors = [1.3 + 1.3 * c / (C - 1) for c in range(C)]
    batch = (list(running[0]), [f**2 * v for f, v in zip(factors, running[1], strict=True)])
    assert named(first_layer_only(batch, running))[0] == "unknown"


def test_a_first_layer_shift_without_common_factor_is_a_domain_shift() -> None:
    running = stats(5)
    rng = random.Random(6)
    batch = (
        [m + rng.choice((-1, 1)) * 0.6 * math.sqrt(v) for m, v in zip(*running, strict=True)],
        [v * rng.uniform(0.8, 1.25) for v in running[1]],
    )
    code, sentence = named(first_layer_only(batch, running))
    assert code == "domain-shift" and "without a common scale or order" in sentence
    # The same departure from statistics made in 8 batches: a recalibration on other data.
    code, sentence = named(first_layer_only(batch, running, num_batches_tracked=8))
    assert code == "spoiled-statistics" and "only 8 batches" in sentence


FEATURES = 30


def features(seed: int) -> tuple[list[float], list[float]]:
    """A table's raw columns: means from 1 to 1,000, standard deviations a quarter of the mean."""
    rng = random.Random(seed)
    means = [10 ** rng.uniform(0, 3) for _ in range(FEATURES)]
    return means, [(m / 4) ** 2 for m in means]


def table(batch: tuple[Sequence[float], Sequence[float]], running: tuple[Sequence[float], Sequence[float]]) -> Report:
    shape = (72, FEATURES)
    return model(layer("net.0", running, batch, shape=shape), input_shape=shape)


def test_standardized_features_into_a_raw_unit_model_are_the_normalization() -> None:
    running = features(8)
    code, sentence = named(table(([0.0] * FEATURES, [1.0] * FEATURES), running), ["net.0"])
    assert code == "input-normalization"
    assert "30 of the 30 features reaching net.0 have mean 0 and variance 1" in sentence


def test_some_features_in_other_units_are_the_input_scale() -> None:
    running = features(9)
    batch = near(running)
    for column in (3, 13, 23):
        batch[0][column] *= 100
        batch[1][column] *= 100**2
    code, sentence = named(table(batch, running), ["net.0"])
    assert code == "input-scale" and "features 3, 13, 23 reaching net.0" in sentence
    factor = re.search(r"about ([0-9.]+)x", sentence)
    assert factor is not None and float(factor.group(1)) == pytest.approx(100, rel=0.03)


def test_swapped_feature_blocks_are_the_channel_order() -> None:
    running = features(10)
    order = [*range(20, 30), *range(10, 20), *range(0, 10)]
    batch = near(([running[0][j] for j in order], [running[1][j] for j in order]))
    code, sentence = named(table(batch, running), ["net.0"])
    assert code == "channel-order" and "features 0, 1, 2, 3, 4, 5 and 14 more" in sentence


def test_statistics_leaning_toward_their_initial_values_saw_few_batches() -> None:
    # One batch at momentum 0.1: running = 0.9 * (0, 1) + 0.1 * batch.
    batch = near(stats(11))
    running = ([0.1 * m for m in batch[0]], [0.9 + 0.1 * v for v in batch[1]])
    code, sentence = named(first_layer_only(batch, running, num_batches_tracked=1))
    assert code == "few-batches-tracked"
    assert "num_batches_tracked 1 at momentum 0.1" in sentence and "90% of the initial" in sentence
    # A cumulative average (momentum None) leans toward nothing: the same figures are not few batches.
    assert named(first_layer_only(batch, running, num_batches_tracked=1, momentum=None))[0] != "few-batches-tracked"


def test_initial_values_are_a_partial_load_or_momentum_0() -> None:
    batch = near(stats(12))
    initial = ([0.0] * C, [1.0] * C)
    code, sentence = named(first_layer_only(batch, initial, num_batches_tracked=0))
    assert code == "partial-load" and "strict=False" in sentence
    code, sentence = named(first_layer_only(batch, initial, num_batches_tracked=500))
    assert code == "momentum" and "num_batches_tracked is 500" in sentence


def test_float16_overflow_and_rounding_are_the_precision() -> None:
    running = features(13)
    running[1][7] = 2e5
    rounded = [struct.unpack("e", struct.pack("e", v))[0] if v < 65504 else math.inf for v in running[1]]
    report = table(near(running), (running[0], rounded))
    code, sentence = named(report, ["net.0"])
    assert code == "precision" and "1 running variances of net.0 are inf (above float16's 65,504)" in sentence


def test_round_variances_are_not_taken_for_float16_rounding() -> None:
    # Hand-set variances (0.5, 1, 1.5, 2, ...) are float16 values too, but say nothing about precision.
    running = ([0.0] * C, [0.5 * (1 + c % 6) for c in range(C)])
    batch = ([0.6] * C, [0.8 * v for v in running[1]])
    assert named(first_layer_only(batch, running))[0] == "domain-shift"


def deep(second: tuple[Sequence[float], Sequence[float]], running: tuple[Sequence[float], Sequence[float]]) -> Report:
    first = stats(20)
    return model(
        layer("layer1.bn1", first, near(first)),
        layer("layer2.bn1", running, second, shape=(64, C, 4, 4)),
    )


def test_one_layer_off_while_the_one_before_matches_is_a_corrupted_layer() -> None:
    data = stats(21)
    corrupted = ([m + 2 * math.sqrt(v) for m, v in zip(*data, strict=True)], data[1])
    code, sentence = named(deep(near(data), corrupted), ["layer2.bn1"])
    assert code == "corrupted-layer"
    assert "every channel of layer2.bn1 departs alike (means moved -2 running std) while layer1.bn1" in sentence


def test_one_channel_off_while_the_rest_and_the_layer_before_match_is_a_corrupted_layer() -> None:
    # One stored variance overwritten with 1e-8: that channel's spread ratio is huge, the others are
    # in-distribution; averaged over channels it would read as noise in no common direction.
    running = stats(31)
    batch = near(running)
    stored = (running[0], [1e-8 if c == 5 else v for c, v in enumerate(running[1])])
    code, sentence = named(deep(batch, stored), ["layer2.bn1"])
    assert code == "corrupted-layer"
    assert "channel 5 of layer2.bn1 makes most of its departure while its other 15 channels" in sentence


def every_which_way() -> Report:
    """A deep layer whose channels depart in no common direction, as one batch's statistics would."""
    running = stats(24)
    rng = random.Random(25)
    batch = (
        [m + rng.gauss(0, 0.25) * math.sqrt(v) for m, v in zip(*running, strict=True)],
        [v * math.exp(rng.gauss(0, 0.4)) for v in running[1]],
    )
    return deep(batch, running)


def test_a_noisy_departure_spread_over_channels_is_not_taken_for_a_few_corrupted_ones() -> None:
    assert named(every_which_way(), ["layer2.bn1"])[0] != "corrupted-layer"


def test_stored_variances_below_eps_are_a_corrupted_layer_not_the_input_scale() -> None:
    # Every first-layer variance overwritten with 1e-8: the spread ratio is enormous in every channel,
    # which alone would read as a missing /255, but the means match and eps/10 is 1e-6.
    running = stats(32)
    stored = (running[0], [1e-8] * C)
    code, sentence = named(first_layer_only(near(running), stored))
    assert code == "corrupted-layer"
    assert "below eps/10 in 16 of its 16 channels" in sentence


def test_a_deep_layer_whose_spread_is_wider_in_every_channel_is_small_batch_training() -> None:
    running = stats(22)
    batch = (near(running)[0], [1.4 * v for v in running[1]])
    code, sentence = named(deep(batch, running), ["layer2.bn1"])
    assert code == "small-batch-training" and "1.2x the running one in all 16 channels of layer2.bn1" in sentence


def test_a_wider_deep_layer_after_a_first_layer_past_the_info_level_names_no_cause() -> None:
    # Data that varies more between samples than the training data's widens the deep layers too; the
    # first layer's departure (score 0.61: info, not warning) says the input itself differs.
    running, first = stats(22), stats(20)
    batch = (near(running)[0], [1.4 * v for v in running[1]])
    wider_first = (near(first)[0], [1.3 * v for v in first[1]])
    report = model(layer("layer1.bn1", first, wider_first), layer("layer2.bn1", running, batch, shape=(64, C, 4, 4)))
    code, sentence = named(report, ["layer2.bn1"])
    assert code == "unknown" and "the first layer's data departs too, if less (score 0.61)" in sentence


def test_a_deep_layer_whose_spread_is_narrower_in_every_channel_is_stale_statistics() -> None:
    running = stats(23)
    batch = (near(running)[0], [0.6 * v for v in running[1]])
    code, sentence = named(deep(batch, running), ["layer2.bn1"])
    assert code == "stale-statistics" and "1.3x below the running one" in sentence


def test_a_deep_layer_departing_every_which_way_is_noise_from_a_momentum_near_1() -> None:
    assert named(every_which_way(), ["layer2.bn1"])[0] == "momentum"


def test_noise_like_one_batchs_is_not_blamed_on_a_momentum_the_model_file_says_is_small() -> None:
    # A TorchScript file keeps the momentum it trained with (0.1 here): a momentum near 1 is ruled out.
    # Weights loaded into --arch (a state_dict) take the architecture's, which says nothing of training.
    scripted = replace(every_which_way(), model=ModelInfo.of("m.pt", "torchscript"))
    code, sentence = named(scripted, ["layer2.bn1"])
    assert code == "unknown" and "but the layer's momentum is 0.1" in sentence


def test_a_deep_layer_with_large_coherent_shifts_after_a_departing_layer_is_not_named() -> None:
    # The layer before departs too, so nothing says which layer holds the fault.
    running, first = stats(26), stats(27)
    batch = ([m + 1.5 * math.sqrt(v) for m, v in zip(*running, strict=True)], [1.3 * v for v in running[1]])
    shifted_first = ([m + 0.8 for m in first[0]], [1.2 * v for v in first[1]])
    report = model(
        layer("layer1.bn1", first, shifted_first),
        layer("layer2.bn1", running, batch, shape=(64, C, 4, 4)),
    )
    code, _ = named(report, ["layer2.bn1"])
    assert code == "unknown"


def test_no_departure_names_no_cause() -> None:
    running = stats(28)
    report = first_layer_only(near(running), running)
    assert model_cause(report, (), set()) is None
    assert model_cause(None, (), {"features.1"}) is None


def state(name: str, **changes: object) -> LayerState:
    base = LayerState(
        name=Untrusted(name),
        type=Untrusted("BatchNorm2d"),
        family="batch",
        num_channels=C,
        eps=1e-5,
        momentum=0.1,
        is_cumulative_average=False,
        affine=True,
        track_running_stats=True,
        num_batches_tracked=1000,
        is_training=False,
        affine_requires_grad=True,
        buffer_dtype="float32",
        running_mean=tuple(stats(30)[0]),
        running_var=tuple(stats(30)[1]),
        weight=None,
        bias=None,
        is_frozen=False,
        is_lazy=False,
        eval_uses="running",
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def test_stored_state_names_its_cause_and_outweighs_a_pattern_only_where_the_buffers_are_wrong() -> None:
    assert state_cause(state("bn")) is None
    half = state_cause(state("bn", buffer_dtype="float16"))
    assert half is not None and half.code == "precision" and "float16" in half.sentence
    keras = state_cause(state("bn", momentum=0.99))
    assert keras is not None and keras.code == "momentum" and "momentum 0.99" in keras.sentence
    # Statistics at their initial values outweigh what the departure's shape would say ...
    running = stats(1)
    report = first_layer_only(affine_input(running, 16.0, [0.0] * C), running)
    fresh = state("features.1", running_mean=(0.0,) * C, running_var=(1.0,) * C, num_batches_tracked=0)
    assert named(report, states=[fresh])[0] == "partial-load"
    # ... float16 rounding and a momentum do not: they move statistics by a thousandth, or not yet.
    for weak in (state("features.1", buffer_dtype="bfloat16"), state("features.1", momentum=0.99)):
        assert named(report, states=[weak])[0] == "input-scale"
    factors = [1.3 + 1.3 * c / (C - 1) for c in range(C)]
    unclear = first_layer_only(
        (list(running[0]), [f**2 * v for f, v in zip(factors, running[1], strict=True)]), running
    )
    assert named(unclear, states=[state("features.1", momentum=0.99)])[0] == "momentum"
    assert named(unclear, states=[state("features.1", buffer_dtype="float16")])[0] == "precision"


def finding(code: str, layer_name: str | None) -> Finding:
    return Finding(code, "rule", Severity.ERROR, Untrusted(layer_name) if layer_name else None, 0, (), "message")


def test_with_causes_fills_shift_findings_and_plain_state_findings_only() -> None:
    running = stats(1)
    report = first_layer_only(affine_input(running, 16.0, [0.0] * C), running)
    states = [
        state("features.1"),
        state("untrained", running_mean=(0.0,) * C, running_var=(1.0,) * C, num_batches_tracked=0),
    ]
    given = [
        finding("BN201", "features.1"),
        finding("BN104", "untrained"),
        finding("BN202", "features.1"),
        finding("BN107", None),
    ]
    filled = with_causes(given, report, states, {"features.1"})
    assert [f.cause for f in filled] == ["input-scale", "partial-load", None, None]
    assert filled[0].cause_sentence is not None and filled[0].cause_sentence.startswith("all 16 channels")
    assert [replace(f, cause=None, cause_sentence=None) for f in filled] == given


def test_every_code_is_documented_where_users_look_and_allowed_by_the_schema() -> None:
    findings = schema("check")["properties"]["findings"]["items"]["properties"]
    assert set(findings["cause"]["enum"]) == {*CAUSES, None}
    readme = (REPO / "README.md").read_text()
    docs = (REPO / "docs" / "causes.md").read_text()
    for code in CAUSES:
        assert f"`{code}`" in readme and f"`{code}`" in docs, code


@pytest.mark.parametrize("code", sorted(CAUSES))
def test_each_code_is_a_lowercase_name(code: str) -> None:
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", code)
    assert json.dumps(code) == f'"{code}"'
