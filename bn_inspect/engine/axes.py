"""Input shape -> axis names, reduced dims, values per statistic, and the sentence that explains them.

Also which dims of a layer's input a layer-norm kernel reduces, when the layer rearranges its
input before normalizing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bn_inspect.model.layers import NormFamily

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


@dataclass(frozen=True)
class TensorLayout:
    """Where a tensor's values lie: enough to tell whether one tensor is a rearranged view of another.

    Attributes:
        shape: the sizes.
        strides: the strides, in elements.
        storage: the address of the storage the tensor views.
        offset: the storage offset, in elements.
    """

    shape: tuple[int, ...]
    strides: tuple[int, ...]
    storage: int
    offset: int


def kernel_reduced_dims(
    module_input: TensorLayout, kernel_input: TensorLayout, normalized_ndim: int
) -> tuple[int, ...] | None:
    """The dims of a module's input that a layer-norm kernel called inside the module reduces.

    The kernel reduces the last ``normalized_ndim`` dims of its own input. A module that permutes
    before normalizing (timm's and torchvision's LayerNorm2d: NCHW -> NHWC, then over C) hands
    the kernel a view of its input, whose strides name the input dims behind every kernel dim,
    permuted, merged or not. A module that copies after rearranging (``.contiguous()``, a dtype
    cast) leaves only the sizes: that case assumes the kernel's input is the module's input with
    its dims reordered (values possibly transformed elementwise), and matches dims by size, which
    settles the answer only where each size is wholly reduced or wholly kept.

    Returns:
        The reduced dims of the module's input in ascending order, or None where they cannot be
        established (the caller then keeps the rule for an unmodified LayerNorm: the trailing dims).
    """
    rank = len(kernel_input.shape)
    if not 0 < normalized_ndim <= rank:
        return None
    reduced = set(range(rank - normalized_ndim, rank))
    found = _reduced_in_view(module_input, kernel_input, reduced)
    if found is None and sorted(module_input.shape) == sorted(kernel_input.shape):
        found = _reduced_by_size(module_input.shape, kernel_input.shape, reduced, set(module_input.shape))
    return None if found is None else tuple(sorted(found))


def _reduced_in_view(module_input: TensorLayout, kernel_input: TensorLayout, reduced: set[int]) -> set[int] | None:
    """Input dims behind the reduced kernel dims, when the kernel's input views every value of the module's."""
    is_same_storage = (kernel_input.storage, kernel_input.offset) == (module_input.storage, module_input.offset)
    if not is_same_storage or math.prod(kernel_input.shape) != math.prod(module_input.shape):
        return None
    by_stride: dict[int, int] = {}
    for dim, (size, stride) in enumerate(zip(module_input.shape, module_input.strides, strict=True)):
        if size > 1:
            if stride in by_stride:
                return None  # overlapping (expanded) input: a stride names no single dim
            by_stride[stride] = dim
    spanned: set[int] = set()
    found: set[int] = set()
    for kernel_dim, (size, stride) in enumerate(zip(kernel_input.shape, kernel_input.strides, strict=True)):
        # A kernel dim spans a run of input dims, innermost first, each stride the product of the
        # sizes and stride before it: one dim for a permutation, several where dims were merged.
        covered, step = 1, stride
        while covered < size:
            inner = by_stride.get(step)
            if inner is None or inner in spanned:
                return None
            spanned.add(inner)
            if kernel_dim in reduced:
                found.add(inner)
            covered *= module_input.shape[inner]
            step *= module_input.shape[inner]
        if covered != size:
            return None
    # Strides of size-1 dims are arbitrary, so those dims are matched by size alone.
    units = _reduced_by_size(module_input.shape, kernel_input.shape, reduced, {1})
    return None if units is None else found | units


def _reduced_by_size(
    module_shape: tuple[int, ...], kernel_shape: tuple[int, ...], reduced: set[int], sizes: set[int]
) -> set[int] | None:
    """Input dims of the given sizes that the reduced kernel dims stand for, matching dims by size."""
    found: set[int] = set()
    for size in sizes:
        module_dims = [d for d, s in enumerate(module_shape) if s == size]
        kernel_dims = [d for d, s in enumerate(kernel_shape) if s == size]
        num_reduced = len(reduced.intersection(kernel_dims))
        if num_reduced == 0:
            continue
        if num_reduced != len(kernel_dims) or len(kernel_dims) != len(module_dims):
            return None
        found.update(module_dims)
    return found


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
    reduced_axes: tuple[int, ...] | None = None,
) -> AxesExplanation:
    """Axis names, reduced dims and the explanation for one call of a layer on ``shape``.

    Args:
        family: how the layer reduces (batch, instance, group, layer, rms).
        layer_label: "name (Type)" to open the sentence with.
        shape: the input shape of one batch.
        is_unbatched: InstanceNorm given (C, *S) without a batch dim.
        num_groups: GroupNorm's G.
        normalized_ndim: how many trailing dims LayerNorm / RMSNorm normalize over.
        reduced_axes: the dims LayerNorm / RMSNorm reduce, where the layer's kernel was seen to
            reduce others than the trailing ones (see kernel_reduced_dims).
    """
    if family is NormFamily.BATCH:
        return _explain_batch(layer_label, shape)
    if family is NormFamily.INSTANCE:
        return _explain_instance(layer_label, shape, is_unbatched)
    if family is NormFamily.GROUP:
        return _explain_group(layer_label, shape, num_groups or 1)
    return _explain_trailing(family, layer_label, shape, normalized_ndim, reduced_axes)


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


def _explain_trailing(
    family: NormFamily,
    label: str,
    shape: tuple[int, ...],
    normalized_ndim: int,
    reduced_axes: tuple[int, ...] | None,
) -> AxesExplanation:
    rank = len(shape)
    normalized_ndim = max(1, min(normalized_ndim, rank))
    reduced = reduced_axes or tuple(range(rank - normalized_ndim, rank))
    is_trailing = reduced == tuple(range(rank - len(reduced), rank))
    if not is_trailing and reduced == (1,) and rank >= 3:
        # Normalizing over dim 1 alone is LayerNorm over channels (ConvNeXt's LayerNorm2d).
        names: tuple[str, ...] = ("N", "C", *_spatial_names(rank - 2))
    elif rank == 2:
        names = ("N", "D")
    elif rank == 3:
        names = ("N", "T", "D")
    else:
        names = ("N", *(f"D{i}" for i in range(1, rank)))
    kept = [d for d in range(rank) if d not in reduced]
    count = math.prod(shape[d] for d in kept)
    values = math.prod(shape[d] for d in reduced)
    what = "root mean squares (no mean is subtracted)" if family is NormFamily.RMS else ("means and as many variances")
    per = "one per sample" if kept == [0] else "one per position"
    if is_trailing:
        # One kept dim is the count itself; several are multiplied out, as the other families show theirs.
        head = f"{count:,}" if len(kept) == 1 else _product([names[d] for d in kept], [shape[d] for d in kept])
        which = ("the last dim" if len(reduced) == 1 else f"the last {len(reduced)} dims") + " reduced"
    else:
        head = _product([names[d] for d in kept], [shape[d] for d in kept])
        which = f"{_dims(reduced)} reduced, which the layer moves last before normalizing"
    sentence = (
        f"{label} got {_shape(shape)} = ({', '.join(names)}): {head} {what}, {per}, each over "
        f"{_product([names[d] for d in reduced], [shape[d] for d in reduced])} values "
        f"({which}; keeps no running statistics)."
    )
    return AxesExplanation(names, reduced, count, values, sentence)
