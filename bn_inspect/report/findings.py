"""What a check produces: the rule table, findings and the CheckReport (plain values); Thresholds live in report/departure.py."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from bn_inspect.options import FailOn
from bn_inspect.report.departure import Thresholds as Thresholds  # its old home: callers import it from here
from bn_inspect.report.departure import departure
from bn_inspect.report.display import NotebookDisplay
from bn_inspect.report.records import SCHEMA_VERSION, InputInfo, ModelInfo, Report, json_ready
from bn_inspect.report.small_batch import estimate_beside, first_layer_departure
from bn_inspect.text import Untrusted


class Severity(str, Enum):
    """How bad a finding is; --fail-on picks the lowest that fails the gate."""

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def rank(self) -> int:
        """0 for info, 1 for warning, 2 for error."""
        return ("info", "warning", "error").index(self.value)


@dataclass(frozen=True)
class Rule:
    """A rule's stable code, short name, default severity and what it is about."""

    code: str
    name: str
    severity: Severity
    summary: str


RULES = {
    rule.code: rule
    for rule in (
        Rule("BN101", "nonfinite-state", Severity.ERROR, "running mean/var, weight or bias holds NaN or Inf"),
        Rule("BN102", "nonpositive-running-var", Severity.ERROR, "running variance is zero or negative"),
        Rule("BN103", "eps-dominated", Severity.WARNING, "running variance below eps/10: eps dominates normalization"),
        Rule("BN104", "untrained", Severity.WARNING, "statistics never trained (num_batches_tracked 0, stats 0 and 1)"),
        Rule("BN105", "momentum", Severity.WARNING, "momentum >= 0.5 (ported from Keras/TF?) or 0 (statistics frozen)"),
        Rule("BN106", "cumulative-average", Severity.INFO, "momentum None: running stats are a cumulative average"),
        Rule("BN107", "train-mode", Severity.WARNING, "saved in train mode, or train and eval layers mixed"),
        Rule(
            "BN108",
            "frozen-but-updating",
            Severity.WARNING,
            "affine frozen (requires_grad False) but layer in train mode",
        ),
        Rule(
            "BN109",
            "low-precision-buffers",
            Severity.WARNING,
            "buffers in float16/bfloat16, or running var above fp16 max",
        ),
        Rule("BN110", "batch-stats-in-eval", Severity.WARNING, "no running buffers: eval output depends on the batch"),
        Rule("BN111", "rank-divergence", Severity.WARNING, "running statistics differ between distributed ranks"),
        Rule(
            "BN112",
            "exported-training-mode",
            Severity.ERROR,
            "exported in training mode: every inference batch is normalized with its own statistics",
        ),
        Rule(
            "BN113",
            "qat-frozen-bn",
            Severity.INFO,
            "QAT fused module with freeze_bn: running statistics frozen, and used in train mode too",
        ),
        Rule("BN114", "few-batches-tracked", Severity.WARNING, "running statistics saw only 1 to 20 batches"),
        Rule("BN201", "shifted", Severity.ERROR, "the data departs from the running statistics (departure score)"),
        Rule("BN202", "dead-channels", Severity.WARNING, "channels with zero batch variance on the data"),
        Rule("BN203", "few-values", Severity.WARNING, "too few values per channel for trustworthy statistics"),
        Rule("BN204", "nonfinite-batch", Severity.ERROR, "the layer's input holds NaN or Inf on the data"),
        Rule(
            "BN205",
            "small-batch-statistics",
            Severity.WARNING,
            "running variances lack the between-sample spread: statistics from batches of 3 samples or fewer",
        ),
        Rule("BN301", "running-drift", Severity.ERROR, "running statistics moved beyond tolerance since --baseline"),
        Rule(
            "BN302",
            "data-drift",
            Severity.ERROR,
            "batch statistics on the data drifted since --baseline, model unchanged",
        ),
        Rule("BN303", "layers-changed", Severity.ERROR, "layers added, removed, renamed or resized since --baseline"),
        Rule("BN401", "bias-before-bn", Severity.INFO, "a Conv/Linear bias directly before BatchNorm is redundant"),
        Rule(
            "BN402",
            "unfoldable-bn",
            Severity.INFO,
            "BatchNorm with nothing to fold into (warning with --precision)",
        ),
        Rule(
            "BN403",
            "fold-precision",
            Severity.WARNING,
            "with --precision: statistics or folded weights overflow, vanish or lose precision in that format",
        ),
        Rule(
            "BN404",
            "fold-output-change",
            Severity.WARNING,
            "with --precision and data: folding BatchNorm changes a layer's or the model's output",
        ),
        # Watch events (bn_inspect.watch): found during training, at a step.
        Rule("BN501", "nonfinite-during-training", Severity.ERROR, "a NaN or Inf appeared in a layer during training"),
        Rule("BN502", "stats-not-moving", Severity.WARNING, "running statistics do not move in training mode"),
        Rule("BN503", "half-frozen", Severity.WARNING, "affine frozen while statistics update, or the reverse"),
        Rule("BN504", "ranks-diverging", Severity.WARNING, "running buffers differ across ranks during training"),
        Rule("BN505", "few-values-training", Severity.WARNING, "too few values per channel per training batch"),
        Rule("BN506", "lagging-stats", Severity.WARNING, "running statistics stay far from the recent batches"),
    )
}


# What a finding on the whole model (no layer) is called in a table or a JUnit case.
MODEL_LABEL = Untrusted("(model)")


@dataclass(frozen=True)
class Finding:
    """One rule firing on one layer (or on the whole model, layer None).

    ``cause`` is the likely cause's code (report/causes.py) and ``cause_sentence`` the pattern that
    named it; both None where no cause follows.
    """

    code: str
    rule: str
    severity: Severity
    layer: Untrusted | None
    call: int | None
    channels: tuple[int, ...]
    message: str
    cause: str | None = None
    cause_sentence: str | None = None

    @property
    def label(self) -> Untrusted:
        """The layer as shown to people: name, with #call past the first call."""
        if self.layer is None:
            return MODEL_LABEL
        return self.layer if not self.call else Untrusted(f"{self.layer.raw}#{self.call}")


def departing_past_error(findings: Iterable[Finding]) -> set[str]:
    """The layer calls BN201 finds past the error level (BN205 reads its estimate off the others)."""
    return {f.label.raw for f in findings if f.code == "BN201" and f.severity is Severity.ERROR}


# repr=False: NotebookDisplay's compact repr, not every per-channel list.
@dataclass(frozen=True, repr=False)
class CheckReport(NotebookDisplay):
    """Findings of one `check` run and what they were measured against."""

    model: ModelInfo
    input: InputInfo | None
    mode: Untrusted
    thresholds: Thresholds
    fail_on: FailOn
    findings: tuple[Finding, ...]
    layers: tuple[Untrusted, ...]
    notes: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()
    first_divergent: Untrusted | None = None
    schema_version: int = field(default=SCHEMA_VERSION)
    # The inspection the data rules judged (None without data): what --write-baseline records.
    inspection: Report | None = field(default=None, compare=False, repr=False)

    @property
    def failed(self) -> tuple[Finding, ...]:
        """Findings at or above --fail-on."""
        limit = Severity(self.fail_on.value).rank
        return tuple(f for f in self.findings if f.severity.rank >= limit)

    @property
    def passed(self) -> bool:
        """True when no finding reaches --fail-on."""
        return not self.failed

    def to_dataframe(self) -> Any:
        """A pandas DataFrame with one row per finding."""
        import pandas as pd

        columns = ["code", "rule", "severity", "layer", "call", "channels", "message"]
        return pd.DataFrame(self.to_dict()["findings"], columns=columns)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data: findings, thresholds, the verdict; non-finite floats become "nan", "inf" or "-inf"."""
        document = {
            "schema_version": self.schema_version,
            "kind": "check",
            "model": asdict(self.model),
            "input": asdict(self.input) if self.input else None,
            "mode": self.mode,
            "thresholds": asdict(self.thresholds),
            "fail_on": self.fail_on.value,
            "ignored": list(self.ignored),
            "passed": self.passed,
            "first_divergent": self.first_divergent,
            "layers": list(self.layers),
            "notes": list(self.notes),
            "findings": [
                {
                    "code": f.code,
                    "rule": f.rule,
                    "severity": f.severity.value,
                    "layer": f.layer,
                    "call": f.call,
                    "channels": list(f.channels),
                    "message": f.message,
                    "cause": f.cause,
                    "cause_sentence": f.cause_sentence,
                }
                for f in self.findings
            ],
            "departures": self._departures(),
            "small_batch": self._small_batch(),
        }
        return json_ready(document)  # type: ignore[no-any-return]

    def _small_batch(self) -> dict[str, Any] | None:
        """BN205's estimate (report/small_batch.py) where one was made, fired or not."""
        if self.inspection is None:
            return None
        found = estimate_beside(self.inspection.layers, departing_past_error(self.findings))
        if found is None:
            return None
        return {
            "inverse_batch": found.inverse_batch,
            "noise": found.noise,
            "batch_size": found.batch_size,
            "fires": found.fires,
            "first_layer_departure": first_layer_departure(self.inspection.layers),
            "layers": [{"layer": gap.label, "share": gap.share, "excess": gap.excess} for gap in found.layers],
        }

    def _departures(self) -> list[dict[str, Any]]:
        """Each compared layer call's departure score and tier by this check's thresholds, in execution order."""
        if self.inspection is None:
            return []
        scored = [(layer, departure(layer, self.thresholds)) for layer in self.inspection.layers]
        return [
            {"layer": layer.label, "score": found.score, "tier": found.tier, "samples": found.samples}
            for layer, found in scored
            if found is not None
        ]  # type: ignore[no-any-return]
