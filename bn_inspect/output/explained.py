"""How each layer's statistics were computed, with the layers that share a pattern said once.

A ResNet-50 has 53 batch norms but about 20 distinct reductions: every block of a stage gives its
norms the same input shape, so their sentences differ only in the name. A sentence here names the
layers of one pattern (the first two and a count where there are more) and then says, once, what
each of them got, which axes it reduced and over how many values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bn_inspect.report.records import LayerReport
from bn_inspect.text import Untrusted

# A group of more layers than this names its first two and counts the rest.
MAX_NAMED = 3


@dataclass(frozen=True)
class ExplanationGroup:
    """Layer calls whose explanations are the same sentence but for the name.

    Attributes:
        layers: the calls, in execution order.
        rest: the sentence after the name (for one call, its whole explanation after the label).
    """

    layers: tuple[LayerReport, ...]
    rest: str

    @property
    def is_shortened(self) -> bool:
        """True when the sentence leaves some of its layers unnamed."""
        return len(self.layers) > MAX_NAMED


def _after_label(layer: LayerReport) -> str | None:
    """The explanation after ``label (Type) got``, or None where it does not open that way (a report file's)."""
    opening = f"{layer.label.raw} ({layer.type.raw}) got "
    text = layer.explanation.raw
    return text[len(opening) :] if text.startswith(opening) else None


def explanation_groups(layers: Sequence[LayerReport]) -> list[ExplanationGroup]:
    """``layers`` grouped by their explanation without the name, in the order each pattern first ran.

    Layers of different types never share a group; an explanation that does not open with the
    layer's label and type stays alone.
    """
    grouped: dict[tuple[str, str] | int, list[LayerReport]] = {}
    for index, layer in enumerate(layers):
        rest = _after_label(layer)
        key: tuple[str, str] | int = index if rest is None else (layer.type.raw, rest)
        grouped.setdefault(key, []).append(layer)
    return [
        ExplanationGroup(tuple(members), key[1] if isinstance(key, tuple) else members[0].explanation.raw)
        for key, members in grouped.items()
    ]


def explanation_sentence(group: ExplanationGroup, name: Callable[[Untrusted], str]) -> str:
    """The group's sentence: one layer's own, or ``a, b and 7 more (Type) each got ...``.

    ``name`` writes a label or a type as the output needs it (escaped for a terminal).
    """
    first = group.layers[0]
    if len(group.layers) == 1:
        return name(first.explanation)
    names = [name(layer.label) for layer in group.layers]
    if group.is_shortened:
        listed = f"{', '.join(names[:2])} and {len(names) - 2:,} more"
    else:
        listed = f"{', '.join(names[:-1])} and {names[-1]}"
    return f"{listed} ({name(first.type)}) each got {name(Untrusted(group.rest))}"
