"""Sharded Hugging Face folders (model.safetensors.index.json + model-0000K-of-0000N.safetensors): a real
save_pretrained(max_shard_size="50KB") inspected against float64, and hostile indexes refused in one line."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bn_inspect.errors import ModelFileError
from bn_inspect.model.loading import load_model
from tests.helpers import assert_one_error_line, invoke
from tests.test_hub import DATA, bn_inputs, trained
from tests.test_stats import reference

transformers = pytest.importorskip("transformers")

INDEX = "model.safetensors.index.json"


def wide_resnet() -> nn.Module:
    """A transformers ResNet of about 300 KB in float32, so that 50 KB shards split it."""
    config = transformers.ResNetConfig(
        num_channels=1, embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], layer_type="basic", num_labels=10
    )
    return transformers.ResNetForImageClassification(config)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    model = trained(wide_resnet)
    folder = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(folder, max_shard_size="50KB")
    return folder, model


def _copy(source: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(source, folder)
    return folder


def _index(folder: Path) -> dict[str, object]:
    return json.loads((folder / INDEX).read_text())  # type: ignore[no-any-return]


def _shards(folder: Path) -> list[str]:
    return sorted(set(_index(folder)["weight_map"].values()))  # type: ignore[attr-defined]


def test_a_sharded_folder_is_read_whole_and_matches_the_float64_reference(
    capsys: pytest.CaptureFixture[str], sharded: tuple[Path, nn.Module]
) -> None:
    folder, model = sharded
    assert not (folder / "model.safetensors").exists() and len(_shards(folder)) >= 4
    loaded = load_model(folder)
    assert loaded.format == "huggingface" and not loaded.module.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value), key
    result = invoke(capsys, ["inspect", folder, "--input", DATA, "--batch-size", "450", "--format", "json"])
    assert result.code == 0, result.err
    report = json.loads(result.out)
    expected = bn_inputs(model, torch.from_numpy(np.load(DATA)))
    assert [layer["name"] for layer in report["layers"]] == list(expected)
    for layer in report["layers"]:
        ref_mean, ref_var = reference(expected[layer["name"]])
        np.testing.assert_allclose(layer["batch_mean"], ref_mean, rtol=1e-6, atol=np.sqrt(ref_var).max() * 1e-6)
        np.testing.assert_allclose(layer["batch_var"], ref_var, rtol=1e-5)
    checked = invoke(capsys, ["check", folder, "--no-data", "--format", "json"])
    assert checked.code == 0, checked.err


def test_the_digest_covers_every_shard(sharded: tuple[Path, nn.Module], tmp_path: Path) -> None:
    folder = _copy(sharded[0], tmp_path)
    before = load_model(folder).sha256
    last = folder / _shards(folder)[-1]
    data = bytearray(last.read_bytes())
    data[-1] ^= 1  # one bit of the last tensor's value: still a valid file
    last.write_bytes(bytes(data))
    assert load_model(folder).sha256 != before


def _rewrite(folder: Path, weight_map: dict[str, str]) -> None:
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.surface("read:model-index", "traceback")
@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda m, s: {k: "../outside.safetensors" if v == s[0] else v for k, v in m.items()}, "which is not a file"),
        (
            lambda m, s: {k: "/etc/passwd" if v == s[0] else v for k, v in m.items()},
            "which is not a file of the folder",
        ),
        (lambda m, s: {k: f"./{v}" if v == s[0] else v for k, v in m.items()}, "which is not a file of the folder"),
        (lambda m, s: {k: "model-00009-of-00009.safetensors" for k in m}, "which is missing"),
        (lambda m, s: {**m, "resnet.extra.weight": s[0]}, "places tensor 'resnet.extra.weight' in shard"),
        (lambda m, s: {k: v for k, v in list(m.items())[1:]}, "but the index does not list it"),
        (lambda m, s: {}, "has no weight_map"),
    ],
    ids=["traversal", "absolute", "dotted", "missing-shard", "absent-tensor", "unlisted-tensor", "empty"],
)
def test_a_hostile_index_ends_in_one_line(
    capsys: pytest.CaptureFixture[str], sharded: tuple[Path, nn.Module], tmp_path: Path, change: object, fragment: str
) -> None:
    folder = _copy(sharded[0], tmp_path)
    (tmp_path / "outside.safetensors").write_bytes((folder / _shards(folder)[0]).read_bytes())
    _rewrite(folder, change(_index(folder)["weight_map"], _shards(folder)))  # type: ignore[operator]
    result = invoke(capsys, ["inspect", folder])
    assert result.code == 2
    assert_one_error_line(result, fragment)


@pytest.mark.surface("read:model-index", "traceback")
def test_a_shard_listed_twice_under_two_names_is_refused(
    capsys: pytest.CaptureFixture[str], sharded: tuple[Path, nn.Module], tmp_path: Path
) -> None:
    folder = _copy(sharded[0], tmp_path)
    first = _shards(folder)[0]
    (folder / "again.safetensors").symlink_to(folder / first)
    weight_map = _index(folder)["weight_map"]
    assert isinstance(weight_map, dict)
    key = next(k for k, v in weight_map.items() if v == first)
    _rewrite(folder, {**weight_map, key: "again.safetensors"})
    result = invoke(capsys, ["inspect", folder])
    assert result.code == 2
    assert_one_error_line(result, "shard 'again.safetensors' holds tensor", "but the index places it in")


@pytest.mark.surface("read:model-index", "traceback")
@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}', "lists 'a' twice"),
        ("{not json", "is not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "is not valid JSON"),
        ('{"weight_map": {"a": 1}}', "has no weight_map"),
    ],
    ids=["tensor-twice", "not-json", "deep", "not-names"],
)
def test_a_malformed_index_ends_in_one_line(
    capsys: pytest.CaptureFixture[str], sharded: tuple[Path, nn.Module], tmp_path: Path, text: str, fragment: str
) -> None:
    folder = _copy(sharded[0], tmp_path)
    (folder / INDEX).write_text(text)
    result = invoke(capsys, ["inspect", folder])
    assert result.code == 2
    assert_one_error_line(result, fragment)


@pytest.mark.surface("read:model-index", "memory")
def test_a_huge_index_is_refused_before_it_is_read(sharded: tuple[Path, nn.Module], tmp_path: Path) -> None:
    folder = _copy(sharded[0], tmp_path)
    with open(folder / INDEX, "r+b") as handle:
        handle.truncate(64 * 2**20)  # sparse: the size is declared, nothing is written
    with pytest.raises(ModelFileError, match="over the 16,777,216-byte budget"):
        load_model(folder)


@pytest.mark.surface("read:model-index", "hang")
def test_an_index_that_is_a_named_pipe_is_refused(sharded: tuple[Path, nn.Module], tmp_path: Path) -> None:
    folder = _copy(sharded[0], tmp_path)
    (folder / INDEX).unlink()
    os.mkfifo(folder / INDEX)
    with pytest.raises(ModelFileError, match="is a named pipe"):
        load_model(folder)


@pytest.mark.surface("read:model", "traceback")
def test_a_shard_linking_out_of_the_folder_is_refused(
    capsys: pytest.CaptureFixture[str], sharded: tuple[Path, nn.Module], tmp_path: Path
) -> None:
    folder = _copy(sharded[0], tmp_path)
    first = folder / _shards(folder)[0]
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(first.read_bytes())
    first.unlink()
    first.symlink_to(outside)
    result = invoke(capsys, ["inspect", folder])
    assert result.code == 2
    assert_one_error_line(result, f"leads to {outside}, outside the folder")
