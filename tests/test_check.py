"""bn-inspect check: every rule fires on a model built to trigger it, and never on the healthy samples."""

from __future__ import annotations

import json
import math
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from torch import nn

from bn_inspect.analyses.checking import check_model
from bn_inspect.cli.main import run
from bn_inspect.report.findings import RULES, Severity, Thresholds
from bn_inspect.text import Untrusted
from tests import models
from tests.conftest import state_fingerprint
from tests.helpers import DIGITS, REPO, SAMPLES

SAMPLE_DATA = {
    "digits_cnn": ["--input", "test_images.npy"],
    "cancer_mlp": ["--input", "test.csv", "--drop-column", "label"],
    "signal_cnn1d": ["--input", "test_signals.npy"],
    "volume_cnn3d": ["--input", "test_volumes.npy"],
}


def codes(model: nn.Module, batches: list | None = None, **kwargs: object) -> set[str]:
    before = state_fingerprint(model)
    result = check_model(model, batches, **kwargs)  # type: ignore[arg-type]
    assert state_fingerprint(model) == before
    return {f.code for f in result.findings}


def healthy() -> nn.Module:
    return models.randomize_norm_state(models.BN1dFeatures()).eval()


def matching_data(model: nn.Module, n: int = 64) -> torch.Tensor:
    """Data drawn from the layer's own running statistics: nothing should fire."""
    bn = model.bn
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, bn.num_features, generator=generator) * bn.running_var.sqrt() + bn.running_mean


def test_healthy_model_on_matching_data_has_no_findings() -> None:
    model = healthy()
    assert codes(model, [matching_data(model)]) == set()


@pytest.mark.parametrize(
    ("code", "break_it"),
    [
        ("BN101", lambda m: m.bn.running_mean.__setitem__(1, float("nan"))),
        ("BN101", lambda m: m.bn.weight.data.__setitem__(0, float("inf"))),
        ("BN102", lambda m: m.bn.running_var.__setitem__(2, -1.0)),
        ("BN103", lambda m: m.bn.running_var.__setitem__(2, 9e-7)),
        ("BN104", lambda m: m.bn.reset_running_stats()),
        ("BN105", lambda m: setattr(m.bn, "momentum", 0.99)),
        ("BN105", lambda m: setattr(m.bn, "momentum", 0.0)),
        ("BN106", lambda m: setattr(m.bn, "momentum", None)),
        ("BN107", lambda m: m.train()),
        ("BN107", lambda m: m.bn.train()),
        ("BN108", lambda m: (m.bn.train(), m.bn.weight.requires_grad_(False), m.bn.bias.requires_grad_(False))),
        ("BN109", lambda m: m.bn.half()),
        ("BN109", lambda m: m.bn.running_var.__setitem__(0, 1e6)),
    ],
)
def test_state_rule_fires(code: str, break_it: object) -> None:
    model = healthy()
    with torch.no_grad():
        break_it(model)  # type: ignore[operator]
    assert code in codes(model, None)


def test_batch_stats_in_eval_rule() -> None:
    assert "BN110" in codes(models.Untracked().eval(), None)


def test_untrained_is_an_error_with_strict() -> None:
    model = models.BN1dFeatures().eval()
    severities = {f.code: f.severity for f in check_model(model, None).findings}
    assert severities["BN104"] is Severity.WARNING
    strict = {f.code: f.severity for f in check_model(model, None, thresholds=Thresholds(strict=True)).findings}
    assert strict["BN104"] is Severity.ERROR


def test_train_mode_rules_need_flags_from_the_file() -> None:
    model = healthy().train()
    assert "BN107" not in codes(model, None, flags_from_file=False)


def test_shift_rule_names_the_first_divergent_layer() -> None:
    model = models.randomize_norm_state(models.ConvBN2d()).eval()
    result = check_model(model, [models.make_input((4, 3, 6, 6), mean=3.0)])
    shifted = [f for f in result.findings if f.code == "BN201"]
    assert [f.layer for f in shifted] == [Untrusted("bn1"), Untrusted("bn2")]
    assert result.first_divergent == Untrusted("bn1")
    assert not result.passed


def test_shift_rule_thresholds_and_share() -> None:
    model = healthy()
    x = matching_data(model)
    x[:, 0] += 10 * model.bn.running_var[0].sqrt()
    assert "BN201" in codes(model, [x])
    assert "BN201" not in codes(model, [x], thresholds=Thresholds(warning=1e9, error=1e9))


def test_variance_ratio_alone_triggers_shift() -> None:
    model = healthy()
    x = (matching_data(model) - model.bn.running_mean) * 3 + model.bn.running_mean
    assert "BN201" in codes(model, [x])


def test_shift_and_dead_rules_skip_random_data() -> None:
    model = models.randomize_norm_state(models.ConvBN2d()).eval()
    result = check_model(model, [models.make_input((4, 3, 6, 6), mean=3.0)], data_is_real=False)
    assert not {f.code for f in result.findings} & {"BN201", "BN202"}
    assert any("random input" in note for note in result.notes)


def test_dead_channels() -> None:
    model = healthy()
    x = matching_data(model)
    x[:, 3] = 0.25
    finding = next(f for f in check_model(model, [x]).findings if f.code == "BN202")
    assert finding.channels == (3,)


def test_too_few_values_per_channel() -> None:
    # In train mode each batch is normalized with its own statistics: a small batch matters.
    model = healthy()
    few = next(f for f in check_model(model, [matching_data(model, 8)], mode="train").findings if f.code == "BN203")
    assert few.severity is Severity.WARNING and "only 8 values" in few.message


def test_a_small_batch_in_eval_mode_is_no_finding() -> None:
    # In eval mode the layers normalize with their running statistics and the comparison pools every
    # batch: --batch-size 8 for memory must not fail a healthy model.
    model = healthy()
    assert "BN203" not in codes(model, [matching_data(model, 8)])


def test_nonfinite_input_is_reported() -> None:
    model = healthy()
    x = matching_data(model)
    x[3, 1] = math.nan
    finding = next(f for f in check_model(model, [x]).findings if f.code == "BN204")
    assert finding.channels == (1,)


def test_ignore_by_code_and_name() -> None:
    model = healthy()
    model.bn.momentum = None
    assert "BN106" not in codes(model, None, ignore=["BN106"])
    assert "BN106" not in codes(model, None, ignore=["cumulative-average"])


def test_every_rule_is_documented_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    for rule in RULES.values():
        assert f"`{rule.code}`" in readme and rule.name in readme


@pytest.mark.parametrize("name", sorted(SAMPLE_DATA))
@pytest.mark.parametrize("model_file", ["state_dict.pt", "torchscript.pt", "pickle.pt"])
def test_no_false_alarms_on_the_sample_models(name: str, model_file: str, capsys: pytest.CaptureFixture[str]) -> None:
    folder = SAMPLES / name
    data = [str(folder / a) if a.endswith((".npy", ".csv")) else a for a in SAMPLE_DATA[name]]
    extra = {
        "state_dict.pt": ["--arch", f"sample_models.architectures:{_class(name)}"],
        "pickle.pt": ["--trust-pickle"],
    }
    code = run(
        [
            "check",
            str(folder / model_file),
            *extra.get(model_file, []),
            *data,
            "--fail-on",
            "warning",
            "--format",
            "json",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    # Notes (severity info) are facts, not alarms: e.g. the raw cancer features' variance exceeds fp16's range.
    assert [f for f in json.loads(out)["findings"] if f["severity"] != "info"] == []


def _class(name: str) -> str:
    return {
        "digits_cnn": "DigitsCNN",
        "cancer_mlp": "CancerMLP",
        "signal_cnn1d": "SignalCNN1d",
        "volume_cnn3d": "VolumeCNN3d",
    }[name]


def test_cli_exit_codes(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    digits = DIGITS
    assert run(["check", str(digits / "torchscript.pt"), "--input", str(digits / "test_images.npy")]) == 0
    assert run(["check", str(digits / "torchscript.pt"), "--input", str(digits / "test_images_unscaled.npy")]) == 1
    assert run(["check", str(tmp_path / "missing.pt"), "--no-data"]) == 2
    assert run(["check", str(digits / "torchscript.pt"), "--no-data", "--ignore", "BN999"]) == 2
    capsys.readouterr()


def write_broken_torchscript(path: Path) -> None:
    model = models.randomize_norm_state(models.ConvBN2d()).eval()
    model.bn2.momentum = 0.99
    with torch.no_grad():
        model.bn1.running_var[0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(model), str(path))


def test_fail_on_warning_and_no_data(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "broken.pt"
    write_broken_torchscript(path)
    assert run(["check", str(path), "--no-data", "--ignore", "BN101"]) == 0
    assert run(["check", str(path), "--no-data", "--ignore", "BN101", "--fail-on", "warning"]) == 1
    assert run(["check", str(path), "--no-data"]) == 1
    out = capsys.readouterr().out
    assert "BN101" in out and "BN105" in out and "no data" in out


def test_pyproject_pins_the_gate(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "broken.pt"
    write_broken_torchscript(path)
    (tmp_path / "pyproject.toml").write_text('[tool.bn-inspect]\nignore = ["BN101"]\nfail-on = "warning"\n')
    monkeypatch.chdir(tmp_path)
    assert run(["check", str(path), "--no-data"]) == 1
    assert run(["check", str(path), "--no-data", "--fail-on", "error"]) == 0
    (tmp_path / "pyproject.toml").write_text("[tool.bn-inspect]\ndeparture-warning = 'three'\n")
    assert run(["check", str(path), "--no-data"]) == 2
    assert "departure-warning" in capsys.readouterr().err


def test_json_and_junit_outputs(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "broken.pt"
    write_broken_torchscript(path)
    assert run(["check", str(path), "--shape", "4,3,6,6", "--format", "json"]) == 1
    document = json.loads(capsys.readouterr().out)
    assert document["passed"] is False and document["schema_version"] == 1
    assert document["thresholds"]["warning"] == 0.83 and document["thresholds"]["error"] == 1.7
    found = {(f["code"], f["layer"]) for f in document["findings"]}
    assert ("BN101", "bn1") in found and ("BN105", "bn2") in found
    junit = tmp_path / "bn.xml"
    assert run(["check", str(path), "--shape", "4,3,6,6", "--format", "junit", "--output", str(junit)]) == 1
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    assert set(cases) == {"(model)", "bn1", "bn2"}
    assert cases["bn1"].find("failure") is not None
    # The NaN in bn1's running_var reaches bn2's input: an error there too; its momentum is only a warning.
    failure = cases["bn2"].find("failure")
    assert failure is not None and failure.get("type") == "BN204"
    assert "BN105" in (cases["bn2"].findtext("system-out") or "")
    assert cases["(model)"].find("failure") is None
    assert suite.get("failures") == "2"
