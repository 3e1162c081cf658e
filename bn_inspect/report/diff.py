"""Two inspection reports compared layer by layer: what `bn-inspect diff` and check's BN3xx rules measure.

Per layer call present in both (matched by qualified name and call index), per channel c:

* ``running_mean_change[c] = (new running_mean - old running_mean) / sqrt(old running_var + eps)``:
  how many OLD running standard deviations the stored mean moved;
* ``running_var_ratio[c] = new running_var / old running_var`` (both unbiased, as PyTorch keeps them);
* ``batch_mean_change[c] = (new batch_mean - old batch_mean) / sqrt(old batch_var + eps)``: the
  same for what the data did at the layer, in OLD batch standard deviations;
* ``batch_var_ratio[c] = new batch_var / old batch_var``, with the biased batch variance (what
  BatchNorm normalizes with).

Both are report/shift.py's shift z and var ratio with OLD in the place of the running statistics,
so its NaN policy holds: a channel whose change is undefined is NaN and makes its layer beyond
any tolerance. A layer call in one report only is added or removed, unless a layer of the same
type, channel count and input shape sits at the same place in the other (between the same matched
layers): then it was renamed. Structural changes (added, removed, renamed, channel count) are
always beyond the tolerance.

What changed at a layer call beyond the tolerance (``LayerChange.changed``) separates cause from
consequence: ``stored`` when its running statistics moved; ``downstream-input`` when only the
batch statistics on the data moved and a layer before it in execution order changed its stored
statistics or its structure (added, removed, other channel count), which changes every input after
it; ``input`` when only the batch statistics moved and nothing before it changed that bn-inspect
compares (other data, or weights it does not compare: convolutions, linear layers, BatchNorm's own
weight and bias); ``structure`` when added, removed or of another channel count; ``normalization``
when it normalizes with batch statistics on one side and running ones on the other (a model
exported in training mode), whatever the numbers.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from bn_inspect.report import shift
from bn_inspect.report.comparability import comparability_notes
from bn_inspect.report.departure import Thresholds, departure
from bn_inspect.report.display import NotebookDisplay
from bn_inspect.report.records import SCHEMA_VERSION, InputInfo, LayerReport, ModelInfo, Report, json_ready
from bn_inspect.text import Untrusted

Floats = tuple[float, ...]

UNCHANGED, WITHIN, CHANGED, ADDED, REMOVED, RENAMED, CHANNELS = (
    "unchanged",
    "within-tolerance",
    "changed",
    "added",
    "removed",
    "renamed",
    "channels",
)
STRUCTURAL = (ADDED, REMOVED, RENAMED, CHANNELS)
STORED, DOWNSTREAM_INPUT, INPUT, STRUCTURE = "stored", "downstream-input", "input", "structure"
# What the layer normalizes with (running or batch statistics) differs: a change of what it computes.
NORMALIZATION = "normalization"


@dataclass(frozen=True)
class Tolerance:
    """How far statistics may move before a comparison fails.

    Attributes:
        max_mean_change: |mean change| (in OLD standard deviations) above this is beyond.
        max_var_ratio: a var ratio (new / old) outside [1 / R, R] is beyond.
    """

    max_mean_change: float = 0.5
    max_var_ratio: float = 1.5

    def describe(self) -> str:
        """The tolerance as one phrase."""
        return (
            f"|mean change| ≤ {self.max_mean_change:g} old std and var ratio within "
            f"[{1 / self.max_var_ratio:.3g}, {self.max_var_ratio:.3g}]"
        )

    def size(self, mean_changes: Sequence[float] | None, var_ratios: Sequence[float] | None) -> float:
        """How far past the tolerance the worst channel is: 1.0 at the tolerance, NaN counted as infinite."""
        worst = 0.0
        largest = shift.max_abs(mean_changes)
        if largest is not None:
            worst = max(worst, _past(_nan_as_inf(largest), self.max_mean_change))
        ratio = shift.worst_ratio(var_ratios)
        if ratio is not None:
            log_ratio = abs(math.log(ratio)) if 0 < ratio < math.inf else math.inf
            worst = max(worst, _past(log_ratio, math.log(self.max_var_ratio)))
        return worst


def _past(value: float, bound: float) -> float:
    """value / bound; a zero bound (a tolerance of 0, a ratio of exactly 1) allows exactly no change."""
    if bound:
        return value / bound
    return math.inf if value else 0.0


def _nan_as_inf(value: float) -> float:
    return math.inf if math.isnan(value) else value


@dataclass(frozen=True)
class StatChange:
    """How one kind of statistics (running, or batch on the data) moved, per channel."""

    mean_change: Floats
    var_ratio: Floats

    @property
    def max_abs_mean_change(self) -> float | None:
        """The largest |mean change| over channels (NaN if any is NaN)."""
        return shift.max_abs(self.mean_change)

    @property
    def worst_var_ratio(self) -> float | None:
        """The var ratio farthest from 1 on a log scale (NaN if any is NaN)."""
        return shift.worst_ratio(self.var_ratio)


@dataclass(frozen=True)
class LayerChange:
    """One layer call compared: matched, renamed, added, removed, or of another channel count.

    Attributes:
        old: its label (name#call past the first call) in OLD; None when added.
        new: its label in NEW; None when removed.
        status: unchanged (stored statistics bitwise equal), within-tolerance (they moved, within the
            tolerance), changed (beyond it, or what it normalizes with changed), added, removed,
            renamed or channels.
        position: its index in execution order, in NEW (in OLD when removed).
        type: the layer's class name (NEW's, OLD's when removed).
        old_channels, new_channels: channel counts.
        running: how the running statistics moved (None without them in either report).
        batch: how the batch statistics on the data moved (None without them in either).
        old_verdict, new_verdict: "departs" or "matches" its running statistics on the data
            (report/departure.py), None where it cannot be judged (random input among them).
        size: Tolerance.size of the larger of both changes; infinite for structural changes.
        changed: what changed beyond the tolerance: stored, downstream-input, input, structure or
            normalization (see the module's docstring); None when nothing did, or the layer was only renamed.
        old_normalizes_with, new_normalizes_with: "running" or "batch" on each side (None when absent).
    """

    old: Untrusted | None
    new: Untrusted | None
    status: str
    position: int
    type: Untrusted
    old_channels: int | None
    new_channels: int | None
    running: StatChange | None
    batch: StatChange | None
    old_verdict: str | None
    new_verdict: str | None
    size: float
    changed: str | None = None
    old_normalizes_with: str | None = None
    new_normalizes_with: str | None = None

    @property
    def label(self) -> Untrusted:
        """How the layer is named to people: NEW's label, "A → B" when renamed, OLD's when removed."""
        if self.status == RENAMED and self.old is not None and self.new is not None:
            return Untrusted(f"{self.old.raw} → {self.new.raw}")
        return self.new or self.old or Untrusted("")

    @property
    def is_beyond(self) -> bool:
        """True when this layer's change exceeds the tolerance (every structural change does)."""
        return self.status in STRUCTURAL or self.status == CHANGED


# repr=False: NotebookDisplay's compact repr, not every per-channel list.
@dataclass(frozen=True, repr=False)
class DiffReport(NotebookDisplay):
    """OLD and NEW compared: every layer call, largest change first, and whether NEW is within tolerance.

    Attributes:
        old_model, new_model, old_input, new_input: what each report ran.
        old_mode, new_mode: eval or train.
        tolerance: what counts as beyond.
        layers: every layer call, sorted by size of change (largest first), then execution order.
        first_changed: label of the first layer in execution order whose change is beyond.
        notes: why the two reports may not be comparable (other data, mode, dtype, versions).
    """

    old_model: ModelInfo
    new_model: ModelInfo
    old_input: InputInfo
    new_input: InputInfo
    old_mode: Untrusted
    new_mode: Untrusted
    tolerance: Tolerance
    layers: tuple[LayerChange, ...]
    first_changed: Untrusted | None
    notes: tuple[str, ...] = ()
    schema_version: int = field(default=SCHEMA_VERSION)

    @property
    def beyond(self) -> tuple[LayerChange, ...]:
        """The layer calls whose change exceeds the tolerance."""
        return tuple(layer for layer in self.layers if layer.is_beyond)

    @property
    def passed(self) -> bool:
        """True when no layer changed beyond the tolerance."""
        return not self.beyond

    @property
    def headline(self) -> str:
        """What changed, cause first: "1 layer's stored statistics changed; 20 downstream inputs changed"."""
        text = what_changed(self.layers)
        return text[0].upper() + text[1:]

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready document of kind "diff"; non-finite floats become "nan", "inf" or "-inf"."""
        layers = []
        for layer in self.layers:
            entry = asdict(layer)
            entry["is_beyond"] = layer.is_beyond
            for kind in ("running", "batch"):
                change = getattr(layer, kind)
                if change is not None:
                    entry[kind]["max_abs_mean_change"] = change.max_abs_mean_change
                    entry[kind]["worst_var_ratio"] = change.worst_var_ratio
            layers.append(entry)
        document = {
            "schema_version": self.schema_version,
            "kind": "diff",
            "old": {"model": asdict(self.old_model), "input": asdict(self.old_input), "mode": self.old_mode},
            "new": {"model": asdict(self.new_model), "input": asdict(self.new_input), "mode": self.new_mode},
            "tolerance": asdict(self.tolerance),
            "passed": self.passed,
            "headline": self.headline,
            "first_changed": self.first_changed,
            "notes": list(self.notes),
            "layers": layers,
        }
        return json_ready(document)  # type: ignore[no-any-return]


def running_change(old: LayerReport, new: LayerReport) -> StatChange | None:
    """How the running statistics moved from ``old`` to ``new`` (None when either lacks them)."""
    if old.running_mean is None or old.running_var is None or new.running_mean is None or new.running_var is None:
        return None
    eps = old.eps or 0.0
    return StatChange(
        shift.mean_shift_z(new.running_mean, old.running_mean, old.running_var, eps),
        shift.var_ratio(new.running_var, old.running_var),
    )


def batch_change(old: LayerReport, new: LayerReport) -> StatChange | None:
    """How the batch statistics on the data moved (None when either run has none)."""
    if old.batch_mean is None or old.batch_var is None or new.batch_mean is None or new.batch_var is None:
        return None
    eps = old.eps or 0.0
    return StatChange(
        shift.mean_shift_z(new.batch_mean, old.batch_mean, old.batch_var, eps),
        shift.var_ratio(new.batch_var, old.batch_var),
    )


def _verdict(layer: LayerReport, thresholds: Thresholds) -> str | None:
    found = departure(layer, thresholds)
    if found is None:
        return None
    return "departs" if found.departs else "matches"


def _compared(
    old: LayerReport, new: LayerReport, position: int, tolerance: Tolerance, thresholds: Thresholds, *, renamed: bool
) -> LayerChange:
    """A layer call present in both reports (or renamed), its changes measured."""
    same_channels = old.num_channels == new.num_channels
    running = running_change(old, new) if same_channels else None
    batch = batch_change(old, new) if same_channels else None
    running_size, batch_size = (tolerance.size(c.mean_change, c.var_ratio) if c else 0.0 for c in (running, batch))
    size = max(running_size, batch_size)
    uses = old.normalizes_with != new.normalizes_with
    quiet = UNCHANGED if (old.running_mean, old.running_var) == (new.running_mean, new.running_var) else WITHIN
    status = CHANNELS if not same_channels else RENAMED if renamed else CHANGED if size > 1 or uses else quiet
    # Until diff_layers knows what ran before it, a change of the input alone counts as INPUT.
    beyond = NORMALIZATION if uses else STORED if running_size > 1 else INPUT if batch_size > 1 else None
    changed = STRUCTURE if not same_channels else beyond
    return LayerChange(
        old=old.label,
        new=new.label,
        status=status,
        position=position,
        type=new.type,
        old_channels=old.num_channels,
        new_channels=new.num_channels,
        running=running,
        batch=batch,
        old_verdict=_verdict(old, thresholds),
        new_verdict=_verdict(new, thresholds),
        size=math.inf if status in STRUCTURAL or uses else size,
        changed=changed,
        old_normalizes_with=old.normalizes_with,
        new_normalizes_with=new.normalizes_with,
    )


def _alone(layer: LayerReport, position: int, status: str) -> LayerChange:
    """A layer call in one report only."""
    is_new = status == ADDED
    return LayerChange(
        old=None if is_new else layer.label,
        new=layer.label if is_new else None,
        status=status,
        position=position,
        type=layer.type,
        old_channels=None if is_new else layer.num_channels,
        new_channels=layer.num_channels if is_new else None,
        running=None,
        batch=None,
        old_verdict=None,
        new_verdict=None,
        size=math.inf,
        changed=STRUCTURE,
    )


def _slots(layers: Sequence[LayerReport], matched: set[Untrusted]) -> dict[Untrusted, Untrusted | None]:
    """For each unmatched layer call, the label of the last matched call before it: its place."""
    place: Untrusted | None = None
    slots = {}
    for layer in layers:
        if layer.label in matched:
            place = layer.label
        else:
            slots[layer.label] = place
    return slots


def _shape_key(layer: LayerReport) -> tuple[Untrusted, int | None, tuple[int, ...] | None]:
    return layer.type, layer.num_channels, layer.input_shape


def _renames(
    old: Sequence[LayerReport], new: Sequence[LayerReport], matched: set[Untrusted]
) -> dict[Untrusted, Untrusted]:
    """OLD label -> NEW label for layer calls that sit at the same place, with the same type,
    channel count and input shape, in execution order.

    Each OLD call takes the first NEW call not yet taken with its place and shape: the NEW calls are
    queued by (place, shape) in execution order, so matching costs one dictionary look-up per call.
    """
    old_slots, new_slots = _slots(old, matched), _slots(new, matched)
    waiting: dict[tuple[Untrusted | None, tuple[Untrusted, int | None, tuple[int, ...] | None]], deque[Untrusted]] = {}
    by_label = {layer.label: layer for layer in new}
    for label, slot in new_slots.items():
        waiting.setdefault((slot, _shape_key(by_label[label])), deque()).append(label)
    renames = {}
    for layer in old:
        if layer.label not in old_slots:
            continue
        queue = waiting.get((old_slots[layer.label], _shape_key(layer)))
        if queue:
            renames[layer.label] = queue.popleft()
    return renames


def diff_layers(
    old: Sequence[LayerReport], new: Sequence[LayerReport], tolerance: Tolerance, thresholds: Thresholds
) -> list[LayerChange]:
    """Every layer call of ``old`` and ``new`` compared, in execution order (NEW's, then OLD's removed calls)."""
    old_by_label = {layer.label: layer for layer in old}
    matched = {layer.label for layer in new} & set(old_by_label)
    renames = _renames(old, new, matched)
    renamed_to = {b: a for a, b in renames.items()}
    changes = []
    for position, layer in enumerate(new):
        if layer.label in matched:
            changes.append(_compared(old_by_label[layer.label], layer, position, tolerance, thresholds, renamed=False))
        elif layer.label in renamed_to:
            before = old_by_label[renamed_to[layer.label]]
            changes.append(_compared(before, layer, position, tolerance, thresholds, renamed=True))
        else:
            changes.append(_alone(layer, position, ADDED))
    for position, layer in enumerate(old):
        if layer.label not in matched and layer.label not in renames:
            changes.append(_alone(layer, position, REMOVED))
    return _downstream(changes)


def _execution_order(change: LayerChange) -> tuple[int, bool]:
    """Execution order across both reports: a removed call sits after the NEW call at its index."""
    return change.position, change.status == REMOVED


def _downstream(changes: list[LayerChange]) -> list[LayerChange]:
    """``changes`` with each INPUT change after a stored or structural one in execution order made DOWNSTREAM_INPUT."""
    causes = [_execution_order(c) for c in changes if c.changed in (STORED, STRUCTURE, NORMALIZATION)]
    if not causes:
        return changes
    first_cause = min(causes)
    return [
        replace(c, changed=DOWNSTREAM_INPUT) if c.changed == INPUT and _execution_order(c) > first_cause else c
        for c in changes
    ]


def first_changed(changes: Sequence[LayerChange]) -> LayerChange | None:
    """The first change beyond the tolerance in execution order (a removed call after a NEW one at its index)."""
    beyond = sorted((c for c in changes if c.is_beyond), key=_execution_order)
    return beyond[0] if beyond else None


def _layers(number: int, what: str) -> str:
    """``1 layer's stored statistics``, ``3 layers' stored statistics``."""
    return f"{number:,} layer's {what}" if number == 1 else f"{number:,} layers' {what}"


def _inputs(number: int, adjective: str = "") -> str:
    """``1 downstream input``, ``20 downstream inputs``."""
    return f"{number:,} {adjective}input{'' if number == 1 else 's'}".strip()


def what_changed(changes: Sequence[LayerChange]) -> str:
    """What changed beyond the tolerance, cause first: "1 layer's stored statistics changed; 20 downstream inputs changed".

    Says only what the two reports can tell: without batch statistics on either side (stored state
    only, as check --baseline --no-data), that inputs were not compared.
    """
    count = {what: sum(c.changed == what for c in changes) for what in (STORED, DOWNSTREAM_INPUT, INPUT)}
    structure = {status: sum(c.status == status for c in changes) for status in STRUCTURAL}
    parts = []
    for uses, other in (("batch", "running"), ("running", "batch")):
        number = sum(c.changed == NORMALIZATION and c.new_normalizes_with == uses for c in changes)
        if number:
            verb = "layer normalizes" if number == 1 else "layers normalize"
            parts.append(f"{number:,} {verb} with {uses} statistics in NEW, {other} in OLD")
    if count[STORED]:
        parts.append(f"{_layers(count[STORED], 'stored statistics')} changed")
    for status, said in ((ADDED, "added"), (REMOVED, "removed"), (RENAMED, "renamed")):
        if structure[status]:
            parts.append(f"{structure[status]:,} layer{'' if structure[status] == 1 else 's'} {said}")
    if structure[CHANNELS]:
        parts.append(f"{_layers(structure[CHANNELS], 'channel count')} changed")
    if count[DOWNSTREAM_INPUT]:
        parts.append(f"{_inputs(count[DOWNSTREAM_INPUT], 'downstream ')} changed")
    if count[INPUT]:
        them = "it" if count[INPUT] == 1 else "them"
        parts.append(f"{_inputs(count[INPUT])} changed with no stored or structural change before {them}")
    has_inputs = any(c.batch is not None for c in changes)
    within = sum(c.status == WITHIN for c in changes)
    if within and parts:
        parts.append(f"{_layers(within, 'stored statistics')} changed within the tolerance")
    elif within:
        parts.append(
            f"stored statistics changed in {within:,} layer{'' if within == 1 else 's'}, all within the tolerance"
        )
    elif not parts:
        parts.append("no layer's stored statistics changed" + (" and no input changed" if has_inputs else ""))
    if not has_inputs:
        parts.append("inputs not compared (no batch statistics on the data)")
    return "; ".join(parts)


def diff_reports(
    old: Report, new: Report, tolerance: Tolerance | None = None, thresholds: Thresholds | None = None
) -> DiffReport:
    """Compare ``new`` with ``old`` layer by layer.

    Args:
        old: the known-good report.
        new: the report to judge.
        tolerance: how far statistics may move (defaults: Tolerance()).
        thresholds: what makes a layer depart from its running statistics, for the verdicts.

    Returns:
        The DiffReport, layers sorted by size of change (largest first, then execution order).
    """
    changes = diff_layers(old.layers, new.layers, tolerance or Tolerance(), thresholds or Thresholds())
    # On random input no layer departs or matches (as inspect and check do not judge it).
    random = (old.input.is_random, new.input.is_random)
    changes = [replace(c, old_verdict=None) if random[0] else c for c in changes]
    changes = [replace(c, new_verdict=None) if random[1] else c for c in changes]
    first = first_changed(changes)
    return DiffReport(
        old_model=old.model,
        new_model=new.model,
        old_input=old.input,
        new_input=new.input,
        old_mode=old.mode,
        new_mode=new.mode,
        tolerance=tolerance or Tolerance(),
        layers=tuple(sorted(changes, key=lambda c: (-_nan_as_inf(c.size), c.position))),
        first_changed=first.label if first else None,
        notes=tuple(comparability_notes(old, new)),
    )
