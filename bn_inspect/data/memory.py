"""Will it fit: refuse a batch or an array larger than half the memory available, before allocating it."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from bn_inspect.errors import InputError


def available_memory_bytes() -> int:
    """Physical memory currently available, from the OS."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def check_fits_memory(shape: Sequence[int], itemsize: int) -> None:
    """Refuse, before allocating, a batch that would take more than half the available memory."""
    needed = math.prod(shape) * itemsize
    available = available_memory_bytes()
    if needed > available // 2:
        raise InputError(
            f"one batch of shape {tuple(shape)} needs {needed / 2**30:,.1f} GiB, more than half of the "
            f"{available / 2**30:,.1f} GiB of memory available",
            "Use a smaller batch (first dim of --shape, or --batch-size)",
        )
