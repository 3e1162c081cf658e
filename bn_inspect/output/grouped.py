"""Findings as people read them: the findings of one rule at one severity as one group with its layer list.

Presentation only: check's JSON and JUnit keep one finding per layer, for the machines that read them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bn_inspect.report.findings import Finding, Severity
from bn_inspect.text import Untrusted


@dataclass(frozen=True)
class FindingGroup:
    """The findings of one rule at one severity, in the order the check found them (execution order)."""

    findings: tuple[Finding, ...]

    @property
    def first(self) -> Finding:
        """The first finding of the group: the one whose message a group of differing messages shows."""
        return self.findings[0]

    @property
    def severity(self) -> Severity:
        """The severity all its findings share."""
        return self.first.severity

    @property
    def labels(self) -> tuple[Untrusted, ...]:
        """Each finding's layer (with #call past the first call), in order."""
        return tuple(finding.label for finding in self.findings)

    @property
    def is_alike(self) -> bool:
        """True when every finding says the same sentence, so one message speaks for all."""
        return len({finding.message for finding in self.findings}) == 1


def grouped_findings(findings: Sequence[Finding]) -> list[FindingGroup]:
    """One group per rule and severity, the most severe first, then in the order each group first appears."""
    groups: dict[tuple[int, str], list[Finding]] = {}
    for finding in sorted(findings, key=lambda f: -f.severity.rank):
        groups.setdefault((finding.severity.rank, finding.code), []).append(finding)
    return [FindingGroup(tuple(members)) for members in groups.values()]


def listed_names(names: Sequence[str], budget: int | None = None) -> str:
    """``a, b and c``; longer than ``budget`` characters, as many names as fit, then ``and 16 more``.

    One name at least is shown, two at least are counted ("and 1 more" would save nothing), and the
    full list is kept wherever the shortened one would be no shorter.
    """
    if len(names) <= 1:
        return "".join(names)
    full = ", ".join(names[:-1]) + " and " + names[-1]
    if budget is None or len(full) <= budget or len(names) == 2:
        return full

    def shortened(shown: int) -> str:
        return ", ".join(names[:shown]) + f" and {len(names) - shown:,} more"

    shown = 1
    while shown + 1 < len(names) - 1 and len(shortened(shown + 1)) <= budget:
        shown += 1
    short = shortened(shown)
    return short if len(short) < len(full) else full


def group_sentence(
    group: FindingGroup, name: Callable[[Untrusted], str], text: Callable[[str], str], budget: int | None = None
) -> str:
    """The group as one paragraph: its layers, then the message (the first layer's, where messages differ).

    ``name`` renders a layer label and ``text`` a message in the output's own escaping; ``budget``
    bounds the layer list in characters (None: the full list).
    """
    said = _with_cause(group.first, text)
    if len(group.findings) == 1:
        return said
    layers = listed_names([name(label) for label in group.labels], budget)
    if group.is_alike:
        return f"{layers}: {said}"
    return f"{layers}. In {name(group.first.label)}: {said}"


def _with_cause(finding: Finding, text: Callable[[str], str]) -> str:
    """The message, then the likely cause (report/causes.py) where the check named one."""
    said = text(finding.message) + "."
    if finding.cause and finding.cause_sentence:
        said += f" Likely cause, {finding.cause}: {text(finding.cause_sentence)}."
    return said
