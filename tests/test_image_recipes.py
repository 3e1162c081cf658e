"""Image folders take the preprocessing of the model's own configuration (timm, torchvision weights) unless overridden."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bn_inspect.analyses.recipes import timm_recipe, torchvision_recipe
from bn_inspect.data.decode import Preprocessing
from bn_inspect.data.images import open_images
from tests.helpers import assert_one_error_line, invoke

ARCH_CODE = """
from torch import nn


class Timmish(nn.Sequential):
    # What a timm model carries: its pretrained configuration, as a plain dict.
    def __init__(self):
        super().__init__(nn.BatchNorm2d(3))
        self.pretrained_cfg = {
            "input_size": (3, 24, 24),
            "crop_pct": 0.8,
            "interpolation": "bicubic",
            "crop_mode": "center",
            "mean": (0.5, 0.4, 0.3),
            "std": (0.2, 0.25, 0.3),
        }


def plain():
    return nn.Sequential(nn.BatchNorm2d(3))
"""


@pytest.fixture(scope="module")
def arch_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("arch") / "nets.py"
    path.write_text(textwrap.dedent(ARCH_CODE))
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for index in range(5):
        picture = np.random.default_rng(index).integers(0, 256, (40 + index, 50, 3), dtype=np.uint8)
        Image.fromarray(picture).save(root / f"{index}.png")
    return root


def run_json(capsys: pytest.CaptureFixture[str], *args: str | Path) -> dict:
    result = invoke(capsys, ["inspect", *args, "--format", "json"])
    assert result.code == 0, result.err
    return json.loads(result.out)


def test_timm_configuration_sets_resize_crop_filter_and_normalization(
    arch_file: Path, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    document = run_json(capsys, "--arch", f"{arch_file}:Timmish", "--input", folder)
    data = document["input"]
    # floor(24 / 0.8) = 30, bicubic, then the centre 24×24.
    assert (
        data["preprocessing"]
        == "resize 30 bicubic, crop 24, normalize mean 0.5,0.4,0.3 std 0.2,0.25,0.3 (from timm pretrained config)"
    )
    assert data["shape"] == [5, 3, 24, 24]
    prep = Preprocessing(resize=30, crop=24, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), interpolation="bicubic")
    tensors = torch.cat([b.args[0] for b in open_images(folder, prep, workers=0).batches(8, None)]).double()
    np.testing.assert_allclose(document["layers"][0]["batch_mean"], tensors.mean(dim=(0, 2, 3)).numpy(), rtol=1e-6)


def test_flags_override_the_configuration_field_by_field(
    arch_file: Path, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = run_json(capsys, "--arch", f"{arch_file}:Timmish", "--input", folder, "--crop", "20", "--normalize", "none")
    assert data["input"]["preprocessing"] == "resize 30 bicubic (from timm pretrained config), crop 20, normalize none"
    assert data["input"]["shape"] == [5, 3, 20, 20]
    all_mine = run_json(capsys, "--arch", f"{arch_file}:Timmish", "--input", folder, "--resize", "22", "--crop", "22")
    assert (
        all_mine["input"]["preprocessing"]
        == "resize 22, crop 22, normalize mean 0.5,0.4,0.3 std 0.2,0.25,0.3 (from timm pretrained config)"
    )


def test_a_model_without_configuration_gets_only_the_flags(
    arch_file: Path, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = run_json(capsys, "--arch", f"{arch_file}:plain", "--input", folder, "--resize", "30", "--crop", "24")
    assert data["input"]["preprocessing"] == "resize 30, crop 24, normalize none"


def test_a_resize_below_the_configured_crop_is_one_line(
    arch_file: Path, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = invoke(capsys, ["inspect", "--arch", f"{arch_file}:Timmish", "--input", folder, "--resize", "20"])
    assert result.code == 2
    assert_one_error_line(
        result, "the crop 24 is larger than the resize 20", "timm pretrained config", "Pass both --resize and --crop"
    )


def test_grayscale_against_a_configured_rgb_mean_is_one_line(
    arch_file: Path, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = invoke(capsys, ["inspect", "--arch", f"{arch_file}:Timmish", "--input", folder, "--grayscale"])
    assert result.code == 2
    assert_one_error_line(result, "the timm pretrained config gives 3 channel means", "with --grayscale")


def test_timm_recipe_reads_the_configuration_as_timm_does() -> None:
    assert timm_recipe({"input_size": (3, 224, 224), "crop_pct": 0.875, "interpolation": "bilinear"}) == {
        "crop": 224,
        "resize": 256,
        "interpolation": "bilinear",
    }
    one_channel = timm_recipe({"input_size": (1, 28, 28), "mean": (0.5,), "std": (0.5,), "crop_mode": "squash"})
    assert one_channel == {"mean": (0.5,), "std": (0.5,), "grayscale": True}


def test_equals_timm_own_eval_transform(tmp_path: Path, folder: Path) -> None:
    timm = pytest.importorskip("timm")
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model("resnet18", pretrained=False)
    transform = create_transform(**resolve_data_config({}, model=model))
    theirs = torch.stack([transform(Image.open(path).convert("RGB")) for path in sorted(folder.glob("*.png"))])
    prep = Preprocessing(**timm_recipe(model.pretrained_cfg))
    ours = torch.cat([b.args[0] for b in open_images(folder, prep, workers=0).batches(8, None)])
    assert torch.equal(ours, theirs)


def testtorchvision_weights_give_their_preset() -> None:
    models = pytest.importorskip("torchvision.models")
    from bn_inspect.analyses.recipes import torchvision_weights

    weights = torchvision_weights("torchvision.models:resnet18", {"weights": "IMAGENET1K_V1"})
    assert weights is models.ResNet18_Weights.IMAGENET1K_V1
    assert torchvision_recipe(weights.transforms()) == {
        "resize": 256,
        "crop": 224,
        "interpolation": "bilinear",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
    }
    assert torchvision_weights("torchvision.models:resnet18", {"weights": None}) is None
    assert torchvision_weights("torchvision.models:resnet18", {"weights": "NO_SUCH"}) is None
