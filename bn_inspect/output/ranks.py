"""Sentences for a report's section on a run over several ranks (torchrun)."""

from __future__ import annotations

from bn_inspect.output.words import counted
from bn_inspect.report.records import DistributedInfo, RankDivergence


def distributed_lines(info: DistributedInfo) -> list[str]:
    """Plain sentences for the report's section on a run over several ranks."""
    shares = "; ".join(
        f"rank {s.rank}: {counted(s.num_samples, 'sample')} in {counted(s.num_batches, 'batch')}" for s in info.shares
    )
    lines = [
        f"{info.world_size} ranks ({info.backend}): every statistic above is over all ranks' data, "
        f"merged exactly in float64 ({shares})."
    ]
    for group in info.sync_batch_norm:
        over = "all ranks" if group.is_world else f"ranks {', '.join(map(str, group.ranks))}"
        lines.append(
            f"{group.name} (SyncBatchNorm) synchronizes its training statistics over {over}; each batch ran "
            "through it locally here, and its statistics are merged over all ranks."
        )
    return lines + divergence_lines(info.divergence)


def divergence_lines(divergence: RankDivergence) -> list[str]:
    """Plain sentences for a report section: one per divergent layer, or one saying all agree."""
    if not divergence.divergent:
        return [f"Running buffers are identical on all {divergence.world_size} ranks."]
    lines = []
    for layer in divergence.divergent:
        parts = "; ".join(
            f"{b.buffer} max |Δ| {b.max_abs_difference:.4g} (ranks {', '.join(map(str, b.differing_ranks))} "
            "differ from rank 0)"
            for b in layer.buffers
            if b.is_divergent
        )
        lines.append(f"{layer.name} ({layer.type}): {parts}")
    return lines
