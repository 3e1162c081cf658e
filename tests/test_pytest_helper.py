"""bn_inspect.testing.assert_bn_healthy: check as a pytest assertion whose message is check's table (#21)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bn_inspect.analyses.checking import check_model
from bn_inspect.analyses.inspection import inspect_model
from bn_inspect.errors import InputError, ReportFileError
from bn_inspect.output.export import to_json
from bn_inspect.output.formats import Rendering, TableFormatter
from bn_inspect.report.baseline import Baseline
from bn_inspect.report.reading import load_report
from bn_inspect.testing import THRESHOLD_KEYWORDS, assert_bn_healthy
from tests import models
from tests.helpers import REPO, deadline
from tests.test_diff import _data, _net, _renamed_net


def _shifted_model() -> torch.nn.Module:
    return models.randomize_norm_state(models.ConvBN2d()).eval()


def test_a_healthy_model_passes_and_returns_the_check() -> None:
    model = _net()
    data = _data(mean=0.0, std=1.0)
    with torch.no_grad():
        model.bn1.running_mean.copy_(data.mean(dim=(0, 2, 3)))
        model.bn1.running_var.copy_(data.var(dim=(0, 2, 3)))
    result = assert_bn_healthy(model, [data], ignore=["BN201"], min_values=1)
    assert result.passed


def test_a_failure_raises_assertion_error_whose_message_is_the_check_table() -> None:
    model = _shifted_model()
    batches = [models.make_input((8, 3, 6, 6), mean=5.0)]
    with pytest.raises(AssertionError) as caught:
        assert_bn_healthy(model, batches)
    expected = TableFormatter().text(check_model(model, batches), Rendering(width=120))
    # The verdict first, where pytest's one-line summary shows it; the table after a blank line.
    assert str(caught.value) == "bn-inspect check FAILED: 2 errors (BN201 shifted in bn1 and bn2)\n\n" + expected
    # Thresholds loosen the gate by the config keys' names.
    assert_bn_healthy(model, batches, departure_warning=1e9, departure_error=1e12)
    assert_bn_healthy(model, batches, ignore=["shifted"])


def test_a_baseline_adds_the_drift_rules(tmp_path: Path) -> None:
    data = _data(mean=0.0, std=1.0)
    golden = tmp_path / "golden.json"
    golden.write_text(to_json(inspect_model(_net(), [data])))
    assert_bn_healthy(_net(), [data], baseline=golden, ignore=["BN201"])
    with pytest.raises(AssertionError, match="BN303"):
        assert_bn_healthy(_renamed_net(), [data], baseline=str(golden), ignore=["BN201"])
    assert_bn_healthy(_renamed_net(), [data], baseline=inspect_model(_net(), [data]), ignore=["BN201", "BN303"])


def test_an_unknown_keyword_is_a_type_error_naming_the_valid_ones() -> None:
    with pytest.raises(TypeError, match=r"unexpected keyword.*max_shift.*the thresholds are departure_warning, "):
        assert_bn_healthy(_net(), [_data()], max_shift=2)
    assert set(THRESHOLD_KEYWORDS) >= {"departure_warning", "departure_error", "max_drift", "ignore", "fail_on"}
    with pytest.raises(InputError, match="BN999"):
        assert_bn_healthy(_net(), [_data()], ignore=["BN999"])


def test_the_verdict_line_counts_what_failed_and_names_each_rule_and_its_layers(tmp_path: Path) -> None:
    data = _data(mean=0.0, std=1.0)
    golden = tmp_path / "golden.json"
    golden.write_text(to_json(inspect_model(_net(), [data])))
    model = _net()
    with torch.no_grad():
        model.bn1.running_mean.add_(3.0)
        model.bn1.momentum = 0.9
    dead = data.clone()
    dead[:, 1] = 0.0  # BN202 on bn1: a channel without variance
    with pytest.raises(AssertionError) as caught:
        assert_bn_healthy(model, [dead], baseline=golden, fail_on="warning", min_values=1)
    # Most severe first; only what reached fail_on; past three rules the rest are counted.
    assert str(caught.value).splitlines()[0] == (
        "bn-inspect check FAILED: 4 errors and 2 warnings (BN201 shifted in bn1, bn2 and bn3; "
        "BN301 running-drift in bn1; BN105 momentum in bn1; and 1 more rule)"
    )
    with pytest.raises(AssertionError) as caught:
        assert_bn_healthy(model, [dead], baseline=golden, min_values=1)
    assert str(caught.value).splitlines()[0] == (
        "bn-inspect check FAILED: 4 errors (BN201 shifted in bn1, bn2 and bn3; BN301 running-drift in bn1)"
    )


def test_a_nan_variance_says_which_value_is_nan(tmp_path: Path) -> None:
    data = _data(mean=0.0, std=1.0)
    golden = tmp_path / "golden.json"
    golden.write_text(to_json(inspect_model(_net(), [data])))
    model = _net()
    with torch.no_grad():
        model.bn1.running_var[2] = float("nan")
    with pytest.raises(AssertionError) as caught:
        assert_bn_healthy(model, [data], baseline=golden, ignore=["BN201"], min_values=1)
    assert re.search(r"\bnan\b", str(caught.value)) is None  # as Python prints a NaN: "a ratio of nan"
    drift = check_model(model, [data], ignore=("BN201",), baseline=Baseline(load_report(golden))).findings[-1]
    assert drift.code == "BN301" and (
        "mean by up to 0 old std, the variance ratio is NaN in channel 2 (this model's running variance is NaN there)"
        in drift.message
    )


def test_pytest_shows_the_verdict_in_its_summary_and_the_table_when_the_assertion_fails(tmp_path: Path) -> None:
    test_file = tmp_path / "test_model.py"
    test_file.write_text(
        "from bn_inspect.testing import assert_bn_healthy\n"
        "from tests import models\n\n"
        "def test_bn():\n"
        "    model = models.randomize_norm_state(models.ConvBN2d()).eval()\n"
        "    assert_bn_healthy(model, [models.make_input((8, 3, 6, 6), mean=5.0)])\n"
    )
    # Wide enough that pytest does not cut its one-line summary.
    environment = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", str(test_file)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=environment,
        timeout=300,
    )
    assert result.returncode == 1, result.stdout[-2000:]
    assert "AssertionError" in result.stdout and "BN201" in result.stdout and "shifted" in result.stdout
    assert "FAILED (fails on error or worse)" in result.stdout
    summary = next(line for line in result.stdout.splitlines() if line.startswith("FAILED test_model.py::test_bn"))
    assert summary.endswith(" - AssertionError: bn-inspect check FAILED: 2 errors (BN201 shifted in bn1 and bn2)")


@pytest.mark.surface("entry:pytest-helper", "traceback")
@pytest.mark.parametrize("case", ["named-pipe", "truncated", "wrong-lengths"])
def test_a_hostile_baseline_is_one_report_error_not_a_crash(tmp_path: Path, case: str) -> None:
    data = _data(mean=0.0, std=1.0)
    golden = tmp_path / "golden.json"
    document = json.loads(to_json(inspect_model(_net(), [data])))
    if case == "named-pipe":
        os.mkfifo(golden)
    elif case == "truncated":
        golden.write_text(json.dumps(document)[:200])
    else:
        document["layers"][0]["batch_mean"] = document["layers"][0]["batch_mean"][:-1]
        golden.write_text(json.dumps(document))
    with deadline(10), pytest.raises(ReportFileError) as caught:
        assert_bn_healthy(_net(), [data], baseline=golden, ignore=["BN201"])
    assert "\n" not in str(caught.value) and str(golden) in str(caught.value)
