"""--data module:function: the user's Dataset, DataLoader or iterable of batches, and its one-line errors."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from bn_inspect.analyses.user_data import as_input_batch
from bn_inspect.errors import InputError
from tests.helpers import DIGITS, assert_one_error_line, invoke

MODEL = DIGITS / "torchscript.pt"
IMAGES = DIGITS / "test_images.npy"

DATA_CODE = '''
import numpy
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

IMAGES = torch.from_numpy(numpy.load({images!r}))
LABELS = torch.arange(len(IMAGES)) % 10


def pairs():
    """A map-style Dataset of (image, label) pairs: bn-inspect batches it."""
    return TensorDataset(IMAGES, LABELS)


class Dicts(Dataset):
    def __len__(self):
        return len(IMAGES)

    def __getitem__(self, index):
        return {{"label": LABELS[index], "pixels": IMAGES[index], "path": f"{{index}}.png"}}


def dicts():
    return Dicts()


def named_dicts():
    return [{{"image": IMAGES[i : i + 50], "name": "batch"}} for i in range(0, len(IMAGES), 50)]


def loader():
    return DataLoader(TensorDataset(IMAGES, LABELS), batch_size=64, num_workers=2)


def generator():
    return (IMAGES[i : i + 64] for i in range(0, len(IMAGES), 64))


def raises():
    raise RuntimeError("the dataset root /data/val does not exist")


def number():
    return 42


class Broken(Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, index):
        if index == 7:
            raise ValueError(f"sample {{index}} is damaged")
        return IMAGES[index]


def broken():
    return Broken()


def broken_in_workers():
    return DataLoader(Broken(), batch_size=4, num_workers=1)


def strings():
    return ["a", "b"]
'''


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "user_data.py"
    path.write_text(textwrap.dedent(DATA_CODE.format(images=str(IMAGES))))
    return path


def inspect_json(capsys: pytest.CaptureFixture[str], *args: str | Path) -> dict:
    result = invoke(capsys, ["inspect", MODEL, *args, "--format", "json"])
    assert result.code == 0, result.err
    return json.loads(result.out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    from bn_inspect.cli.main import run

    out = tmp_path_factory.mktemp("ref") / "ref.json"
    assert run(["inspect", str(MODEL), "--input", str(IMAGES), "--format", "json", "--output", str(out)]) == 0
    return json.loads(out.read_text())["layers"]


def same_statistics(layers: list[dict], reference: list[dict]) -> None:
    for ours, theirs in zip(layers, reference, strict=True):
        for key in ("batch_mean", "batch_var", "values_per_channel"):
            np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    ("function", "extra", "num_batches"),
    [
        ("pairs", ["--workers", "0"], 8),
        ("pairs", ["--workers", "2", "--batch-size", "100"], 5),
        ("dicts", ["--input-key", "pixels", "--workers", "0"], 8),
        ("named_dicts", [], 9),
        ("loader", [], 8),
        ("generator", [], 8),
    ],
)
def test_every_kind_of_data_gives_the_statistics_of_the_same_tensors(
    data_file: Path,
    reference: list[dict],
    capsys: pytest.CaptureFixture[str],
    function: str,
    extra: list[str],
    num_batches: int,
) -> None:
    document = inspect_json(capsys, "--data", f"{data_file}:{function}", *extra)
    assert document["input"]["num_samples"] == 450 and document["input"]["num_batches"] == num_batches
    assert document["input"]["source"] == f"--data {data_file}:{function}"
    same_statistics(document["layers"], reference)


def test_batches_caps_an_iterable(data_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    document = inspect_json(capsys, "--data", f"{data_file}:generator", "--batches", "2")
    assert document["input"]["num_samples"] == 128


def test_check_runs_the_data_rules_on_it(data_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = invoke(capsys, ["check", MODEL, "--data", f"{data_file}:pairs", "--format", "json"])
    assert result.code == 0, result.err
    assert "skipped" not in result.err  # real data: BN201 and BN202 ran


@pytest.mark.parametrize(
    ("function", "extra", "fragments"),
    [
        ("raises", [], ["raised RuntimeError when called: the dataset root /data/val does not exist"]),
        ("number", [], ["returned an object of type int, which is not iterable"]),
        ("broken", ["--workers", "0"], ["reading batch 0 raised ValueError: sample 7 is damaged"]),
        ("broken_in_workers", [], ["reading batch 1 raised ValueError: sample 7 is damaged"]),
        ("strings", [], ["cannot use a batch of type str"]),
        ("dicts", [], ["dicts with keys label, pixels, path, none of them a known input name", "--input-key"]),
        ("dicts", ["--input-key", "pixel"], ["dicts with keys label, pixels, path, not 'pixel'"]),
        ("missing", [], ["has no attribute 'missing'"]),
        ("pairs", ["--resize", "8"], ["--resize applies to images"]),
    ],
)
def test_errors_are_one_line(
    data_file: Path, capsys: pytest.CaptureFixture[str], function: str, extra: list[str], fragments: list[str]
) -> None:
    result = invoke(capsys, ["inspect", MODEL, "--data", f"{data_file}:{function}", *extra])
    assert result.code == 2, result.err
    assert_one_error_line(result, *fragments)


def test_data_next_to_input_or_shape_is_refused(data_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    both = invoke(capsys, ["inspect", MODEL, "--data", f"{data_file}:pairs", "--input", IMAGES])
    assert_one_error_line(both, "--data and --input were both given")
    result = invoke(capsys, ["check", MODEL, "--no-data", "--data", f"{data_file}:pairs"])
    assert_one_error_line(result, "--no-data runs no data, so --data would be ignored")
    images = invoke(capsys, ["check", MODEL, "--no-data", "--resize", "8", "--grayscale"])
    assert_one_error_line(images, "--no-data runs no data, so --resize, --grayscale would be ignored")


def test_output_may_not_replace_the_data_file(data_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = invoke(capsys, ["inspect", MODEL, "--data", f"{data_file}:pairs", "--output", data_file])
    assert result.code == 2
    assert_one_error_line(result, "is the --data source")


def test_a_dict_without_a_known_key_of_tensors_is_keyword_input() -> None:
    batch = as_input_batch({"input_ids": torch.zeros(2, 3), "attention_mask": torch.ones(2, 3)}, None)
    assert batch.args == () and set(batch.kwargs) == {"input_ids", "attention_mask"}
    picked = as_input_batch({"pixel_values": torch.zeros(2, 3), "labels": torch.ones(2)}, None)
    assert picked.args[0].shape == (2, 3) and not picked.kwargs
    assert as_input_batch((np.zeros((2, 3), np.float32), [0, 1]), None).args[0].shape == (2, 3)
    with pytest.raises(InputError, match="dicts with keys a, b"):
        as_input_batch({"a": "text", "b": torch.zeros(1)}, None)


def test_the_python_api_takes_a_dataloader() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from bn_inspect import inspect_model

    model = torch.jit.load(str(MODEL))
    images = torch.from_numpy(np.load(IMAGES))
    loader = DataLoader(TensorDataset(images, torch.zeros(len(images))), batch_size=64)
    report = inspect_model(model, loader)
    assert report.input.num_samples == 450 and report.input.num_batches == 8
