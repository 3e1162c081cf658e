"""Will it fit: refuse a batch or an array larger than half the memory available, before allocating it."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from bn_inspect.errors import InputError


def available_memory_bytes() -> int:
    """Memory this process can still take: the least of what the OS has available, what the cgroup
    (a container's limit) leaves, and what the address-space limit (``ulimit -v``) leaves.

    Free physical memory alone overstates it in a container or under ``ulimit``, where an allocation
    then fails inside torch instead of being refused here in one line.
    """
    limits = [_meminfo_available(), _cgroup_headroom(), _address_space_headroom()]
    known = [limit for limit in limits if limit is not None]
    return min(known) if known else 1 << 40


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_headroom() -> int | None:
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as limit_file:
            limit = limit_file.read().strip()
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as current_file:
            current = int(current_file.read().strip())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(int(limit) - current, 0)


def _address_space_headroom() -> int | None:
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY:
            return None
        with open("/proc/self/status", encoding="ascii") as status:
            size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    except (ImportError, OSError, ValueError, StopIteration):
        return None
    return max(soft - size, 0)


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
