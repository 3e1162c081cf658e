"""Eval-mode batch norm that also returns its input's per-channel moments, in one read (Triton).

A separate statistics pass must read every batch-norm input once more than the forward does;
on a GPU that read costs as much as the normalization itself. In eval mode the layer's output
is an affine map of its input with fixed coefficients, so one kernel can normalize a tile and
reduce the same tile while it sits in registers: the input is read once, as the plain forward
reads it. This module holds that kernel and the small one that folds its per-program partials into
the float64 moments, merged with the batches seen before.

Exactness: each program shifts its channels by the mean of its own first tile, adds the shifted
values and their squares element by element across its tiles in float32 (no reduction across
threads per tile), and reduces once at the end; the shift is stored exactly, so the float64
combine recovers every program's mean and sum of squared deviations, and merges programs and
batches with Chan's formula. The sums cancel only by how far a program's values stray from its
own first tile's mean, so large means and tiny variances keep float32 resolution relative to
the spread, not to the magnitude (tests/test_fused.py, benchmarks/gpu_check.py).

Used only where it applies exactly (stock ``nn.BatchNorm1d/2d/3d`` in eval mode with running
statistics, on CUDA, input contiguous in NC* or channels-last order, no autograd); elsewhere the
portable path (a pre-hook and ``stats.channel_moments``) runs. ``BN_INSPECT_FUSED=0`` turns it off.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bn_inspect.engine.fused import cpu
from bn_inspect.engine.fused.cpu import STOCK_FORWARD
from bn_inspect.engine.fused.tiles import TILE
from bn_inspect.engine.moments import ChannelMoments

_FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpreting() -> bool:
    # Triton's interpreter runs the kernels on CPU tensors: how they are tested without a GPU.
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _kernels() -> Any:
    """The compiled kernels, or None where Triton is absent or turned off."""
    if os.environ.get("BN_INSPECT_FUSED") == "0" or importlib.util.find_spec("triton") is None:
        return None
    from bn_inspect.engine.fused import kernels as fused_kernels

    return fused_kernels


def fused_may_run(module: nn.Module) -> bool:
    """Whether ``module`` is a stock batch norm on a device where the fused kernel can replace its forward."""
    if not (
        isinstance(module, _BatchNorm)
        and type(module).forward is STOCK_FORWARD
        and "forward" not in vars(module)
        and not isinstance(module, nn.modules.lazy.LazyModuleMixin)
        and module.running_mean is not None
    ):
        return False
    device = module.running_mean.device
    if device.type == "cpu" and not _interpreting():
        return cpu.requested()
    return (device.type == "cuda" or (_interpreting() and device.type == "cpu")) and _kernels() is not None


def _layout(x: torch.Tensor) -> tuple[str, int, int, int] | None:
    """('rows', R, C, 1) for (R, C) row-major data, ('planes', N, C, S) for NC* contiguous, else None."""
    return _layout_of(x.shape, x.stride())


@functools.lru_cache(maxsize=256)
def _layout_of(shape: tuple[int, ...], strides: tuple[int, ...]) -> tuple[str, int, int, int] | None:
    # Cached by shape and strides: this runs for every layer call, and Python time adds up when
    # the forward is short (on a GPU the host can fall behind the kernels).
    if len(shape) < 2:
        return None
    num_channels = shape[1]
    spatial = math.prod(shape[2:])
    if _dense_in_order(shape, strides, (*range(len(shape) - 1, 1, -1), 1, 0)) and spatial > 1:
        return ("planes", shape[0], num_channels, spatial)
    if _dense_in_order(shape, strides, (1, *range(len(shape) - 1, 1, -1), 0)):
        return ("rows", shape[0] * spatial, num_channels, 1)
    return None


def _dense_in_order(shape: tuple[int, ...], strides: tuple[int, ...], innermost_first: tuple[int, ...]) -> bool:
    """Whether the dims, innermost first, are laid out densely (size-1 dims may have any stride)."""
    expected = 1
    for dim in innermost_first:
        if shape[dim] != 1 and strides[dim] != expected:
            return False
        expected *= shape[dim]
    return True


def fused_applies(module: _BatchNorm, x: torch.Tensor) -> bool:
    """Whether this call of a fusable module can run the fused kernel (else: the portable path)."""
    if module.training or module.running_mean is None or module.running_var is None or x.dim() < 2:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters(False))):
        return False
    if x.device.type == "cpu" and not _interpreting():
        return cpu.requested() and cpu.applies(module, x)
    if not (x.is_cuda or (_interpreting() and x.device.type == "cpu")) or x.dtype not in _FLOAT_TYPES:
        return False
    if x.numel() == 0 or _layout(x) is None:
        return False
    return _kernels() is not None


def batch_norm_eval_with_moments(
    module: _BatchNorm, x: torch.Tensor, previous: ChannelMoments | None
) -> tuple[torch.Tensor, ChannelMoments]:
    """The layer's eval-mode output and ``previous`` merged with the moments of ``x``.

    Call only where ``fused_applies(module, x)``. Returns a tensor of ``x``'s shape, dtype and
    memory format, normalized with the running statistics as ``F.batch_norm`` would (float32
    arithmetic; the result differs from torch's kernels by rounding only).
    """
    if x.device.type == "cpu" and not _interpreting():
        return cpu.batch_norm_eval_with_moments(module, x, previous)
    kernels = _kernels()
    layout = _layout(x)
    assert kernels is not None and layout is not None
    kind, outer, num_channels, spatial = layout
    y = torch.empty_like(x)
    partials = kernels.normalize_and_reduce(kind, x, y, module, outer, num_channels, spatial, TILE)
    count = x.numel() // num_channels
    mean, m2 = kernels.combine(partials, num_channels, previous, count)
    return y, ChannelMoments(count + (previous.count if previous else 0), mean, m2)
