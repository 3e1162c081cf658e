"""A pytest helper: assert that a model's BatchNorm layers are healthy on your data, check's rules and all.

    from bn_inspect.testing import assert_bn_healthy

    def test_batchnorm_state(model, val_batches):
        assert_bn_healthy(model, val_batches, baseline="tests/golden_bn.json", departure_warning=0.6)

On failure the AssertionError's first line is the verdict (``bn-inspect check FAILED: 1 error (BN201
shifted in features.1)``), what pytest's one-line summary shows; check's table (120 columns)
follows, so the test log says which rule fired on which layer and why.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bn_inspect.config import CheckConfig
from bn_inspect.report.findings import CheckReport, Severity
from bn_inspect.report.records import Report

if TYPE_CHECKING:
    from torch import nn

# The keywords are [tool.bn-inspect]'s keys, with underscores: what a repository pins, a test can set.
THRESHOLD_KEYWORDS = (
    "departure_warning",
    "departure_error",
    "min_values",
    "strict",
    "fail_on",
    "ignore",
    "max_drift",
    "max_drift_var_ratio",
)

_TABLE_WIDTH = 120
# The verdict line names this many rules, then counts the rest: pytest's summary line is one line.
_RULES_NAMED = 3


def assert_bn_healthy(
    model: nn.Module, batches: Iterable[Any], baseline: Report | str | Path | None = None, **thresholds: Any
) -> CheckReport:
    """Run `bn-inspect check` on ``model`` and ``batches``; raise AssertionError with its table if it fails.

    Args:
        model: the model (left unchanged, as by check_model).
        batches: real data: tensors, dicts of tensors, (inputs, targets) pairs or a DataLoader.
        baseline: a known-good Report, or the path of a JSON report (``inspect --format json``,
            ``check --write-baseline``): adds the BN3xx drift rules.
        **thresholds: check's settings by their [tool.bn-inspect] names with underscores
            (departure_warning=0.6, ignore=["BN106"], fail_on="warning", max_drift=0.2, ...); the
            project's pyproject.toml is not read, so a test says what it checks.

    Returns:
        The CheckReport, when it passed.

    Raises:
        AssertionError: a finding reached fail_on; the message is the verdict line, then check's table.
        TypeError: a keyword that is no threshold (the message lists the valid ones).
        BnInspectError: the check could not run (no normalization layers, data that does not fit, ...).
    """
    from bn_inspect.analyses.checking import check_gate, check_model
    from bn_inspect.output.formats import Rendering, TableFormatter
    from bn_inspect.report.baseline import Baseline
    from bn_inspect.report.reading import load_report

    unknown = sorted(set(thresholds) - set(THRESHOLD_KEYWORDS))
    if unknown:
        raise TypeError(
            f"assert_bn_healthy() got unexpected keyword(s) {', '.join(unknown)}; "
            f"the thresholds are {', '.join(THRESHOLD_KEYWORDS)}"
        )
    gate = check_gate(thresholds, config=CheckConfig())
    known_good = load_report(Path(baseline)) if isinstance(baseline, (str, Path)) else baseline
    result = check_model(
        model,
        batches,
        thresholds=gate.thresholds,
        fail_on=gate.fail_on,
        ignore=gate.ignore,
        baseline=None if known_good is None else Baseline(known_good, gate.tolerance),
    )
    if not result.passed:
        table = TableFormatter().text(result, Rendering(width=_TABLE_WIDTH))
        raise AssertionError(f"{verdict_line(result)}\n\n{table}")
    return result


def verdict_line(result: CheckReport) -> str:
    """``bn-inspect check FAILED: 2 errors (BN201 shifted in features.1 and features.4)``: the verdict on one line.

    The findings that reached fail_on are counted and named, one rule at a time, the most severe
    first; past three rules the rest are counted.
    """
    from bn_inspect.output.grouped import grouped_findings, listed_names
    from bn_inspect.output.words import counted

    if result.passed:
        return "bn-inspect check PASSED"
    nouns = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "note"}
    tally = [counted(sum(f.severity == s for f in result.failed), noun) for s, noun in nouns.items()]
    groups = grouped_findings(result.failed)
    named = [
        f"{group.first.code} {group.first.rule} in {listed_names([label.inert() for label in group.labels], 60)}"
        for group in groups[:_RULES_NAMED]
    ]
    if len(groups) > _RULES_NAMED:
        named.append(f"and {counted(len(groups) - _RULES_NAMED, 'more rule')}")
    counts = " and ".join(part for part in tally if not part.startswith("0 "))
    return f"bn-inspect check FAILED: {counts} ({'; '.join(named)})"
