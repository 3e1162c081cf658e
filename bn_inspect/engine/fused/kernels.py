"""Triton kernels behind ``fused``: imported only where Triton is installed (see fused._kernels)."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from bn_inspect.engine.fused.tiles import TileConfig
from bn_inspect.engine.moments import ChannelMoments


@triton.jit
def _is_finite(v):
    return tl.abs(v) < float("inf")


@triton.jit
def _chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Chan's parallel update; infinite or NaN means add up (as the values would) and leave m2 NaN."""
    total = count_a + count_b
    weight_b = count_b / tl.maximum(total, 1.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * weight_b
    m2 = m2_a + m2_b + delta * delta * count_a * weight_b
    finite = _is_finite(mean_a) & _is_finite(mean_b)
    mean = tl.where(finite, mean, mean_a + mean_b)
    m2 = tl.where(finite, m2, float("nan"))
    return total, mean, m2


@triton.jit
def _affine(rm_ptr, rv_ptr, w_ptr, b_ptr, cols, cmask, eps, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Eval batch norm as y = x * scale + offset, in float32 as torch's own kernels compute it."""
    running_mean = tl.load(rm_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    running_var = tl.load(rv_ptr + cols, mask=cmask, other=1.0).to(tl.float32)
    scale = 1.0 / tl.sqrt(running_var + eps)
    if HAS_WEIGHT:
        scale = scale * tl.load(w_ptr + cols, mask=cmask, other=1.0).to(tl.float32)
    offset = -running_mean * scale
    if HAS_BIAS:
        offset = offset + tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    return scale, offset


@triton.jit
def _rows_tile(x_ptr, y_ptr, tile, num_rows, num_channels, cols, cmask, scale, offset, BLOCK_R: tl.constexpr):
    """Normalize one tile of BLOCK_R rows; return its float32 values, their mask and how many rows it has."""
    rows = tile * BLOCK_R + tl.arange(0, BLOCK_R)
    mask = (rows < num_rows)[:, None] & cmask[None, :]
    offsets = rows.to(tl.int64)[:, None] * num_channels + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offsets, (x * scale[None, :] + offset[None, :]).to(y_ptr.dtype.element_ty), mask=mask)
    return x, mask, tl.minimum(tl.maximum(num_rows - tile * BLOCK_R, 0), BLOCK_R).to(tl.float32)


@triton.jit
def _planes_tile(
    x_ptr, y_ptr, tile, num_samples, num_channels, spatial, cols, cmask, scale, offset, BLOCK_S: tl.constexpr
):
    """Normalize BLOCK_S positions of one sample's channels; return values, mask and positions per channel."""
    blocks_per_plane = tl.cdiv(spatial, BLOCK_S)
    sample = tile // blocks_per_plane
    start = (tile % blocks_per_plane) * BLOCK_S
    positions = start + tl.arange(0, BLOCK_S)
    # Past the last sample no position is valid (a comparison of ints, not a scalar-bool mask).
    valid_positions = tl.where(sample < num_samples, spatial, 0)
    mask = cmask[:, None] & (positions < valid_positions)[None, :]
    offsets = (sample.to(tl.int64) * num_channels + cols[:, None]) * spatial + positions[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offsets, (x * scale[:, None] + offset[:, None]).to(y_ptr.dtype.element_ty), mask=mask)
    count = tl.where(sample < num_samples, tl.minimum(spatial - start, BLOCK_S), 0).to(tl.float32)
    return x, mask, count


@triton.jit
def _partial_pointers(work_ptr, num_programs, num_channels):
    """Where shifts, shifted means, m2 and counts start in the work buffer (see ``Partials``)."""
    plane = num_programs.to(tl.int64) * num_channels
    return work_ptr, work_ptr + plane, work_ptr + 2 * plane, work_ptr + 3 * plane


@triton.jit
def _store_partials(
    work_ptr,
    program,
    num_programs,
    first_program,
    num_channels,
    cols,
    cmask,
    shift,
    sums,
    squares,
    count,
):
    """Write one program's (shift, mean - shift, m2, count) into the work buffer (see ``Partials``)."""
    pshift_ptr, pmean_ptr, pm2_ptr, pcount_ptr = _partial_pointers(work_ptr, num_programs, num_channels)
    shifted_mean = sums / count
    m2 = squares - sums * shifted_mean
    m2 = tl.where(m2 < 0, 0.0, m2)
    base = program.to(tl.int64) * num_channels + cols
    tl.store(pshift_ptr + base, shift, mask=cmask)
    tl.store(pmean_ptr + base, shifted_mean, mask=cmask)
    tl.store(pm2_ptr + base, m2, mask=cmask)
    tl.store(pcount_ptr + program, count, mask=first_program)


# Row and sample counts only bound the masks: specializing on them would recompile per batch size.
@triton.jit(do_not_specialize=["num_rows", "num_programs"])
def _rows_kernel(
    x_ptr,
    y_ptr,
    rm_ptr,
    rv_ptr,
    w_ptr,
    b_ptr,
    work_ptr,
    num_programs,
    num_rows,
    num_channels,
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    TILES: tl.constexpr,
):
    """(R, C) row-major input (channels last, or (N, C)): TILES tiles of BLOCK_R rows x BLOCK_C channels.

    Every tile is normalized and stored, and its shifted values and squares are added element by
    element (no reduction across threads per tile); the program reduces once at the end. The shift
    is the mean of the program's first tile, so the squares cancel only by the local spread.
    """
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < num_channels
    scale, offset = _affine(rm_ptr, rv_ptr, w_ptr, b_ptr, cols, cmask, eps, HAS_WEIGHT, HAS_BIAS)
    x, mask, count = _rows_tile(
        x_ptr, y_ptr, pid_r * TILES, num_rows, num_channels, cols, cmask, scale, offset, BLOCK_R
    )
    shift = tl.sum(x, 0) / count
    shift = tl.where(_is_finite(shift), shift, 0.0)
    shifted = tl.where(mask, x - shift[None, :], 0.0)
    sums = shifted
    squares = shifted * shifted
    for i in range(1, TILES):
        x, mask, tile_count = _rows_tile(
            x_ptr, y_ptr, pid_r * TILES + i, num_rows, num_channels, cols, cmask, scale, offset, BLOCK_R
        )
        shifted = tl.where(mask, x - shift[None, :], 0.0)
        sums += shifted
        squares += shifted * shifted
        count += tile_count
    _store_partials(
        work_ptr,
        pid_r,
        num_programs,
        pid_c == 0,
        num_channels,
        cols,
        cmask,
        shift,
        tl.sum(sums, 0),
        tl.sum(squares, 0),
        count,
    )


@triton.jit(do_not_specialize=["num_samples", "num_programs"])
def _planes_kernel(
    x_ptr,
    y_ptr,
    rm_ptr,
    rv_ptr,
    w_ptr,
    b_ptr,
    work_ptr,
    num_programs,
    num_samples,
    num_channels,
    spatial,
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    TILES: tl.constexpr,
):
    """(N, C, S) contiguous input: TILES tiles of BLOCK_C channels x BLOCK_S positions of one sample each.

    Accumulates as ``_rows_kernel`` does, reducing over positions (dim 1 of the tile).
    """
    pid_c = tl.program_id(0)
    pid_t = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < num_channels
    scale, offset = _affine(rm_ptr, rv_ptr, w_ptr, b_ptr, cols, cmask, eps, HAS_WEIGHT, HAS_BIAS)
    x, mask, count = _planes_tile(
        x_ptr, y_ptr, pid_t * TILES, num_samples, num_channels, spatial, cols, cmask, scale, offset, BLOCK_S
    )
    shift = tl.sum(x, 1) / count
    shift = tl.where(_is_finite(shift), shift, 0.0)
    shifted = tl.where(mask, x - shift[:, None], 0.0)
    sums = shifted
    squares = shifted * shifted
    for i in range(1, TILES):
        x, mask, tile_count = _planes_tile(
            x_ptr, y_ptr, pid_t * TILES + i, num_samples, num_channels, spatial, cols, cmask, scale, offset, BLOCK_S
        )
        shifted = tl.where(mask, x - shift[:, None], 0.0)
        sums += shifted
        squares += shifted * shifted
        count += tile_count
    _store_partials(
        work_ptr,
        pid_t,
        num_programs,
        pid_c == 0,
        num_channels,
        cols,
        cmask,
        shift,
        tl.sum(sums, 1),
        tl.sum(squares, 1),
        count,
    )


@triton.jit
def _load_partials(work_ptr, start, num_partials, num_channels, cols, cmask, BLOCK_P: tl.constexpr):
    """BLOCK_P programs' partials from ``start`` in float64: (counts, means, m2, mask)."""
    pshift_ptr, pmean_ptr, pm2_ptr, pcount_ptr = _partial_pointers(work_ptr, num_partials, num_channels)
    parts = start + tl.arange(0, BLOCK_P)
    mask = (parts < num_partials)[:, None] & cmask[None, :]
    offsets = parts.to(tl.int64)[:, None] * num_channels + cols[None, :]
    counts = tl.load(pcount_ptr + parts, mask=parts < num_partials, other=0.0).to(tl.float64)[:, None]
    means = tl.load(pshift_ptr + offsets, mask=mask, other=0.0).to(tl.float64)
    means += tl.load(pmean_ptr + offsets, mask=mask, other=0.0).to(tl.float64)
    m2s = tl.load(pm2_ptr + offsets, mask=mask, other=0.0).to(tl.float64)
    return counts, means, m2s, mask


# Counts change from call to call: specializing on them (1, multiples of 16) would recompile.
@triton.jit(do_not_specialize=["prev_count", "batch_count", "num_partials"])
def _combine_kernel(
    work_ptr,
    prev_mean_ptr,
    prev_m2_ptr,
    out_ptr,
    num_partials,
    num_channels,
    prev_count,
    batch_count,
    HAS_PREVIOUS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Partials -> the batch's float64 moments (two passes over them), merged with the previous ones.

    Writes mean to ``out[0]`` and m2 to ``out[1]``.
    """
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < num_channels
    batch_count = batch_count.to(tl.float64)
    # while, not range(0, num_partials, BLOCK_P): Triton's interpreter (the CPU test) cannot
    # take a runtime range bound under NumPy >= 2.4.
    weighted = tl.zeros([BLOCK_C], dtype=tl.float64)
    start = tl.full([], 0, tl.int32)
    while start < num_partials:
        counts, means, _, mask = _load_partials(work_ptr, start, num_partials, num_channels, cols, cmask, BLOCK_P)
        weighted += tl.sum(tl.where(mask, counts * means, 0.0), 0)
        start += BLOCK_P
    batch_mean = weighted / batch_count
    m2 = tl.zeros([BLOCK_C], dtype=tl.float64)
    start = tl.full([], 0, tl.int32)
    while start < num_partials:
        counts, means, m2s, mask = _load_partials(work_ptr, start, num_partials, num_channels, cols, cmask, BLOCK_P)
        delta = means - batch_mean[None, :]
        m2 += tl.sum(tl.where(mask, m2s + counts * delta * delta, 0.0), 0)
        start += BLOCK_P
    mean = batch_mean
    m2 = tl.where(_is_finite(batch_mean), m2, float("nan"))
    if HAS_PREVIOUS:
        prev_mean = tl.load(prev_mean_ptr + cols, mask=cmask, other=0.0)
        prev_m2 = tl.load(prev_m2_ptr + cols, mask=cmask, other=0.0)
        _, mean, m2 = _chan_merge(prev_count.to(tl.float64), prev_mean, prev_m2, batch_count, batch_mean, m2)
    tl.store(out_ptr + cols, mean, mask=cmask)
    tl.store(out_ptr + num_channels + cols, m2, mask=cmask)


class Partials(NamedTuple):
    """What the programs of one launch wrote, for ``combine``.

    Attributes:
        work: one float32 buffer holding, for P programs, shifts (P x C), shifted means (P x C),
            m2 (P x C), then the number of values each program saw (P).
        num_programs: P.
    """

    work: torch.Tensor
    num_programs: int


class Plan(NamedTuple):
    """Launch shape of the fused kernel for one input layout."""

    grid: tuple[int, int]
    block_c: int
    block_inner: int
    tiles: int


@functools.lru_cache(maxsize=256)
def _plan(kind: str, outer: int, num_channels: int, spatial: int, tile: TileConfig) -> Plan:
    block_c = min(tile.max_block_c, triton.next_power_of_2(num_channels))
    if kind == "rows":
        block_inner = max(1, min(tile.elements // block_c, triton.next_power_of_2(outer)))
        num_tiles = triton.cdiv(outer, block_inner)
    else:
        block_inner = min(1024, triton.next_power_of_2(spatial))
        block_c = max(1, min(block_c, tile.elements // block_inner))
        num_tiles = outer * triton.cdiv(spatial, block_inner)
    tiles = max(1, min(tile.tiles_per_program, num_tiles))
    return Plan((triton.cdiv(num_channels, block_c), triton.cdiv(num_tiles, tiles)), block_c, block_inner, tiles)


def normalize_and_reduce(
    kind: str,
    x: torch.Tensor,
    y: torch.Tensor,
    module: Any,
    outer: int,
    num_channels: int,
    spatial: int,
    tile: TileConfig,
) -> Partials:
    """Write ``module``'s eval-mode output for ``x`` into ``y``; return the per-program partials."""
    plan = _plan(kind, outer, num_channels, spatial, tile)
    num_programs = plan.grid[1]
    work = torch.empty(num_programs * (3 * num_channels + 1), device=x.device, dtype=torch.float32)
    weight, bias = (module.weight, module.bias) if module.affine else (None, None)
    running_mean = module.running_mean
    common = (
        x,
        y,
        running_mean,
        module.running_var,
        running_mean if weight is None else weight,
        running_mean if bias is None else bias,
        work,
        num_programs,
    )
    flags = {
        "HAS_WEIGHT": weight is not None,
        "HAS_BIAS": bias is not None,
        "TILES": plan.tiles,
        "num_warps": tile.num_warps,
    }
    eps = float(module.eps)
    if kind == "rows":
        _rows_kernel[plan.grid](
            *common, outer, num_channels, eps, BLOCK_R=plan.block_inner, BLOCK_C=plan.block_c, **flags
        )
    else:
        _planes_kernel[plan.grid](
            *common, outer, num_channels, spatial, eps, BLOCK_C=plan.block_c, BLOCK_S=plan.block_inner, **flags
        )
    return Partials(work, num_programs)


def combine(
    partials: Partials, num_channels: int, previous: ChannelMoments | None, batch_count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (mean, m2) of everything seen: ``previous`` merged with the partials' moments."""
    out = torch.empty(2, num_channels, dtype=torch.float64, device=partials.work.device)
    block_c = min(64, triton.next_power_of_2(num_channels))
    if previous is None or previous.count == 0:
        previous = ChannelMoments(0, out, out)
    _combine_kernel[(triton.cdiv(num_channels, block_c),)](
        partials.work,
        previous.mean,
        previous.m2,
        out,
        partials.num_programs,
        num_channels,
        previous.count,
        batch_count,
        HAS_PREVIOUS=previous.count > 0,
        BLOCK_P=64,
        BLOCK_C=block_c,
    )
    mean, m2 = out.unbind()
    return mean, m2
