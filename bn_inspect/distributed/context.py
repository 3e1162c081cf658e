"""Joining a torchrun run: this process's rank, world size, backend and collective timeout.

The place comes from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) or from a process group already initialized (the end of a DDP job); without either,
the process runs alone and every distributed step is a no-op.

torch is imported inside the functions that need it, so DistributedContext can sit in a report
without importing torch.
"""

from __future__ import annotations

import datetime
import math
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bn_inspect.errors import DistributedError

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

TIMEOUT_ENV = "BN_INSPECT_DIST_TIMEOUT"
# torch's own default for collectives; a status exchange waits for the slowest rank's local work,
# so the limit must exceed the largest difference in work between ranks, not one collective's time.
DEFAULT_TIMEOUT_S = 1800.0


_MAX_MESSAGE = 400


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in a distributed run (or a single process: world_size 1, no group).

    Attributes:
        rank: global rank, 0 to world_size - 1; rank 0 alone writes the report.
        world_size: number of ranks.
        local_rank: rank on this machine (torchrun's LOCAL_RANK): the CUDA device index.
        backend: "gloo", "nccl" (or a mixed spec), None for a single process.
        group: the process group used for every collective; None means the default group.
        timeout_s: the collective timeout set at initialization; None when the group was
            created by someone else (its timeout is theirs) or for a single process.
        owns_group: True when distributed_context created the group and will destroy it.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    group: ProcessGroup | None = None
    timeout_s: float | None = None
    owns_group: bool = False

    @property
    def is_distributed(self) -> bool:
        """True when there is more than one rank, so collectives are needed."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that prints or writes the report."""
        return self.rank == 0


def collective_timeout_s(timeout_s: float | None = None, environ: Mapping[str, str] | None = None) -> float:
    """The collective timeout: ``timeout_s``, else $BN_INSPECT_DIST_TIMEOUT (seconds), else 1800.

    Raises:
        DistributedError: a timeout that is not a positive number.
    """
    environ = os.environ if environ is None else environ
    if timeout_s is None:
        text = environ.get(TIMEOUT_ENV)
        if text is None:
            return DEFAULT_TIMEOUT_S
        try:
            timeout_s = float(text)
        except ValueError:
            timeout_s = math.nan
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise DistributedError(
            f"the collective timeout {timeout_s!r} s (from {TIMEOUT_ENV} or the caller) is not a positive number",
            f"Set {TIMEOUT_ENV} to a number of seconds, e.g. 600",
        )
    return timeout_s


def _env_int(environ: Mapping[str, str], name: str) -> int:
    text = environ.get(name)
    if text is None:
        raise DistributedError(
            f"WORLD_SIZE is set but {name} is not, so this process cannot tell its place in the run",
            "Launch with torchrun, which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT",
        )
    try:
        return int(text)
    except ValueError:
        raise DistributedError(f"{name}={text!r} is not an integer", "Launch with torchrun") from None


def _torchrun_ranks(environ: Mapping[str, str], world: int) -> tuple[int, int]:
    """RANK and LOCAL_RANK from torchrun's environment, once it tells where the ranks meet."""
    rank = _env_int(environ, "RANK")
    local_rank = int(environ.get("LOCAL_RANK", rank))
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not environ.get(name):
            raise DistributedError(
                f"WORLD_SIZE={world} is set but {name} is not, so the ranks cannot find each other",
                "Launch with torchrun, which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT",
            )
    return rank, local_rank


@contextmanager
def distributed_context(
    *,
    device: str | None = None,
    backend: str | None = None,
    timeout_s: float | None = None,
    environ: Mapping[str, str] | None = None,
) -> Iterator[DistributedContext]:
    """Join the distributed run this process is part of, if any, for the duration of the block.

    * A process group already initialized (the end of a DDP training job): use it as it is, with
      its own backend and timeout, and leave it initialized on exit.
    * torchrun's environment (RANK, WORLD_SIZE > 1, LOCAL_RANK, MASTER_ADDR, MASTER_PORT):
      initialize a group with ``init_method="env://"`` and a collective timeout, and destroy it on
      exit, even when the block raises. The backend is nccl when ``device`` is CUDA (and the
      process then uses CUDA device LOCAL_RANK), gloo otherwise.
    * Otherwise, or WORLD_SIZE 1: a single-process context; every function here is then a no-op.

    Args:
        device: where the model runs ("cpu", "cuda", "cuda:1"); picks the backend.
        backend: override the backend ("gloo", "nccl", or e.g. "cpu:gloo,cuda:nccl").
        timeout_s: collective timeout in seconds (default $BN_INSPECT_DIST_TIMEOUT, else 1800).
        environ: the environment to read (default os.environ).

    Raises:
        DistributedError: an incomplete or invalid torchrun environment, or a group that cannot
            be formed (a rank that never arrives times out after ``timeout_s``).
    """
    import torch
    import torch.distributed as dist

    environ = os.environ if environ is None else environ
    if dist.is_available() and dist.is_initialized():
        yield joined_context(environ)
        return
    world = int(environ.get("WORLD_SIZE", "1") or "1")
    if world <= 1:
        yield DistributedContext()
        return
    if not dist.is_available():
        raise DistributedError(
            "WORLD_SIZE is set but this torch build has no torch.distributed", "Install a torch build with it"
        )
    rank, local_rank = _torchrun_ranks(environ, world)
    timeout = collective_timeout_s(timeout_s, environ)
    uses_cuda = device is not None and device.startswith("cuda")
    chosen = backend or ("nccl" if uses_cuda and dist.is_nccl_available() else "gloo")
    if uses_cuda:
        # "cuda" then means this rank's own device; nccl needs one device per rank.
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group(
            backend=chosen,
            init_method="env://",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout),
        )
    except (RuntimeError, ValueError) as error:
        raise DistributedError(
            f"rank {rank} of {world} could not join the process group at "
            f"{environ.get('MASTER_ADDR')}:{environ.get('MASTER_PORT')} ({first_line(error)})",
            f"Check that every rank was started and can reach MASTER_ADDR; the wait times out after {timeout:g} s",
        ) from error
    try:
        yield DistributedContext(
            rank=rank,
            world_size=world,
            local_rank=local_rank,
            backend=chosen,
            timeout_s=timeout,
            owns_group=True,
        )
    finally:
        dist.destroy_process_group()


def joined_context(environ: Mapping[str, str] | None = None) -> DistributedContext:
    """The process group this process already belongs to (the end of a DDP job), or a single process.

    What the Python API uses when it is given no context: called on every rank of an initialized
    group, it merges over all of them. To look at this rank's data alone, pass
    ``DistributedContext()`` instead.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return DistributedContext()
    environ = os.environ if environ is None else environ
    rank = dist.get_rank()
    return DistributedContext(
        rank=rank,
        world_size=dist.get_world_size(),
        local_rank=int(environ.get("LOCAL_RANK", rank)),
        backend=str(dist.get_backend()),
        owns_group=False,
    )


def group_rank_and_size(group: ProcessGroup | None) -> tuple[int, int]:
    """This process's rank in ``group`` and the group's size; (0, 1) without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def first_line(error: BaseException) -> str:
    """One line of a torch.distributed error for a message: no C++ source location, no generic hint."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text)
    text = text.split(". This is typically caused")[0]
    return text[:_MAX_MESSAGE]
