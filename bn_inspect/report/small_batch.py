"""BN205: running statistics that look accumulated from batches of a few samples.

A channel's spread over the data has two parts: how far each sample's own mean of the channel
sits from the other samples' (the between-sample variance tau^2) and the spread within a sample. A
training batch of B samples sees the within-sample spread whole but only (1 - 1/B) of the
between-sample part, since its mean follows its own B samples; BatchNorm normalizes with that
variance and folds it into running_var. Statistics accumulated from such batches therefore hold
about ``running_var = T - tau^2 / B``, T being the data's whole (biased) variance. Given the data in
eval mode, check has T and tau^2 of every channel, and reads 1/B off the gap, per layer l:

    share  s_l = sum_c tau^2_c / sum_c T_c
    excess e_l = (sum_c T_c - sum_c running_var_c) / sum_c T_c     (about s_l / B)

and for the model the least-squares fit of e_l = s_l / B over the layers: 1/B = sum s_l e_l / sum s_l^2.
Layers where each sample holds one value per channel (BatchNorm1d on (N, C)) have no within-sample
part and no such gap; layers whose excess is beyond any batch size (e_l > 2 s_l, past the noise: a
corrupted or rescaled layer) are another departure's, and both are left out. So are the layers
whose data departs past the error level (check's BN201) for some other reason, and the whole
estimate where the first layer's data departs that far (the input itself is off).

Data whose samples differ more among themselves than the training data's did (exposure or gain that
varies per image, mixed sources) widens the between-sample spread just as small batches narrow the
running one, and the two cannot be told apart here. Where the first layer's departure score
reaches the info level (0.5) the input itself differs from the training data, so BN205 then names
both readings and no cause (``first_layer_departure``). On the fault benchmark every case BN205
fires on has a first layer at 0.39 or below; per-image brightness offsets that cost a digits CNN 18
points put its first layer at 0.73.

The noise of e_l from N samples is modelled as ``NOISE * sqrt(2 / N) * (s_l + (1 - s_l) / S_l)``
(S_l values per sample and channel), NOISE fitted on subsamples of the healthy models of the fault
benchmark's calibration halves. BN205 warns when 1/B, less twice its noise, reaches LEVEL: batches
of 3 samples or fewer. The benchmark's healthy models reach at most 0.17 (running statistics of a
ResNet that lag its last weights); batches of 2 give 0.54 to 1.56, of 4 give 0.0 to 0.5.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from bn_inspect.report.departure import Thresholds, departure
from bn_inspect.report.records import LayerReport

LEVEL = 1 / 3
NOISE = 0.7
# Below this many samples the estimate's noise alone can hide batches of 2 (a digits CNN needed 256).
FEW_SAMPLES = 300
# Batches of one sample leave out the whole between-sample share (e_l = s_l); running statistics
# over a few such batches are noisy themselves, so up to twice that still counts as theirs.
EXCESS_LIMIT = 2.0


@dataclass(frozen=True)
class LayerGap:
    """One layer call's part in the estimate."""

    label: str
    share: float
    excess: float
    noise: float


@dataclass(frozen=True)
class SmallBatchEstimate:
    """1/B, the inverse of the samples per batch the running statistics look accumulated from."""

    inverse_batch: float
    noise: float
    layers: tuple[LayerGap, ...]

    @property
    def fires(self) -> bool:
        """1/B, less twice its noise, reaches LEVEL."""
        return self.inverse_batch - 2 * self.noise >= LEVEL

    @property
    def batch_size(self) -> float:
        """B, at least 1 sample (inf where 1/B is 0 or below: no sign of small batches)."""
        return max(1.0, 1 / self.inverse_batch) if self.inverse_batch > 0 else math.inf

    def strongest(self) -> LayerGap:
        """The layer that weighs most in the fit (the largest between-sample share)."""
        return max(self.layers, key=lambda gap: gap.share)


def layer_gap(layer: LayerReport) -> LayerGap | None:
    """The layer's share, excess and noise, or None where it tells nothing about the batch size."""
    spread = layer.sample_spread
    if spread is None or layer.family != "batch" or layer.normalizes_with != "running":
        return None
    if layer.batch_var is None or layer.running_var is None or not layer.values_per_channel:
        return None
    values_per_sample = layer.values_per_channel / spread.num_samples
    if values_per_sample <= 1 or spread.num_samples < 2:
        return None
    columns = (layer.batch_var, layer.running_var, spread.between_var)
    if not all(math.isfinite(v) for column in columns for v in column):
        return None
    total, running, between = (math.fsum(column) for column in columns)
    if total <= 0 or running <= 0:
        return None
    share, excess = between / total, (total - running) / total
    noise = NOISE * math.sqrt(2 / spread.num_samples) * (share + (1 - share) / values_per_sample)
    if excess > EXCESS_LIMIT * share + 2 * noise:
        return None
    return LayerGap(layer.label.raw, share, excess, noise)


def estimate_beside(layers: Sequence[LayerReport], departing: Collection[str]) -> SmallBatchEstimate | None:
    """``estimate`` over the layers whose labels are not in ``departing`` (those BN201 finds past the
    error level); None where the first layer is among them."""
    if not layers or layers[0].label.raw in departing:
        return None
    return estimate([layer for layer in layers if layer.label.raw not in departing])


def first_layer_departure(layers: Sequence[LayerReport]) -> float | None:
    """The first layer's departure score where it reaches the info level (the input differs from the
    training data, which can widen the between-sample spread as small batches do); else None."""
    found = departure(layers[0]) if layers else None
    if found is None or not (found.is_nonfinite or found.score >= Thresholds().info):
        return None
    return found.score


def estimate(layers: Sequence[LayerReport]) -> SmallBatchEstimate | None:
    """The model's 1/B over the layers that tell something, or None where none does."""
    gaps = tuple(gap for gap in map(layer_gap, layers) if gap is not None)
    weight = math.fsum(gap.share**2 for gap in gaps)
    if weight <= 0:
        return None
    inverse_batch = math.fsum(gap.share * gap.excess for gap in gaps) / weight
    noise = math.sqrt(math.fsum((gap.share * gap.noise) ** 2 for gap in gaps)) / weight
    return SmallBatchEstimate(inverse_batch, noise, gaps)


def inconclusive_note(layers: Sequence[LayerReport], departing: Collection[str]) -> str | None:
    """A note where 1/B reaches LEVEL but its noise keeps BN205 from firing: on the border, or too few samples."""
    found = estimate_beside(layers, departing)
    if found is None or found.fires or found.inverse_batch < LEVEL:
        return None
    samples = max(layer.sample_spread.num_samples for layer in layers if layer.sample_spread is not None)
    low, high = found.inverse_batch - 2 * found.noise, found.inverse_batch + 2 * found.noise
    batches = (
        f"batches of {1 / high:.1f} to {1 / low:.1f} samples"
        if low > 0
        else f"batches of {1 / high:.1f} samples or more"
    )
    advice = (
        f"; {samples:,} samples leave that much noise, a few hundred or more narrow it"
        if samples < FEW_SAMPLES
        else ", on the border of the 3 samples per batch it warns at"
    )
    return (
        f"BN205 could not tell: the running variances lack {min(1.0, found.inverse_batch):.0%} of the spread between "
        f"samples (1/B = {found.inverse_batch:.2f} ± {found.noise:.2f}: {batches}, or data that varies more "
        f"between samples than the training data's){advice}"
    )
