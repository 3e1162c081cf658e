"""The folding rules BN401-BN404 (#28): each fires on a planted case and stays silent on a healthy model,
with numbers against a float64 reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bn_inspect.analyses.checking import check_model
from bn_inspect.model.folding import find_fold_sites, fold_parameters, folded_copy
from bn_inspect.report.findings import Finding, Severity
from bn_inspect.report.folding import MAX_INT8_CHANNEL_ERROR, MAX_OUTPUT_CHANGE, FoldChange, change_findings
from bn_inspect.text import Untrusted
from sample_models.architectures import DigitsCNN
from tests import models
from tests.conftest import state_fingerprint
from tests.helpers import DIGITS, invoke


def _findings(model: nn.Module, batches: list | None = None, **kwargs: object) -> list[Finding]:
    before = state_fingerprint(model)
    found = check_model(model, batches, **kwargs)  # type: ignore[arg-type]
    assert state_fingerprint(model) == before
    return [f for f in found.findings if f.code.startswith("BN4")]


def _codes(findings: list[Finding]) -> set[tuple[str, str | None]]:
    return {(f.code, None if f.layer is None else f.layer.raw) for f in findings}


class AfterEverything(nn.Module):
    """BatchNorms after a ReLU, an add, a pooling, a concat, the input, and after a conv read twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn_input = nn.BatchNorm2d(3)
        self.relu = nn.ReLU()
        self.bn_relu = nn.BatchNorm2d(4)
        self.bn_add = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.bn_pool = nn.BatchNorm2d(4)
        self.bn_cat = nn.BatchNorm2d(8)
        self.shared = nn.Conv2d(4, 4, 1, bias=False)
        self.bn_shared = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.conv(self.bn_input(x)))
        y = self.bn_relu(y)
        y = self.bn_add(y + y)
        z = self.shared(y)
        w = self.bn_shared(z) + z
        pooled = self.bn_pool(self.pool(w))
        return self.bn_cat(torch.cat([pooled, pooled], dim=1))


class Branchy(nn.Module):
    """Forward that torch.fx cannot trace: it branches on a value."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = -x
        return self.bn(self.conv(x))


def test_a_bias_before_batchnorm_is_bn401_with_its_largest_bias() -> None:
    model = models.randomize_norm_state(models.ConvBN2d()).eval()
    found = _findings(model, fold=True)
    assert _codes(found) == {("BN401", "bn1"), ("BN401", "bn2")}
    bn1 = next(f for f in found if f.layer is not None and f.layer.raw == "bn1")
    largest = np.abs(model.conv1.bias.detach().double().numpy()).max()
    assert f"largest |bias| {largest:.3g}" in bn1.message and bn1.severity is Severity.INFO


def test_batchnorms_that_cannot_fold_are_bn402_with_the_reason() -> None:
    model = models.randomize_norm_state(AfterEverything()).eval()
    found = {f.layer.raw: f for f in _findings(model, fold=True) if f.code == "BN402" and f.layer is not None}
    assert set(found) == {"bn_input", "bn_relu", "bn_add", "bn_pool", "bn_cat", "bn_shared"}
    assert "follows relu (ReLU)" in found["bn_relu"].message
    assert "the model's input" in found["bn_input"].message
    assert "follows add" in found["bn_add"].message and "follows pool (MaxPool2d)" in found["bn_pool"].message
    assert "follows cat" in found["bn_cat"].message
    assert "the output of shared is read elsewhere too" in found["bn_shared"].message
    assert {f.severity for f in found.values()} == {Severity.INFO}
    deployed = _findings(model, precision="fp16")
    assert {f.severity for f in deployed if f.code == "BN402"} == {Severity.WARNING}


def test_a_model_fx_cannot_trace_says_so_and_no_rule_guesses() -> None:
    result = check_model(models.randomize_norm_state(Branchy()).eval(), fold=True)
    assert not [f for f in result.findings if f.code.startswith("BN4")]
    assert any(note.startswith("the folding rules (BN401-BN404) did not run: torch.fx") for note in result.notes)


def test_a_healthy_model_without_biases_is_silent() -> None:
    model = models.calibrated_resnet()
    assert find_fold_sites(model).sites and all(site.is_foldable for site in find_fold_sites(model).sites)
    for precision in ("fp16", "bf16"):
        assert _findings(model, [models.resnet_data()[1]], precision=precision) == []


def _numpy_fold(weight, bias, gamma, beta, mean, var, eps):  # type: ignore[no-untyped-def]
    scale = gamma / np.sqrt(var + eps)
    folded = weight * scale.reshape(-1, *([1] * (weight.ndim - 1)))
    return folded, (bias - mean) * scale + beta, scale


def test_fold_parameters_match_a_float64_reference_on_large_means_and_tiny_variances() -> None:
    generator = np.random.default_rng(0)
    weight = generator.normal(size=(6, 3, 3, 3)).astype(np.float32)
    bias, gamma, beta = (generator.normal(size=6).astype(np.float32) for _ in range(3))
    mean = (generator.normal(size=6) * 1e3).astype(np.float32)
    var = (10.0 ** generator.uniform(-9, 4, size=6)).astype(np.float32)
    ours = fold_parameters(*(torch.from_numpy(a) for a in (weight, bias, gamma, beta, mean, var)), 1e-5)
    reference = _numpy_fold(*(a.astype(np.float64) for a in (weight, bias, gamma, beta, mean, var)), 1e-5)
    for got, expected in zip(ours, reference, strict=True):
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


def test_the_folded_copy_computes_what_the_model_does_and_leaves_it_alone() -> None:
    model = models.randomize_norm_state(models.ConvBN2d()).eval().double()
    before = state_fingerprint(model)
    folded = folded_copy(model, find_fold_sites(model).sites)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = models.make_input((4, 3, 6, 6), mean=3.0).double()
    torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=1e-10)
    assert state_fingerprint(model) == before


def test_a_tiny_running_var_vanishes_in_fp16_and_a_huge_gamma_overflows() -> None:
    model = models.randomize_norm_state(models.ConvBN2d()).eval()
    with torch.no_grad():
        model.bn1.running_var[3] = 1e-8
        model.bn2.weight[1] = 1e4
        model.bn2.running_var[1] = 1e-6
    found = _findings(model, precision="fp16")
    bn403 = {(f.layer.raw, f.severity.value, f.message.split(" is ")[0]) for f in found if f.code == "BN403"}  # type: ignore[union-attr]
    assert ("bn1", "warning", "running_var of channel 3") in bn403
    scale = 1e4 / np.sqrt(np.float64(np.float32(1e-6)) + 1e-5)
    overflow = next(f for f in found if f.code == "BN403" and f.message.startswith("scale of channel 1"))
    assert overflow.severity is Severity.ERROR and f"{scale:.4g}" in overflow.message
    assert not any(f.code == "BN403" for f in _findings(model, precision="bf16") if f.layer.raw == "bn2")  # type: ignore[union-attr]


def test_int8_names_the_channel_another_channel_dwarfs_with_its_rounding_bound() -> None:
    model = models.randomize_norm_state(models.ConvBN2d()).eval()
    with torch.no_grad():
        model.bn2.weight[2] = 50.0
    (finding,) = [f for f in _findings(model, precision="int8") if f.code == "BN403" and f.layer.raw == "bn2"]  # type: ignore[union-attr]
    folded, _, _ = _numpy_fold(
        *(t.detach().double().numpy() for t in (model.conv2.weight, model.conv2.bias, model.bn2.weight)),
        model.bn2.bias.detach().double().numpy(),
        model.bn2.running_mean.double().numpy(),
        model.bn2.running_var.double().numpy(),
        model.bn2.eps,
    )
    per_channel = np.abs(folded).reshape(4, -1).max(axis=1)
    error = (per_channel.max() / 127 / 2) / per_channel
    worst = int(error.argmax())
    assert error[worst] > MAX_INT8_CHANNEL_ERROR and finding.layer.raw == "bn2"  # type: ignore[union-attr]
    assert f"channel {worst}'s largest |folded weight|, {per_channel[worst]:.3g}" in finding.message
    assert f"up to {error[worst]:.1%}" in finding.message
    setter = int(per_channel.argmax())
    assert setter == 2 and f"set by channel 2's largest |folded weight|, {per_channel[setter]:.3g}" in finding.message


def _digits(change: object = None) -> DigitsCNN:
    model = DigitsCNN()
    model.load_state_dict(torch.load(DIGITS / "state_dict.pt"))
    with torch.no_grad():
        if change is not None:
            change(model)  # type: ignore[operator]
    return model.eval()


def _digits_batch() -> torch.Tensor:
    return torch.from_numpy(np.load(DIGITS / "test_images.npy")).float()[:64]


@pytest.mark.parametrize("precision", ["fp16", "bf16", "int8"])
def test_folding_the_healthy_sample_model_changes_nothing_worth_a_finding(precision: str) -> None:
    assert [f for f in _findings(_digits(), [_digits_batch()], precision=precision) if f.code == "BN404"] == []


def test_a_tiny_running_var_moves_the_int8_output() -> None:
    planted = _digits(lambda m: m.features[8].running_var.__setitem__(0, 1e-8))
    found = [f for f in _findings(planted, [_digits_batch()], precision="int8") if f.code == "BN404"]
    assert any(f.layer is None for f in found), [f.message for f in found]
    change = float(next(f for f in found if f.layer is None).message.split("changes by ")[1].split(" ")[0])
    assert change > MAX_OUTPUT_CHANGE


def test_a_huge_gamma_makes_the_fp16_fold_inf_and_bn404_fire_at_that_layer() -> None:
    planted = _digits(
        lambda m: (m.features[4].weight.__setitem__(1, 1e4), m.features[4].running_var.__setitem__(1, 1e-6))
    )
    found = [f for f in _findings(planted, [_digits_batch()], precision="fp16") if f.code == "BN404"]
    layers = {None if f.layer is None else f.layer.raw for f in found}
    assert "features.4" in layers and None in layers
    assert all(f.message.startswith("folded and run in fp16") for f in found)


def test_the_cli_runs_the_folding_rules_and_ignore_knows_them(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["check", DIGITS / "state_dict.pt", "--arch", "sample_models.architectures:DigitsCNN"]
    result = invoke(capsys, [*argv, "--input", DIGITS / "test_images.npy", "--precision", "int8", "--format", "json"])
    assert result.code == 0, result.err
    document = json.loads(result.out)
    assert {f["code"] for f in document["findings"]} == {"BN401"}
    quiet = invoke(capsys, [*argv, "--no-data", "--fold", "--ignore", "BN401", "--format", "json"])
    assert quiet.code == 0 and json.loads(quiet.out)["findings"] == []
    assert "BN401-BN403" in json.loads(quiet.out)["notes"][0]
    plain = invoke(capsys, [*argv, "--no-data", "--format", "json"])
    assert json.loads(plain.out)["findings"] == []


def test_lazy_modules_not_yet_run_are_said_and_not_folded() -> None:
    result = check_model(models.LazyConvBN(), [torch.randn(4, 3, 8, 8)], precision="fp16", materialize_lazy=True)
    assert not [f for f in result.findings if f.code.startswith("BN4")]
    assert any("lazy modules that have not run yet" in note for note in result.notes)


def test_a_hostile_module_name_reaches_the_message_inert() -> None:
    model = nn.Sequential()
    model.add_module("conv\x1b[31m", nn.Conv2d(3, 4, 3))
    model.add_module("bn", nn.BatchNorm2d(4))
    (finding,) = [f for f in check_model(model.eval(), fold=True).findings if f.code == "BN401"]
    assert "\x1b" not in finding.message and "conv\\x1b[31m (Conv2d)" in finding.message


def test_the_int8_output_change_matches_a_float64_reference() -> None:
    from bn_inspect.analyses.folding import fold_changes
    from bn_inspect.data.batch import as_batch
    from bn_inspect.options import Precision

    model = models.randomize_norm_state(nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4))).eval()
    with torch.no_grad():
        model[1].weight[0] = 20.0  # channel 0's folded weights set the int8 scale of the whole tensor
    x = models.make_input((64, 5), mean=2.0)
    changes = {
        (c.format, c.layer is None): c.change
        for c in fold_changes(model, find_fold_sites(model), Precision.INT8, as_batch(x))
    }
    linear, norm = model[0], model[1]
    tensors = [t.detach().double().numpy() for t in (linear.weight, linear.bias, norm.weight, norm.bias)]
    folded, folded_bias, _ = _numpy_fold(
        *tensors, norm.running_mean.double().numpy(), norm.running_var.double().numpy(), norm.eps
    )
    step = np.abs(folded).max() / 127
    quantized = np.round(folded / step) * step
    inputs = x.double().numpy()
    exact = model.double()(x.double()).detach().numpy()
    moved = inputs @ quantized.T + folded_bias - exact
    expected = np.sqrt(np.mean(moved**2)) / np.sqrt(np.mean(exact**2))
    assert expected > 1e-3
    np.testing.assert_allclose(changes[("int8 (per-tensor weights)", True)], expected, rtol=1e-3)
    np.testing.assert_allclose(changes[("int8 (per-tensor weights)", False)], expected, rtol=1e-3)
    assert changes[("float32", True)] < 1e-6


def test_bn404_says_its_largest_changes_even_when_silent() -> None:
    result = check_model(_digits(), [_digits_batch()], precision="bf16")
    (note,) = [note for note in result.notes if note.startswith("BN404 on the first batch")]
    assert "folded in float32, the model's output moved" in note and "folded in bf16" in note


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d in miniature: a BatchNorm subclass that also activates."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


def test_a_batchnorm_subclass_is_one_site_that_does_not_fold_and_a_keyword_call_is_read() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), BatchNormAct(4)).eval()
    (site,) = find_fold_sites(model).sites
    assert not site.is_foldable and site.reason is not None and site.reason.startswith("BatchNormAct subclasses")
    (keyword,) = find_fold_sites(models.KeywordCall()).sites
    assert keyword.producer_kind == "the model's input"


def test_a_torch_export_archive_gets_bn401_and_bn402_from_its_graph(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    model = models.randomize_norm_state(AfterEverything()).eval()
    exported = torch.export.export(model, (torch.randn(2, 3, 8, 8),))
    traced = {site.layer.raw: site.reason for site in find_fold_sites(model).sites}
    assert {site.layer.raw: site.reason for site in find_fold_sites(exported.module()).sites} == traced
    path = tmp_path / "convbn.pt2"
    torch.export.save(
        torch.export.export(models.randomize_norm_state(models.ConvBN2d()).eval(), (torch.randn(2, 3, 8, 8),)), path
    )
    result = invoke(capsys, ["check", path, "--no-data", "--precision", "fp16", "--format", "json"])
    document = json.loads(result.out)
    assert result.code == 0, result.err
    assert {(f["code"], f["layer"]) for f in document["findings"]} == {("BN401", "bn1"), ("BN401", "bn2")}
    assert any(note.startswith("BN403 and BN404 did not run") for note in document["notes"])


def test_a_folded_output_that_is_no_longer_a_number_is_an_error_and_a_large_change_a_warning() -> None:
    changes = [
        FoldChange(None, "fp16", float("inf"), 23.3),
        FoldChange(Untrusted("bn1"), "fp16", 0.5, 2.0),
        FoldChange(Untrusted("bn2"), "fp16", 0.01, 2.0),
    ]
    found = {(f.layer.raw if f.layer else None): f for f in change_findings(changes)}
    assert found.keys() == {None, "bn1"}
    assert found[None].severity is Severity.ERROR and "becomes NaN or infinite" in found[None].message
    assert found["bn1"].severity is Severity.WARNING
    assert "the root mean square of the change is 0.5 times the original output's (2)" in found["bn1"].message
