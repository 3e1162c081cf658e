"""PyTorch Lightning checkpoints end to end: a real Trainer.fit save, loaded with --arch, numbers against float64."""

from __future__ import annotations

import json
import pathlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bn_inspect.model.loading import load_model
from sample_models.architectures import DigitsCNN
from tests.helpers import DIGITS, assert_one_error_line, invoke
from tests.test_stats import reference

pl = pytest.importorskip("pytorch_lightning")

ARCH = "sample_models.architectures:DigitsCNN"


class DigitsModule(pl.LightningModule):  # type: ignore[misc]
    """The sample CNN under ``self.model``, beside a weighted loss whose buffer the checkpoint keeps too."""

    def __init__(self, lr: float, data_root: pathlib.Path) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = DigitsCNN()
        self.criterion = nn.CrossEntropyLoss(weight=torch.linspace(0.5, 1.5, 10))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _index: int) -> torch.Tensor:
        images, labels = batch
        loss: torch.Tensor = self.criterion(self.model(images), labels)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DigitsModule]:
    """A checkpoint written by Lightning's own ModelCheckpoint after a few steps on the shipped digits."""
    root = tmp_path_factory.mktemp("lightning")
    torch.manual_seed(0)
    images = torch.from_numpy(np.load(DIGITS / "train_images.npy"))
    labels = torch.from_numpy(np.load(DIGITS / "train_labels.npy")).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=64, shuffle=True)
    module = DigitsModule(lr=0.05, data_root=root / "digits")
    trainer = pl.Trainer(
        max_steps=6,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=root,
    )
    trainer.fit(module, loader)
    (checkpoint,) = (root / "checkpoints").glob("*.ckpt")
    return checkpoint, module


def test_a_real_checkpoint_holds_lightning_entries_and_a_path(trained: tuple[Path, DigitsModule]) -> None:
    checkpoint, _ = trained
    content = torch.load(checkpoint, weights_only=False)
    assert {"state_dict", "hyper_parameters", "pytorch-lightning_version", "optimizer_states"} <= content.keys()
    # The hyperparameters keep a pathlib path: what the plain-data allow-list is for.
    assert isinstance(content["hyper_parameters"]["data_root"], pathlib.PurePath)
    assert any(key.startswith("criterion.") for key in content["state_dict"])


def test_load_model_strips_the_attribute_prefix(trained: tuple[Path, DigitsModule]) -> None:
    checkpoint, module = trained
    loaded = load_model(checkpoint, arch=ARCH)
    assert loaded.format == "checkpoint"
    assert isinstance(loaded.module, DigitsCNN)
    for key, value in module.model.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value), key
    (note,) = loaded.notes
    assert "'model.'" in note and "1 entries outside it are left out" in note


def test_inspect_matches_the_float64_reference(
    capsys: pytest.CaptureFixture[str], trained: tuple[Path, DigitsModule]
) -> None:
    checkpoint, module = trained
    data = DIGITS / "test_images.npy"
    result = invoke(capsys, ["inspect", checkpoint, "--arch", ARCH, "--input", data, "--format", "json"])
    assert result.code == 0, result.err
    assert "under the prefix 'model.'" in result.err
    report = json.loads(result.out)
    network = module.model.eval()
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        layer.register_forward_pre_hook(lambda _m, args, name=name: seen.setdefault(name, args[0].detach().clone()))
        for name, layer in network.named_modules()
        if isinstance(layer, nn.BatchNorm2d)
    ]
    with torch.no_grad():
        network(torch.from_numpy(np.load(data)))
    for hook in hooks:
        hook.remove()
    assert [layer["name"] for layer in report["layers"]] == list(seen)
    for layer in report["layers"]:
        ref_mean, ref_var = reference(seen[layer["name"]])
        np.testing.assert_allclose(layer["batch_mean"], ref_mean, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(layer["batch_var"], ref_var, rtol=1e-5)
        bn = network.get_submodule(layer["name"])
        assert layer["running_mean"] == pytest.approx(bn.running_mean.double().tolist(), rel=1e-12)


def test_layers_lists_the_network_of_the_checkpoint(
    capsys: pytest.CaptureFixture[str], trained: tuple[Path, DigitsModule]
) -> None:
    checkpoint, _ = trained
    result = invoke(capsys, ["layers", checkpoint, "--arch", ARCH, "--format", "json"])
    assert result.code == 0, result.err
    assert [layer["name"] for layer in json.loads(result.out)["layers"]] == ["features.1", "features.4", "features.8"]


def test_recalibrate_writes_back_under_the_prefix(
    capsys: pytest.CaptureFixture[str], trained: tuple[Path, DigitsModule], tmp_path: Path
) -> None:
    checkpoint, _ = trained
    output = tmp_path / "recalibrated.ckpt"
    data = DIGITS / "test_images.npy"
    result = invoke(capsys, ["recalibrate", checkpoint, "--arch", ARCH, "--input", data, "--output", output])
    assert result.code == 0, result.err
    before = torch.load(checkpoint, weights_only=False)
    after = torch.load(output, weights_only=False)
    assert list(after["state_dict"]) == list(before["state_dict"])
    assert after["hyper_parameters"] == before["hyper_parameters"]
    assert not torch.equal(
        after["state_dict"]["model.features.1.running_mean"], before["state_dict"]["model.features.1.running_mean"]
    )
    assert torch.equal(after["state_dict"]["criterion.weight"], before["state_dict"]["criterion.weight"])
    assert torch.equal(
        load_model(output, arch=ARCH).module.features[1].running_mean,
        after["state_dict"]["model.features.1.running_mean"],
    )


def test_a_checkpoint_that_fits_no_prefix_is_refused(
    capsys: pytest.CaptureFixture[str], trained: tuple[Path, DigitsModule]
) -> None:
    checkpoint, _ = trained
    result = invoke(
        capsys, ["inspect", checkpoint, "--arch", "sample_models.architectures:SignalCNN1d", "--shape", "2,1,64"]
    )
    assert result.code == 2
    assert_one_error_line(result, "does not fit --arch sample_models.architectures:SignalCNN1d")
