"""timm's hub folders (config.json with ``architecture``, written by timm's save_for_hf), inspected like a model file.

Marked ``zoo`` (and ``slow``) and skipped where timm is not installed: timm lives in the zoo venv
(torch 2.14.1, docs/model-zoo.md), where this runs as ``python -m pytest -m zoo tests/test_hub_timm.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bn_inspect.model.loading import load_model
from tests.helpers import invoke
from tests.test_stats import reference

timm = pytest.importorskip("timm")

pytestmark = [pytest.mark.zoo, pytest.mark.slow]


@pytest.fixture(scope="module")
def timm_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module, Path]:
    """resnet18 trained two steps on seeded data, saved by timm's save_for_hf; and the data to inspect."""
    from timm.models import _hub

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        images = torch.randn(8, 3, 32, 32) * 2 + 0.5
        loss = nn.functional.cross_entropy(model(images), torch.randint(0, 10, (8,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    root = tmp_path_factory.mktemp("timm")
    folder = root / "resnet18"
    _hub.save_for_hf(model, str(folder), safe_serialization=True)
    data = root / "images.npy"
    np.save(data, (torch.randn(16, 3, 32, 32) * 2 + 0.5).numpy())
    return folder, model, data


def test_a_timm_folder_is_built_with_timm_and_matches_the_float64_reference(
    capsys: pytest.CaptureFixture[str], timm_folder: tuple[Path, nn.Module, Path]
) -> None:
    folder, model, data = timm_folder
    assert "architecture" in json.loads((folder / "config.json").read_text())
    result = invoke(capsys, ["inspect", folder, "--input", data, "--batch-size", "16", "--format", "json"])
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["model"]["format"] == "timm"
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_pre_hook(lambda _m, args, name=name: seen.__setitem__(name, args[0].detach().clone()))
        for name, module in model.named_modules()
        if isinstance(module, nn.BatchNorm2d)
    ]
    with torch.no_grad():
        model(torch.from_numpy(np.load(data)))
    for hook in hooks:
        hook.remove()
    assert [layer["name"] for layer in report["layers"]] == list(seen)
    for layer in report["layers"]:
        ref_mean, ref_var = reference(seen[layer["name"]])
        np.testing.assert_allclose(layer["batch_mean"], ref_mean, rtol=1e-6, atol=np.sqrt(ref_var).max() * 1e-6)
        np.testing.assert_allclose(layer["batch_var"], ref_var, rtol=1e-5)


def test_the_input_shape_comes_from_pretrained_cfg(timm_folder: tuple[Path, nn.Module, Path]) -> None:
    folder, model, _ = timm_folder
    loaded = load_model(folder)
    assert (loaded.format, loaded.sample_shape) == ("timm", (3, 224, 224))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value), key


def test_an_architecture_timm_does_not_know_ends_in_one_line(
    capsys: pytest.CaptureFixture[str], timm_folder: tuple[Path, nn.Module, Path], tmp_path: Path
) -> None:
    source, _, _ = timm_folder
    for entry in source.iterdir():
        (tmp_path / entry.name).write_bytes(entry.read_bytes())
    config = json.loads((source / "config.json").read_text()) | {"architecture": "no_such_net"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = invoke(capsys, ["inspect", tmp_path])
    assert result.code == 2 and "names architecture 'no_such_net', which timm" in result.err
