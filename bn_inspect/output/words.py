"""How counts read in every output for people: thousands separated, the noun singular only for one."""

from __future__ import annotations

from collections.abc import Sequence

from bn_inspect.text import Untrusted


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


def past_limits_sentence(names: Sequence[Untrusted], method: str) -> str:
    """What recalibrate says when layers still sit past check's limits in eval mode after it (inert)."""
    shown = ", ".join(name.inert() for name in names[:3]) + (", …" if len(names) > 3 else "")
    why = (
        "--method precise takes statistics in train mode, which deep layers do not see in eval; "
        "--method sequential is exact for eval"
        if method == "precise"
        else "a layer runs more than once per forward, or the data differs from pass to pass (see the notes)"
    )
    return (
        f"In eval mode on these data, {counted(len(names), 'layer')} ({shown}) still "
        f"{'sits' if len(names) == 1 else 'sit'} past the "
        f"limits check uses: {why}."
    )
