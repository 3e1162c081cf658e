"""Reports say what they compared: the model file's SHA-256, the first batch's, and the versions that ran (#21)."""

from __future__ import annotations

import hashlib
import json
import platform

import numpy as np
import pytest
import torch

import bn_inspect
from bn_inspect.analyses.inspection import inspect_model
from tests import models
from tests.helpers import DIGITS, invoke

MODEL = DIGITS / "torchscript.pt"
IMAGES = DIGITS / "test_images.npy"


def _inspected(capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, object]:
    result = invoke(capsys, ["inspect", MODEL, "--input", IMAGES, "--format", "json", *extra])
    assert result.code == 0, result.err
    document: dict[str, object] = json.loads(result.out)
    return document


def test_the_model_sha256_is_that_of_the_file_and_the_first_batch_sha256_that_of_its_tensor(
    capsys: pytest.CaptureFixture[str],
) -> None:
    document = _inspected(capsys, "--batch-size", "50")
    assert document["model"]["sha256"] == hashlib.sha256(MODEL.read_bytes()).hexdigest()  # type: ignore[index]
    first = np.load(IMAGES)[:50].astype(np.float32)
    framing = f"0:torch.float32:{first.shape};".encode()
    expected = hashlib.sha256(framing + np.ascontiguousarray(first).tobytes()).hexdigest()
    assert document["input"]["first_batch_sha256"] == expected  # type: ignore[index]
    assert document["bn_inspect_version"] == bn_inspect.__version__
    assert document["python_version"] == platform.python_version()
    assert document["torch_version"] == torch.__version__


def test_the_data_fingerprint_tells_other_data_and_other_batching_apart(capsys: pytest.CaptureFixture[str]) -> None:
    same = [_inspected(capsys)["input"]["first_batch_sha256"] for _ in range(2)]  # type: ignore[index]
    other = _inspected(capsys, "--batch-size", "32")["input"]["first_batch_sha256"]  # type: ignore[index]
    assert same[0] == same[1] != other
    result = invoke(capsys, ["inspect", MODEL, "--input", DIGITS / "test_images_unscaled.npy", "--format", "json"])
    assert json.loads(result.out)["input"]["first_batch_sha256"] not in same


def test_the_python_api_has_no_model_file_to_hash_but_fingerprints_its_data() -> None:
    model = models.ConvBN2d().eval()
    x = models.make_input((4, 3, 6, 6), mean=1e4, std=1e-2)
    report = inspect_model(model, [x, x])
    assert report.model.sha256 is None
    assert report.input.first_batch_sha256 == inspect_model(model, [x]).input.first_batch_sha256
    assert report.input.first_batch_sha256 != inspect_model(model, [x + 1]).input.first_batch_sha256
    assert report.bn_inspect_version.raw == bn_inspect.__version__


def test_a_keyword_batch_and_a_bfloat16_batch_are_fingerprinted() -> None:
    from bn_inspect.data.batch import Batch

    x = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    a = Batch((), {"x": x, "y": x + 1}).sha256()
    b = Batch((), {"y": x + 1, "x": x}).sha256()
    assert a == b != Batch((x,)).sha256() != Batch((x.float(),)).sha256()
