"""Collectives between ranks: exchanging bytes and floats, and failing together.

Collectives a run makes, in this order, on every rank alike (a rank that skipped one would make
the others wait): one status exchange per ``fail_together`` block, then one exchange of moments
(``merge_run_across_ranks``), then optionally one of buffers (``rank_divergence``). Each exchange is
an all_gather of sizes, of a JSON header (uint8) and of one flat float64 tensor; nothing is pickled.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from bn_inspect.distributed.context import TIMEOUT_ENV, first_line, group_rank_and_size
from bn_inspect.errors import BnInspectError, DistributedError, RankFailure

if TYPE_CHECKING:
    import torch
    from torch.distributed import ProcessGroup


def collective_device(group: ProcessGroup | None) -> torch.device:
    """The device a collective of ``group``'s backend takes tensors on: the CPU for gloo, the current GPU for nccl."""
    import torch
    import torch.distributed as dist

    backend = str(dist.get_backend(group))
    # gloo (alone or as the CPU half of a mixed spec) takes CPU tensors; nccl only CUDA ones.
    if "gloo" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


@contextmanager
def _contact(step: str, group: ProcessGroup | None) -> Iterator[None]:
    """Turn a failed collective (a peer died, or the timeout struck) into a DistributedError."""
    try:
        yield
    except RuntimeError as error:
        rank, world = group_rank_and_size(group)
        raise DistributedError(
            f"rank {rank} of {world} lost contact with the other ranks while {step} ({first_line(error)})",
            "Another rank exited, crashed or is stuck: see its output above. Collectives time out after "
            f"the process group's timeout ({TIMEOUT_ENV} seconds when bn-inspect created the group)",
        ) from error


def exchange(
    header: bytes, floats: torch.Tensor, group: ProcessGroup | None, step: str
) -> list[tuple[bytes, torch.Tensor]]:
    """all_gather of a byte string and a 1-D float64 tensor of any lengths: one pair per rank.

    Three collectives: the two lengths, then the bytes and the floats padded to the longest.
    """
    import torch
    import torch.distributed as dist

    _, world = group_rank_and_size(group)
    device = collective_device(group)
    with _contact(step, group):
        sizes = torch.tensor([len(header), floats.numel()], dtype=torch.int64, device=device)
        all_sizes = [torch.empty_like(sizes) for _ in range(world)]
        dist.all_gather(all_sizes, sizes, group=group)
        lengths = [(int(s[0]), int(s[1])) for s in torch.stack(all_sizes).cpu()]
        longest_header = max(n for n, _ in lengths)
        longest_floats = max(n for _, n in lengths)
        padded = torch.zeros(longest_header, dtype=torch.uint8, device=device)
        if header:
            padded[: len(header)] = torch.frombuffer(bytearray(header), dtype=torch.uint8).to(device)
        headers = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(headers, padded, group=group)
        values = [torch.zeros(0, dtype=torch.float64)] * world
        # Every rank knows every length, so all of them skip (or make) this call alike.
        if longest_floats:
            padded_floats = torch.zeros(longest_floats, dtype=torch.float64, device=device)
            padded_floats[: floats.numel()] = floats.to(device=device, dtype=torch.float64)
            gathered = [torch.empty_like(padded_floats) for _ in range(world)]
            dist.all_gather(gathered, padded_floats, group=group)
            values = [g[:n].cpu() for g, (_, n) in zip(gathered, lengths, strict=True)]
    return [(bytes(h[:n].cpu().numpy().tobytes()), v) for h, (n, _), v in zip(headers, lengths, values, strict=True)]


def gather_json(value: Any, group: ProcessGroup | None, step: str) -> list[Any]:
    """Every rank's JSON-serialisable ``value``, in rank order (one exchange; nothing is pickled)."""
    import torch

    _, world = group_rank_and_size(group)
    header = json.dumps(value, sort_keys=True).encode()
    if world == 1:
        return [json.loads(header)]
    gathered = exchange(header, torch.zeros(0, dtype=torch.float64), group, step)
    return [json.loads(text) for text, _ in gathered]


def _status(error: BaseException | None) -> dict[str, Any]:
    if error is None:
        return {"ok": True}
    if isinstance(error, BnInspectError):
        return {
            "ok": False,
            "type": type(error).__name__,
            "what": error.what,
            "fix": error.fix,
            "internal": False,
            "exit_code": error.exit_code,
        }
    return {
        "ok": False,
        "type": type(error).__name__,
        "what": first_line(error),
        "fix": "",
        "internal": True,
        "exit_code": 3,
    }


def exchange_status(error: BaseException | None, group: ProcessGroup | None = None) -> None:
    """Tell every rank whether this one's local work failed; raise on all of them if any did.

    One all_gather of a small status, so it must be called exactly once per step on every rank,
    whether the step failed there or not (``fail_together`` does that).

    Raises:
        DistributedError: naming each failed rank and its message, on every rank (chained from
            this rank's own error, if it had one).
        the rank's own ``error`` again when it is not a BnInspectError (a bug: its traceback
            matters more than the summary; the other ranks get a DistributedError naming it).
    """
    import torch

    _, world = group_rank_and_size(group)
    if world == 1:
        if error is not None:
            raise error
        return
    payload = json.dumps(_status(error)).encode()
    statuses = [
        json.loads(text) for text, _ in exchange(payload, torch.zeros(0), group, "exchanging each rank's status")
    ]
    failures = tuple(
        RankFailure(r, s["type"], s["what"], s["fix"], s["internal"], s["exit_code"])
        for r, s in enumerate(statuses)
        if not s["ok"]
    )
    if not failures:
        return
    if error is not None and not isinstance(error, BnInspectError):
        raise error
    raise describe_failures(failures, world) from error


def describe_failures(failures: Sequence[RankFailure], world_size: int) -> DistributedError:
    """One DistributedError for the failed ranks: 'rank 1 of 3 failed: <its message>'."""
    first = failures[0]

    def message(failure: RankFailure) -> str:
        if failure.is_internal:
            return f"internal error {failure.error_type}: {failure.what} (a bug: see that rank's traceback)"
        return failure.what

    if len(failures) == 1:
        what = f"rank {first.rank} of {world_size} failed: {message(first)}"
    else:
        ranks = ", ".join(str(f.rank) for f in failures[:-1]) + f" and {failures[-1].rank}"
        details = "; ".join(f"rank {f.rank}: {message(f)}" for f in failures)
        what = f"ranks {ranks} of {world_size} failed: {details}"
    fix = first.fix or ("Please report the bug with that rank's traceback" if first.is_internal else "")
    return DistributedError(what, fix, failures=tuple(failures), exit_code=first.exit_code)


@contextmanager
def fail_together(group: ProcessGroup | None = None) -> Iterator[None]:
    """Run the block's local work; if it raises on any rank, raise on every rank.

    Without it a rank whose shard is unreadable would exit while the others wait in the next
    collective until the timeout. At the end of the block every rank exchanges an ok/error
    status (even the one that failed), so all of them either go on or raise a DistributedError
    naming the failed ranks. With one rank it adds nothing.
    """
    try:
        yield
    except Exception as error:
        exchange_status(error, group)
        raise
    exchange_status(None, group)
