"""Rank divergence: whether the ranks hold different running buffers (BN111).

DDP with ``broadcast_buffers=False`` lets every rank update its own running statistics, and a
checkpoint then holds whichever rank saved it; comparing the buffers across ranks shows it.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

from bn_inspect.distributed.collectives import collective_device, exchange
from bn_inspect.distributed.context import group_rank_and_size
from bn_inspect.errors import DistributedError
from bn_inspect.report.findings import RULES, Finding
from bn_inspect.report.records import BufferDivergence, LayerDivergence, RankDivergence
from bn_inspect.text import Untrusted

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.distributed import ProcessGroup

_BUFFER_NAMES = ("running_mean", "running_var", "num_batches_tracked")


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

    rank, world = group_rank_and_size(group)
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
        gathered = exchange(header.encode(), values, group, "comparing buffers across ranks")
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
    layers = tuple(
        LayerDivergence(Untrusted(name), Untrusted(type_name), tuple(buffers))
        for name, (type_name, buffers) in by_layer.items()
    )
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


def running_spread(values: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """max - min across ranks of every element of ``values``, in one all_reduce (the watch's BN504).

    One collective per call whatever the number of layers: the maximum of the values and of their
    negatives together gives each element's maximum and minus its minimum.

    Returns:
        A float64 tensor on the CPU, the same on every rank (NaN where a rank holds NaN).
    """
    import torch
    import torch.distributed as dist

    both = torch.cat([values.detach().reshape(-1), -values.detach().reshape(-1)]).to(
        collective_device(group), torch.float64
    )
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    size = values.numel()
    return (both[:size] + both[size:]).cpu()
