"""Every saved format and normalization layer people use: export, functional, compiled, third-party."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bn_inspect.analyses.checking import check_model
from bn_inspect.analyses.inspection import inspect_model
from bn_inspect.analyses.modes import compare_modes
from bn_inspect.analyses.recalibration import recalibrate
from bn_inspect.cli.main import run
from bn_inspect.errors import ExportModeError
from bn_inspect.model.loading import load_model
from bn_inspect.text import Untrusted
from tests import models
from tests.conftest import state_fingerprint
from tests.helpers import DIGITS, SAMPLES
from tests.test_inspection import assert_matches, inspect_unchanged, layer
from tests.test_stats import reference


class Nested(nn.Module):
    """Two BatchNorm2d at different depths, for checking original module paths."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.block = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.stem(x))


def export(model: nn.Module, x: torch.Tensor, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(torch.export.export(model, (x,)), str(path))
    return path


def test_export_archive_names_layers_by_module_path_and_matches_eager(tmp_path: Path) -> None:
    model = models.randomize_norm_state(Nested()).eval()
    x = models.make_input((2, 3, 7, 7), mean=20.0, std=0.5)
    loaded = load_model(export(model, x, tmp_path / "nested.pt2"))
    exported = inspect_unchanged(loaded.module, [x])
    eager = inspect_unchanged(model, [x])
    assert [entry.name.raw for entry in exported.layers] == ["stem.1", "block.1"]
    assert [entry.type.raw for entry in exported.layers] == ["BatchNorm2d", "BatchNorm2d"]
    for a, b in zip(eager.layers, exported.layers, strict=True):
        np.testing.assert_allclose(a.batch_mean, b.batch_mean, rtol=1e-6)
        np.testing.assert_allclose(a.batch_var, b.batch_var, rtol=1e-5)
        assert a.running_var == b.running_var and a.eps == b.eps


def test_train_mode_export_updates_nothing_and_refuses_eval(tmp_path: Path) -> None:
    model = models.randomize_norm_state(Nested()).train()
    x = models.make_input((2, 3, 7, 7))
    loaded = load_model(export(model, x, tmp_path / "train.pt2"))
    with pytest.raises(ExportModeError, match="exported in train mode"):
        inspect_model(loaded.module, [x])
    report = inspect_unchanged(loaded.module, [x, x], mode="train")
    assert all(entry.normalizes_with == "batch" for entry in report.layers)
    with torch.no_grad():
        stem_input = model.stem[0](x)
    assert_matches(layer(report, "stem.1"), torch.cat([stem_input, stem_input]))


def test_export_through_the_cli_says_its_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = export(models.randomize_norm_state(Nested()).eval(), torch.randn(2, 3, 7, 7), tmp_path / "m.pt2")
    assert run(["inspect", str(path), "--shape", "2,3,7,7", "--format", "json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["model"]["format"] == "torch.export"
    assert "exported in eval mode" in captured.err
    assert run(["inspect", str(path), "--shape", "2,3,7,7", "--mode", "train"]) == 2


def test_functional_batch_norm_is_named_by_its_buffers() -> None:
    model = models.FunctionalBN().eval()
    x = models.make_input((4, 3, 5, 5), mean=7.0)
    report = inspect_unchanged(model, [x])
    entry = layer(report, "mean")
    assert entry.type.raw == "functional batch_norm"
    assert entry.normalizes_with == "running"
    assert_matches(entry, x)


class StemWithFunctional(nn.Module):
    """A BatchNorm module and, after it, a direct F.batch_norm on buffers of a plain submodule."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Module()
        self.head.register_buffer("rm", torch.full((3,), 0.5))
        self.head.register_buffer("rv", torch.full((3,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        return F.batch_norm(y * 3, self.head.rm, self.head.rv, training=False, eps=1e-3)


def test_functional_and_module_batch_norm_together() -> None:
    model = models.randomize_norm_state(StemWithFunctional()).eval()
    x = models.make_input((4, 3, 5, 5))
    report = inspect_unchanged(model, [x, x])
    assert [(entry.name.raw, entry.type.raw) for entry in report.layers] == [
        ("bn", "BatchNorm2d"),
        ("head.rm", "functional batch_norm"),
    ]
    functional = layer(report, "head.rm")
    assert functional.eps == pytest.approx(1e-3)
    assert functional.running_var == (2.0, 2.0, 2.0)
    with torch.no_grad():
        second = model.bn(x) * 3
    assert_matches(functional, torch.cat([second, second]))


def test_compiled_model_is_inspected_through_its_eager_module() -> None:
    model = models.randomize_norm_state(models.ConvBN2d()).eval()
    compiled = torch.compile(model, backend="eager")
    x = models.make_input((2, 3, 6, 6))
    compiled(x)
    from_compiled = inspect_model(compiled, [x])
    eager = inspect_model(model, [x])
    assert [e.name.raw for e in from_compiled.layers] == ["bn1", "bn2"]
    for a, b in zip(eager.layers, from_compiled.layers, strict=True):
        assert a.batch_mean == b.batch_mean


def _compiled_and_eager() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """A torch.compile'd model that has already run (hooks added now would never fire) and an equal eager copy."""
    model = models.randomize_norm_state(models.ConvBN2d()).eval()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="eager")
    x = models.make_input((4, 3, 6, 6), mean=2.0)
    compiled(x)
    return compiled, eager, x


def test_every_entry_point_sees_through_torch_compile() -> None:
    compiled, eager, x = _compiled_and_eager()
    checked, expected = check_model(compiled, [x]), check_model(eager, [x])
    assert [f.code for f in checked.findings] == [f.code for f in expected.findings] and checked.layers == (
        Untrusted("bn1"),
        Untrusted("bn2"),
    )
    gaps, expected_gaps = compare_modes(compiled, [x]), compare_modes(eager, [x])
    assert [g.label.raw for g in gaps.layers] == ["bn1", "bn2"]
    assert [g.output_rel_diff for g in gaps.layers] == [g.output_rel_diff for g in expected_gaps.layers]
    recalibrated, expected_recalibration = recalibrate(compiled, [x]), recalibrate(eager, [x])
    assert [r.name.raw for r in recalibrated.layers] == ["bn1", "bn2"]
    for name in ("bn1", "bn2"):
        ours, theirs = getattr(compiled._orig_mod, name), getattr(eager, name)
        assert torch.equal(ours.running_mean, theirs.running_mean) and torch.equal(ours.running_var, theirs.running_var)
    assert expected_recalibration.num_passes == recalibrated.num_passes


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.FrozenBatchNorm2d, verbatim in behaviour: every tensor is a buffer."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


class BatchNormAct2d(nn.BatchNorm2d):
    """Like timm's: a BatchNorm2d subclass that applies its activation inside forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x))


class ThirdParty(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = FrozenBatchNorm2d(3)
        self.act = BatchNormAct2d(3)
        self.sync = nn.SyncBatchNorm(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sync(self.act(self.frozen(x) - 1))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_third_party_layers(mode: str) -> None:
    model = models.randomize_norm_state(ThirdParty()).eval()
    x = models.make_input((4, 3, 5, 5), mean=2.0)
    report = inspect_unchanged(model, [x], mode=mode)
    frozen, act, sync = (layer(report, name) for name in ("frozen", "act", "sync"))
    assert frozen.type.raw == "FrozenBatchNorm2d" and "frozen" in frozen.flags
    assert frozen.normalizes_with == "running"
    assert act.type.raw == "BatchNormAct2d" and sync.type.raw == "SyncBatchNorm"
    assert act.normalizes_with == sync.normalizes_with == ("batch" if mode == "train" else "running")
    assert_matches(frozen, x)
    with torch.no_grad():
        act_input = model.frozen(x) - 1
        model.train(mode == "train")
        sync_input = model.act(act_input)
        model.eval()
    # The statistics are those of the layer's input, not of its activated output.
    assert_matches(act, act_input)
    assert_matches(sync, sync_input)


def test_instance_norm_on_unbatched_input() -> None:
    model = nn.Sequential(nn.InstanceNorm1d(4, affine=True, track_running_stats=True)).eval()
    x = models.make_input((1, 4, 30), mean=3.0)[0]
    entry = layer(inspect_unchanged(model, [x]), "0")
    assert entry.axis_names == ("C", "L") and entry.reduced_axes == (1,)
    mean, var = reference(x.unsqueeze(0))
    np.testing.assert_allclose(entry.batch_mean, mean, rtol=1e-7)
    np.testing.assert_allclose(entry.batch_var, var, rtol=1e-5)
    assert "one per channel, each over L = 30 values" in entry.explanation.raw


@dataclasses.dataclass
class Outputs:
    logits: torch.Tensor
    features: torch.Tensor


class TwoInputs(nn.Module):
    """Takes (image, extra) or image= / extra= keywords; returns a dataclass."""

    def __init__(self) -> None:
        super().__init__()
        self.bn_image = nn.BatchNorm2d(3)
        self.bn_extra = nn.BatchNorm1d(5)

    def forward(self, image: torch.Tensor, extra: torch.Tensor) -> Outputs:
        pooled = self.bn_image(image).mean((2, 3))
        return Outputs(logits=pooled, features=self.bn_extra(extra))


@pytest.mark.parametrize("packing", ["tuple", "dict"])
def test_models_with_several_inputs_from_a_pt_file(
    packing: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = models.randomize_norm_state(TwoInputs()).eval()
    arch = tmp_path / "two.py"
    arch.write_text("from tests.test_formats import TwoInputs\n")
    torch.save(model.state_dict(), tmp_path / "two.pt")
    image, extra = models.make_input((10, 3, 4, 4), mean=5.0), models.make_input((10, 5), mean=-2.0)
    data = (image, extra) if packing == "tuple" else {"extra": extra, "image": image}
    torch.save(data, tmp_path / "inputs.pt")
    code = run(
        [
            "inspect",
            str(tmp_path / "two.pt"),
            "--arch",
            f"{arch}:TwoInputs",
            "--input",
            str(tmp_path / "inputs.pt"),
            "--batch-size",
            "4",
            "--format",
            "json",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    document = json.loads(captured.out)
    by_name = {entry["name"]: entry for entry in document["layers"]}
    np.testing.assert_allclose(by_name["bn_image"]["batch_mean"], reference(image)[0], rtol=1e-6)
    np.testing.assert_allclose(by_name["bn_extra"]["batch_var"], reference(extra)[1], rtol=1e-5)
    assert document["input"]["num_batches"] == 3 and document["input"]["num_samples"] == 10


def test_structured_outputs_are_fine() -> None:
    model = models.randomize_norm_state(TwoInputs()).eval()
    before = state_fingerprint(model)
    from bn_inspect.data.batch import Batch

    report = inspect_model(model, [Batch((torch.randn(4, 3, 2, 2), torch.randn(4, 5)))])
    assert [entry.name.raw for entry in report.layers] == ["bn_image", "bn_extra"]
    assert state_fingerprint(model) == before


def test_layers_listing_of_a_bare_state_dict(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["layers", str(DIGITS / "state_dict.pt"), "--format", "json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["types_inferred"] is True
    assert [(entry["name"], entry["num_channels"]) for entry in document["layers"]] == [
        ("features.1", 16),
        ("features.4", 32),
        ("features.8", 32),
    ]
    state_dict = torch.load(DIGITS / "state_dict.pt", weights_only=True)
    assert document["layers"][0]["running_var"] == pytest.approx(state_dict["features.1.running_var"].tolist())
    assert document["layers"][0]["num_batches_tracked"] == int(state_dict["features.1.num_batches_tracked"])


@pytest.mark.parametrize(
    ("model_file", "extra"),
    [
        ("torchscript.pt", []),
        ("state_dict.pt", ["--arch", "sample_models.architectures:SignalCNN1d"]),
        ("pickle.pt", ["--trust-pickle"]),
    ],
)
def test_layers_listing_knows_the_classes(
    model_file: str, extra: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["layers", str(SAMPLES / "signal_cnn1d" / model_file), *extra, "--format", "json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["types_inferred"] is False
    assert {entry["type"] for entry in document["layers"]} == {"BatchNorm1d"}
    assert all(entry["eps"] == 1e-5 and entry["momentum"] == 0.1 for entry in document["layers"])


def test_layers_table_and_markdown(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "160")
    assert run(["layers", str(DIGITS / "state_dict.pt")]) == 0
    out = capsys.readouterr().out
    assert "features.8" in out and "inferred" in out
    assert run(["layers", str(SAMPLES / "volume_cnn3d" / "torchscript.pt"), "--format", "markdown"]) == 0
    assert "| `features.1` | BatchNorm3d |" in capsys.readouterr().out


def test_torchscript_family_coverage_is_as_documented() -> None:
    model = models.randomize_norm_state(models.Family()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(model)
    report = inspect_unchanged(scripted, [models.make_input((3, 4, 5, 6))])
    assert [entry.name.raw for entry in report.layers] == ["gn", "ln"]
    assert [name.raw for name in report.not_executed] == ["inorm", "inorm_plain", "rms"]


def test_export_says_which_layers_it_lowered_to_arithmetic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # torch.export traces FrozenBatchNorm2d's forward into mul/add: no kernel is left to watch.
    mixed = export(models.randomize_norm_state(ThirdParty()).eval(), torch.randn(2, 3, 5, 5), tmp_path / "mixed.pt2")
    assert run(["inspect", str(mixed), "--shape", "2,3,5,5", "--format", "json"]) == 0
    captured = capsys.readouterr()
    assert [layer["name"] for layer in json.loads(captured.out)["layers"]] == ["act", "sync"]
    assert "1 normalization module(s) of this archive, e.g. frozen (FrozenBatchNorm2d)" in captured.err
    only = export(nn.Sequential(FrozenBatchNorm2d(3)).eval(), torch.randn(2, 3, 5, 5), tmp_path / "only.pt2")
    assert run(["inspect", str(only), "--shape", "2,3,5,5"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "keeps 0 (FrozenBatchNorm2d) only as plain arithmetic" in error
    assert "--arch" in error


def test_export_with_only_other_norm_families_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4), nn.LayerNorm(5)).eval()
    archive = export(model, torch.randn(2, 3, 5, 5), tmp_path / "groups.pt2")
    assert run(["inspect", str(archive), "--shape", "2,3,5,5"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error
    assert "keeps 1 (GroupNorm), 2 (LayerNorm) and no batch norm" in error and "--arch" in error
