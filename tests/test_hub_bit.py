"""A real transformers BiT folder (BitForImageClassification, save_pretrained) inspected and checked end to end.

BiT normalizes with BitGroupNormActivation, a GroupNorm subclass that also activates: bn-inspect reports
each as a GroupNorm (family "group": statistics per sample and group, no running statistics), and its
numbers (the input each receives, the groups, the values per group, the affine terms) are checked
against the float64 model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.helpers import invoke
from tests.test_hub import DATA, trained

transformers = pytest.importorskip("transformers")


def tiny_bit(layer_type: str) -> nn.Module:
    config = transformers.BitConfig(
        num_channels=1,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        num_groups=4,
        layer_type=layer_type,
        num_labels=10,
    )
    return transformers.BitForImageClassification(config)


@pytest.fixture(scope="module", params=["preactivation", "bottleneck"])
def bit_folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    model = trained(lambda: tiny_bit(request.param))
    folder = tmp_path_factory.mktemp(f"bit-{request.param}")
    model.save_pretrained(folder)
    return folder, model


def group_inputs(model: nn.Module, images: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """The shape of what each GroupNorm receives, in a float64 copy of the model."""
    import copy

    twin = copy.deepcopy(model).double().eval()
    seen: dict[str, tuple[int, ...]] = {}
    hooks = [
        module.register_forward_pre_hook(lambda _m, args, name=name: seen.__setitem__(name, tuple(args[0].shape)))
        for name, module in twin.named_modules()
        if isinstance(module, nn.GroupNorm)
    ]
    with torch.no_grad():
        twin(images.double())
    for hook in hooks:
        hook.remove()
    return seen


def test_bit_is_inspected_with_transformers_names_as_group_norms(
    capsys: pytest.CaptureFixture[str], bit_folder: tuple[Path, nn.Module]
) -> None:
    folder, model = bit_folder
    images = torch.from_numpy(np.load(DATA))
    result = invoke(capsys, ["inspect", folder, "--input", DATA, "--batch-size", "450", "--format", "json"])
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["model"]["format"] == "huggingface"
    expected = group_inputs(model, images)
    assert expected and [layer["name"] for layer in report["layers"]] == list(expected)
    for layer in report["layers"]:
        module = model.get_submodule(layer["name"])
        assert (layer["type"], layer["family"], layer["num_groups"]) == ("BitGroupNormActivation", "group", 4)
        assert tuple(layer["input_shape"]) == expected[layer["name"]]
        assert layer["batch_mean"] is None and layer["running_mean"] is None and not layer["track_running_stats"]
        assert layer["weight"] == pytest.approx(module.weight.double().tolist(), rel=1e-12)
        assert layer["bias"] == pytest.approx(module.bias.double().tolist(), rel=1e-12)
        n, c, h, w = expected[layer["name"]]
        per_group = c // 4 * h * w
        assert f"N×G = {n}×4 = {n * 4:,} means" in layer["explanation"]
        assert f"= {per_group:,} values" in layer["explanation"]


def test_bit_checks_clean_and_says_why_the_folding_rules_did_not_run(
    capsys: pytest.CaptureFixture[str], bit_folder: tuple[Path, nn.Module]
) -> None:
    folder, _ = bit_folder
    result = invoke(capsys, ["check", folder, "--input", DATA, "--precision", "fp16", "--format", "json"])
    assert result.code == 0, result.err
    document = json.loads(result.out)
    assert document["findings"] == []
    assert any("the folding rules (BN401-BN404) did not run" in note for note in document["notes"])
