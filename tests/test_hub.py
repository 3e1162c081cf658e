"""Hugging Face model folders: real save_pretrained folders of small transformers vision models, trained a few steps,
inspected from the CLI and the API with transformers' module names, numbers against float64; and hostile folders."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bn_inspect.errors import ModelFileError, RemoteCodeError
from bn_inspect.model.loading import load_model
from tests.helpers import DIGITS, assert_one_error_line, invoke
from tests.test_stats import reference

transformers = pytest.importorskip("transformers")

DATA = DIGITS / "test_images.npy"


def tiny_resnet() -> nn.Module:
    config = transformers.ResNetConfig(
        num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=10
    )
    return transformers.ResNetForImageClassification(config)


def tiny_regnet() -> nn.Module:
    config = transformers.RegNetConfig(
        num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8, num_labels=10
    )
    return transformers.RegNetForImageClassification(config)


def tiny_convnext() -> nn.Module:
    config = transformers.ConvNextConfig(
        num_channels=1, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], patch_size=2, image_size=8, num_labels=10
    )
    return transformers.ConvNextForImageClassification(config)


BUILDERS: dict[str, Callable[[], nn.Module]] = {"resnet": tiny_resnet, "regnet": tiny_regnet, "convnext": tiny_convnext}


def trained(build: Callable[[], nn.Module], steps: int = 6) -> nn.Module:
    """``build()`` trained ``steps`` Adam steps on the shipped digits, then in eval mode."""
    torch.manual_seed(0)
    model = build()
    images = torch.from_numpy(np.load(DIGITS / "train_images.npy"))
    labels = torch.from_numpy(np.load(DIGITS / "train_labels.npy")).long()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(steps):
        batch = slice(step * 64, (step + 1) * 64)
        loss = model(pixel_values=images[batch], labels=labels[batch]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, nn.Module]]:
    """One save_pretrained folder per architecture, with the trained model it was saved from."""
    made = {}
    for name, build in BUILDERS.items():
        model = trained(build)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        made[name] = (folder, model)
    return made


def bn_inputs(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """What each BatchNorm of the model receives on ``images``, captured by pre-hooks in its own forward."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_pre_hook(lambda _m, args, name=name: seen.__setitem__(name, args[0].detach().clone()))
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
    ]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    return seen


@pytest.mark.parametrize("name", ["resnet", "regnet"])
def test_inspect_a_folder_matches_the_float64_reference(
    capsys: pytest.CaptureFixture[str], folders: dict[str, tuple[Path, nn.Module]], name: str
) -> None:
    folder, model = folders[name]
    result = invoke(capsys, ["inspect", folder, "--input", DATA, "--batch-size", "450", "--format", "json"])
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["model"]["format"] == "huggingface"
    expected = bn_inputs(model, torch.from_numpy(np.load(DATA)))
    # The module names are transformers' own.
    assert [layer["name"] for layer in report["layers"]] == list(expected)
    for layer in report["layers"]:
        ref_mean, ref_var = reference(expected[layer["name"]])
        np.testing.assert_allclose(layer["batch_mean"], ref_mean, rtol=1e-6, atol=np.sqrt(ref_var).max() * 1e-6)
        np.testing.assert_allclose(layer["batch_var"], ref_var, rtol=1e-5)
        running = model.get_submodule(layer["name"]).running_mean.double().tolist()
        assert layer["running_mean"] == pytest.approx(running, rel=1e-12)


def test_the_api_loads_the_folder_in_eval_mode_with_its_weights(folders: dict[str, tuple[Path, nn.Module]]) -> None:
    folder, model = folders["resnet"]
    loaded = load_model(folder)
    assert (loaded.format, loaded.arch, loaded.sample_shape) == ("huggingface", None, (1, 224, 224))
    assert type(loaded.module) is transformers.ResNetForImageClassification and not loaded.module.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value), key


def test_without_input_the_config_gives_the_shape(
    capsys: pytest.CaptureFixture[str], folders: dict[str, tuple[Path, nn.Module]]
) -> None:
    folder, model = folders["convnext"]
    result = invoke(capsys, ["inspect", folder, "--format", "json"])
    assert result.code == 0, result.err
    assert "(8, 1, 8, 8)" in result.err and "config.json gives that input size" in result.err
    report = json.loads(result.out)
    # ConvNeXt normalizes with LayerNorm: listed under transformers' names, described by their axes.
    norms = [name for name, module in model.named_modules() if isinstance(module, nn.LayerNorm)]
    assert [layer["name"] for layer in report["layers"]] == norms
    assert {layer["family"] for layer in report["layers"]} == {"layer"}


def test_layers_and_check_read_a_folder(
    capsys: pytest.CaptureFixture[str], folders: dict[str, tuple[Path, nn.Module]]
) -> None:
    folder, model = folders["regnet"]
    listed = invoke(capsys, ["layers", folder, "--format", "json"])
    assert listed.code == 0, listed.err
    names = [name for name, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)]
    assert [layer["name"] for layer in json.loads(listed.out)["layers"]] == names
    # The folder's model trained 6 steps, which BN114 (few batches tracked) rightly flags: left out here.
    checked = invoke(capsys, ["check", folder, "--no-data", "--format", "json", "--ignore", "BN114"])
    assert checked.code == 0, checked.err


def test_a_pytorch_model_bin_folder_loads_through_the_safe_loader(
    folders: dict[str, tuple[Path, nn.Module]], tmp_path: Path
) -> None:
    source, model = folders["resnet"]
    (tmp_path / "config.json").write_bytes((source / "config.json").read_bytes())
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    loaded = load_model(tmp_path)
    assert torch.equal(loaded.module.state_dict()["classifier.1.weight"], model.state_dict()["classifier.1.weight"])


def test_loading_a_folder_opens_no_connection(
    folders: dict[str, tuple[Path, nn.Module]], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_args: object) -> None:
        raise AssertionError("bn-inspect tried to connect")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for folder, _ in folders.values():
        assert load_model(folder).format == "huggingface"


def test_import_bn_inspect_and_loading_a_file_never_import_transformers() -> None:
    code = (
        "import sys, bn_inspect; from bn_inspect.model.loading import load_model; "
        f"load_model({str(DIGITS / 'state_dict.pt')!r}, arch='sample_models.architectures:DigitsCNN'); "
        "print(sorted(m for m in ('transformers', 'timm') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().endswith("[]")


# --- hostile folders ------------------------------------------------------------------------------


def folder_with(tmp_path: Path, source: Path, config: object = None) -> Path:
    """A copy of ``source``, with ``config`` (a dict, or raw bytes) as its config.json where given."""
    folder = tmp_path / "folder"
    folder.mkdir()
    for entry in source.iterdir():
        (folder / entry.name).write_bytes(entry.read_bytes())
    if config is not None:
        raw = config if isinstance(config, bytes) else json.dumps(config).encode()
        (folder / "config.json").write_bytes(raw)
    return folder


def config_of(source: Path) -> dict[str, object]:
    loaded: dict[str, object] = json.loads((source / "config.json").read_text())
    return loaded


@pytest.mark.surface("read:model-config", "execution")
def test_a_config_naming_remote_code_is_refused(
    capsys: pytest.CaptureFixture[str], folders: dict[str, tuple[Path, nn.Module]], tmp_path: Path
) -> None:
    source, _ = folders["resnet"]
    config = config_of(source) | {"auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}}
    folder = folder_with(tmp_path, source, config)
    (folder / "evil.py").write_text("raise SystemExit('imported')\n")
    result = invoke(capsys, ["inspect", folder])
    assert result.code == 2
    assert_one_error_line(result, "evil.EvilConfig", "--trust-remote-code")
    with pytest.raises(RemoteCodeError):
        load_model(folder)


@pytest.mark.surface("read:model-config", "traceback")
@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        (b"{not json", "config.json is not valid JSON"),
        (b"[1, 2]", "holds a JSON list, not an object"),
        (b"[" * 100_000 + b"]" * 100_000, "config.json is not valid JSON"),
        ({"model_type": "no-such-model"}, "model_type 'no-such-model', which transformers"),
        ({"model_type": "resnet", "hidden_sizes": "wide"}, "config.json"),
    ],
    ids=["not-json", "list", "deep", "unknown-model-type", "bad-value"],
)
def test_a_bad_config_ends_in_one_line(
    capsys: pytest.CaptureFixture[str],
    folders: dict[str, tuple[Path, nn.Module]],
    tmp_path: Path,
    config: object,
    fragment: str,
) -> None:
    folder = folder_with(tmp_path, folders["resnet"][0], config)
    result = invoke(capsys, ["inspect", folder])
    assert result.code == 2
    assert_one_error_line(result, fragment)


@pytest.mark.surface("read:model-config", "memory")
def test_a_huge_config_is_refused_before_it_is_read(folders: dict[str, tuple[Path, nn.Module]], tmp_path: Path) -> None:
    folder = folder_with(tmp_path, folders["resnet"][0])
    with open(folder / "config.json", "r+b") as handle:
        handle.truncate(64 * 2**20)  # sparse: the size is declared, nothing is written
    with pytest.raises(ModelFileError, match="over the 16,777,216-byte budget"):
        load_model(folder)


@pytest.mark.surface("read:model-config", "hang")
def test_a_config_that_is_a_named_pipe_is_refused(folders: dict[str, tuple[Path, nn.Module]], tmp_path: Path) -> None:
    folder = folder_with(tmp_path, folders["resnet"][0])
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")
    with pytest.raises(ModelFileError, match="is a named pipe"):
        load_model(folder)


@pytest.mark.surface("read:model-config", "traceback")
@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_a_symlink_leaving_the_folder_is_refused(
    capsys: pytest.CaptureFixture[str], folders: dict[str, tuple[Path, nn.Module]], tmp_path: Path, name: str
) -> None:
    folder = folder_with(tmp_path, folders["resnet"][0])
    outside = tmp_path / "outside"
    outside.write_bytes((folder / name).read_bytes())
    (folder / name).unlink()
    (folder / name).symlink_to(outside)
    result = invoke(capsys, ["inspect", folder])
    assert result.code == 2
    assert_one_error_line(result, f"{name} leads to {outside}, outside the folder")


def test_a_hub_cache_snapshot_whose_links_point_into_its_blobs_loads(
    folders: dict[str, tuple[Path, nn.Module]], tmp_path: Path
) -> None:
    source, _ = folders["resnet"]
    snapshot = tmp_path / "models--org--tiny" / "snapshots" / "abc123"
    blobs = tmp_path / "models--org--tiny" / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for entry in source.iterdir():
        (blobs / entry.name).write_bytes(entry.read_bytes())
        (snapshot / entry.name).symlink_to(Path("../../blobs") / entry.name)
    assert load_model(snapshot).format == "huggingface"


def safetensors_bytes(header: dict[str, object], payload: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + payload


@pytest.mark.surface("read:model", "memory")
@pytest.mark.parametrize(
    "weights",
    [
        safetensors_bytes({"w": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 16]}}, b"\0" * 16),
        safetensors_bytes({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 2**40]}}, b"\0" * 16),
        struct.pack("<Q", 2**60) + b"{}",
    ],
    ids=["huge-declared-tensor", "offsets-past-the-end", "header-length-lies"],
)
def test_lying_safetensors_in_a_folder_end_in_one_line(
    capsys: pytest.CaptureFixture[str], folders: dict[str, tuple[Path, nn.Module]], tmp_path: Path, weights: bytes
) -> None:
    folder = folder_with(tmp_path, folders["resnet"][0])
    (folder / "model.safetensors").write_bytes(weights)
    result = invoke(capsys, ["inspect", folder])
    assert result.code == 2
    assert_one_error_line(result, "model.safetensors is corrupt")


@pytest.mark.surface("read:model", "execution")
def test_a_pickle_in_a_folder_is_refused(
    capsys: pytest.CaptureFixture[str], folders: dict[str, tuple[Path, nn.Module]], tmp_path: Path
) -> None:
    folder = folder_with(tmp_path, folders["resnet"][0])
    (folder / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1), "hook": os.getcwd}, folder / "pytorch_model.bin")
    result = invoke(capsys, ["inspect", folder])
    assert result.code == 2
    assert_one_error_line(result, "posix.getcwd", "loading it would run code")


def test_a_folder_without_config_or_weights_says_what_is_missing(
    capsys: pytest.CaptureFixture[str], folders: dict[str, tuple[Path, nn.Module]], tmp_path: Path
) -> None:
    (tmp_path / "empty").mkdir()
    result = invoke(capsys, ["inspect", tmp_path / "empty"])
    assert_one_error_line(result, "is a directory without a config.json")
    folder = folder_with(tmp_path, folders["resnet"][0])
    (folder / "model.safetensors").unlink()
    result = invoke(capsys, ["inspect", folder])
    assert_one_error_line(result, "has no model.safetensors or pytorch_model.bin")


REMOTE_CONFIG = """
from transformers import PretrainedConfig


class TinyBNConfig(PretrainedConfig):
    model_type = "tiny-bn"

    def __init__(self, channels=4, **kwargs):
        self.channels = channels
        super().__init__(**kwargs)
"""

REMOTE_MODEL = """
from torch import nn
from transformers import PreTrainedModel

from .configuration_tiny import TinyBNConfig


class TinyBNModel(PreTrainedModel):
    config_class = TinyBNConfig

    def __init__(self, config):
        super().__init__(config)
        self.conv = nn.Conv2d(1, config.channels, 3)
        self.norm = nn.BatchNorm2d(config.channels)
        self.post_init()

    def forward(self, pixel_values):
        return self.norm(self.conv(pixel_values))
"""


def test_trusted_remote_code_is_imported_from_the_folder_only(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # transformers copies the folder's code into its modules cache before importing it: a fresh one here.
    monkeypatch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "configuration_tiny.py").write_text(REMOTE_CONFIG)
    (folder / "modeling_tiny.py").write_text(REMOTE_MODEL)
    config = {
        "model_type": "tiny-bn",
        "channels": 4,
        "image_size": 8,
        "num_channels": 1,
        "auto_map": {"AutoConfig": "configuration_tiny.TinyBNConfig", "AutoModel": "modeling_tiny.TinyBNModel"},
    }
    (folder / "config.json").write_text(json.dumps(config))
    from safetensors.torch import save_file

    norm = nn.BatchNorm2d(4)
    norm.running_mean.copy_(torch.arange(4.0))
    weights = {f"norm.{key}": value for key, value in norm.state_dict().items()}
    save_file(
        weights | {"conv.weight": torch.ones(4, 1, 3, 3), "conv.bias": torch.zeros(4)}, folder / "model.safetensors"
    )
    refused = invoke(capsys, ["layers", folder])
    assert_one_error_line(refused, "configuration_tiny.TinyBNConfig", "--trust-remote-code")
    result = invoke(capsys, ["layers", folder, "--trust-remote-code", "--format", "json"])
    assert result.code == 0, result.err
    (layer,) = json.loads(result.out)["layers"]
    assert (layer["name"], layer["running_mean"]) == ("norm", [0.0, 1.0, 2.0, 3.0])
    loaded = load_model(folder, trust_remote_code=True)
    assert type(loaded.module).__name__ == "TinyBNModel" and loaded.sample_shape == (1, 8, 8)
