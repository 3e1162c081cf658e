"""How counts read in every output for people: thousands separated, the noun singular only for one."""

from __future__ import annotations


def counted(number: int, noun: str) -> str:
    """``1 batch``, ``4,096 batches``, ``2 passes``."""
    plural = noun + ("es" if noun.endswith(("s", "ch")) else "s")
    return f"{number:,} {noun if number == 1 else plural}"
