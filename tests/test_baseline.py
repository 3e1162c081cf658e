"""`check --baseline` / `--write-baseline`: the BN3xx drift rules against a known-good report (#21)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

from bn_inspect.analyses.checking import check_model
from bn_inspect.analyses.inspection import inspect_model
from bn_inspect.output.html.pages import html_page
from bn_inspect.report.baseline import Baseline
from bn_inspect.report.diff import Tolerance
from bn_inspect.report.schemas import schema
from bn_inspect.text import Untrusted
from tests.helpers import DIGITS, assert_one_error_line, invoke
from tests.test_diff import _data, _net, _renamed_net

MODEL = DIGITS / "torchscript.pt"
MATCHING = DIGITS / "test_images.npy"
SHIFTED = DIGITS / "test_images_unscaled.npy"
ARCH = ("--arch", "sample_models.architectures:DigitsCNN")


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A baseline written by check --write-baseline on the digits model and its test images."""
    from bn_inspect.cli.main import run

    path = tmp_path_factory.mktemp("baseline") / "golden.json"
    assert run(["check", str(MODEL), "--input", str(MATCHING), "--write-baseline", str(path), "-q"]) == 0
    return path


def _codes(result_out: str) -> list[str]:
    return [finding["code"] for finding in json.loads(result_out)["findings"]]


def test_write_baseline_records_the_inspect_report_atomically_and_refuses_to_overwrite(
    capsys: pytest.CaptureFixture[str], golden: Path
) -> None:
    document = json.loads(golden.read_text())
    jsonschema.Draft202012Validator(schema("inspect")).validate(document)
    assert document["kind"] == "inspect" and document["input"]["first_batch_sha256"]
    before = golden.read_bytes()
    refused = invoke(capsys, ["check", MODEL, "--input", SHIFTED, "--write-baseline", golden])
    assert refused.code == 2 and golden.read_bytes() == before
    assert_one_error_line(refused, f"--write-baseline {golden} already exists", "Pass --force")
    copy = golden.parent / "copy.json"
    copy.write_bytes(before)
    replaced = invoke(capsys, ["check", MODEL, "--input", SHIFTED, "--write-baseline", copy, "--force", "-q"])
    assert replaced.code == 1  # the check itself fails on the shifted data; the baseline is written anyway
    assert json.loads(copy.read_text())["input"]["source"] == str(SHIFTED)


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--no-data", "--write-baseline", "b.json"], "--write-baseline records the statistics on the data"),
        (["--input", MATCHING, "--write-baseline", "-"], "--write-baseline - would mix"),
        (["--input", MATCHING, "--write-baseline", MATCHING, "--force"], "is the --input file"),
        (["--input", MATCHING, "--write-baseline", "b.json", "--output", "b.json"], "name the same file"),
        (["--input", MATCHING, "--baseline", "missing.json"], "report missing.json does not exist"),
    ],
)
def test_baseline_options_that_cannot_work_are_one_error_line(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    extra: list[str | Path],
    fragment: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke(capsys, ["check", MODEL, *extra])
    assert result.code == 2
    assert_one_error_line(result, fragment)
    assert not (tmp_path / "b.json").exists()


def test_an_inspect_report_is_a_baseline_and_the_same_run_passes(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    report = tmp_path / "inspect.json"
    assert invoke(capsys, ["inspect", MODEL, "--input", MATCHING, "--format", "json", "--output", report]).code == 0
    result = invoke(capsys, ["check", MODEL, "--input", MATCHING, "--baseline", report, "--format", "json"])
    assert result.code == 0, result.out
    assert not any(code.startswith("BN3") for code in _codes(result.out))


def test_other_data_through_the_same_model_is_data_drift(capsys: pytest.CaptureFixture[str], golden: Path) -> None:
    result = invoke(capsys, ["check", MODEL, "--input", SHIFTED, "--baseline", golden, "--format", "json"])
    assert result.code == 1
    document = json.loads(result.out)
    drift = [f for f in document["findings"] if f["code"] == "BN302"]
    assert [f["layer"] for f in drift] == ["features.1", "features.4", "features.8"]
    assert "data drifted" in drift[0]["message"] and "old std" in drift[0]["message"]
    assert any("the baseline and this run ran other data" in n for n in document["notes"])
    jsonschema.Draft202012Validator(schema("check")).validate(document)
    ignored = invoke(
        capsys,
        ["check", MODEL, "--input", SHIFTED, "--baseline", golden, "--ignore", "data-drift", "--ignore", "BN201", "-q"],
    )
    assert ignored.code == 0


def test_changed_running_statistics_are_running_drift_not_data_drift(
    capsys: pytest.CaptureFixture[str], golden: Path, tmp_path: Path
) -> None:
    state = torch.load(DIGITS / "state_dict.pt")
    state["features.4.running_var"] = state["features.4.running_var"] * 4
    drifted = tmp_path / "drifted.pt"
    torch.save(state, drifted)
    result = invoke(capsys, ["check", drifted, *ARCH, "--input", MATCHING, "--baseline", golden, "--format", "json"])
    document = json.loads(result.out)
    assert result.code == 1
    running = [f for f in document["findings"] if f["code"] == "BN301"]
    assert [f["layer"] for f in running] == ["features.4"] and "ratio of 4" in running[0]["message"]
    # features.8 sees other inputs through the changed layer: that is the model's doing, not the data's.
    assert "BN302" not in _codes(result.out)
    assert (
        "the 1 input that changed is not reported as data drift (BN302) because the model changed (BN301, BN303)"
        in document["notes"]
    )
    assert "against the baseline, 1 layer's stored statistics changed; 1 downstream input changed" in document["notes"]
    no_data = invoke(capsys, ["check", drifted, *ARCH, "--no-data", "--baseline", golden, "--format", "json"])
    assert no_data.code == 1 and _codes(no_data.out) == ["BN301"]
    assert (
        "against the baseline, 1 layer's stored statistics changed; inputs not compared (no batch statistics on "
        "the data)" in json.loads(no_data.out)["notes"]
    )
    loose = invoke(
        capsys, ["check", drifted, *ARCH, "--no-data", "--baseline", golden, "--max-drift-var-ratio", "5", "-q"]
    )
    assert loose.code == 0


def test_the_drift_tolerance_comes_from_pyproject(
    capsys: pytest.CaptureFixture[str], golden: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.bn-inspect]\nmax-drift = 1000\nmax-drift-var-ratio = 1000\n")
    monkeypatch.chdir(tmp_path)
    result = invoke(capsys, ["check", MODEL, "--input", SHIFTED, "--baseline", golden, "--format", "json"])
    assert "BN302" not in _codes(result.out)
    (tmp_path / "pyproject.toml").write_text("[tool.bn-inspect]\nmax-drift = -1\n")
    assert_one_error_line(invoke(capsys, ["check", MODEL, "--no-data"]), "max-drift = -1", "out of range")


def test_a_renamed_layer_is_a_layer_set_change_through_the_python_api() -> None:
    data = _data(mean=0.0, std=1.0)
    known_good = Baseline(inspect_model(_net(), [data]), Tolerance())
    same = check_model(_net(), [data], baseline=known_good)
    assert not [f for f in same.findings if f.code.startswith("BN3")]
    renamed = check_model(_renamed_net(), [data], baseline=known_good)
    layer_set = [f for f in renamed.findings if f.code == "BN303"]
    assert len(layer_set) == 1 and layer_set[0].layer == Untrusted("norm_two")
    assert "bn2 of the baseline is now named norm_two" in layer_set[0].message and not renamed.passed
    without_data = check_model(_renamed_net(), None, baseline=known_good)
    assert [f.code for f in without_data.findings if f.code.startswith("BN3")] == ["BN303"]


def test_drift_findings_name_the_channels_beyond_the_tolerance_and_the_page_shows_no_channel_count_of_0() -> None:
    data = _data(mean=0.0, std=1.0)
    known_good = Baseline(inspect_model(_net(), [data]), Tolerance())
    shifted = data.clone()
    shifted[:, 1] += 2.0  # input channel 1 only: bn1 normalizes the input itself
    drift = [f for f in check_model(_net(), [shifted], baseline=known_good).findings if f.code == "BN302"]
    bn1 = next(f for f in drift if f.layer == Untrusted("bn1"))
    x_old, x_new = (np.moveaxis(x.numpy(), 1, 0).reshape(3, -1) for x in (data, shifted))
    change = (x_new.mean(axis=1) - x_old.mean(axis=1)) / np.sqrt(x_old.var(axis=1) + 1e-5)
    ratio = x_new.var(axis=1) / x_old.var(axis=1)
    beyond = np.flatnonzero((np.abs(change) > 0.5) | (ratio > 1.5) | (ratio < 1 / 1.5))
    assert bn1.channels == tuple(beyond) == (1,)
    moved = _net()
    with torch.no_grad():
        moved.bn2.running_mean[[0, 3]] += moved.bn2.running_var[[0, 3]].sqrt()  # 1 old std: beyond 0.5
    running = [f for f in check_model(moved, [data], baseline=known_good).findings if f.code == "BN301"]
    assert [(f.layer, f.channels) for f in running] == [(Untrusted("bn2"), (0, 3))]
    renamed = check_model(_renamed_net(), [data], baseline=known_good)
    page = html_page(renamed)
    row = next(r for r in re.findall(r"<tr.*?</tr>", page, re.S) if ">BN303<" in r)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
    assert cells[4] == "—"
    drifted_page = html_page(check_model(_net(), [shifted], baseline=known_good))
    bn1_row = next(r for r in re.findall(r"<tr.*?</tr>", drifted_page, re.S) if ">BN302<" in r and "bn1" in r)
    assert re.findall(r"<td[^>]*>(.*?)</td>", bn1_row, re.S)[4] == "1: 1"
