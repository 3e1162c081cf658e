"""The fault benchmark's cause evaluation (benchmarks/faults/causes_eval.py): its departure score against a
float64 reference, every fault case's expected cause, and right / wrong / unknown counted per half."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.faults import causes_eval
from benchmarks.faults.cases import input_cases, model_cases
from bn_inspect.report.cause_codes import CAUSES, UNKNOWN
from bn_inspect.report.reading import write_report
from bn_inspect.report.records import InputInfo, LayerReport, ModelInfo, Report
from bn_inspect.text import Untrusted

C = 24


def layer(name: str, running: tuple[np.ndarray, np.ndarray], batch: tuple[np.ndarray, np.ndarray]) -> LayerReport:
    shape = (50, C, 6, 6)
    return LayerReport(
        name=Untrusted(name),
        call=0,
        type=Untrusted("BatchNorm2d"),
        family="batch",
        num_channels=C,
        input_shape=shape,
        axis_names=("N", "C", "H", "W"),
        reduced_axes=(0, 2, 3),
        values_per_channel=4 * 50 * 36,
        eps=1e-3,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        num_batches_tracked=2000,
        normalizes_with="running",
        batch_mean=tuple(map(float, batch[0])),
        batch_var=tuple(map(float, batch[1])),
        batch_var_unbiased=tuple(map(float, batch[1])),
        running_mean=tuple(map(float, running[0])),
        running_var=tuple(map(float, running[1])),
        weight=None,
        bias=None,
        explanation=Untrusted(""),
    )


def trained(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.uniform(-1e3, 1e3, C), rng.uniform(1e-4, 1e-2, C)


def test_the_score_it_judges_by_is_the_mean_wasserstein_distance_over_the_sample_allowance() -> None:
    # Large means and tiny variances: bn-inspect's own score, which causes_eval judges detection by.
    running = trained(1)
    rng = np.random.default_rng(2)
    batch = (running[0] + rng.normal(0, 0.3, C) * np.sqrt(running[1]), running[1] * rng.uniform(0.3, 3, C))
    eps, samples = 1e-3, 4 * 50
    vb, vr = batch[1].astype(np.float64) + eps, running[1].astype(np.float64) + eps
    distance = np.sqrt((batch[0] - running[0]) ** 2 + (np.sqrt(vb) - np.sqrt(vr)) ** 2) / np.sqrt(vr)
    expected = distance.mean() / (0.1 + 3 / np.sqrt(samples))
    found = layer("bn", running, batch).departure
    assert found is not None and found.score == pytest.approx(expected, rel=1e-12)
    assert causes_eval.departed_labels(report(layer("bn", running, batch))) == ({"bn"} if found.departs else set())


def test_every_fault_case_expects_a_documented_cause_and_no_healthy_case_does() -> None:
    for spec in input_cases() + model_cases():
        if spec.family == "healthy":
            assert spec.expected_cause is None, spec.name
        else:
            assert spec.expected_cause in CAUSES and spec.expected_cause != UNKNOWN, spec.name


def report(*layers: LayerReport) -> Report:
    data = InputInfo(Untrusted("x.npy"), (50, 1, 6, 6), Untrusted("float32"), 4, 200)
    return Report(ModelInfo.of("m.pt", "state_dict"), data, Untrusted("eval"), Untrusted("cpu"), tuple(layers))


def run_dir(tmp_path: Path, cases: dict[str, tuple[str, Report]]) -> tuple[Path, Path]:
    """A results JSON and a workdir with each case's inspect report, as run.py --workdir leaves them."""
    (tmp_path / "reports").mkdir()
    entries = []
    for name, (split, case_report) in cases.items():
        write_report(tmp_path / "reports" / f"digits_cnn-{name}.inspect.json", case_report)
        entries.append(
            {"id": f"digits_cnn/{name}", "net": "digits_cnn", "name": name, "family": "fault", "split": split}
        )
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"seed": 0, "cases": entries}))
    return results, tmp_path


def test_detected_faults_are_counted_right_wrong_or_unknown_per_half(tmp_path: Path) -> None:
    running = trained(3)
    in_place = (running[0], running[1] * 1.01)
    scaled = (running[0] * 16, running[1] * 256)
    cases = {
        "scale_0_255": ("calibration", report(layer("bn1", running, scaled))),  # input-scale: right
        "bgr_order": ("held-out", report(layer("bn1", running, scaled))),  # input-scale for channel-order: wrong
        "domain_noise": ("held-out", report(layer("bn1", running, in_place))),  # nothing departs: not counted
    }
    judged = causes_eval.judge_run(*run_dir(tmp_path, cases), causes_eval.expected_causes())
    assert [(j.id, j.named, j.verdict) for j in judged] == [
        ("digits_cnn/scale_0_255", "input-scale", "right"),
        ("digits_cnn/bgr_order", "input-scale", "wrong"),
    ]
    table = causes_eval.summary(judged)
    assert "| calibration | 1 | 1 (100%) | 0 (0%) | 0 (0%) |" in table
    assert "| held-out | 1 | 0 (0%) | 1 (100%) | 0 (0%) |" in table
