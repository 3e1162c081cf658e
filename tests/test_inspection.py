"""inspect_model end to end on small models: numbers against float64, order, modes, and no side effects."""

from __future__ import annotations

import json
import math
import warnings

import jsonschema
import numpy as np
import pytest
import torch
from torch import nn

from bn_inspect.analyses.inspection import inspect_model
from bn_inspect.data.batch import Batch
from bn_inspect.engine.capture import StatisticsRecorder, hooks_capture
from bn_inspect.errors import ForwardError, LazyModelError, NoNormLayersError, ShapeMismatchError
from bn_inspect.model.layers import iter_norm_layers
from bn_inspect.output.export import to_json
from bn_inspect.report.records import LayerReport, Report
from bn_inspect.report.schemas import schema
from bn_inspect.text import Untrusted
from tests import models
from tests.conftest import state_fingerprint
from tests.test_stats import float64_input, instance_reference, reference


def inspect_unchanged(model: nn.Module, batches: list, **kwargs: object) -> Report:
    """inspect_model, asserting the model's parameters, buffers, flags and hooks are untouched."""
    before = state_fingerprint(model)
    report = inspect_model(model, batches, **kwargs)  # type: ignore[arg-type]
    assert state_fingerprint(model) == before
    return report


def layer(report: Report, name: str, call: int = 0) -> LayerReport:
    return next(entry for entry in report.layers if entry.name.raw == name and entry.call == call)


def assert_matches(entry: LayerReport, activation: torch.Tensor) -> None:
    ref_mean, ref_var = reference(activation)
    n = activation.numel() // activation.shape[1]
    assert entry.values_per_channel == n
    scale = math.sqrt(float(ref_var.max())) or 1.0
    np.testing.assert_allclose(entry.batch_mean, ref_mean, rtol=1e-7, atol=scale * 1e-6)
    np.testing.assert_allclose(entry.batch_var, ref_var, rtol=3e-5, atol=1e-30)
    np.testing.assert_allclose(entry.batch_var_unbiased, ref_var * n / (n - 1), rtol=3e-5, atol=1e-30)


@pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (1e3, 1e-2)], ids=["standard", "large-mean-tiny-std"])
def test_conv_bn_statistics_match_float64_reference(mean: float, std: float) -> None:
    model = models.randomize_norm_state(models.ConvBN2d()).eval()
    x = models.make_input((4, 3, 9, 11), mean=mean, std=std)
    report = inspect_unchanged(model, [x])
    with torch.no_grad():
        bn1_input = model.conv1(x)
        bn2_input = model.conv2(torch.relu(model.bn1(bn1_input)))
    assert [entry.name.raw for entry in report.layers] == ["bn1", "bn2"]
    assert_matches(layer(report, "bn1"), bn1_input)
    assert_matches(layer(report, "bn2"), bn2_input)
    bn1 = layer(report, "bn1")
    assert bn1.input_shape == (4, 8, 9, 11)
    assert bn1.axis_names == ("N", "C", "H", "W") and bn1.reduced_axes == (0, 2, 3)
    assert bn1.running_mean == pytest.approx(model.bn1.running_mean.double().tolist())
    assert bn1.running_var == pytest.approx(model.bn1.running_var.double().tolist())
    assert bn1.weight == pytest.approx(model.bn1.weight.double().tolist())
    assert bn1.normalizes_with == "running"
    assert bn1.num_batches_tracked == 100


@pytest.mark.parametrize(
    ("factory", "shape"),
    [(models.BN1dFeatures, (64, 5)), (models.BN1dSequence, (5, 6, 13)), (models.BN3dVolume, (2, 3, 4, 5, 3))],
    ids=["BatchNorm1d (N,C)", "BatchNorm1d (N,C,L)", "BatchNorm3d"],
)
def test_every_batch_norm_rank(factory: type[nn.Module], shape: tuple[int, ...]) -> None:
    model = models.randomize_norm_state(factory()).eval()
    x = models.make_input(shape, mean=-2e3, std=5e-2)
    report = inspect_unchanged(model, [x])
    assert_matches(layer(report, "bn"), x)


def test_uneven_batches_merge_to_population_statistics() -> None:
    model = models.randomize_norm_state(models.BN1dSequence()).eval()
    batches = [models.make_input((n, 6, 7), mean=50.0, std=0.1, seed=n) for n in (1, 5, 2, 9)]
    report = inspect_unchanged(model, batches)
    entry = layer(report, "bn")
    assert_matches(entry, torch.cat(batches))
    assert report.input.num_batches == 4 and report.input.num_samples == 17
    # 4 × (1×7) would be 28: the sentence must say the batches differ, and how (17 × 7 = 119).
    assert "Over 4 batches (1 of 1 sample, 1 of 5, 1 of 2 and 1 of 9): 119 values per channel in all." in (
        entry.explanation.raw
    )


@pytest.mark.parametrize(
    ("sizes", "phrase"),
    [
        ((4, 4, 4), "Over 3 batches: 84 values per channel in all."),
        ((4, 4, 4, 1), "Over 4 batches (3 of 4 samples and 1 of 1): 91 values per channel in all."),
        ((1, 2, 3, 4, 5), "Over 5 batches of 1 to 5 samples: 105 values per channel in all."),
    ],
    ids=["equal", "short-last", "many-sizes"],
)
def test_explanation_gives_the_batch_sizes_when_they_differ(sizes: tuple[int, ...], phrase: str) -> None:
    model = models.randomize_norm_state(models.BN1dSequence()).eval()
    batches = [models.make_input((n, 6, 7), seed=i) for i, n in enumerate(sizes)]
    assert phrase in layer(inspect_unchanged(model, batches), "bn").explanation.raw


def test_shift_z_and_var_ratio_follow_their_formulas() -> None:
    model = models.randomize_norm_state(models.BN1dFeatures()).eval()
    entry = layer(inspect_unchanged(model, [models.make_input((32, 5), mean=1.0)]), "bn")
    for c in range(5):
        expected_z = (entry.batch_mean[c] - entry.running_mean[c]) / math.sqrt(entry.running_var[c] + entry.eps)
        assert entry.mean_shift_z[c] == pytest.approx(expected_z, rel=1e-12)
        assert entry.var_ratio[c] == pytest.approx(entry.batch_var[c] / entry.running_var[c], rel=1e-12)


def test_shared_module_gives_one_row_per_call_and_unused_is_listed() -> None:
    model = models.randomize_norm_state(models.SharedBN()).eval()
    x = models.make_input((3, 3, 4, 4))
    report = inspect_unchanged(model, [x, x])
    assert [(entry.name.raw, entry.call) for entry in report.layers] == [("bn", 0), ("bn", 1)]
    assert report.not_executed == (Untrusted("unused"),)
    with torch.no_grad():
        second_input = model.bn(x) * 2 + 1
    assert_matches(layer(report, "bn", 1), torch.cat([second_input, second_input]))
    assert layer(report, "bn", 1).label.raw == "bn#1"


def test_input_passed_as_keyword_is_captured() -> None:
    model = models.randomize_norm_state(models.KeywordCall()).eval()
    x = models.make_input((8, 4))
    assert_matches(layer(inspect_unchanged(model, [x]), "bn"), x)


def test_train_mode_restores_buffers_and_mode_and_reports_stored_statistics() -> None:
    model = models.randomize_norm_state(models.ConvBN2d()).eval()
    stored_mean = model.bn1.running_mean.double().tolist()
    report = inspect_unchanged(model, [models.make_input((4, 3, 6, 6))] * 3, mode="train")
    assert report.mode.raw == "train"
    assert all(entry.normalizes_with == "batch" for entry in report.layers)
    assert layer(report, "bn1").running_mean == pytest.approx(stored_mean)
    assert not model.training


def test_training_model_stays_in_training_mode() -> None:
    model = models.randomize_norm_state(models.ConvBN2d()).train()
    model.bn2.eval()
    inspect_unchanged(model, [models.make_input((2, 3, 5, 5))])
    assert model.training and model.bn1.training and not model.bn2.training


def test_forward_that_raises_names_last_layer_and_changes_nothing() -> None:
    model = models.randomize_norm_state(models.Raises()).eval()
    before = state_fingerprint(model)
    with pytest.raises(ForwardError, match="raised RuntimeError after layer bn ran: deliberate failure"):
        inspect_model(model, [models.make_input((2, 3, 4, 4))], mode="train")
    assert state_fingerprint(model) == before


def test_channel_mismatch_names_the_layer() -> None:
    model = models.BN1dFeatures(5).eval()
    with pytest.raises(
        ShapeMismatchError, match=r"layer bn \(BatchNorm1d\) expects 5 channels in dim 1 but received 6"
    ):
        inspect_model(model, [torch.randn(4, 6)])
    assert not model.bn._forward_pre_hooks


def test_rank_mismatch_names_the_layer() -> None:
    with pytest.raises(ShapeMismatchError, match=r"layer bn \(BatchNorm3d\) expects 5-D input but received 4-D"):
        inspect_model(models.BN3dVolume().eval(), [torch.randn(2, 3, 4, 4)])


def test_one_value_per_channel_in_train_mode_is_explained() -> None:
    with pytest.raises(ForwardError, match=r"1 value per channel in train mode.*at least 2 values per channel"):
        inspect_model(models.BN1dFeatures().eval(), [torch.randn(1, 5)], mode="train")


def test_normalization_family_rows() -> None:
    model = models.randomize_norm_state(models.Family()).eval()
    x = models.make_input((3, 4, 5, 6), mean=10.0)
    report = inspect_unchanged(model, [x])
    assert [entry.name.raw for entry in report.layers] == ["inorm", "inorm_plain", "gn", "ln", "rms"]
    inorm = layer(report, "inorm")
    flat = x.double().numpy().reshape(3, 4, -1)
    np.testing.assert_allclose(inorm.batch_mean, flat.mean(axis=2).mean(axis=0), rtol=1e-7)
    np.testing.assert_allclose(inorm.batch_var, flat.var(axis=2).mean(axis=0), rtol=1e-5)
    assert inorm.normalizes_with == "running" and inorm.reduced_axes == (2, 3)
    assert layer(report, "inorm_plain").normalizes_with == "batch"
    for name in ("gn", "ln", "rms"):
        entry = layer(report, name)
        assert entry.batch_mean is None and entry.running_mean is None
        assert "keeps no running statistics" in entry.explanation.raw
    assert layer(report, "gn").family == "group"


def test_untracked_batch_norm_uses_batch_statistics_in_eval() -> None:
    entry = layer(inspect_unchanged(models.Untracked().eval(), [models.make_input((4, 3, 3, 3))]), "bn")
    assert entry.normalizes_with == "batch"
    assert "no-running-stats" in entry.flags
    assert entry.running_mean is None and entry.mean_shift_z is None


def test_lazy_model_is_refused_unless_materializing_is_allowed() -> None:
    model = models.LazyConvBN().eval()
    before = state_fingerprint(model)
    with pytest.raises(LazyModelError, match="lazy modules that have not run yet"):
        inspect_model(model, [models.make_input((2, 3, 6, 6))])
    assert state_fingerprint(model) == before
    report = inspect_model(model, [models.make_input((2, 3, 6, 6))], materialize_lazy=True)
    entry = layer(report, "bn")
    assert entry.num_channels == 4 and "lazy" in entry.flags
    # The first forward materializes the layer before normalizing, with fresh running statistics.
    assert entry.running_mean == (0.0,) * 4 and entry.batch_mean is not None
    assert entry.normalizes_with == "running" and "no-running-stats" not in entry.flags


def test_untrained_statistics_are_flagged() -> None:
    entry = layer(inspect_unchanged(models.BN1dFeatures().eval(), [torch.randn(8, 5)]), "bn")
    assert "untrained" in entry.flags


def test_no_normalization_layer_is_an_error() -> None:
    with pytest.raises(NoNormLayersError, match="has no normalization layer"):
        inspect_model(models.NoNorm(), [torch.randn(2, 4)])


def test_torchscript_capture_matches_eager() -> None:
    model = models.randomize_norm_state(models.ConvBN2d()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(model)
    x = models.make_input((3, 3, 7, 7), mean=100.0, std=0.1)
    eager = inspect_unchanged(model, [x])
    script = inspect_unchanged(scripted, [x])
    assert [entry.name.raw for entry in script.layers] == ["bn1", "bn2"]
    for a, b in zip(eager.layers, script.layers, strict=True):
        assert a.type.raw == b.type.raw == "BatchNorm2d"
        np.testing.assert_allclose(a.batch_mean, b.batch_mean, rtol=1e-6)
        np.testing.assert_allclose(a.batch_var, b.batch_var, rtol=1e-5)
        assert a.explanation == b.explanation


def test_torchscript_train_mode_restores_buffers() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(models.randomize_norm_state(models.ConvBN2d()).eval())
    report = inspect_unchanged(scripted, [models.make_input((3, 3, 5, 5))], mode="train")
    assert [entry.normalizes_with for entry in report.layers] == ["batch", "batch"]


def test_batches_from_a_dataloader_and_batch_objects() -> None:
    model = models.randomize_norm_state(models.BN1dFeatures()).eval()
    x = models.make_input((10, 5))
    pairs = [(x[:6], torch.zeros(6)), (x[6:], torch.zeros(4))]
    assert_matches(layer(inspect_unchanged(model, pairs), "bn"), x)
    assert_matches(layer(inspect_unchanged(model, [Batch((x,))]), "bn"), x)


def test_float64_model_and_half_precision_input() -> None:
    model = models.randomize_norm_state(models.BN1dSequence()).double().eval()
    x = models.make_input((4, 6, 9), mean=1e5, std=1e-3).double()
    assert_matches(layer(inspect_unchanged(model, [x]), "bn"), x)
    half_model = models.randomize_norm_state(models.BN1dSequence()).eval()
    half = models.make_input((4, 6, 9), mean=2.0).half()
    assert_matches(layer(inspect_unchanged(half_model, [half]), "bn"), half.float())


def function_mode_depth() -> int:
    return int(torch._C._len_torch_function_stack())


def test_layer_norm_subclasses_report_the_dims_their_kernel_reduces() -> None:
    model = models.ChannelNorms().eval()
    x = models.make_input((2, 3, 7, 9), mean=5.0)
    report = inspect_unchanged(model, [x, models.make_input((1, 3, 7, 9), seed=1)])
    expected = {
        "ln_view": ((2, 6, 5, 7), ("N", "C", "H", "W"), (1,)),
        "ln_copy": ((2, 6, 5, 7), ("N", "C", "H", "W"), (1,)),
        # Normalizes over C with its own arithmetic: no kernel call to watch, so the module's rule stays.
        "ln_own": ((2, 6, 5, 7), ("N", "D1", "D2", "D3"), (3,)),
        "ln_tokens": ((2, 35, 6), ("N", "T", "D"), (2,)),
        "rms_view": ((2, 6, 35), ("N", "C", "L"), (1,)),
    }
    assert {e.name.raw: (e.input_shape, e.axis_names, e.reduced_axes) for e in report.layers} == expected
    assert layer(report, "ln_view").explanation.raw == (
        "ln_view (ChannelLayerNorm) got (2, 6, 5, 7) = (N, C, H, W): N×H×W = 2×5×7 = 70 means and as many "
        "variances, one per position, each over C = 6 values (dim 1 reduced, which the layer moves last before "
        "normalizing; keeps no running statistics)."
    )
    assert "N×L = 2×35 = 70 root mean squares (no mean is subtracted), one per position, each over C = 6 values" in (
        layer(report, "rms_view").explanation.raw
    )
    assert layer(report, "ln_tokens").explanation.raw == (
        "ln_tokens (LayerNorm) got (2, 35, 6) = (N, T, D): N×T = 2×35 = 70 means and as many variances, one per "
        "position, "
        "each over D = 6 values (the last dim reduced; keeps no running statistics)."
    )
    assert function_mode_depth() == 0
    # Torch itself agrees: each layer's output, over the dims reported for it, has mean 0 and
    # variance 1 (RMSNorm: mean square 1), per statistic (weights are 1 and biases 0).
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        getattr(model, name).register_forward_hook(lambda _m, _a, y, name=name: outputs.__setitem__(name, y))
        for name in ("ln_view", "ln_copy", "rms_view")
    ]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    for name, y in outputs.items():
        dims = layer(report, name).reduced_axes
        assert dims is not None
        if name == "rms_view":
            torch.testing.assert_close(y.pow(2).mean(dims), torch.ones(2, 35), atol=1e-4, rtol=0)
            continue
        var, mean = torch.var_mean(y, dims, correction=0)
        torch.testing.assert_close(mean, torch.zeros(2, 5, 7), atol=1e-5, rtol=0)
        torch.testing.assert_close(var, torch.ones(2, 5, 7), atol=1e-3, rtol=0)


class DepthProbe(models.ChannelLayerNorm):
    """Notes how many torch function modes are active while its forward runs."""

    def __init__(self, num_channels: int) -> None:
        super().__init__(num_channels)
        self.depths: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.depths.append(function_mode_depth())
        return super().forward(x)


class WrapsALayerNorm(models.ChannelLayerNorm):
    """Runs a plain LayerNorm over W inside its own forward, before its own kernel over C."""

    def __init__(self, num_channels: int, width: int) -> None:
        super().__init__(num_channels)
        self.inner = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.inner(x))


class FailsAfterNormalizing(models.ChannelLayerNorm):
    def __init__(self, error: BaseException) -> None:
        super().__init__(3)
        self.error = error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        super().forward(x)
        raise self.error


def test_the_kernel_is_watched_on_the_first_call_only_and_owned_by_the_innermost_layer() -> None:
    probe = DepthProbe(3)
    model = nn.Sequential(nn.BatchNorm2d(3), probe, WrapsALayerNorm(3, 5)).eval()
    report = inspect_unchanged(model, [models.make_input((2, 3, 4, 5), seed=seed) for seed in range(3)])
    assert probe.depths == [1, 0, 0]
    assert function_mode_depth() == 0
    assert [(e.name.raw, e.reduced_axes) for e in report.layers] == [
        ("0", (0, 2, 3)),
        ("1", (1,)),
        ("2", (1,)),
        ("2.inner", (3,)),
    ]


@pytest.mark.parametrize(
    "error", [RuntimeError("deliberate failure inside the layer"), KeyboardInterrupt()], ids=["error", "interrupt"]
)
def test_a_layer_norm_that_raises_leaves_no_mode_and_no_hook(error: BaseException) -> None:
    model = nn.Sequential(FailsAfterNormalizing(error)).eval()
    before = state_fingerprint(model)
    is_error = isinstance(error, Exception)
    with pytest.raises(
        ForwardError if is_error else KeyboardInterrupt, match="deliberate failure" if is_error else None
    ):
        inspect_model(model, [models.make_input((2, 3, 4, 5))])
    assert function_mode_depth() == 0
    assert state_fingerprint(model) == before


class JaggedLayerNorm(nn.Module):
    """LayerNorm on a nested jagged tensor, which has no storage of its own to compare."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(torch.nested.as_nested_tensor([x[0, :2], x[1]], layout=torch.jagged))


def test_a_layer_norm_on_a_nested_tensor_runs_with_its_dims_unknown() -> None:
    model = JaggedLayerNorm().eval()
    recorder = StatisticsRecorder()
    with warnings.catch_warnings(), hooks_capture(iter_norm_layers(model), recorder), torch.no_grad():
        warnings.simplefilter("ignore")
        model(torch.randn(2, 3, 4))
    assert [(name, record.reduced_dims) for name, record in recorder.records.items()] == [(("ln", 0), None)]
    assert function_mode_depth() == 0


class Normalizes(nn.Module):
    """One normalization layer called ``norm``: a model of one family, for the precision tests."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)  # type: ignore[no-any-return]


FLOAT64_CASES = {
    "BatchNorm2d": (lambda: nn.BatchNorm2d(3), (4, 3, 9, 11)),
    "BatchNorm1d": (lambda: nn.BatchNorm1d(3), (16, 3)),
    "InstanceNorm2d-tracked": (lambda: nn.InstanceNorm2d(3, track_running_stats=True), (4, 3, 9, 11)),
    "InstanceNorm1d-affine": (lambda: nn.InstanceNorm1d(3, affine=True), (4, 3, 700)),
    "InstanceNorm2d-unbatched": (lambda: nn.InstanceNorm2d(3, affine=True), (3, 9, 11)),
}


# Dispatch capture (TorchScript) is tested on BatchNorm only: a scripted InstanceNorm reaches the
# dispatcher as batch norm on repeated copies of its buffers, which name no layer.
FLOAT64_RUNS = [(case, "hooks") for case in FLOAT64_CASES] + [
    (case, "dispatch") for case in FLOAT64_CASES if case.startswith("BatchNorm")
]


@pytest.mark.parametrize(("case", "capture"), FLOAT64_RUNS)
def test_float64_model_statistics_match_float64_reference(case: str, capture: str) -> None:
    make_norm, shape = FLOAT64_CASES[case]
    model = models.randomize_norm_state(Normalizes(make_norm())).double().eval()
    if capture == "dispatch":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = torch.jit.script(model)
    x = float64_input(shape, mean=1e3, std=1e-2)
    entry = layer(inspect_unchanged(model, [x]), "norm")
    batched = x.unsqueeze(0) if case.endswith("unbatched") else x
    ref_mean, ref_var = instance_reference(batched) if "Instance" in case else reference(batched)
    np.testing.assert_allclose(entry.batch_mean, ref_mean, rtol=1e-12)
    np.testing.assert_allclose(entry.batch_var, ref_var, rtol=1e-12)


def test_a_model_without_float_tensors_keeps_float64_input() -> None:
    # No parameter or buffer to take a dtype from: the input's own precision is kept, so the
    # statistics of float64 data are float64 statistics, not float32 ones.
    model = nn.Sequential(nn.InstanceNorm2d(3)).eval()
    x = models.make_input((4, 3, 5, 7), mean=1e3).double() + torch.randn(4, 3, 5, 7, dtype=torch.float64) * 1e-2
    report = inspect_model(model, [x])
    flat = x.numpy().reshape(4, 3, -1)
    expected_mean = flat.mean(axis=2).mean(axis=0)
    expected_var = flat.var(axis=2).mean(axis=0)
    np.testing.assert_allclose(report.layers[0].batch_mean, expected_mean, rtol=1e-12)
    np.testing.assert_allclose(report.layers[0].batch_var, expected_var, rtol=1e-10)
    assert report.input.dtype.raw == "float64"


def test_a_model_without_float_tensors_upcasts_half_input() -> None:
    model = nn.Sequential(nn.InstanceNorm2d(3)).eval()
    report = inspect_model(model, [models.make_input((2, 3, 4, 4)).half()])
    # What the layer saw: float16 upcast to float32, as a float32 parameter would have it.
    assert report.layers[0].batch_mean is not None and report.input.dtype.raw == "float32"


EMPTY_BATCH_CASES = {
    "BatchNorm1d": (nn.BatchNorm1d(5), (0, 5, 9)),
    "InstanceNorm1d-tracking": (nn.InstanceNorm1d(5, track_running_stats=True), (0, 5, 9)),
    "LayerNorm": (nn.LayerNorm(5), (0, 5)),
}


@pytest.mark.parametrize("name", sorted(EMPTY_BATCH_CASES))
def test_an_empty_batch_has_no_statistics_and_a_valid_report(name: str) -> None:
    layer, shape = EMPTY_BATCH_CASES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's var_mean warns on zero degrees of freedom
        report = inspect_model(nn.Sequential(layer).eval(), [torch.zeros(shape)])
    reported = report.layers[0]
    assert (reported.batch_mean, reported.batch_var, reported.batch_var_unbiased) == (None, None, None)
    assert reported.values_per_channel in (0, None) and "nonfinite-input" not in reported.flags
    assert report.input.num_samples == 0
    jsonschema.validate(json.loads(to_json(report)), schema("inspect"))


@pytest.mark.parametrize("name", ["BatchNorm1d", "InstanceNorm1d-tracking"])
def test_an_empty_batch_among_others_adds_nothing(name: str) -> None:
    layer, shape = EMPTY_BATCH_CASES[name]
    model = nn.Sequential(layer).eval()
    x = models.make_input((3, *shape[1:]), mean=5.0)
    with_empty, without = inspect_model(model, [torch.zeros(shape), x]), inspect_model(model, [x])
    assert with_empty.layers[0].batch_mean == without.layers[0].batch_mean
    assert with_empty.layers[0].batch_var == without.layers[0].batch_var
    assert with_empty.layers[0].values_per_channel == without.layers[0].values_per_channel
