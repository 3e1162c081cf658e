"""Buckets, the calibration/held-out split, and the tables printed at the end of a run."""

from __future__ import annotations

import math
import random
from collections import defaultdict
from typing import Any

BUCKETS = (">=3", "1-3", "<1", "healthy")
VERDICTS = ("error", "warning", "pass", "could-not-run")
# Fixed thresholds shown for every score family (the per-score calibrated threshold comes on top).
GRIDS = {
    "abs_shift_z": (0.25, 0.5, 1.0, 2.0, 3.0),
    "abs_log_var_ratio": (math.log(1.25), math.log(1.5), math.log(2.0), math.log(4.0)),
    "skl": (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0),
    "w2": (0.1, 0.2, 0.3, 0.5, 1.0),
    "skl_over_floor": (1.0, 2.0, 5.0, 10.0, 20.0, 50.0),
    "share": (0.05, 0.1, 0.25, 0.5),
    # bn-inspect's own score: its info, warning and error levels among others.
    "departure": (0.5, 0.83, 1.0, 1.7, 3.0),
}
# A calibrated threshold sits this far above the largest healthy score of the calibration half.
MARGIN = 1.1


# A fault's damage counts as measured when the samples it lost against the healthy model outnumber the
# ones it gained beyond chance: the exact two-sided sign test (McNemar's) on the discordant samples.
SIGNIFICANCE = 0.05
MEASURED = f"paired sign test p < {SIGNIFICANCE}"


def damage_p(lost: int, gained: int) -> float:
    """Two-sided exact p-value that ``lost`` and ``gained`` discordant samples come from a fault that
    changes nothing (each discordant sample lost or gained with probability 1/2)."""
    n = lost + gained
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(lost, gained) + 1)) / 2**n
    return min(1.0, 2 * tail)


def measured(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The healthy cases, the faults that cost under 1 point, and the faults whose cost of 1 point or more is
    measured: the damage buckets the targets speak of, without faults whose loss is within the test set's noise."""
    return [c for c in cases if c["bucket"] in ("healthy", "<1") or c["damage_p"] < SIGNIFICANCE]


def bucket(family: str, damage_points: float) -> str:
    """Damage bucket of a case; healthy cases are their own bucket whatever their accuracy change."""
    if family == "healthy":
        return "healthy"
    if damage_points >= 3.0:
        return ">=3"
    return "1-3" if damage_points >= 1.0 else "<1"


def assign_split(cases: list[dict[str, Any]], seed: int) -> None:
    """Half of each (family, bucket) group to 'calibration', half to 'held-out', shuffled by ``seed``."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for case in sorted(cases, key=lambda c: c["id"]):
        groups[(case["family"], case["bucket"])].append(case)
    rng = random.Random(seed)
    for key in sorted(groups):
        members = groups[key]
        rng.shuffle(members)
        for index, case in enumerate(members):
            case["split"] = "calibration" if index % 2 == 0 else "held-out"


def confusion(cases: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Count of cases per damage bucket and today's check verdict."""
    table = {b: dict.fromkeys(VERDICTS, 0) for b in BUCKETS}
    for case in cases:
        table[case["bucket"]][case["check"]["verdict"]] += 1
    return table


def rates(cases: list[dict[str, Any]], score: str, threshold: float) -> dict[str, Any]:
    """Recall per damage bucket and false alarms among healthy cases when ``score > threshold`` alarms."""
    result: dict[str, Any] = {"threshold": threshold}
    for name in BUCKETS:
        members = [c for c in cases if c["bucket"] == name and score in c["inspect"]["scores"]]
        hits = sum(c["inspect"]["scores"][score] > threshold for c in members)
        result[name] = [hits, len(members)]
    return result


def score_names(cases: list[dict[str, Any]]) -> list[str]:
    names: set[str] = set()
    for case in cases:
        names.update(case["inspect"]["scores"])
    return sorted(names)


def grid_for(score: str) -> tuple[float, ...]:
    if score == "departure.worst_layer":
        return GRIDS["departure"]
    stat, agg, _ = score.split(".")
    return GRIDS["share"] if agg == "share" else GRIDS[stat]


def calibrated_threshold(cases: list[dict[str, Any]], score: str) -> float:
    """Just above the largest healthy score among the calibration cases (no healthy case alarms there)."""
    healthy = [
        c["inspect"]["scores"][score] for c in cases if c["bucket"] == "healthy" and score in c["inspect"]["scores"]
    ]
    return max(healthy, default=0.0) * MARGIN


def separation(cases: list[dict[str, Any]], score: str) -> float | None:
    """Share of (fault costing >=3 points, healthy) pairs the score orders right (ties count half): the AUC."""
    faults = [c["inspect"]["scores"][score] for c in cases if c["bucket"] == ">=3" and score in c["inspect"]["scores"]]
    healthy = [
        c["inspect"]["scores"][score] for c in cases if c["bucket"] == "healthy" and score in c["inspect"]["scores"]
    ]
    if not faults or not healthy:
        return None
    wins = sum((f > h) + 0.5 * (f == h) for f in faults for h in healthy)
    return wins / (len(faults) * len(healthy))


def per_net(cases: list[dict[str, Any]], score: str) -> dict[str, dict[str, float | None]]:
    """Per net: the largest healthy score and the smallest score of a fault costing >=3 points."""
    result = {}
    for net in sorted({c["net"] for c in cases}):
        mine = [c for c in cases if c["net"] == net and score in c["inspect"]["scores"]]
        healthy = [c["inspect"]["scores"][score] for c in mine if c["bucket"] == "healthy"]
        damaging = [c["inspect"]["scores"][score] for c in mine if c["bucket"] == ">=3"]
        result[net] = {"max_healthy": max(healthy, default=None), "min_damaging": min(damaging, default=None)}
    return result


def trade_offs(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """For each candidate score: rates over all cases at fixed thresholds, and a threshold tuned on the
    calibration half only, with its rates on each half."""
    calibration = [c for c in cases if c["split"] == "calibration"]
    held_out = [c for c in cases if c["split"] == "held-out"]
    result = {}
    for score in score_names(cases):
        tuned = calibrated_threshold(calibration, score)
        result[score] = {
            "auc_all": separation(cases, score),
            "per_net": per_net(cases, score),
            "fixed": [rates(cases, score, th) for th in grid_for(score)],
            "tuned": {"calibration": rates(calibration, score, tuned), "held-out": rates(held_out, score, tuned)},
        }
    return result


def fraction(pair: list[int]) -> str:
    hits, total = pair
    return f"{hits}/{total}" if total else "-"


def format_confusion(table: dict[str, dict[str, int]], title: str) -> str:
    lines = [title, f"{'damage':<10}" + "".join(f"{v:>15}" for v in VERDICTS)]
    lines += [f"{b:<10}" + "".join(f"{table[b][v]:>15}" for v in VERDICTS) for b in BUCKETS]
    return "\n".join(lines)


def format_tuned(trade: dict[str, Any]) -> str:
    """One line per score: the calibrated threshold and its recall / false alarms on each half."""
    head = (
        f"{'score':<34}{'threshold':>11}  {'calibration >=3 | 1-3 | healthy':>32}  {'held-out >=3 | 1-3 | healthy':>30}"
    )
    lines = ["Candidate scores: threshold tuned on the calibration half (just above its healthy cases)", head]
    for score, entry in trade.items():
        cal, held = entry["tuned"]["calibration"], entry["tuned"]["held-out"]
        cells = [" | ".join(fraction(part[b]) for b in (">=3", "1-3", "healthy")) for part in (cal, held)]
        auc = "-" if entry["auc_all"] is None else f"{entry['auc_all']:.3f}"
        lines.append(f"{score:<36}{auc:>6}{cal['threshold']:>11.3g}  {cells[0]:>32}  {cells[1]:>30}")
    return "\n".join(lines)


def format_per_net(trade: dict[str, Any], scores: list[str]) -> str:
    """Per net, the largest healthy score against the smallest score of a fault costing >=3 points."""
    lines = ["Per net: largest healthy score < smallest score of a fault costing >=3 points?"]
    for score in scores:
        if score not in trade:
            continue
        cells = []
        for net, pair in trade[score]["per_net"].items():
            high, low = pair["max_healthy"], pair["min_damaging"]
            if high is None or low is None:
                continue
            cells.append(f"{net} {high:.3g} {'<' if high < low else '>='} {low:.3g}")
        lines.append(f"{score:<34} " + "; ".join(cells))
    return "\n".join(lines)


def format_fixed(trade: dict[str, Any], scores: list[str]) -> str:
    """Recall (>=3, 1-3) and false alarms (healthy) at fixed thresholds, all cases, for a few scores."""
    lines = ["Fixed thresholds, all cases: alarms in >=3 | 1-3 | <1 | healthy"]
    for score in scores:
        if score not in trade:
            continue
        for row in trade[score]["fixed"]:
            cells = " | ".join(fraction(row[b]) for b in BUCKETS)
            lines.append(f"{score:<34} > {row['threshold']:<8.3g} {cells}")
    return "\n".join(lines)


def markdown_confusion(table: dict[str, dict[str, int]]) -> str:
    lines = ["| damage \\ check verdict | " + " | ".join(VERDICTS) + " |", "|---" * (len(VERDICTS) + 1) + "|"]
    lines += [f"| {b} | " + " | ".join(str(table[b][v]) for v in VERDICTS) + " |" for b in BUCKETS]
    return "\n".join(lines)


def markdown_tuned(trade: dict[str, Any]) -> str:
    lines = [
        "| score | AUC (all) | threshold | calibration >=3 / 1-3 / healthy | held-out >=3 / 1-3 / healthy |",
        "|---|---|---|---|---|",
    ]
    for score, entry in trade.items():
        cal, held = entry["tuned"]["calibration"], entry["tuned"]["held-out"]
        cells = [" / ".join(fraction(part[b]) for b in (">=3", "1-3", "healthy")) for part in (cal, held)]
        auc = "-" if entry["auc_all"] is None else f"{entry['auc_all']:.3f}"
        lines.append(f"| `{score}` | {auc} | {cal['threshold']:.3g} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def markdown_cases(cases: list[dict[str, Any]]) -> str:
    """One row per case: damage, check's verdict and rule codes, bn-inspect's departure score (worst layer) and
    three candidate scores (mean over channels, worst layer)."""
    lines = [
        "| case | split | accuracy (reference) | damage | check | codes | departure | skl | w2 | skl / floor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        scores = case["inspect"]["scores"]
        codes = ", ".join(sorted({f["code"] for f in case["check"]["findings"]})) or "-"
        lines.append(
            f"| {case['id']} | {case['split']} | {case['accuracy']:.4f} ({case['reference_accuracy']:.4f}) "
            f"| {case['damage_points']:.2f} | {case['check']['verdict']} | {codes} "
            f"| {scores.get('departure.worst_layer', math.nan):.3g} "
            f"| {scores.get('skl.mean.worst_layer', math.nan):.3g} | {scores.get('w2.mean.worst_layer', math.nan):.3g} "
            f"| {scores.get('skl_over_floor.mean.worst_layer', math.nan):.3g} |"
        )
    return "\n".join(lines)
