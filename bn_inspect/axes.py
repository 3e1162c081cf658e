"""Input shape -> axis names, reduced dims, values per statistic, and the sentence that explains them."""

from __future__ import annotations

import math
from dataclasses import dataclass

from bn_inspect.layers import NormFamily

_SPATIAL_NAMES = {0: (), 1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}


@dataclass(frozen=True)
class AxesExplanation:
    """How one layer call reduced its input.

    Attributes:
        axis_names: a name per input dim, e.g. ("N", "C", "H", "W").
        reduced_axes: dims averaged over to get one statistic.
        num_statistics: how many means (and as many variances) the layer computed.
        values_per_statistic: how many input values feed each of them.
        sentence: the plain-language account, e.g. "... each over N×H×W = 8×56×56 = 25,088 values".
    """

    axis_names: tuple[str, ...]
    reduced_axes: tuple[int, ...]
    num_statistics: int
    values_per_statistic: int
    sentence: str


def _spatial_names(count: int) -> tuple[str, ...]:
    return _SPATIAL_NAMES.get(count, tuple(f"S{i + 1}" for i in range(count)))


def _product(names: list[str], sizes: list[int]) -> str:
    """'N×H×W = 8×56×56 = 25,088', shortened where there is nothing to multiply."""
    total = math.prod(sizes)
    if len(names) == 1:
        return f"{names[0]} = {total:,}"
    return f"{'×'.join(names)} = {'×'.join(str(s) for s in sizes)} = {total:,}"


def _dims(dims: tuple[int, ...]) -> str:
    return ("dim " if len(dims) == 1 else "dims ") + ", ".join(str(d) for d in dims)


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + (",)" if len(shape) == 1 else ")")


def explain_axes(
    family: NormFamily,
    layer_label: str,
    shape: tuple[int, ...],
    *,
    is_unbatched: bool = False,
    num_groups: int | None = None,
    normalized_ndim: int = 1,
) -> AxesExplanation:
    """Axis names, reduced dims and the explanation for one call of a layer on ``shape``.

    Args:
        family: how the layer reduces (batch, instance, group, layer, rms).
        layer_label: "name (Type)" to open the sentence with.
        shape: the input shape of one batch.
        is_unbatched: InstanceNorm given (C, *S) without a batch dim.
        num_groups: GroupNorm's G.
        normalized_ndim: how many trailing dims LayerNorm / RMSNorm normalize over.
    """
    if family is NormFamily.BATCH:
        return _explain_batch(layer_label, shape)
    if family is NormFamily.INSTANCE:
        return _explain_instance(layer_label, shape, is_unbatched)
    if family is NormFamily.GROUP:
        return _explain_group(layer_label, shape, num_groups or 1)
    return _explain_trailing(family, layer_label, shape, normalized_ndim)


def _explain_batch(label: str, shape: tuple[int, ...]) -> AxesExplanation:
    names = ("N", "C", *_spatial_names(len(shape) - 2))
    reduced = (0, *range(2, len(shape)))
    channels = shape[1]
    values = math.prod(shape[d] for d in reduced)
    sentence = (
        f"{label} got {_shape(shape)} = ({', '.join(names)}): {channels:,} means and {channels:,} "
        f"variances, each over {_product([names[d] for d in reduced], [shape[d] for d in reduced])} values "
        f"({_dims(reduced)} reduced; C kept)."
    )
    return AxesExplanation(names, reduced, channels, values, sentence)


def _explain_instance(label: str, shape: tuple[int, ...], is_unbatched: bool) -> AxesExplanation:
    offset = 0 if is_unbatched else 1
    names = (() if is_unbatched else ("N",)) + ("C", *_spatial_names(len(shape) - 1 - offset))
    reduced = tuple(range(offset + 1, len(shape)))
    samples = 1 if is_unbatched else shape[0]
    channels = shape[offset]
    values = math.prod(shape[d] for d in reduced)
    count = samples * channels
    per = "one per channel" if is_unbatched else "one per sample and channel"
    kept = "C kept" if is_unbatched else "N and C kept"
    head = f"{count:,}" if is_unbatched else f"N×C = {samples}×{channels} = {count:,}"
    sentence = (
        f"{label} got {_shape(shape)} = ({', '.join(names)}): {head} means and as many variances, "
        f"{per}, each over {_product([names[d] for d in reduced], [shape[d] for d in reduced])} values "
        f"({_dims(reduced)} reduced; {kept}). The per-channel figures shown average them over samples."
    )
    return AxesExplanation(names, reduced, count, values, sentence)


def _explain_group(label: str, shape: tuple[int, ...], groups: int) -> AxesExplanation:
    names = ("N", "C", *_spatial_names(len(shape) - 2))
    samples, channels = shape[0], shape[1]
    per_group = channels // groups
    spatial = list(range(2, len(shape)))
    values = per_group * math.prod(shape[d] for d in spatial)
    count = samples * groups
    sizes = [per_group, *(shape[d] for d in spatial)]
    parts = ["C/G", *(names[d] for d in spatial)]
    sentence = (
        f"{label} got {_shape(shape)} = ({', '.join(names)}): N×G = {samples}×{groups} = {count:,} means "
        f"and as many variances, one per sample and group of {per_group} channels, each over "
        f"{_product(parts, sizes)} values (C split into {groups} groups"
        + (f"; {_dims(tuple(spatial))} reduced" if spatial else "")
        + "; keeps no running statistics)."
    )
    return AxesExplanation(names, (1, *spatial), count, values, sentence)


def _explain_trailing(family: NormFamily, label: str, shape: tuple[int, ...], normalized_ndim: int) -> AxesExplanation:
    rank = len(shape)
    normalized_ndim = max(1, min(normalized_ndim, rank))
    if rank == 2:
        names: tuple[str, ...] = ("N", "D")
    elif rank == 3:
        names = ("N", "T", "D")
    else:
        names = ("N", *(f"D{i}" for i in range(1, rank)))
    reduced = tuple(range(rank - normalized_ndim, rank))
    count = math.prod(shape[: rank - normalized_ndim])
    values = math.prod(shape[d] for d in reduced)
    what = "root mean squares (no mean is subtracted)" if family is NormFamily.RMS else ("means and as many variances")
    per = "one per sample" if rank - normalized_ndim == 1 else "one per position"
    which = "the last dim" if normalized_ndim == 1 else f"the last {normalized_ndim} dims"
    sentence = (
        f"{label} got {_shape(shape)} = ({', '.join(names)}): {count:,} {what}, {per}, each over "
        f"{_product([names[d] for d in reduced], [shape[d] for d in reduced])} values "
        f"({which} reduced; keeps no running statistics)."
    )
    return AxesExplanation(names, reduced, count, values, sentence)
