"""recalibrate's default method against check, and the provenance it records in the report and the model file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bn_inspect.analyses.recalibration import recalibrate
from tests import models
from tests.helpers import REPO, invoke

ARCH = ("--arch", "tests.models:ResidualStack")


def residual_files(folder: Path) -> tuple[Path, Path]:
    """A ResidualStack state_dict whose statistics the data does not fit, and 60 samples of that data."""
    torch.manual_seed(0)
    model = models.randomize_norm_state(models.ResidualStack(), seed=3)
    model_path, data_path = folder / "residual.pt", folder / "images.npy"
    torch.save(model.state_dict(), model_path)
    generator = np.random.default_rng(5)
    images = generator.normal(size=(60, 3, 6, 6)) * np.array([1.0, 2.0, 0.5])[:, None, None] + 1.5
    np.save(data_path, images.astype(np.float32))
    return model_path, data_path


def eval_statistics(model: nn.Module, images: torch.Tensor) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Float64 reference: each BatchNorm's eval-mode input over all images, its mean and unbiased variance."""
    model = model.double().eval()
    inputs: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(lambda _m, args, _o, name=name: inputs.__setitem__(name, args[0]))
        for name, module in model.named_modules()
        if isinstance(module, nn.BatchNorm2d)
    ]
    with torch.no_grad():
        model(images.double())
    for handle in handles:
        handle.remove()
    statistics = {}
    for name, x in inputs.items():
        values = x.transpose(0, 1).reshape(x.shape[1], -1)
        statistics[name] = (values.mean(1).numpy(), values.var(1, unbiased=True).numpy())
    return statistics


def test_default_recalibration_passes_check_on_its_own_data_and_holds_the_eval_statistics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    model_path, data_path = residual_files(tmp_path)
    output = tmp_path / "recalibrated.pt"
    small = ("--batch-size", "4")
    assert invoke(capsys, ["check", model_path, *ARCH, "--input", data_path, *small]).code == 1
    result = invoke(capsys, ["recalibrate", model_path, *ARCH, "--input", data_path, *small, "--output", output])
    assert result.code == 0, result.err
    checked = invoke(capsys, ["check", output, *ARCH, "--input", data_path, *small, "--format", "json"])
    assert checked.code == 0, checked.out
    assert json.loads(checked.out)["findings"] == []

    recalibrated = models.ResidualStack()
    recalibrated.load_state_dict(torch.load(output, weights_only=True))
    images = torch.from_numpy(np.load(data_path))
    reference = eval_statistics(recalibrated, images)
    for name, module in recalibrated.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            mean, var = reference[name]
            np.testing.assert_allclose(module.running_mean.numpy(), mean, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(module.running_var.numpy(), var, rtol=1e-4)
            assert int(module.num_batches_tracked) == 15  # 60 samples in batches of 4

    # precise, on the same batches, describes train-mode inputs: the deepest layer's eval input is not that.
    precise = models.ResidualStack()
    precise.load_state_dict(torch.load(model_path, weights_only=True))
    recalibrate(precise, list(images.split(4)), method="precise")
    deepest = precise.blocks[2]["bn2"]
    ratio = eval_statistics(precise, images)["blocks.2.bn2"][1] / deepest.running_var.double().numpy()
    assert np.abs(ratio - 1).max() > 0.05
