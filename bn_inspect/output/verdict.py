"""inspect's verdict: which layer's data departs first from its running statistics, judged as check judges it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bn_inspect.report.causes import model_cause
from bn_inspect.report.departure import Thresholds, departure
from bn_inspect.report.records import Report
from bn_inspect.text import Untrusted, inert


@dataclass(frozen=True)
class Verdict:
    """One sentence and what it says: "departs", "within", "random" or "nothing to compare"."""

    outcome: str
    sentence: str


def inspection_verdict(
    report: Report,
    name: Callable[[Untrusted], str],
    thresholds: Thresholds | None = None,
    text: Callable[[str], str] = inert,
) -> Verdict:
    """The verdict on ``report`` by check's thresholds (its defaults unless given).

    Args:
        report: the inspection.
        name: how a layer's label is written (escaped for a terminal, code-quoted for Markdown).
        thresholds: the limits of "departs" (report/departure.py).
        text: how a cause's sentence is written (it may quote a layer name): escaped by the output's kind.
    """
    limits = thresholds or Thresholds()
    scored = [(layer, found) for layer in report.layers if (found := departure(layer, limits)) is not None]
    if not scored and report.input.num_samples == 0:
        return Verdict(
            "nothing to compare", "Every batch was empty (0 samples): there are no batch statistics to compare."
        )
    if not scored:
        return Verdict("nothing to compare", "No layer keeps running statistics to compare the batch with.")
    if report.input.is_random:
        return Verdict(
            "random",
            "Random input says nothing about the running statistics (on it every layer may look shifted): "
            "pass real data with --input to see which layer departs from them first.",
        )
    worst_layer, worst = report.worst_departure(limits) or scored[0]
    departed = [(layer, found) for layer, found in scored if found.departs]
    if not departed:
        return Verdict(
            "within",
            f"No layer departs from its running statistics ({limits.departure_limits()}); largest departure: "
            f"{name(worst_layer.label)}, {worst.score:.3g}.",
        )
    first, found = departed[0]
    sentence = (
        f"First departure from the running statistics, in execution order: {name(first.label)}: {found.describe()}."
    )
    if worst_layer is not first:
        sentence += f" The largest: {name(worst_layer.label)}, departure {worst.score:.3g} ({worst.tier})."
    cause = model_cause(report, (), {layer.label.raw for layer, _ in departed})
    if cause is not None:
        sentence += f" Likely cause, {cause.code}: {text(cause.sentence)}."
    return Verdict("departs", sentence)
