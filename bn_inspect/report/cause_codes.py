"""The cause codes bn-inspect names for a departure, what each means, and the Cause record."""

from __future__ import annotations

from dataclasses import dataclass

INPUT_SCALE = "input-scale"
INPUT_NORMALIZATION = "input-normalization"
CHANNEL_ORDER = "channel-order"
DOMAIN_SHIFT = "domain-shift"
SPOILED_STATISTICS = "spoiled-statistics"
FEW_BATCHES_TRACKED = "few-batches-tracked"
SMALL_BATCH_TRAINING = "small-batch-training"
STALE_STATISTICS = "stale-statistics"
CORRUPTED_LAYER = "corrupted-layer"
MOMENTUM = "momentum"
PRECISION = "precision"
PARTIAL_LOAD = "partial-load"
UNKNOWN = "unknown"

# Each code and what it means (README's rule section and docs/causes.md say the same).
CAUSES = {
    INPUT_SCALE: "the input's scale differs from training's by a large factor (0-255 where 0-1 was "
    "trained, a missing or extra /255, other units)",
    INPUT_NORMALIZATION: "the input's normalization differs from training's (a missing or different "
    "mean/std, or standardized data into a model that standardizes itself)",
    CHANNEL_ORDER: "the input's channels or features are in another order (BGR for RGB, swapped columns)",
    DOMAIN_SHIFT: "the data's content differs from what the statistics describe, at the right scale: "
    "another domain or sensor, or another crop, resize or decoding",
    SPOILED_STATISTICS: "the running statistics were computed on other data (recalibrated on the wrong "
    "data, or an evaluation loop without eval())",
    FEW_BATCHES_TRACKED: "the running statistics saw too few batches and still lean toward their "
    "initial mean 0, variance 1",
    SMALL_BATCH_TRAINING: "the running statistics came from tiny batches (fine-tuning with batch size 2, "
    "or BN layers left in train mode while frozen)",
    STALE_STATISTICS: "the weights changed after the statistics were recorded (SWA/EMA weights saved "
    "without update_bn)",
    CORRUPTED_LAYER: "one layer's stored statistics are off while the layers before it match the data",
    MOMENTUM: "the running statistics were updated with a momentum of 0 (never moved) or near 1",
    PRECISION: "the running statistics passed through float16 (overflow to inf, rounding)",
    PARTIAL_LOAD: "the running statistics are still at their initial values: the BN buffers were not "
    "loaded (a state_dict loaded with strict=False) or never trained",
    UNKNOWN: "the departure matches none of the patterns above well enough to name one",
}


@dataclass(frozen=True)
class Cause:
    """A cause code (one of CAUSES) and a sentence saying which pattern led to it."""

    code: str
    sentence: str
