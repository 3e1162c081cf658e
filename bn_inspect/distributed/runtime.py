"""Runs across torch.distributed ranks: sharding the data, exact merge of statistics, rank divergence, shared failure.

Under ``torchrun --nproc-per-node N -m bn_inspect ...`` every rank runs its own share of the
batches through its own copy of the model and keeps, per layer call, the exact moments of what it
saw (count n_r, mean m_r, centred sum of squares M2_r, in float64). The ranks then exchange those
moments and fold them in rank order with Chan's parallel formula::

    n  = n_a + n_b
    d  = m_b - m_a
    m  = m_a + d * n_b / n
    M2 = M2_a + M2_b + d**2 * n_a * n_b / n

which gives the moments of the union of all values, so the statistics equal those of one process
over all the data to float64 rounding (only the order of the merges differs). Every rank folds
the same gathered numbers in the same order on the CPU, so every rank holds bit-identical results.
InstanceNorm sums (per-instance means and variances) simply add.

Collectives a run makes, in this order, on every rank alike (a rank that skipped one would make
the others wait): one status exchange per ``fail_together`` block, then one exchange of moments
(``merge_run_across_ranks``), then optionally one of buffers (``rank_divergence``). Each exchange is
an all_gather of sizes, of a JSON header (uint8) and of one flat float64 tensor; nothing is pickled.

torch is imported inside the functions that need it, so the dataclasses here can sit in a report
without importing torch.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
import types
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from bn_inspect.data.inputs import DirectoryData, InputData, read_input
from bn_inspect.errors import BnInspectError, DistributedError, RankFailure
from bn_inspect.report.records import (
    BufferDivergence,
    LayerDivergence,
    RankDivergence,
    RankShare,
    SyncGroupInfo,
)
from bn_inspect.report.rules import RULES, Finding

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.distributed import ProcessGroup

    from bn_inspect.data.batch import Batch
    from bn_inspect.engine.capture import CallRecord
    from bn_inspect.model.layers import NormLayer

T = TypeVar("T")
RecordKey = tuple[str, int]

TIMEOUT_ENV = "BN_INSPECT_DIST_TIMEOUT"
# torch's own default for collectives; a status exchange waits for the slowest rank's local work,
# so the limit must exceed the largest difference in work between ranks, not one collective's time.
DEFAULT_TIMEOUT_S = 1800.0
_BUFFER_NAMES = ("running_mean", "running_var", "num_batches_tracked")
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
    rank = _env_int(environ, "RANK")
    local_rank = int(environ.get("LOCAL_RANK", rank))
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not environ.get(name):
            raise DistributedError(
                f"WORLD_SIZE={world} is set but {name} is not, so the ranks cannot find each other",
                "Launch with torchrun, which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT",
            )
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
            f"{environ.get('MASTER_ADDR')}:{environ.get('MASTER_PORT')} ({_first_line(error)})",
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


def _group_rank_and_size(group: ProcessGroup | None) -> tuple[int, int]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


# ---------------------------------------------------------------------------------------------
# Sharding


def shard_batches(batches: Iterable[T], rank: int, world_size: int) -> Iterator[T]:
    """This rank's share of ``batches``: items rank, rank + world_size, rank + 2 * world_size, ...

    The batches themselves are unchanged, so every batch runs exactly once somewhere and the
    merged statistics are those of the whole stream. Items of other ranks are still produced
    (and dropped); for files prefer ``shard_input``, which reads only this rank's part.
    """
    _check_rank(rank, world_size)
    return islice(batches, rank, None, world_size)


def shard_files(files: Sequence[Path], rank: int, world_size: int) -> tuple[Path, ...]:
    """This rank's files: file i (in name order) goes to rank i % world_size; may be empty."""
    _check_rank(rank, world_size)
    return tuple(sorted(files)[rank::world_size])


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise DistributedError(f"rank {rank} is not in a world of {world_size}", "Launch with torchrun")


@dataclass(frozen=True)
class ShardedInput:
    """This rank's share of an input file or directory, with the interface of InputData.

    * one file: batch b (consecutive slices of ``batch_size`` samples) goes to rank b % world_size;
      only this rank's slices are read (a .npy file is memory-mapped);
    * a directory: file i goes to rank i % world_size and is read by that rank alone; with
      ``max_batches`` the cap is on the whole run, as in one process, so batch b of the
      concatenated stream goes to rank b % world_size instead (each rank then opens every file,
      reading only its own batches of .npy files).

    Either way the union of all ranks' batches is exactly the batches one process would run.
    """

    data: InputData | DirectoryData
    rank: int
    world_size: int

    @property
    def source(self) -> str:
        """Where the whole input came from (the same on every rank)."""
        return self.data.source

    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample, read from the whole input (so a rank without files can tell)."""
        return self.data.sample_shape()

    def batches(self, batch_size: int, max_batches: int | None) -> Iterator[Batch]:
        """This rank's batches, in stream order."""
        if isinstance(self.data, InputData):
            yield from _slices(self.data, batch_size, max_batches, self.rank, self.world_size, 0)
            return
        if max_batches is None:
            own = DirectoryData(
                self.data.source, shard_files(self.data.files, self.rank, self.world_size), self.data.key
            )
            yield from own.batches(batch_size, None)
            return
        first_index = 0
        for path in self.data.files:
            if first_index >= max_batches:
                return
            data = read_input(path, key=self.data.key)
            remaining = max_batches - first_index
            yield from _slices(data, batch_size, remaining, self.rank, self.world_size, first_index)
            first_index += data.num_batches(batch_size, remaining)

    def num_batches(self, batch_size: int, max_batches: int | None) -> int | None:
        """How many batches this rank runs, when it can be told without reading the data."""
        if isinstance(self.data, DirectoryData) and max_batches is None:
            own = DirectoryData(
                self.data.source, shard_files(self.data.files, self.rank, self.world_size), self.data.key
            )
            return own.num_batches(batch_size, None) if own.files else 0
        total = self.data.num_batches(batch_size, max_batches)
        return None if total is None else len(range(self.rank, total, self.world_size))


def _slices(
    data: InputData, batch_size: int, max_batches: int | None, rank: int, world_size: int, first_index: int
) -> Iterator[Batch]:
    """Batches of one file whose global index (``first_index`` + local index) is this rank's.

    Each batch is cut from the (memory-mapped) arrays first and converted by InputData itself, so
    only this rank's batches are read, with the same conversion as in one process.
    """
    starts = range(0, data.num_samples, batch_size)
    if max_batches is not None:
        starts = starts[:max_batches]
    offset = (rank - first_index) % world_size
    for start in starts[offset::world_size]:
        stop = start + batch_size
        piece = InputData(
            data.source,
            tuple(a[start:stop] for a in data.args),
            {name: a[start:stop] for name, a in data.kwargs.items()},
            min(stop, data.num_samples) - start,
        )
        yield from piece.batches(batch_size, 1)


def shard_input(data: InputData | DirectoryData, rank: int, world_size: int) -> ShardedInput:
    """This rank's share of ``data`` (see ShardedInput); use it wherever InputData is used."""
    _check_rank(rank, world_size)
    return ShardedInput(data, rank, world_size)


# ---------------------------------------------------------------------------------------------
# Collectives


def _collective_device(group: ProcessGroup | None) -> torch.device:
    import torch
    import torch.distributed as dist

    backend = str(dist.get_backend(group))
    # gloo (alone or as the CPU half of a mixed spec) takes CPU tensors; nccl only CUDA ones.
    if "gloo" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text)
    text = text.split(". This is typically caused")[0]
    return text[:_MAX_MESSAGE]


@contextmanager
def _contact(step: str, group: ProcessGroup | None) -> Iterator[None]:
    """Turn a failed collective (a peer died, or the timeout struck) into a DistributedError."""
    try:
        yield
    except RuntimeError as error:
        rank, world = _group_rank_and_size(group)
        raise DistributedError(
            f"rank {rank} of {world} lost contact with the other ranks while {step} ({_first_line(error)})",
            "Another rank exited, crashed or is stuck: see its output above. Collectives time out after "
            f"the process group's timeout ({TIMEOUT_ENV} seconds when bn-inspect created the group)",
        ) from error


def _exchange(
    header: bytes, floats: torch.Tensor, group: ProcessGroup | None, step: str
) -> list[tuple[bytes, torch.Tensor]]:
    """all_gather of a byte string and a 1-D float64 tensor of any lengths: one pair per rank.

    Three collectives: the two lengths, then the bytes and the floats padded to the longest.
    """
    import torch
    import torch.distributed as dist

    _, world = _group_rank_and_size(group)
    device = _collective_device(group)
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

    _, world = _group_rank_and_size(group)
    header = json.dumps(value, sort_keys=True).encode()
    if world == 1:
        return [json.loads(header)]
    gathered = _exchange(header, torch.zeros(0, dtype=torch.float64), group, step)
    return [json.loads(text) for text, _ in gathered]


# ---------------------------------------------------------------------------------------------
# Failing together


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
        "what": _first_line(error),
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

    _, world = _group_rank_and_size(group)
    if world == 1:
        if error is not None:
            raise error
        return
    payload = json.dumps(_status(error)).encode()
    statuses = [
        json.loads(text) for text, _ in _exchange(payload, torch.zeros(0), group, "exchanging each rank's status")
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


# ---------------------------------------------------------------------------------------------
# Merging recorded moments


@dataclass(frozen=True)
class RunTotals:
    """What one rank's run (or the merged run) saw besides the layer moments.

    Attributes:
        num_batches: forward passes run.
        num_samples: samples in them.
        num_nonfinite_values: NaN or infinite input values.
        first_shape: shape of the first input tensor of the first batch (None: no batch ran).
        first_dtype: its dtype, e.g. "float32".
    """

    num_batches: int = 0
    num_samples: int = 0
    num_nonfinite_values: int = 0
    first_shape: tuple[int, ...] | None = None
    first_dtype: str | None = None


@dataclass
class MergedRun:
    """The merged layer records (in execution order), the merged totals and each rank's share."""

    records: dict[RecordKey, CallRecord]
    totals: RunTotals
    shares: tuple[RankShare, ...]


def _layer_fields(layer: NormLayer) -> dict[str, Any]:
    fields = {
        f.name: getattr(layer, f.name) for f in dataclasses.fields(layer) if f.name not in ("module", "owner_tensors")
    }
    fields["family"] = layer.family.value
    return fields


def _layer_from_fields(fields: Mapping[str, Any]) -> NormLayer:
    """A NormLayer rebuilt from another rank's description (its module is a placeholder)."""
    from torch import nn

    from bn_inspect.model.layers import NormFamily, NormLayer

    values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    values["family"] = NormFamily(values["family"])
    # The report reads only the layer's facts, never its module.
    return NormLayer(module=nn.Module(), **values)


def _encode_records(
    records: Mapping[RecordKey, CallRecord], totals: RunTotals, known: set[str]
) -> tuple[bytes, torch.Tensor]:
    import torch

    from bn_inspect.engine.moments import ChannelMoments, InstanceMoments

    entries: list[dict[str, Any]] = []
    pieces: list[torch.Tensor] = []
    for (name, call), record in records.items():
        entry: dict[str, Any] = {
            "name": name,
            "call": call,
            "num_batches": record.num_batches,
            "input_shape": list(record.input_shape),
            "is_unbatched": record.is_unbatched,
            "reduced_dims": None if record.reduced_dims is None else list(record.reduced_dims),
            # A layer found at run time (a direct F.batch_norm) travels with its facts, for ranks that never ran it.
            "layer": None if record.layer.name in known else _layer_fields(record.layer),
        }
        moments = record.moments
        if isinstance(moments, ChannelMoments):
            entry |= {"kind": "channel", "count": moments.count, "num_channels": int(moments.mean.numel())}
            pieces += [moments.mean.reshape(-1), moments.m2.reshape(-1)]
        elif isinstance(moments, InstanceMoments):
            entry |= {
                "kind": "instance",
                "count": moments.num_instances,
                "values_per_instance": moments.values_per_instance,
                "num_channels": int(moments.mean_sum.numel()),
            }
            pieces += [moments.mean_sum.reshape(-1), moments.var_sum.reshape(-1)]
        else:
            entry["kind"] = "none"
        entries.append(entry)
    header = {"totals": dataclasses.asdict(totals), "records": entries}
    floats = torch.cat([p.detach().to("cpu", torch.float64) for p in pieces]) if pieces else torch.zeros(0)
    return json.dumps(header).encode(), floats.to(torch.float64)


def _decode_moments(entry: Mapping[str, Any], floats: torch.Tensor, offset: int) -> tuple[Any, int]:
    from bn_inspect.engine.moments import ChannelMoments, InstanceMoments

    if entry["kind"] == "none":
        return None, offset
    c = int(entry["num_channels"])
    first, second = floats[offset : offset + c], floats[offset + c : offset + 2 * c]
    if entry["kind"] == "channel":
        return ChannelMoments(int(entry["count"]), first, second), offset + 2 * c
    return InstanceMoments(int(entry["count"]), int(entry["values_per_instance"]), first, second), offset + 2 * c


def _merged_order(per_rank_keys: Sequence[Sequence[RecordKey]]) -> list[RecordKey]:
    """Union of the ranks' key sequences; a key only some ranks saw goes after its predecessor there."""
    order: list[RecordKey] = []
    for keys in per_rank_keys:
        position = 0
        for key in keys:
            if key in order:
                position = order.index(key) + 1
            else:
                order.insert(position, key)
                position += 1
    return order


def merge_run_across_ranks(
    records: Mapping[RecordKey, CallRecord],
    totals: RunTotals,
    group: ProcessGroup | None = None,
    *,
    layers: Sequence[NormLayer] = (),
) -> MergedRun:
    """Merge every rank's recorded moments and totals; every rank gets identical results.

    Per layer call the moments of ranks 0, 1, ..., W-1 are folded in that order with the exact
    merge of stats.py (Chan's formula for ChannelMoments, sums for InstanceMoments), in float64
    on the CPU. A layer call that ran on some ranks only (a rank with no batches, data-dependent
    control flow) merges over the ranks that ran it. ``num_batches`` and the totals add; the
    input shape reported is that of the lowest rank that ran the call.

    Args:
        records: this rank's ``StatisticsRecorder.records``: (layer name, call) -> CallRecord.
        totals: this rank's batches, samples, non-finite values and first batch.
        group: the process group (None: the default group; no group at all: a single process).
        layers: this rank's normalization layers (``find_layers``), used to describe a layer
            this rank never ran; layers not among them travel with their facts.

    Returns:
        The merged records in execution order, the merged totals and each rank's share. The
        merged moments live on the CPU.

    Raises:
        DistributedError: the ranks lost contact, or report one layer call with different kinds
            of statistics or channel counts (they do not run the same model).
    """
    _, world = _group_rank_and_size(group)
    if world == 1:
        share = RankShare(0, totals.num_batches, totals.num_samples)
        return MergedRun(dict(records), totals, (share,))
    known = {layer.name: layer for layer in layers}
    header, floats = _encode_records(records, totals, set(known))
    gathered = _exchange(header, floats, group, "merging the statistics of all ranks")
    decoded = []
    for text, values in gathered:
        document = json.loads(text)
        offset = 0
        entries: dict[RecordKey, tuple[dict[str, Any], Any]] = {}
        for entry in document["records"]:
            moments, offset = _decode_moments(entry, values, offset)
            entries[(entry["name"], int(entry["call"]))] = (entry, moments)
        decoded.append((RunTotals(**_tupled(document["totals"])), entries))
    merged: dict[RecordKey, CallRecord] = {}
    for key in _merged_order([list(entries) for _, entries in decoded]):
        merged[key] = _merge_record(key, [entries.get(key) for _, entries in decoded], records, known)
    rank_totals = [t for t, _ in decoded]
    first = next((t for t in rank_totals if t.first_shape is not None), RunTotals())
    merged_totals = RunTotals(
        num_batches=sum(t.num_batches for t in rank_totals),
        num_samples=sum(t.num_samples for t in rank_totals),
        num_nonfinite_values=sum(t.num_nonfinite_values for t in rank_totals),
        first_shape=first.first_shape,
        first_dtype=first.first_dtype,
    )
    shares = tuple(RankShare(r, t.num_batches, t.num_samples) for r, t in enumerate(rank_totals))
    return MergedRun(merged, merged_totals, shares)


def _tupled(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


def _merge_record(
    key: RecordKey,
    per_rank: Sequence[tuple[dict[str, Any], Any] | None],
    local: Mapping[RecordKey, CallRecord],
    known: Mapping[str, NormLayer],
) -> CallRecord:
    from bn_inspect.engine.capture import CallRecord

    present = [(rank, item) for rank, item in enumerate(per_rank) if item is not None]
    first_rank, (first_entry, merged_moments) = present[0]
    for rank, (entry, moments) in present[1:]:
        if (entry["kind"], entry.get("num_channels")) != (first_entry["kind"], first_entry.get("num_channels")):
            raise DistributedError(
                f"layer {key[0]} call {key[1]} reported {first_entry['kind']} statistics of "
                f"{first_entry.get('num_channels')} channels on rank {first_rank} but {entry['kind']} statistics "
                f"of {entry.get('num_channels')} channels on rank {rank}",
                "Run the same model on every rank",
            )
        if merged_moments is not None and moments is not None:
            merged_moments = merged_moments.merge(moments)
    if key in local:
        layer = local[key].layer
    elif key[0] in known:
        layer = known[key[0]]
    else:
        described = next((entry["layer"] for _, (entry, _) in present if entry["layer"] is not None), None)
        if described is None:
            raise DistributedError(
                f"layer {key[0]} ran on other ranks but is unknown on this one",
                "Pass this rank's layers (find_layers) to the merge",
            )
        layer = _layer_from_fields(described)
    return CallRecord(
        layer=layer,
        call=key[1],
        input_shape=tuple(first_entry["input_shape"]),
        is_unbatched=bool(first_entry["is_unbatched"]),
        moments=merged_moments,
        num_batches=sum(int(entry["num_batches"]) for _, (entry, _) in present),
        reduced_dims=None if first_entry["reduced_dims"] is None else tuple(first_entry["reduced_dims"]),
    )


def merge_records_across_ranks(
    records: Mapping[RecordKey, CallRecord],
    group: ProcessGroup | None = None,
    *,
    layers: Sequence[NormLayer] = (),
) -> dict[RecordKey, CallRecord]:
    """The layer records merged over all ranks (see merge_run_across_ranks); identical on every rank."""
    return merge_run_across_ranks(records, RunTotals(), group, layers=layers).records


# ---------------------------------------------------------------------------------------------
# SyncBatchNorm


@contextmanager
def local_sync_batch_norm(model: nn.Module) -> Iterator[None]:
    """Run every SyncBatchNorm as a plain BatchNorm for the block; restored on exit, even on error.

    In train mode with a process group, SyncBatchNorm all-gathers batch statistics inside its
    forward: every rank must then run the same number of batches (uneven shards would hang or
    cross our own collectives), CPU tensors are refused outright ("SyncBatchNorm expected input
    tensor to be on GPU"), and each batch would be normalized with statistics of other ranks'
    batches, unlike one process. Run locally, each batch is normalized with its own statistics,
    as in a single-process inspection, and the merge still gives the statistics over all ranks.
    """
    from torch import nn

    patched = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
    try:
        for module in patched:
            # An instance attribute shadows the class's forward; hooks still run around it.
            module.__dict__["forward"] = types.MethodType(nn.modules.batchnorm._BatchNorm.forward, module)
        yield
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)


def sync_batch_norm_groups(model: nn.Module) -> tuple[SyncGroupInfo, ...]:
    """For every SyncBatchNorm: the global ranks of its process group (all ranks for the default).

    Without an initialized process group SyncBatchNorm behaves as BatchNorm: ranks is (0,).
    """
    import torch.distributed as dist
    from torch import nn

    initialized = dist.is_available() and dist.is_initialized()
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.SyncBatchNorm):
            continue
        group = module.process_group
        if not initialized:
            found.append(SyncGroupInfo(name, (0,), True))
        elif group is None:
            found.append(SyncGroupInfo(name, tuple(range(dist.get_world_size())), True))
        else:
            found.append(SyncGroupInfo(name, tuple(dist.get_process_group_ranks(group)), False))
    return tuple(found)


# ---------------------------------------------------------------------------------------------
# Rank divergence of the stored buffers


def _layer_buffers(model: nn.Module) -> list[tuple[str, str, str, torch.Tensor]]:
    """(layer name, type, buffer name, tensor) for each running buffer, in model order."""
    from bn_inspect.model.layers import is_uninitialized
    from bn_inspect.model.modules import find_layers, unwrap_compiled

    model = unwrap_compiled(model)
    inner = getattr(model, "module", None)
    # DDP and DataParallel wrap the model; name its layers as the checkpoint will.
    if type(model).__name__ in ("DistributedDataParallel", "DataParallel") and inner is not None:
        model = inner
    layers, _ = find_layers(model)
    buffers = dict(model.named_buffers())
    found = []
    for layer in layers:
        for buffer_name in _BUFFER_NAMES:
            tensor = buffers.get(f"{layer.name}.{buffer_name}")
            if tensor is None and layer.module is model:
                # The model is itself the layer (named after its type), or an exported graph.
                tensor = buffers.get(buffer_name)
            if tensor is not None and not is_uninitialized(tensor) and tensor.numel():
                found.append((layer.name, layer.type_name, buffer_name, tensor))
    return found


def rank_divergence(model: nn.Module, group: ProcessGroup | None = None) -> RankDivergence:
    """Compare every normalization layer's running_mean, running_var and num_batches_tracked across ranks.

    DDP broadcasts rank 0's buffers before each forward by default; with
    ``broadcast_buffers=False`` every rank updates its own running statistics from its own
    batches, and a checkpoint then holds whichever rank saved it. All buffers travel in one
    all_gather, as float64 (exact for num_batches_tracked up to 2**53).

    Returns:
        Every layer with running buffers, in model order; identical on every rank. With a
        single process every difference is 0.

    Raises:
        DistributedError: the ranks lost contact, or hold different layers or buffer sizes.
    """
    import torch

    rank, world = _group_rank_and_size(group)
    entries = _layer_buffers(model)
    header = json.dumps([[name, type_name, buffer_name, int(t.numel())] for name, type_name, buffer_name, t in entries])
    values = (
        torch.cat([t.detach().reshape(-1).to("cpu", torch.float64) for *_, t in entries])
        if entries
        else torch.zeros(0, dtype=torch.float64)
    )
    if world == 1:
        gathered = [(header.encode(), values)]
    else:
        gathered = _exchange(header.encode(), values, group, "comparing buffers across ranks")
    for other, (text, _) in enumerate(gathered):
        if text.decode() != header:
            raise DistributedError(
                f"rank {other} holds other normalization layers or buffer sizes than rank {rank}",
                "Run the same model on every rank",
            )
    stacked = torch.stack([v for _, v in gathered])  # (ranks, all buffer elements)
    by_layer: dict[str, tuple[str, list[BufferDivergence]]] = {}
    offset = 0
    for name, type_name, buffer_name, tensor in entries:
        block = stacked[:, offset : offset + tensor.numel()]
        offset += tensor.numel()
        by_layer.setdefault(name, (type_name, []))[1].append(_buffer_divergence(buffer_name, block))
    layers = tuple(LayerDivergence(name, type_name, tuple(buffers)) for name, (type_name, buffers) in by_layer.items())
    return RankDivergence(world, layers)


def _buffer_divergence(buffer_name: str, block: torch.Tensor) -> BufferDivergence:
    """``block``: (ranks, elements) float64 values of one buffer."""
    import torch

    reference = block[0:1]
    same = (block == reference) | (block.isnan() & reference.isnan())
    all_same = same.all(dim=0)
    spread = block.amax(dim=0) - block.amin(dim=0)  # NaN where any rank holds NaN
    spread = torch.where(all_same, torch.zeros_like(spread), spread)
    nan_spread = bool(spread.isnan().any())
    largest = math.nan if nan_spread else (float(spread.max()) if spread.numel() else 0.0)
    return BufferDivergence(
        buffer=buffer_name,
        max_abs_difference=largest,
        differing_ranks=tuple(int(r) for r in (~same).any(dim=1).nonzero().flatten().tolist()),
        elements=tuple(int(i) for i in (~all_same).nonzero().flatten().tolist()),
    )


RANK_DIVERGENCE_RULE = RULES["BN111"]


def divergence_findings(divergence: RankDivergence, tolerance: float = 0.0) -> list[Finding]:
    """A BN111 finding for each layer whose buffers differ across ranks by more than ``tolerance``.

    The default 0 demands identical buffers: DDP's default buffer broadcast keeps them bitwise
    equal, so any difference means they were updated per rank.
    """
    findings = []
    for layer in divergence.layers:
        bad = [
            b
            for b in layer.buffers
            if b.is_divergent and (math.isnan(b.max_abs_difference) or b.max_abs_difference > tolerance)
        ]
        if not bad:
            continue
        parts = ", ".join(f"{b.buffer} by up to {b.max_abs_difference:.4g}" for b in bad)
        ranks = sorted({r for b in bad for r in b.differing_ranks})
        channels = sorted({c for b in bad if b.buffer != "num_batches_tracked" for c in b.elements})
        findings.append(
            Finding(
                code=RANK_DIVERGENCE_RULE.code,
                rule=RANK_DIVERGENCE_RULE.name,
                severity=RANK_DIVERGENCE_RULE.severity,
                layer=layer.name,
                call=0,
                channels=tuple(channels),
                message=(
                    f"the ranks hold different buffers: {parts} (rank{'s' if len(ranks) > 1 else ''} "
                    f"{', '.join(map(str, ranks))} of {divergence.world_size} differ from rank 0). Each rank "
                    "updated its own running statistics (DDP with broadcast_buffers=False), so a checkpoint "
                    "holds only the saving rank's: keep broadcast_buffers=True, use SyncBatchNorm, or average "
                    "the buffers across ranks (all_reduce) before saving."
                ),
            )
        )
    return findings
