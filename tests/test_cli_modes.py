"""bn-inspect compare-modes and recalibrate as users run them, on the shipped samples."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bn_inspect.cli.main import run
from tests.helpers import DIGITS, SAMPLES


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_compare_modes_names_where_the_gap_opens(capsys: pytest.CaptureFixture[str]) -> None:
    code = run(
        [
            "compare-modes",
            str(DIGITS / "torchscript.pt"),
            "--input",
            str(DIGITS / "test_images_unscaled.npy"),
            "--format",
            "json",
        ]
    )
    document = json.loads(capsys.readouterr().out)
    assert code == 0
    assert document["kind"] == "compare-modes" and document["schema_version"] == 1
    assert document["gap_opens_at"] == "features.1"
    assert [layer["name"] for layer in document["layers"]] == ["features.1", "features.4", "features.8"]
    assert document["output"]["argmax_change_fraction"] > 0.05


def test_compare_modes_on_matching_data_finds_no_gap(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "140")
    code = run(["compare-modes", str(DIGITS / "torchscript.pt"), "--input", str(DIGITS / "test_images.npy")])
    out = capsys.readouterr().out
    assert code == 0
    assert "No layer's output differs by more than 10% between modes." in out
    assert (
        run(
            [
                "compare-modes",
                str(DIGITS / "torchscript.pt"),
                "--input",
                str(DIGITS / "test_images.npy"),
                "--format",
                "markdown",
            ]
        )
        == 0
    )
    assert "| `features.1` | BatchNorm2d |" in capsys.readouterr().out


def test_small_single_class_batches_are_no_gap_headline(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Sorted by label, batches of 8 hold one class each: train mode's per-batch statistics differ
    # from the running ones, which match the data. That is no fault of the model.
    images, labels = np.load(DIGITS / "test_images.npy"), np.load(DIGITS / "test_labels.npy")
    np.save(tmp_path / "sorted.npy", images[np.argsort(labels, kind="stable")])
    monkeypatch.setenv("COLUMNS", "140")
    argv = [
        "compare-modes",
        str(DIGITS / "torchscript.pt"),
        "--input",
        str(tmp_path / "sorted.npy"),
        "--batch-size",
        "8",
    ]
    assert run(argv) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "The gap opens" not in text
    assert "but no layer's data departs from its running statistics" in text
    assert "train mode's per-batch statistics on batches of about 7.89 samples" in text
    assert run([*argv, "--format", "json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["gap_opens_at"] is None and document["batch_noise_from"] is not None
    assert all(layer["departure_tier"] == "within" for layer in document["layers"])


@pytest.mark.parametrize(
    ("model_file", "extra"),
    [
        ("torchscript.pt", []),
        ("state_dict.pt", ["--arch", "sample_models.architectures:DigitsCNN"]),
        ("pickle.pt", ["--trust-pickle"]),
    ],
)
@pytest.mark.parametrize("method", ["precise", "sequential"])
def test_recalibrated_model_passes_check_on_the_same_data(
    model_file: str,
    extra: list[str],
    method: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(SAMPLES.parent)
    source = DIGITS / model_file
    data = str(DIGITS / "test_images_unscaled.npy")
    before = digest(source)
    assert run(["check", str(source), *extra, "--input", data]) == 1
    capsys.readouterr()
    output = tmp_path / f"recalibrated_{model_file}"
    code = run(
        [
            "recalibrate",
            str(source),
            *extra,
            "--input",
            data,
            "--method",
            method,
            "--output",
            str(output),
            "--format",
            "json",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result["method"] == method and len(result["layers"]) == 3
    assert digest(source) == before
    assert run(["check", str(output), *extra, "--input", data, "--fail-on", "warning"]) == 0, capsys.readouterr().out
    if model_file == "state_dict.pt":
        saved = torch.load(output, weights_only=True)
        assert set(saved) == set(torch.load(source, weights_only=True))


def test_recalibrate_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = DIGITS / "torchscript.pt"
    data = str(DIGITS / "train_images.npy")
    assert run(["recalibrate", str(source), "--output", str(tmp_path / "new.pt")]) == 2
    assert capsys.readouterr().err.startswith("Error: recalibrate needs real data")
    assert run(["recalibrate", str(source), "--input", data, "--output", str(source)]) == 2
    assert "is the model file" in capsys.readouterr().err
    existing = tmp_path / "exists.pt"
    existing.write_bytes(b"keep me")
    assert run(["recalibrate", str(source), "--input", data, "--output", str(existing)]) == 2
    assert "already exists. Pass --force" in capsys.readouterr().err
    assert existing.read_bytes() == b"keep me"
    assert (
        run(["recalibrate", str(source), "--input", data, "--batches", "2", "--output", str(existing), "--force"]) == 0
    )
    assert existing.read_bytes() != b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.pt"]
    capsys.readouterr()
