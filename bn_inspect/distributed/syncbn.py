"""SyncBatchNorm under inspection: run it locally, and tell which ranks each layer syncs with."""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from bn_inspect.report.records import SyncGroupInfo
from bn_inspect.text import Untrusted

if TYPE_CHECKING:
    from torch import nn


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
            found.append(SyncGroupInfo(Untrusted(name), (0,), True))
        elif group is None:
            found.append(SyncGroupInfo(Untrusted(name), tuple(range(dist.get_world_size())), True))
        else:
            found.append(SyncGroupInfo(Untrusted(name), tuple(dist.get_process_group_ranks(group)), False))
    return tuple(found)
