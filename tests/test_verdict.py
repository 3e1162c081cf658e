"""One definition of "departs" (report/departure.py): inspect's verdict, check's BN201 and first_divergent agree.

The score itself is checked against an independent float64 reference in tests/test_departure.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bn_inspect.analyses.checking import check_model
from bn_inspect.analyses.inspection import inspect_model
from bn_inspect.output.export import to_markdown
from bn_inspect.output.render import verdict
from bn_inspect.report.departure import Thresholds, departure
from bn_inspect.report.records import InputInfo
from bn_inspect.text import Untrusted
from tests import models
from tests.helpers import DIGITS, invoke


@pytest.fixture(scope="module")
def var_scaled_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits model with features.4's running_var times 50: its data's var ratio is about 0.02."""
    model = torch.load(DIGITS / "pickle.pt", weights_only=False)
    with torch.no_grad():
        model.features[4].running_var.mul_(50)
    path = tmp_path_factory.mktemp("scaled") / "model.pt"
    torch.save(model, path)
    return path


def test_inspect_verdict_names_a_variance_departure(capsys: pytest.CaptureFixture[str], var_scaled_model: Path) -> None:
    result = invoke(capsys, ["inspect", var_scaled_model, "--trust-pickle", "--input", DIGITS / "test_images.npy"])
    assert result.code == 0, result.err
    text = " ".join(result.out.split())
    assert "First departure from the running statistics, in execution order: features.4" in text
    assert "features.4: departure " in text and "(error at 1.7)" in text
    assert "data spread 0.14x the running one" in text
    assert "Every layer" not in text


def test_check_first_divergent_and_bn201_message_quote_the_var_ratio(
    capsys: pytest.CaptureFixture[str], var_scaled_model: Path
) -> None:
    argv = ["check", var_scaled_model, "--trust-pickle", "--input", DIGITS / "test_images.npy", "--format", "json"]
    document = json.loads(invoke(capsys, argv).out)
    assert document["first_divergent"] == "features.4"
    bn201 = [f for f in document["findings"] if f["code"] == "BN201"]
    assert bn201 and bn201[0]["layer"] == "features.4"
    assert bn201[0]["severity"] == "error"
    # The scores themselves, for a pipeline that trends them: one entry per compared layer call.
    scores = {entry["layer"]: entry for entry in document["departures"]}
    assert scores.keys() == {"features.1", "features.4", "features.8"}
    assert scores["features.4"]["tier"] == "error" and scores["features.4"]["score"] >= 1.7
    assert scores["features.4"]["samples"] == 450
    assert "data spread 0.14x the running one" in bn201[0]["message"]
    assert "means above" not in bn201[0]["message"] and "means below" not in bn201[0]["message"]


def test_report_first_divergent_is_checks() -> None:
    model = models.randomize_norm_state(models.BN1dFeatures()).eval()
    x = (torch.randn(64, 5, generator=torch.Generator().manual_seed(0)) * 3 * model.bn.running_var.sqrt()) + (
        model.bn.running_mean
    )
    report = inspect_model(model, [x])
    check = check_model(model, [x])
    first = report.first_divergent()
    assert first is not None and first.label == check.first_divergent == Untrusted("bn")
    found = departure(first, Thresholds())
    assert found is not None and found.departs and abs(found.mean_shift) < 0.5 and found.std_ratio > 2
    assert report.first_divergent(Thresholds(warning=100, error=200)) is None


def test_untrained_model_departs(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = models.ConvBN2d().eval()
    path = tmp_path / "untrained.pt"
    torch.save(model, path)
    data = tmp_path / "x.pt"
    torch.save(models.make_input((16, 3, 6, 6), mean=3.0), data)
    inspected = invoke(capsys, ["inspect", path, "--trust-pickle", "--input", data])
    checked = json.loads(invoke(capsys, ["check", path, "--trust-pickle", "--input", data, "--format", "json"]).out)
    first = checked["first_divergent"]
    assert first is not None and any(f["code"] == "BN201" and f["layer"] == first for f in checked["findings"])
    assert f"First departure from the running statistics, in execution order: {first}:" in " ".join(
        inspected.out.split()
    )


def test_random_input_gives_no_departure_verdict(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model = models.ConvBN2d().eval()
    path = tmp_path / "untrained.pt"
    torch.save(model, path)
    result = invoke(capsys, ["inspect", path, "--trust-pickle", "--shape", "4,3,6,6"])
    text = " ".join(result.out.split())
    assert "First departure" not in text
    assert "Random input says nothing about the running statistics" in text
    markdown = invoke(capsys, ["inspect", path, "--trust-pickle", "--shape", "4,3,6,6", "--format", "markdown"]).out
    assert "Random input says nothing" in markdown and "First departure" not in markdown


def test_markdown_verdict_matches_the_terminal() -> None:
    model = models.randomize_norm_state(models.ConvBN2d()).eval()
    report = inspect_model(model, [models.make_input((4, 3, 6, 6), mean=3.0)])
    assert "`bn1`" in to_markdown(report, []) and "bn1" in verdict(report).plain
    assert InputInfo(Untrusted("random normal, seed 0"), (4,), Untrusted("float32"), 1, 4).is_random
