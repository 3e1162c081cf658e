"""Axis names, reduced dims, counts and the explanation sentence for every family and rank."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from bn_inspect.engine.axes import TensorLayout, explain_axes, kernel_reduced_dims
from bn_inspect.model.layers import NormFamily


def test_batch_norm_2d_sentence_from_the_issue() -> None:
    axes = explain_axes(NormFamily.BATCH, "layer1.0.bn1 (BatchNorm2d)", (8, 64, 56, 56))
    assert axes.sentence == (
        "layer1.0.bn1 (BatchNorm2d) got (8, 64, 56, 56) = (N, C, H, W): 64 means and 64 variances, "
        "each over N×H×W = 8×56×56 = 25,088 values (dims 0, 2, 3 reduced; C kept)."
    )
    assert axes.axis_names == ("N", "C", "H", "W")
    assert axes.reduced_axes == (0, 2, 3)
    assert (axes.num_statistics, axes.values_per_statistic) == (64, 25_088)


@pytest.mark.parametrize(
    ("shape", "names", "reduced", "values", "product"),
    [
        ((32, 30), ("N", "C"), (0,), 32, "N = 32"),
        ((4, 6, 50), ("N", "C", "L"), (0, 2), 200, "N×L = 4×50 = 200"),
        ((2, 3, 4, 5, 6), ("N", "C", "D", "H", "W"), (0, 2, 3, 4), 240, "N×D×H×W = 2×4×5×6 = 240"),
        ((2, 3, 2, 2, 2, 2), ("N", "C", "S1", "S2", "S3", "S4"), (0, 2, 3, 4, 5), 32, "= 2×2×2×2×2 = 32"),
    ],
    ids=["N,C", "N,C,L", "N,C,D,H,W", "rank6"],
)
def test_batch_norm_every_rank(
    shape: tuple[int, ...], names: tuple[str, ...], reduced: tuple[int, ...], values: int, product: str
) -> None:
    axes = explain_axes(NormFamily.BATCH, "bn (BatchNorm)", shape)
    assert axes.axis_names == names
    assert axes.reduced_axes == reduced
    assert axes.values_per_statistic == values
    assert axes.num_statistics == shape[1]
    assert product in axes.sentence


def test_instance_norm_batched_and_unbatched() -> None:
    batched = explain_axes(NormFamily.INSTANCE, "in (InstanceNorm2d)", (8, 16, 32, 32))
    assert batched.reduced_axes == (2, 3)
    assert (batched.num_statistics, batched.values_per_statistic) == (128, 1024)
    assert "N×C = 8×16 = 128 means" in batched.sentence
    assert "each over H×W = 32×32 = 1,024 values (dims 2, 3 reduced; N and C kept)" in batched.sentence
    unbatched = explain_axes(NormFamily.INSTANCE, "in (InstanceNorm1d)", (4, 50), is_unbatched=True)
    assert unbatched.axis_names == ("C", "L")
    assert unbatched.reduced_axes == (1,)
    assert (unbatched.num_statistics, unbatched.values_per_statistic) == (4, 50)


def test_group_norm() -> None:
    axes = explain_axes(NormFamily.GROUP, "gn (GroupNorm)", (8, 64, 16, 16), num_groups=4)
    assert (axes.num_statistics, axes.values_per_statistic) == (32, 4096)
    assert "one per sample and group of 16 channels, each over C/G×H×W = 16×16×16 = 4,096 values" in axes.sentence
    assert "keeps no running statistics" in axes.sentence


def test_layer_norm_and_rms_norm_over_trailing_dims() -> None:
    tokens = explain_axes(NormFamily.LAYER, "ln (LayerNorm)", (8, 10, 768))
    assert tokens.sentence == (
        "ln (LayerNorm) got (8, 10, 768) = (N, T, D): N×T = 8×10 = 80 means and as many variances, one per "
        "position, each over D = 768 values (the last dim reduced; keeps no running statistics)."
    )
    # The issue's case: the kept dims multiplied out, as BatchNorm's reduced ones are.
    assert explain_axes(NormFamily.LAYER, "ln (LayerNorm)", (8, 128, 512)).sentence == (
        "ln (LayerNorm) got (8, 128, 512) = (N, T, D): N×T = 8×128 = 1,024 means and as many variances, one per "
        "position, each over D = 512 values (the last dim reduced; keeps no running statistics)."
    )
    assert "N×D1×D2 = 4×3×5 = 60 means" in explain_axes(NormFamily.LAYER, "ln (LayerNorm)", (4, 3, 5, 6)).sentence
    two_dims = explain_axes(NormFamily.LAYER, "ln (LayerNorm)", (4, 3, 5, 6), normalized_ndim=2)
    assert two_dims.reduced_axes == (2, 3)
    assert (two_dims.num_statistics, two_dims.values_per_statistic) == (12, 30)
    rms = explain_axes(NormFamily.RMS, "rms (RMSNorm)", (4, 16))
    assert "4 root mean squares (no mean is subtracted), one per sample, each over D = 16 values" in rms.sentence


def test_layer_norm_over_channels_moved_last() -> None:
    axes = explain_axes(NormFamily.LAYER, "stem.1 (LayerNorm2d)", (8, 64, 56, 56), reduced_axes=(1,))
    assert axes.sentence == (
        "stem.1 (LayerNorm2d) got (8, 64, 56, 56) = (N, C, H, W): N×H×W = 8×56×56 = 25,088 means and as many "
        "variances, one per position, each over C = 64 values (dim 1 reduced, which the layer moves last before "
        "normalizing; keeps no running statistics)."
    )
    assert axes.axis_names == ("N", "C", "H", "W")
    assert axes.reduced_axes == (1,)
    assert (axes.num_statistics, axes.values_per_statistic) == (25_088, 64)
    rms = explain_axes(NormFamily.RMS, "rms (ChannelRMSNorm)", (4, 16, 10), reduced_axes=(1,))
    assert rms.axis_names == ("N", "C", "L")
    assert "N×L = 4×10 = 40 root mean squares (no mean is subtracted), one per position, each over C = 16" in (
        rms.sentence
    )


def test_given_trailing_dims_read_as_the_plain_rule() -> None:
    plain = explain_axes(NormFamily.LAYER, "ln (LayerNorm)", (4, 3, 5, 6), normalized_ndim=2)
    assert explain_axes(NormFamily.LAYER, "ln (LayerNorm)", (4, 3, 5, 6), reduced_axes=(2, 3)) == plain
    moved = explain_axes(NormFamily.LAYER, "ln (Odd)", (4, 3, 5, 6), reduced_axes=(1, 2, 3))
    assert moved == explain_axes(NormFamily.LAYER, "ln (Odd)", (4, 3, 5, 6), normalized_ndim=3)
    assert "4 means and as many variances, one per sample" in moved.sentence
    two = explain_axes(NormFamily.LAYER, "ln (Odd)", (4, 3, 5, 6), reduced_axes=(1, 2))
    assert two.axis_names == ("N", "D1", "D2", "D3")
    assert (two.num_statistics, two.values_per_statistic) == (24, 15)
    assert "N×D3 = 4×6 = 24 means" in two.sentence and "(dims 1, 2 reduced, which the layer moves last" in two.sentence


def layout(tensor: torch.Tensor) -> TensorLayout:
    return TensorLayout(
        tuple(tensor.shape), tuple(tensor.stride()), tensor.untyped_storage().data_ptr(), tensor.storage_offset()
    )


def to_nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


@pytest.mark.parametrize(
    ("shape", "rearrange", "normalized_ndim", "expected"),
    [
        ((2, 3, 4, 5), lambda x: x, 1, (3,)),
        ((2, 3, 4, 5), lambda x: x, 2, (2, 3)),
        ((2, 3, 4, 5), to_nhwc, 1, (1,)),
        ((2, 3, 4, 5), lambda x: x.permute(0, 3, 1, 2), 2, (1, 2)),
        ((2, 3, 4, 4), to_nhwc, 1, (1,)),
        ((2, 4, 4, 4), to_nhwc, 1, (1,)),
        ((2, 3, 4, 5), lambda x: to_nhwc(x.contiguous(memory_format=torch.channels_last)), 1, (1,)),
        ((2, 3, 4, 5), lambda x: x.flatten(2).transpose(1, 2), 1, (1,)),
        ((2, 6, 1, 1), to_nhwc, 1, (1,)),
        ((2, 1, 4, 5), to_nhwc, 1, (1,)),
        ((2, 3, 4, 5), lambda x: to_nhwc(x).contiguous(), 1, (1,)),
        ((2, 3, 4, 4), lambda x: to_nhwc(x).contiguous(), 1, (1,)),
        ((2, 3, 4, 5), lambda x: to_nhwc(x.half()).float(), 1, (1,)),
        ((2, 3, 4, 5), lambda x: torch.relu(to_nhwc(x)), 1, (1,)),
        ((2, 4, 4, 4), lambda x: to_nhwc(x).contiguous(), 1, None),
        ((2, 3, 3, 5), lambda x: to_nhwc(x).contiguous(), 1, None),
        ((2, 3, 4, 5), lambda x: x.flatten(2).transpose(1, 2).contiguous(), 1, None),
        ((2, 3, 4, 5), lambda x: to_nhwc(x)[:, :, :, :2], 1, None),
        ((2, 3, 4, 5), lambda x: to_nhwc(x), 5, None),
    ],
    ids=[
        "itself",
        "itself, 2 dims",
        "NHWC view",
        "NWCH view, 2 dims",
        "NHWC view, H = W",
        "NHWC view, C = H = W",
        "NHWC view of channels_last input",
        "flattened (N, HW, C) view",
        "NHWC view, 1x1 maps",
        "NHWC view, one channel",
        "NHWC copy",
        "NHWC copy, H = W",
        "NHWC copy in another dtype",
        "NHWC after an elementwise op",
        "NHWC copy, C = H = W: ambiguous",
        "NHWC copy, C = H: ambiguous",
        "flattened copy: sizes do not match",
        "part of the input",
        "more dims than the kernel input has",
    ],
)
def test_kernel_reduced_dims(
    shape: tuple[int, ...],
    rearrange: Callable[[torch.Tensor], torch.Tensor],
    normalized_ndim: int,
    expected: tuple[int, ...] | None,
) -> None:
    x = torch.randn(shape)
    assert kernel_reduced_dims(layout(x), layout(rearrange(x)), normalized_ndim) == expected
