"""Merging every rank's recorded moments into the statistics of the whole run.

Every rank runs its own share of the batches through its own copy of the model and keeps, per
layer call, the exact moments of what it saw (count n_r, mean m_r, centred sum of squares M2_r, in
float64). The ranks then exchange those moments and fold them in rank order with Chan's parallel
formula::

    n  = n_a + n_b
    d  = m_b - m_a
    m  = m_a + d * n_b / n
    M2 = M2_a + M2_b + d**2 * n_a * n_b / n

which gives the moments of the union of all values, so the statistics equal those of one process
over all the data to float64 rounding (only the order of the merges differs). Every rank folds
the same gathered numbers in the same order on the CPU, so every rank holds bit-identical results.
InstanceNorm sums (per-instance means and variances) simply add.

torch is imported inside the functions that need it, so the dataclasses here can sit in a report
without importing torch.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bn_inspect.data.batch import RunTotals
from bn_inspect.distributed.collectives import exchange
from bn_inspect.distributed.context import group_rank_and_size
from bn_inspect.errors import DistributedError
from bn_inspect.report.records import RankShare

if TYPE_CHECKING:
    import torch
    from torch.distributed import ProcessGroup

    from bn_inspect.engine.capture import CallRecord
    from bn_inspect.model.layers import NormLayer

RecordKey = tuple[str, int]


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
            # Pairs, not a dict: JSON would turn the sizes into strings.
            "batch_sizes": sorted(record.batch_sizes.items()),
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
        if record.sample_moments is not None:
            entry["sample_count"] = record.sample_moments.count
            pieces += [record.sample_moments.mean.reshape(-1), record.sample_moments.m2.reshape(-1)]
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


def _decode_samples(entry: Mapping[str, Any], floats: torch.Tensor, offset: int) -> tuple[Any, int]:
    """The per-sample moments (check's BN205) where the rank recorded them, after the moments."""
    from bn_inspect.engine.moments import ChannelMoments

    if "sample_count" not in entry:
        return None, offset
    c = int(entry["num_channels"])
    mean, m2 = floats[offset : offset + c], floats[offset + c : offset + 2 * c]
    return ChannelMoments(int(entry["sample_count"]), mean, m2), offset + 2 * c


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
    merge of engine/moments.py (Chan's formula for ChannelMoments, sums for InstanceMoments), in float64
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
    _, world = group_rank_and_size(group)
    if world == 1:
        share = RankShare(0, totals.num_batches, totals.num_samples)
        return MergedRun(dict(records), totals, (share,))
    known = {layer.name: layer for layer in layers}
    header, floats = _encode_records(records, totals, set(known))
    gathered = exchange(header, floats, group, "merging the statistics of all ranks")
    decoded = []
    for text, values in gathered:
        document = json.loads(text)
        offset = 0
        entries: dict[RecordKey, tuple[dict[str, Any], Any, Any]] = {}
        for entry in document["records"]:
            moments, offset = _decode_moments(entry, values, offset)
            samples, offset = _decode_samples(entry, values, offset)
            entries[(entry["name"], int(entry["call"]))] = (entry, moments, samples)
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
        first_sha256=first.first_sha256,
    )
    shares = tuple(RankShare(r, t.num_batches, t.num_samples) for r, t in enumerate(rank_totals))
    return MergedRun(merged, merged_totals, shares)


def _tupled(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


def _merge_record(
    key: RecordKey,
    per_rank: Sequence[tuple[dict[str, Any], Any, Any] | None],
    local: Mapping[RecordKey, CallRecord],
    known: Mapping[str, NormLayer],
) -> CallRecord:
    from bn_inspect.engine.capture import CallRecord

    present = [(rank, item) for rank, item in enumerate(per_rank) if item is not None]
    first_rank, (first_entry, merged_moments, _) = present[0]
    for rank, (entry, moments, _) in present[1:]:
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
        described = next((entry["layer"] for _, (entry, _, _) in present if entry["layer"] is not None), None)
        if described is None:
            raise DistributedError(
                f"layer {key[0]} ran on other ranks but is unknown on this one",
                "Pass this rank's layers (find_layers) to the merge",
            )
        layer = _layer_from_fields(described)
    batch_sizes: Counter[int] = Counter()
    for _, (entry, _, _) in present:
        batch_sizes.update({int(size): int(count) for size, count in entry["batch_sizes"]})
    return CallRecord(
        layer=layer,
        call=key[1],
        input_shape=tuple(first_entry["input_shape"]),
        is_unbatched=bool(first_entry["is_unbatched"]),
        moments=merged_moments,
        num_batches=sum(int(entry["num_batches"]) for _, (entry, _, _) in present),
        batch_sizes=batch_sizes,
        reduced_dims=None if first_entry["reduced_dims"] is None else tuple(first_entry["reduced_dims"]),
        sample_moments=_merged_samples([samples for _, (_, _, samples) in present]),
    )


def _merged_samples(per_rank: Sequence[Any]) -> Any:
    """The ranks' per-sample moments merged in rank order, where every rank that ran the call kept them."""
    if not per_rank or any(samples is None for samples in per_rank):
        return None
    merged = per_rank[0]
    for samples in per_rank[1:]:
        merged = merged.merge(samples)
    return merged


def merge_records_across_ranks(
    records: Mapping[RecordKey, CallRecord],
    group: ProcessGroup | None = None,
    *,
    layers: Sequence[NormLayer] = (),
) -> dict[RecordKey, CallRecord]:
    """The layer records merged over all ranks (see merge_run_across_ranks); identical on every rank."""
    return merge_run_across_ranks(records, RunTotals(), group, layers=layers).records
