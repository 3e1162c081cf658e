"""The fault benchmark's smoke run (benchmarks/faults/run.py --smoke): its JSON has every field, and damage is
measured (healthy cases ~0, some fault costs points). Structure and sanity only, never exact accuracies."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from typing import Any

import pytest

from tests.helpers import REPO

# Left out of the quick subset (`-m "not slow"`): trains the fault benchmark's smoke subset (about 40 s).
pytestmark = pytest.mark.slow

RUN = REPO / "benchmarks" / "faults" / "run.py"
CASE_FIELDS = {
    "id",
    "net",
    "name",
    "family",
    "what",
    "accuracy",
    "reference_accuracy",
    "damage_points",
    "samples_lost",
    "samples_gained",
    "damage_p",
    "bucket",
    "split",
    "check",
    "inspect",
}


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    output = tmp_path_factory.mktemp("faults") / "results.json"
    subprocess.run(
        [sys.executable, str(RUN), "--smoke", "--seed", "0", "--output", str(output)],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
        timeout=240,
    )
    return json.loads(output.read_text())


def test_smoke_run_records_every_case_field(smoke_results: dict[str, Any]) -> None:
    cases = smoke_results["cases"]
    assert cases and smoke_results["smoke"] is True
    for case in cases:
        assert case.keys() >= CASE_FIELDS, case["id"]
        assert case["split"] in {"calibration", "held-out"}
        assert case["check"]["verdict"] in {"error", "warning", "pass"}
        assert case["check"]["exit_code"] in {0, 1}
        assert case["inspect"]["layers"], case["id"]
        for layer in case["inspect"]["layers"]:
            assert {"abs_shift_z", "abs_log_var_ratio", "skl", "w2"} <= layer.keys()
        assert {"skl.mean.worst_layer", "w2.mean.first_layer"} <= case["inspect"]["scores"].keys()


def test_smoke_run_measures_damage(smoke_results: dict[str, Any]) -> None:
    cases = smoke_results["cases"]
    healthy = [c for c in cases if c["family"] == "healthy"]
    faults = [c for c in cases if c["family"] == "fault"]
    assert healthy and faults
    assert all(abs(c["damage_points"]) < 3.0 for c in healthy)
    assert any(c["damage_points"] >= 3.0 for c in faults)
    assert all(c["bucket"] == "healthy" for c in healthy)
    for case in cases:
        # The paired counts reproduce the damage: lost minus gained samples, in points of the evaluated samples.
        net = case["samples_lost"] - case["samples_gained"]
        assert case["damage_points"] == pytest.approx(100.0 * net / case["num_samples"], abs=0.01), case["id"]


@pytest.mark.parametrize(
    ("lost", "gained"), [(0, 0), (1, 0), (2, 0), (5, 1), (13, 0), (7, 7), (3, 9), (40, 25), (0, 12)]
)
def test_damage_p_is_the_exact_two_sided_sign_test(lost: int, gained: int) -> None:
    # Independent reference: enumerate every way the discordant samples could split under "no effect" and
    # add the probability of each split at most as likely as the one seen.
    from benchmarks.faults.tables import damage_p

    n = lost + gained
    probability = [math.comb(n, k) / 2**n for k in range(n + 1)]
    seen = probability[lost]
    reference = sum(p for p in probability if p <= seen * (1 + 1e-12))
    assert damage_p(lost, gained) == pytest.approx(min(1.0, reference), rel=1e-12)
    assert (damage_p(lost, gained) < 0.05) == (reference < 0.05)


def test_smoke_run_splits_and_tabulates(smoke_results: dict[str, Any]) -> None:
    splits = {c["split"] for c in smoke_results["cases"]}
    assert splits == {"calibration", "held-out"}
    confusion = smoke_results["confusion"]["all"]
    assert sum(sum(row.values()) for row in confusion.values()) == len(smoke_results["cases"])
    measured = smoke_results["confusion"]["held-out, damage measured"]
    held_out = smoke_results["confusion"]["held-out"]
    for bucket, row in measured.items():
        assert sum(row.values()) <= sum(held_out[bucket].values()), bucket
    for trade in smoke_results["trade_offs"].values():
        assert {"calibration", "held-out"} <= trade["tuned"].keys()


def test_smoke_run_judges_by_the_departure_score(smoke_results: dict[str, Any]) -> None:
    # The smoke subset's faults are gross (0-255 pixels, a partial load) and its healthy models are the
    # trained one and its recalibrations: check must tell them apart, and compare-modes stay quiet.
    for case in smoke_results["cases"]:
        assert "departure.worst_layer" in case["inspect"]["scores"], case["id"]
        if case["family"] == "healthy":
            assert case["check"]["verdict"] == "pass", case["id"]
            assert case["compare_modes"]["gap_opens_at"] is None, case["id"]
        elif case["damage_points"] >= 30:
            assert case["check"]["verdict"] in {"warning", "error"}, case["id"]
    assert smoke_results["compare_modes_healthy"]["gap_headlines"] == []
