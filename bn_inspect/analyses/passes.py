"""The one batch loop every analysis runs, and what a pass over the data runs under.

A pass takes the user's batches one at a time (tensors, dicts, (inputs, targets) pairs or
Batch objects), moves each to the model's device and dtype, and counts what it saw; the analysis
runs its own forward on each. Under torchrun the counts and the captured moments of every rank
are merged exactly afterwards; a single process never imports bn_inspect.distributed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bn_inspect.data.batch import Batch, RunTotals, as_batch
from bn_inspect.engine.capture import CallRecord
from bn_inspect.engine.preserve import preserved_state
from bn_inspect.model.qat import observers_paused

if TYPE_CHECKING:
    from bn_inspect.distributed.context import DistributedContext
    from bn_inspect.model.layers import NormLayer
    from bn_inspect.report.records import RankShare

RecordKey = tuple[str, int]


def joined_run(distributed: DistributedContext | None) -> DistributedContext | None:
    """The run over several ranks to merge across, or None for a single process.

    ``distributed`` None joins the process group this process already belongs to (the end of a
    DDP job), if any; a context of one rank is a single process.
    """
    if distributed is None:
        if not _has_process_group():
            return None
        from bn_inspect.distributed.context import joined_context

        distributed = joined_context()
    return distributed if distributed.is_distributed else None


def _has_process_group() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@contextmanager
def guarded_pass(model: nn.Module, run: DistributedContext | None, *, keep_state: bool = True) -> Iterator[None]:
    """What every pass runs under: no autograd, the model's state restored on exit (even on error),
    SyncBatchNorm run locally where a process group exists, and under torchrun every rank failing
    together, so that none waits on a dead one.

    ``keep_state`` False leaves the state and SyncBatchNorm to an enclosing guard (a series of passes).
    """
    with ExitStack() as stack:
        if run is not None:
            from bn_inspect.distributed.collectives import fail_together

            stack.enter_context(fail_together(run.group))
        if keep_state:
            stack.enter_context(preserved_state(model))
        if keep_state and _has_process_group():
            # SyncBatchNorm would gather statistics inside its forward; the merge makes them global.
            from bn_inspect.distributed.syncbn import local_sync_batch_norm

            stack.enter_context(local_sync_batch_norm(model))
        # A QAT model's observers would requantize it batch by batch; every batch sees it as saved.
        stack.enter_context(observers_paused(model))
        stack.enter_context(torch.no_grad())
        yield


class Tally:
    """What a pass saw besides the layer moments: batches, samples, non-finite values, first input."""

    def __init__(self, device: torch.device, *, count_nonfinite: bool = False, fingerprint: bool = False) -> None:
        self._fingerprint = fingerprint
        self.num_batches = 0
        self.num_samples = 0
        self.first: Batch | None = None
        # Counted on the device and read once at the end: no host synchronisation per batch.
        self._nonfinite = torch.zeros((), dtype=torch.int64, device=device) if count_nonfinite else None

    def add(self, batch: Batch) -> None:
        """Count one batch that is about to run."""
        self.first = self.first or batch
        self.num_batches += 1
        self.num_samples += batch.num_samples
        if self._nonfinite is not None:
            for tensor in batch.tensors():
                if tensor.is_floating_point():
                    self._nonfinite += (~torch.isfinite(tensor)).sum()

    def totals(self) -> RunTotals:
        """The counts as a RunTotals (one host synchronisation, for the non-finite count)."""
        first = self.first
        source = None if first is None else first.args[0] if first.args else next(iter(first.kwargs.values()))
        return RunTotals(
            num_batches=self.num_batches,
            num_samples=self.num_samples,
            num_nonfinite_values=0 if self._nonfinite is None else int(self._nonfinite.item()),
            first_shape=None if source is None else tuple(source.shape),
            first_dtype=None if source is None else str(source.dtype).removeprefix("torch."),
            first_sha256=first.sha256() if first is not None and self._fingerprint else None,
        )


def iter_batches(
    batches: Iterable[Any],
    device: torch.device,
    dtype: torch.dtype | None,
    tally: Tally,
    *,
    skip_empty: bool = False,
    held: Callable[[int], bool] | None = None,
) -> Iterator[Batch]:
    """The one batch loop: each item as a Batch on ``device`` with floats in ``dtype`` (see Batch.to), counted in ``tally``.

    ``skip_empty`` leaves out batches of 0 samples uncounted (where a forward of none is meaningless).
    ``held`` names the batches (by index) that are counted but not moved: their forward starts from
    an activation already on the device.
    """
    for index, item in enumerate(batches):
        batch = as_batch(item)
        if held is None or not held(index):
            batch = batch.to(device, dtype)
        if skip_empty and batch.num_samples == 0:
            continue
        tally.add(batch)
        yield batch


def merged_over_ranks(
    records: Mapping[RecordKey, CallRecord],
    totals: RunTotals,
    run: DistributedContext | None,
    layers: Sequence[NormLayer],
) -> tuple[Mapping[RecordKey, CallRecord], RunTotals, tuple[RankShare, ...]]:
    """The pass's records and totals over all ranks (exact float64 merge), and each rank's share."""
    shares: tuple[RankShare, ...] = ()
    if run is not None:
        from bn_inspect.distributed.merge import merge_run_across_ranks

        merged = merge_run_across_ranks(records, totals, run.group, layers=list(layers))
        records, totals, shares = merged.records, merged.totals, merged.shares
    return records, totals, shares
