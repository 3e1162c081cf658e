"""Per-channel moments of normalization-layer inputs and their exact merge: pure tensor math.

Two accumulators, both kept in float64 on the activations' device so that a run never
synchronises with the host until the report is built:

* ``ChannelMoments`` for batch-style layers (BatchNorm and relatives). For an input of shape
  (N, C, *S) each channel c has ``count = N * prod(S)`` values x; it keeps their mean and the
  centred sum of squares ``m2 = sum((x - mean)**2)``. The biased variance ``m2 / count`` is what
  BatchNorm normalizes with in training; the unbiased ``m2 / (count - 1)`` is what it folds into
  ``running_var``. Batches merge with Chan's parallel formula, which is exact: the merged moments
  are those of all values seen, not an average of per-batch numbers.
* ``InstanceMoments`` for InstanceNorm, which normalizes every (sample, channel) pair over its own
  spatial values and whose running statistics average those per-instance statistics.

Both answer the same questions alike (``Moments``): ``mean``, ``biased_var()``, ``unbiased_var()``,
``values_per_channel``, ``values_per_statistic`` and ``merge``, so no caller asks which it holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Shifted sums lose about log2(1 + shift**2 / var) bits to the cancellation in m2 = S2 - S1**2 / n.
# Past this factor the exact (slower) two-pass torch.var_mean is used for that input instead.
MAX_CANCELLATION = 64.0
# The CPU sums run over pieces of the batch this large: each piece is shifted, summed, squared and
# summed again while it sits in the cache, so the activation is read from memory once, and the
# scratch space stays the size of a piece (or one sample), not of the activation.
CPU_PIECE_BYTES = 1 << 22


@dataclass(frozen=True)
class ChannelMoments:
    """Count, mean and centred sum of squares per channel (float64, on the input's device).

    Attributes:
        count: values per channel, N x product of the reduced spatial sizes.
        mean: (C,) per-channel mean.
        m2: (C,) per-channel sum of squared deviations from ``mean``.
    """

    count: int
    mean: torch.Tensor
    m2: torch.Tensor

    @property
    def values_per_channel(self) -> int:
        """Values behind each channel's statistics: ``count``."""
        return self.count

    @property
    def values_per_statistic(self) -> int:
        """Values behind one mean and one variance: ``count`` (decides whether n - 1 > 0)."""
        return self.count

    def merge(self, other: ChannelMoments) -> ChannelMoments:
        """Moments of the union of both value sets (Chan et al.'s parallel update)."""
        if self.count == 0:
            return other
        if other.count == 0:
            return self
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = torch.add(self.mean, delta, alpha=other.count / count)
        m2 = torch.addcmul(self.m2 + other.m2, delta, delta, value=self.count * other.count / count)
        # Chan's update turns an infinite mean into NaN (inf - inf); the sum of the means keeps
        # +inf, -inf or NaN as the population of values would have it, and the spread is undefined.
        # delta - delta is 0 exactly where delta is finite, which it is where both means are (it
        # could overflow only for means near 1e308).
        finite = delta - delta == 0
        mean = torch.where(finite, mean, self.mean + other.mean)
        m2 = torch.where(finite, m2, math.nan)
        return ChannelMoments(count, mean, m2)

    def biased_var(self) -> torch.Tensor:
        """m2 / count: the variance BatchNorm normalizes with."""
        return self.m2 / self.count if self.count else torch.full_like(self.m2, float("nan"))

    def unbiased_var(self) -> torch.Tensor:
        """m2 / (count - 1): the variance BatchNorm folds into running_var; NaN for one value."""
        if self.count < 2:
            return torch.full_like(self.m2, float("nan"))
        return self.m2 / (self.count - 1)


def channel_moments(x: torch.Tensor) -> ChannelMoments:
    """Per-channel moments of ``x`` of shape (N, C, *S), reducing every dim but dim 1.

    The sums run in float32 (float64 for float64 input), never in bf16/fp16, on the input's
    device; only (C,)-sized results are kept. Values are first shifted by one sample of their
    channel, so the sum of squares stays accurate even for large means and tiny variances.
    """
    num_channels = x.shape[1]
    count = x.numel() // num_channels if num_channels else 0
    if count == 0:
        empty = torch.zeros(num_channels, dtype=torch.float64, device=x.device)
        return ChannelMoments(0, empty, empty.clone())
    if x.is_cuda and x.dtype != torch.float64:
        return welford_moments(x, count)
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    if x.device.type != "cpu":
        # Elsewhere a cancellation check would stall the device queue; var_mean is exact.
        return two_pass_moments(work, [0, *range(2, x.dim())], count)
    return cpu_moments(work)


def cpu_moments(work: torch.Tensor) -> ChannelMoments:
    """``channel_moments`` of a float32 or float64 CPU tensor of shape (N, C, *S) with N * prod(S) > 0."""
    if work.requires_grad:
        # Out= ops refuse tensors that require grad, and statistics are no part of the graph.
        work = work.detach()
    num_channels = work.shape[1]
    # The first value of each channel is the shift (one strided view of them, shaped to broadcast);
    # an infinite one would turn the whole channel into inf - inf = NaN, so those are not shifted.
    first = work.as_strided((1, num_channels, *[1] * (work.dim() - 2)), work.stride(), work.storage_offset())
    shift = torch.nan_to_num(first, nan=0.0, posinf=0.0, neginf=0.0)
    shifted_sum, sum_sq = _shifted_sums(work, shift)
    count = work.numel() // num_channels
    return settled_moments(work, count, *shifted_moments(count, shift.reshape(-1), shifted_sum, sum_sq))


def settled_moments(
    work: torch.Tensor, count: int, mean: torch.Tensor, m2: torch.Tensor, unusable: torch.Tensor
) -> ChannelMoments:
    """``shifted_moments``'s results as moments, or, where they were unusable, exact two-pass moments of ``work``."""
    if bool(unusable):
        # Exact, and rare: in float64, so no channel's mean is rounded to float32.
        return two_pass_moments(work.double(), [0, *range(2, work.dim())], count)
    return ChannelMoments(count, mean, m2)


def shifted_moments(
    count: int, shift: torch.Tensor, shifted_sum: torch.Tensor, sum_sq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, m2 and whether the shifted sums are unusable (a 0-dim bool), from sums over ``count`` values.

    Plain tensor ops, so that the compiled CPU kernel (engine/fused/cpu.py) runs them in its graph.
    """
    shifted_mean = shifted_sum / count
    m2 = torch.addcmul(sum_sq, shifted_sum, shifted_mean, value=-1)
    # Shifted sums are unusable where they cancelled (the squared mean over the spread past
    # MAX_CANCELLATION, or m2 <= 0 beside a nonzero mean: m2 - count * mean**2 / MAX_CANCELLATION
    # < 0), or where float32 squares overflowed although the values themselves are finite (m2 =
    # inf; activations beyond ~1e17). NaN channels compare false and keep their NaN.
    excess = torch.addcmul(m2, shifted_mean, shifted_mean, value=-count / MAX_CANCELLATION)
    unusable = ((excess < 0) | (m2 == math.inf)).any()
    return shifted_mean + shift, m2.clamp_min(0), unusable


def _piece_length(work: torch.Tensor) -> int:
    """Samples of ``work`` per piece of the CPU statistics pass: CPU_PIECE_BYTES, or one sample."""
    return max(1, CPU_PIECE_BYTES // max(1, math.prod(work.shape[1:]) * work.element_size()))


def _shifted_sums(work: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel sum and sum of squares of ``work - shift``, piece by piece along dim 0 (float64 totals).

    Within a piece each (sample, channel) row is summed in float32 (torch.sum's cascade over
    contiguous values) into one buffer of row sums, whose rows are then added in float64: relative
    errors near 1e-8, where one float32 reduction over all of N, H, W drifts to 1e-6, and
    torch.linalg.vector_norm to 1e-4. The pieces are views made by one ``split`` each, so the
    Python work per piece is the four reductions themselves.
    """
    spatial = list(range(2, work.dim()))
    step = _piece_length(work)
    row_sums, row_squares = torch.empty((2, work.shape[0], work.shape[1]), dtype=work.dtype).unbind()
    # A (N, C) input has no spatial dims: its rows are its values, shifted straight into the buffer.
    is_one_piece = step >= work.shape[0]
    scratch = torch.empty_like(work if is_one_piece else work[:step]) if spatial else None
    # Most inputs of a small model fit one piece: they skip the three splits.
    pieces = (
        [(work, row_sums, row_squares)]
        if is_one_piece
        else zip(torch.split(work, step), torch.split(row_sums, step), torch.split(row_squares, step), strict=True)
    )
    for piece, sums, squares in pieces:
        if scratch is None:
            torch.sub(piece, shift, out=sums)
            torch.mul(sums, sums, out=squares)
        else:
            length = len(piece)
            shifted = torch.sub(piece, shift, out=scratch if length == len(scratch) else scratch[:length])
            torch.sum(shifted, spatial, out=sums)
            torch.sum(shifted.square_(), spatial, out=squares)
    return row_sums.sum(0, dtype=torch.float64), row_squares.sum(0, dtype=torch.float64)


# A float32 mean over up to millions of values errs by well under 1e-6 of its magnitude (torch.mean
# sums in a cascade); below this many times that error squared, a spread of per-sample means would
# be rounding, so those means are taken again in float64.
SAMPLE_MEAN_ERROR = 1e-6


def sample_moments(x: torch.Tensor) -> ChannelMoments:
    """Moments over the N samples of each sample's channel mean, for ``x`` of shape (N, C, *S), S non-empty.

    ``biased_var()`` is then the between-sample variance of the channel: the part of the channel's
    spread that a batch of few samples leaves out of its own variance (check's BN205). On the CPU
    each sample's mean is a float32 mean over S (float64 for float64 input), taken again in float64
    wherever its rounding could matter next to the spread; elsewhere it is a float64 mean. The merge
    over samples and batches is ``channel_moments``'s, exact.
    """
    work, spatial = x.detach(), list(range(2, x.dim()))
    if x.device.type != "cpu":
        # On an accelerator a float64 mean costs no more than the read, and checking the rounding
        # would wait for the device.
        return channel_moments(work.mean(spatial, dtype=torch.float64))
    # Half-precision input is summed in float32 without a float32 copy of it.
    moments = channel_moments(work.mean(spatial, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32))
    if x.dtype != torch.float64 and moments.count:
        rounding = (moments.mean.abs() * SAMPLE_MEAN_ERROR).square() * moments.count * MAX_CANCELLATION
        if bool((moments.m2 < rounding).any()):
            moments = channel_moments(work.mean(spatial, dtype=torch.float64))
    return moments


# torch's batch-norm statistics kernel returns invstd = 0 for a zero variance when eps is 0 (its
# InvStd functor), which would read back as an infinite variance for every constant channel (a dead
# ReLU upstream). With the smallest normal float32 as eps, a constant channel gives invstd = 2**63
# exactly, and subtracting eps again gives exactly 0; an overflowed variance still reads as inf, and
# any other variance keeps its float32 accuracy, to within 1e-45 absolute.
_WELFORD_EPS = torch.finfo(torch.float32).tiny


def welford_moments(x: torch.Tensor, count: int) -> ChannelMoments:
    """CUDA: the batch-norm statistics kernel (Welford, float accumulation, one read of ``x``).

    It returns 1/sqrt(biased var + eps), so var = invstd**-2 - eps (see _WELFORD_EPS). It reads
    bf16/fp16 directly and accumulates in float32, so no upcast copy is made, and it handles
    channels-last layouts natively.
    """
    mean, invstd = torch.batch_norm_stats(x, _WELFORD_EPS)
    biased_var = (invstd.double().pow(-2) - _WELFORD_EPS).clamp_min(0)
    return ChannelMoments(count, mean.double(), biased_var * count)


def two_pass_moments(work: torch.Tensor, dims: list[int], count: int) -> ChannelMoments:
    """Exact two-pass moments over ``dims``, the fallback on every device."""
    batch_var, batch_mean = _var_mean(work, dims)
    return ChannelMoments(count, batch_mean.double(), batch_var.double() * count)


def _var_mean(work: torch.Tensor, dims: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Biased variance and mean over ``dims``, to the rounding of ``work``'s dtype.

    torch.var_mean accumulates Welford-style, whose relative error grows with mean**2 / var: in
    float64 it errs by 1e-12 at mean 1e3, std 1e-2, far above float64's rounding. For float64 the
    deviations from the mean are summed instead (with the corrected two-pass term, which removes
    the mean's own rounding), at the cost of one float64 copy of ``work``.
    """
    if work.dtype != torch.float64:
        return torch.var_mean(work, dim=dims, correction=0)
    mean = work.mean(dim=dims, keepdim=True)
    deviations = work - mean
    deviation_mean = deviations.mean(dim=dims)
    biased_var = deviations.square_().mean(dim=dims) - deviation_mean.square()
    mean = mean.squeeze_(dims)
    # An infinite value makes every deviation inf - inf = NaN; the mean itself stays what it was.
    corrected_mean = torch.where(torch.isfinite(deviation_mean), mean + deviation_mean, mean)
    return biased_var.clamp_min(0), corrected_mean


@dataclass(frozen=True)
class InstanceMoments:
    """Sums of per-instance statistics for InstanceNorm (float64, on the input's device).

    Attributes:
        num_instances: samples seen; each contributes one mean and one variance per channel.
        values_per_instance: spatial values behind each per-instance statistic.
        mean_sum: (C,) sum over instances of the instance mean.
        var_sum: (C,) sum over instances of the instance's biased variance.
    """

    num_instances: int
    values_per_instance: int
    mean_sum: torch.Tensor
    var_sum: torch.Tensor

    def merge(self, other: InstanceMoments) -> InstanceMoments:
        """Sums over the instances of both."""
        if self.num_instances == 0:
            return other
        if other.num_instances == 0:
            return self
        return InstanceMoments(
            self.num_instances + other.num_instances,
            self.values_per_instance,
            self.mean_sum + other.mean_sum,
            self.var_sum + other.var_sum,
        )

    @property
    def values_per_channel(self) -> int:
        """Values behind each channel's averaged statistics: every instance's spatial values."""
        return self.num_instances * self.values_per_instance

    @property
    def values_per_statistic(self) -> int:
        """Values behind one instance's mean and variance (decides whether n - 1 > 0)."""
        return self.values_per_instance

    @property
    def mean(self) -> torch.Tensor:
        """Average instance mean: what running_mean tracks."""
        return self.mean_sum / self.num_instances

    def biased_var(self) -> torch.Tensor:
        """Average biased instance variance: what InstanceNorm normalizes with, averaged."""
        return self.var_sum / self.num_instances

    def unbiased_var(self) -> torch.Tensor:
        """Average unbiased instance variance: what running_var tracks."""
        if self.values_per_instance < 2:
            return torch.full_like(self.var_sum, float("nan"))
        n = self.values_per_instance
        return self.var_sum / self.num_instances * (n / (n - 1))


Moments = ChannelMoments | InstanceMoments


def instance_moments(x: torch.Tensor) -> InstanceMoments:
    """Per-channel sums of per-instance moments of ``x`` of shape (N, C, *S) over the dims S."""
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    flat = work.flatten(2)
    if x.shape[0] == 0:
        # No instance: nothing to add (var_mean would warn about zero degrees of freedom).
        empty = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
        return InstanceMoments(0, flat.shape[2], empty, empty.clone())
    instance_var, instance_mean = _var_mean(flat, [2])
    return InstanceMoments(
        x.shape[0],
        flat.shape[2],
        instance_mean.double().sum(0),
        instance_var.double().sum(0),
    )
