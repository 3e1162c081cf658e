"""How counts read in every output for people: thousands separated, the noun singular only for one."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from bn_inspect.report.comparisons import ModeComparison
from bn_inspect.report.diff import CHANGED, DOWNSTREAM_INPUT, NORMALIZATION, STORED, WITHIN, LayerChange
from bn_inspect.report.records import LayerReport
from bn_inspect.text import Untrusted

# What the change column says for a layer whose statistics changed: what changed, not just that.
_CHANGED_WORD = {STORED: "stored", DOWNSTREAM_INPUT: "downstream"}
_MEANINGS = {
    "stored": "its running statistics moved",
    "downstream": "only its input on the data moved, after a stored or structural change earlier in execution order",
    "input": "only its input on the data moved, with no stored or structural change before it",
    "within tolerance": "its running statistics moved, within the tolerance",
    "uses batch": "it normalizes with batch statistics in NEW, with running ones in OLD",
    "uses running": "it normalizes with running statistics in NEW, with batch ones in OLD",
}

# Why a layer asked for with --layer has no per-channel table, by family.
_NO_CHANNELS = {
    "group": "its statistics are per sample and group of channels, not per channel",
    "layer": "its statistics are per sample or position, not per channel",
    "rms": "its statistics are per sample or position, not per channel",
}


def counted(number: int, noun: str) -> str:
    """``1 batch``, ``4,096 batches``, ``2 passes``."""
    plural = noun + ("es" if noun.endswith(("s", "ch")) else "s")
    return f"{number:,} {noun if number == 1 else plural}"


def image_details(preprocessing: Untrusted | None, num_skipped: int, skipped: tuple[Untrusted, ...]) -> list[str]:
    """What the input header adds for images: the preprocessing, and the files skipped as not decodable.

    Plain text with both in their inert form: each format escapes it further as its own text.
    """
    # Labelled: on its own, "normalize mean 0 std 0.94, grayscale" does not say it describes the input.
    said = [f"preprocessing: {preprocessing}"] if preprocessing else []
    if num_skipped:
        said.append(f"{counted(num_skipped, 'file')} skipped (not decodable), e.g. {skipped[0] if skipped else '?'}")
    return said


def change_word(layer: LayerChange) -> str:
    """A diff row's change: its status, with "changed" said as what changed (stored, input, downstream)."""
    if layer.status == WITHIN:
        return "within tolerance"
    if layer.changed == NORMALIZATION:
        return f"uses {layer.new_normalizes_with}"
    if layer.status != CHANGED:
        return layer.status
    return _CHANGED_WORD.get(layer.changed or "", "input")


def change_legend(layers: Sequence[LayerChange]) -> str:
    """What each change word in ``layers`` means ("" when none is used): `"stored": its running statistics moved`."""
    used = {change_word(layer) for layer in layers}
    return "; ".join(f'"{word}": {meaning}' for word, meaning in _MEANINGS.items() if word in used)


def batch_noise_sentence(comparison: ModeComparison, name: Callable[[Untrusted], str]) -> str:
    """compare-modes when the modes differ but no layer's data departs: what the difference is, and is not."""
    start = comparison.batch_noise_from
    opening = comparison.layer(start.raw) if start is not None else None
    scored = [layer for layer in comparison.layers if layer.departure is not None]
    largest = max(scored, key=lambda layer: layer.departure or 0.0) if scored else None
    per_batch = comparison.num_samples / comparison.num_batches if comparison.num_batches else 0
    said = (
        f"Train and eval mode differ from {name(start)} on (its output by {opening.output_rel_diff:.1%}), "
        if start is not None and opening is not None
        else "Train and eval mode differ, "
    )
    said += "but no layer's data departs from its running statistics"
    if largest is not None and largest.departure is not None:
        said += f" (largest departure {largest.departure:.3g}, {name(largest.label)})"
    return (
        said + f": the difference is train mode's per-batch statistics on batches of about {per_batch:.3g} samples "
        "(small or unshuffled batches), not a fault of the stored statistics. Eval mode is what the deployed model does."
    )


def no_channel_statistics(layer: LayerReport, name: Callable[[Untrusted], str]) -> str | None:
    """The one line that stands for a per-channel table where ``layer`` has none to show, else None.

    ``name`` writes the layer's label as the format needs it (escaped, code-quoted).
    """
    if layer.batch_mean or layer.running_mean:
        return None
    why = _NO_CHANNELS.get(layer.family, "it has neither batch nor running statistics")
    return f"{name(layer.label)} ({name(layer.type)}): no per-channel statistics ({why})."


def departing_after_sentence(names: Sequence[Untrusted], method: str) -> str:
    """What recalibrate says when layers' eval inputs still depart from their new statistics (inert)."""
    shown = ", ".join(name.inert() for name in names[:3]) + (", …" if len(names) > 3 else "")
    why = (
        "--method precise takes statistics in train mode, which deep layers do not see in eval; "
        "--method sequential is exact for eval"
        if method == "precise"
        else "a layer runs more than once per forward, or the data differs from pass to pass (see the notes)"
    )
    return (
        f"In eval mode on these data, {counted(len(names), 'layer')} ({shown}) still "
        f"{'departs' if len(names) == 1 else 'depart'} from the new statistics as check measures it: {why}."
    )
