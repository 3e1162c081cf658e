"""Quantization-aware training: prepare_qat's fused ConvBn/LinearBn modules, trained a few steps, numbers against float64.

The BatchNorm inside a fused module normalizes conv(x, fake_quant(W * s), 0) / s + b with
s = bn.weight / sqrt(running_var + eps), not the plain convolution's output; the reference
recomputes that tensor in float64 from the fused module's input and parameters.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.ao.quantization as quantization
from torch import nn

from bn_inspect.analyses.inspection import inspect_model
from bn_inspect.model.qat import observers_paused
from tests import models
from tests.conftest import state_fingerprint
from tests.helpers import DIGITS, invoke
from tests.test_stats import reference

# torch.ao.quantization announces its move to torchao on every call.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

QAT_ARCH = "tests.models:qat_digits"
CONV_LAYERS = ["features.0.bn", "features.3.bn", "features.7.bn"]


def trained(build: Callable[[], nn.Module], steps: int = 8) -> nn.Module:
    """``build()`` trained ``steps`` SGD steps on the shipped digits (observers and fake quantization on), then in eval."""
    torch.manual_seed(0)
    model = build()
    images = torch.from_numpy(np.load(DIGITS / "train_images.npy"))
    labels = torch.from_numpy(np.load(DIGITS / "train_labels.npy")).long()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(steps):
        batch = slice(step * 64, (step + 1) * 64)
        loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_images() -> torch.Tensor:
    return torch.from_numpy(np.load(DIGITS / "test_images.npy"))


def fused_owners(model: nn.Module) -> dict[str, nn.Module]:
    return {
        f"{name}.bn": module
        for name, module in model.named_modules()
        if hasattr(module, "weight_fake_quant") and hasattr(module, "bn")
    }


def float64_bn_inputs(model: nn.Module, images: torch.Tensor, *, quantized: bool = True) -> dict[str, torch.Tensor]:
    """Each fused module's BN input, recomputed in float64 from the module's input in the model's own forward.

    ``quantized`` False gives the plain layer's output, conv(x, W) + b, for contrast.
    """
    model = copy.deepcopy(model)
    owners = fused_owners(model)
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        owner.register_forward_pre_hook(lambda _m, args, name=name: inputs.__setitem__(name, args[0].detach().clone()))
        for name, owner in owners.items()
    ]
    model.apply(quantization.disable_observer)
    with torch.no_grad():
        model(images)
        for hook in hooks:
            hook.remove()
        result = {}
        for name, owner in owners.items():
            bn = owner.bn
            scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
            shape = [-1] + [1] * (owner.weight.dim() - 1)
            if quantized:
                scale32 = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                weight = owner.weight_fake_quant(owner.weight * scale32.reshape(shape)).double()
            else:
                weight, scale = owner.weight.double(), torch.ones_like(scale)
            x = inputs[name].double()
            if isinstance(owner, nn.Linear):
                out = nn.functional.linear(x, weight)
            else:
                out = nn.functional.conv2d(x, weight, None, owner.stride, owner.padding, owner.dilation, owner.groups)
            channel = [1, -1] + [1] * (out.dim() - 2)
            out = out / scale.reshape(channel)
            result[name] = out + owner.bias.double().reshape(channel)
    return result


def assert_matches(
    report_layers: list[tuple[str, list[float], list[float]]], expected: dict[str, torch.Tensor]
) -> None:
    assert [name for name, _, _ in report_layers] == list(expected)
    for name, batch_mean, batch_var in report_layers:
        ref_mean, ref_var = reference(expected[name])
        # The model computes in float32; the reduction itself is float64 on both sides.
        np.testing.assert_allclose(batch_mean, ref_mean, rtol=1e-5, atol=np.sqrt(ref_var).max() * 1e-5, err_msg=name)
        np.testing.assert_allclose(batch_var, ref_var, rtol=1e-4, err_msg=name)


def api_layers(model: nn.Module, images: torch.Tensor) -> list[tuple[str, list[float], list[float]]]:
    report = inspect_model(model, images.split(64))
    return [(layer.name.raw, list(layer.batch_mean or ()), list(layer.batch_var or ())) for layer in report.layers]


@pytest.fixture(scope="module")
def qat_model() -> nn.Module:
    return trained(models.qat_digits)


def test_the_bn_inputs_are_the_rescaled_quantized_convolution(qat_model: nn.Module) -> None:
    images = test_images()
    before = state_fingerprint(qat_model)
    measured = api_layers(qat_model, images)
    assert state_fingerprint(qat_model) == before
    assert_matches(measured, float64_bn_inputs(qat_model, images))
    report = inspect_model(qat_model, images.split(64))
    assert [layer.flags for layer in report.layers] == [("qat",)] * 3
    assert (
        "Inside the QAT ConvBnReLU2d, that input is conv(x, fake_quant(W·s))/s + b" in report.layers[0].explanation.raw
    )
    # The plain convolution's output is measurably another tensor: the check above tells them apart.
    plain = float64_bn_inputs(qat_model, images, quantized=False)
    name, batch_mean, _ = measured[1]
    gap = np.abs(np.asarray(batch_mean) - reference(plain[name])[0]).max()
    assert gap > 100 * np.sqrt(reference(plain[name])[1]).max() * 1e-5


def test_linear_bn_1d_is_measured_on_its_rescaled_input() -> None:
    model = trained(models.qat_linear_head)
    images = test_images()
    measured = api_layers(model, images)
    assert [name for name, _, _ in measured] == ["fc.bn"]
    assert_matches(measured, float64_bn_inputs(model, images))


def test_torchs_slow_path_folds_bn_in_eval_and_is_still_measured(qat_model: nn.Module) -> None:
    model = copy.deepcopy(qat_model)
    for owner in fused_owners(model).values():
        owner._enable_slow_path_for_better_numerical_stability = True
    images = test_images()
    calls = []
    probe = copy.deepcopy(model)  # its forward moves the observers
    probe.features[0].bn.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        probe(images[:4])
    assert not calls  # the fold: bn itself never runs in eval on this path
    assert_matches(api_layers(model, images), float64_bn_inputs(qat_model, images))


def test_observers_do_not_move_during_a_run_and_are_set_back(qat_model: nn.Module) -> None:
    model = copy.deepcopy(qat_model)
    fake_quant = model.features[3].activation_post_process
    assert int(fake_quant.observer_enabled) == 1
    scale = fake_quant.scale.clone()
    with observers_paused(model):
        assert int(fake_quant.observer_enabled) == 0
        model(test_images() * 50)  # data far outside the observed range
        assert torch.equal(fake_quant.scale, scale)
    assert int(fake_quant.observer_enabled) == 1


def test_layers_lists_the_fused_class_and_the_frozen_state(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model = trained(lambda: models.qat_digits(freeze_bn=True), steps=2)
    path = tmp_path / "qat_sd.pt"
    torch.save(model.state_dict(), path)
    result = invoke(
        capsys, ["layers", path, "--arch", f"{QAT_ARCH}", "--arch-kwargs", '{"freeze_bn": true}', "--format", "json"]
    )
    assert result.code == 0, result.err
    layers = json.loads(result.out)["layers"]
    assert [(layer["name"], layer["fused_into"], layer["is_qat_frozen"]) for layer in layers] == [
        ("features.0.bn", "ConvBnReLU2d", True),
        ("features.3.bn", "ConvBn2d", True),
        ("features.7.bn", "ConvBnReLU2d", True),
    ]


def pickled(model: nn.Module, path: Path) -> Path:
    """``torch.save(model)`` as a QAT script would: qconfig dropped first, since prepare_qat's does not pickle."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if hasattr(module, "qconfig"):
            module.qconfig = None
    torch.save(model, path)
    return path


def test_a_pickled_qat_model_is_refused_without_trust_and_inspected_with_it(
    capsys: pytest.CaptureFixture[str], qat_model: nn.Module, tmp_path: Path
) -> None:
    path = pickled(qat_model, tmp_path / "qat.pt")
    data = DIGITS / "test_images.npy"
    refused = invoke(capsys, ["inspect", path, "--input", data])
    assert refused.code == 2 and "ConvBnReLU2d" in refused.err and "--trust-pickle" in refused.err
    result = invoke(capsys, ["inspect", path, "--trust-pickle", "--input", data, "--format", "json"])
    assert result.code == 0, result.err
    layers = [(layer["name"], layer["batch_mean"], layer["batch_var"]) for layer in json.loads(result.out)["layers"]]
    assert_matches(layers, float64_bn_inputs(qat_model, test_images()))


def test_the_state_dict_with_arch_gives_the_same_numbers(
    capsys: pytest.CaptureFixture[str], qat_model: nn.Module, tmp_path: Path
) -> None:
    path = tmp_path / "qat_sd.pt"
    torch.save(qat_model.state_dict(), path)
    result = invoke(
        capsys, ["inspect", path, "--arch", QAT_ARCH, "--input", DIGITS / "test_images.npy", "--format", "json"]
    )
    assert result.code == 0, result.err
    layers = [(layer["name"], layer["batch_mean"], layer["batch_var"]) for layer in json.loads(result.out)["layers"]]
    assert_matches(layers, float64_bn_inputs(qat_model, test_images()))


@pytest.mark.parametrize("freeze", [True, False], ids=["frozen", "updating"])
def test_bn113_fires_on_a_frozen_qat_model_only(
    capsys: pytest.CaptureFixture[str], qat_model: nn.Module, tmp_path: Path, freeze: bool
) -> None:
    model = copy.deepcopy(qat_model)
    if freeze:
        model.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)
    path = pickled(model, tmp_path / "qat.pt")
    # The fixture trains a few steps only, which BN114 (few batches tracked) rightly flags: left out here.
    result = invoke(capsys, ["check", path, "--trust-pickle", "--no-data", "--format", "json", "--ignore", "BN114"])
    assert result.code == 0, result.err
    findings = [f for f in json.loads(result.out)["findings"] if f["code"] == "BN113"]
    assert [f["layer"] for f in findings] == (CONV_LAYERS if freeze else [])
    if freeze:
        assert findings[0]["severity"] == "info" and "QAT ConvBnReLU2d whose freeze_bn is set" in findings[0]["message"]


def test_a_frozen_qat_bn_normalizes_with_running_statistics_in_train_mode(qat_model: nn.Module) -> None:
    model = copy.deepcopy(qat_model)
    model.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)
    report = inspect_model(model, test_images().split(64), mode="train")
    assert {layer.name.raw: layer.normalizes_with for layer in report.layers} == dict.fromkeys(CONV_LAYERS, "running")
    assert {layer.flags for layer in report.layers} == {("qat-frozen",)}
