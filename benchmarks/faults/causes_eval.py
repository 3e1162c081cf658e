"""How often bn-inspect names the right cause of a detected fault (issue 26, item 4).

    python benchmarks/faults/causes_eval.py RESULTS WORKDIR [RESULTS WORKDIR ...] [--cases]

Each RESULTS is a run.py results JSON and WORKDIR the --workdir it kept (its reports/ hold each
case's `inspect --format json` report). A fault is detected when some layer's departure score
reaches the warning level (bn-inspect's departure score, report/departure.py), or, where none
does, when check's BN205 (statistics from tiny batches) fired; for each detected fault the cause
that bn_inspect.report.causes names (BN205's own, for the second kind) is compared with the case's
``expected_cause`` (cases.py): right, wrong or unknown, per half (calibration, held-out).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bn_inspect.report.causes import UNKNOWN, model_cause  # noqa: E402
from bn_inspect.report.reading import load_report  # noqa: E402
from bn_inspect.report.records import Report  # noqa: E402

HALVES = ("calibration", "held-out")


@dataclass(frozen=True)
class Judged:
    """One detected fault: what was expected and what was named."""

    id: str
    seed: int
    split: str
    expected: str
    named: str
    sentence: str

    @property
    def verdict(self) -> str:
        """right, wrong or unknown."""
        if self.named == UNKNOWN:
            return "unknown"
        return "right" if self.named == self.expected else "wrong"


def departed_labels(report: Report) -> set[str]:
    """The layer calls that depart by bn-inspect's own departure score (what check's BN201 fires on)."""
    return {layer.label.raw for layer in report.layers if (found := layer.departure) is not None and found.departs}


def expected_causes() -> dict[str, str | None]:
    """Each case name's expected cause, from the case specs."""
    from benchmarks.faults.cases import input_cases, model_cases

    return {spec.name: spec.expected_cause for spec in input_cases() + model_cases()}


def judge_run(results: Path, workdir: Path, expected: dict[str, str | None]) -> list[Judged]:
    """Every detected fault of one run, with the cause named for it."""
    document = json.loads(results.read_text())
    judged = []
    for case in document["cases"]:
        wanted = expected.get(case["name"])
        path = workdir / "reports" / f"{case['net']}-{case['name']}.inspect.json"
        if wanted is None or case["family"] != "fault" or not path.exists():
            continue
        report = load_report(path)
        departed = departed_labels(report)
        cause = model_cause(report, (), departed)
        if cause is not None:
            judged.append(Judged(case["id"], document["seed"], case["split"], wanted, cause.code, cause.sentence))
            continue
        # Detected by BN205 alone (statistics from tiny batches): the cause check gave it.
        small_batch = _small_batch_finding(workdir / "reports" / f"{case['net']}-{case['name']}.check.json")
        if small_batch is not None:
            judged.append(
                Judged(
                    case["id"],
                    document["seed"],
                    case["split"],
                    wanted,
                    small_batch["cause"],
                    small_batch["cause_sentence"],
                )
            )
    return judged


def _small_batch_finding(path: Path) -> dict[str, str] | None:
    if not path.exists():
        return None
    found = [f for f in json.loads(path.read_text())["findings"] if f["code"] == "BN205"]
    return found[0] if found else None


def summary(judged: Sequence[Judged]) -> str:
    """A markdown table: per half, detected faults and the share right, wrong and unknown."""
    lines = ["| half | detected faults | right | wrong | unknown |", "|---|---|---|---|---|"]
    for half in HALVES:
        rows = [j for j in judged if j.split == half]
        counts = Counter(j.verdict for j in rows)
        cells = [f"{counts[v]} ({counts[v] / len(rows):.0%})" if rows else "-" for v in ("right", "wrong", "unknown")]
        lines.append(f"| {half} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def by_case(judged: Sequence[Judged]) -> str:
    """Per case name and half: expected cause and what was named how often."""
    lines = []
    groups: dict[tuple[str, str, str], Counter[str]] = {}
    for j in judged:
        groups.setdefault((j.id.split("/")[1], j.split, j.expected), Counter())[j.named] += 1
    for (name, half, wanted), named in sorted(groups.items()):
        shown = ", ".join(f"{code} {count}" for code, count in named.most_common())
        lines.append(f"{name:22s} {half:11s} expected {wanted:20s} named {shown}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="RESULTS WORKDIR pairs")
    parser.add_argument("--cases", action="store_true", help="also list each case's expected and named causes")
    parser.add_argument("--sentences", action="store_true", help="also print every named sentence")
    args = parser.parse_args(argv)
    if len(args.runs) % 2:
        parser.error("give the runs as RESULTS WORKDIR pairs")
    expected = expected_causes()
    judged = [
        j
        for results, workdir in zip(args.runs[::2], args.runs[1::2], strict=True)
        for j in judge_run(results, workdir, expected)
    ]
    print(summary(judged))
    if args.cases:
        print()
        print(by_case(judged))
    if args.sentences:
        for j in judged:
            print(f"{j.verdict:8s} s{j.seed} {j.id}: {j.named}: {j.sentence}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
