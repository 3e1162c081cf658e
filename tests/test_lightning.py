"""BNWatch, the Lightning callback: a real Trainer fits the digits CNN with it, and the timeline holds the run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from bn_inspect.report.departure import allowance
from bn_inspect.report.timeline_reading import read_timelines
from sample_models.architectures import DigitsCNN
from tests.helpers import DIGITS, REPO, invoke

PACKAGES = ["lightning.pytorch", "pytorch_lightning"]
if not any(importlib.util.find_spec(name.split(".")[0]) for name in PACKAGES):
    pytest.skip("neither lightning nor pytorch_lightning is installed", allow_module_level=True)

BATCH = 64


@pytest.fixture(params=PACKAGES)
def pl(request: pytest.FixtureRequest) -> ModuleType:
    """Each Lightning package in turn (its Trainer takes only its own callbacks and modules); skipped if absent."""
    return pytest.importorskip(request.param)


def _loader(images: str, labels: str, *, shuffle: bool = False) -> torch.utils.data.DataLoader[Any]:
    x = torch.from_numpy(np.load(DIGITS / images)).float()
    y = torch.from_numpy(np.load(DIGITS / labels)).long()
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y),
        batch_size=BATCH,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(0),
    )


def digits_module(pl: ModuleType, fail_at: int | None = None) -> Any:
    """The digits CNN as a LightningModule of the package ``pl``."""

    class Digits(pl.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = DigitsCNN()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            if fail_at is not None and self.global_step == fail_at:
                raise RuntimeError("the loss exploded")
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
            x, y = batch
            self.log("val_loss", nn.functional.cross_entropy(self(x), y))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    return Digits()


def _trainer(pl: ModuleType, callback: Any, epochs: int = 2) -> Any:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        deterministic=True,
    )


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_the_callback_is_a_callback_of_each_lightning_package_installed(pl: ModuleType, tmp_path: Path) -> None:
    from bn_inspect.lightning import CALLBACK_PACKAGES, BNWatch

    assert pl.__name__ in CALLBACK_PACKAGES
    assert isinstance(BNWatch(tmp_path / "run.jsonl"), pl.Callback)


def test_importing_bn_inspect_does_not_import_lightning() -> None:
    code = (
        "import sys, bn_inspect; "
        "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'lightning_fabric') if m in sys.modules))"
    )
    found = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]"


def test_a_real_fit_writes_samples_at_global_steps_and_the_train_eval_gap_at_each_validation(
    pl: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bn_inspect.lightning import BNWatch

    path = tmp_path / "bn-watch.jsonl"
    module = digits_module(pl)
    callback = BNWatch(path, every_n_steps=5)
    train = _loader("train_images.npy", "train_labels.npy", shuffle=True)
    # The unscaled images (16 times the training scale): eval mode meets data far from its statistics.
    val = _loader("test_images_unscaled.npy", "test_labels.npy")
    _trainer(pl, callback).fit(module, train, val)
    steps_per_epoch = len(train)
    records = _records(path)
    assert records[0]["record"] == "header" and records[-1]["record"] == "end"
    train_steps = [r["step"] for r in records if r["record"] == "sample" and r["phase"] == "train"]
    assert train_steps == list(range(0, 2 * steps_per_epoch, 5))
    gaps = [r for r in records if r["record"] == "validation"]
    # The sanity check is no validation run; one after each epoch, at that epoch's last global step.
    assert [g["step"] for g in gaps] == [steps_per_epoch, 2 * steps_per_epoch]
    assert any(r["record"] == "sample" and r["phase"] == "validation" for r in records)
    # The last gap, against a float64 reference of features.1 over the validation images at the end.
    net = module.net.double().eval()
    x = torch.from_numpy(np.load(DIGITS / "test_images_unscaled.npy")).double()
    with torch.no_grad():
        values = net.features[0](x)
    bn = net.features[1]
    mean = values.mean(dim=(0, 2, 3)).numpy()
    var = values.var(dim=(0, 2, 3), unbiased=False).numpy()
    running_mean, running_var = bn.running_mean.numpy(), bn.running_var.numpy()
    std = np.sqrt(running_var + bn.eps)
    expected = float(np.mean(np.hypot(mean - running_mean, np.sqrt(var + bn.eps) - std) / std)) / allowance(len(x))
    first = next(layer for layer in gaps[-1]["gap"]["layers"] if layer["layer"] == "net.features.1")
    assert first["departure"] == pytest.approx(expected, rel=1e-4)
    assert gaps[-1]["gap"]["largest"]["departure"] > 1.7
    timeline = read_timelines([path])
    assert timeline.is_complete and len(timeline.validations) == 2
    assert invoke(capsys, ["timeline", path, "--fail-on", "never"]).code == 0
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())


def test_a_fit_that_fails_closes_the_timeline_and_removes_the_hooks(pl: ModuleType, tmp_path: Path) -> None:
    from bn_inspect.lightning import BNWatch

    path = tmp_path / "bn-watch.jsonl"
    module = digits_module(pl, fail_at=7)
    with pytest.raises(RuntimeError, match="the loss exploded"):
        _trainer(pl, BNWatch(path, every_n_steps=5)).fit(module, _loader("train_images.npy", "train_labels.npy"))
    records = _records(path)
    assert records[0]["record"] == "header"
    assert [r["step"] for r in records if r["record"] == "sample"] == [0, 5]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())


@pytest.mark.parametrize("every", [0, -1, 2.5, True])
def test_every_n_steps_must_be_a_whole_number_of_at_least_one(every: Any, tmp_path: Path) -> None:
    from bn_inspect.errors import WatchError
    from bn_inspect.lightning import BNWatch

    with pytest.raises(WatchError, match="every_n_steps must be a whole number of at least 1"):
        BNWatch(tmp_path / "run.jsonl", every_n_steps=every)


def test_with_gradient_accumulation_a_step_is_an_optimizer_step(pl: ModuleType, tmp_path: Path) -> None:
    from bn_inspect.lightning import BNWatch

    path = tmp_path / "bn-watch.jsonl"
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        callbacks=[BNWatch(path, every_n_steps=3)],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        accumulate_grad_batches=2,
        limit_train_batches=12,
        limit_val_batches=2,
    )
    trainer.fit(
        digits_module(pl),
        _loader("train_images.npy", "train_labels.npy"),
        _loader("test_images.npy", "test_labels.npy"),
    )
    written = [(r["record"], r["step"], r.get("phase")) for r in _records(path) if r["record"] != "header"]
    # 12 batches, 6 optimizer steps: one sample at steps 0 and 3, then the validation at step 6.
    assert written == [
        ("sample", 0, "train"),
        ("sample", 3, "train"),
        ("sample", 6, "validation"),
        ("validation", 6, None),
        ("end", 6, None),
    ]
