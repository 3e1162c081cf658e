"""Frozen dataclasses for the versioned inspection report: plain floats, no torch objects inside.

Per-channel statistics of a layer call, over every batch that ran:

* ``batch_mean[c]``: mean of the layer's input over all reduced axes.
* ``batch_var[c]``: biased variance, sum((x - mean)**2) / n, what BatchNorm normalizes with.
* ``batch_var_unbiased[c]``: sum((x - mean)**2) / (n - 1), what BatchNorm folds into running_var.
* ``mean_shift_z[c] = (batch_mean - running_mean) / sqrt(running_var + eps)``: how many running
  standard deviations the data's mean sits from the stored mean.
* ``var_ratio[c] = batch_var / running_var``.

n is ``values_per_channel``: N times the product of the reduced spatial sizes, summed over batches.
For InstanceNorm the figures are averages over samples of per-instance statistics.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bn_inspect.report import shift
from bn_inspect.report.departure import Departure, Thresholds, departure
from bn_inspect.report.display import NotebookDisplay
from bn_inspect.report.layer_moments import Floats, LayerMoments, SampleSpread
from bn_inspect.text import Untrusted

# Adding a field keeps the version (README, "JSON report"): reports written before the fingerprints
# (model and first-batch SHA-256, bn-inspect and Python versions) read as reports without them.
SCHEMA_VERSION = 1
# How InputInfo.source starts for seeded random input (--shape, or a shape guessed from the model).
RANDOM_INPUT = "random normal"
# ModelInfo.format of a model handed to the Python API in memory (its source is the class name).
IN_MEMORY_FORMAT = "module"

# The versions of a report that predates them.
NO_VERSION = Untrusted("")


@dataclass(frozen=True)
class ModelInfo:
    """Where the model came from: file path (or "ResNet (in memory)": the Python API's class name), detected format, --arch spec, and the
    hex SHA-256 of the file's bytes (None without a file: a fresh --arch, the Python API)."""

    source: Untrusted
    format: Untrusted
    arch: Untrusted | None = None
    sha256: Untrusted | None = None

    @property
    def is_in_memory(self) -> bool:
        """True for a model handed to the Python API: its source names its class, and its format says nothing more."""
        return self.format.raw == IN_MEMORY_FORMAT

    @classmethod
    def of(cls, source: str, format: str, arch: str | None = None, sha256: str | None = None) -> ModelInfo:
        """The record of a model bn-inspect loaded: every field as Untrusted."""
        return cls(Untrusted(source), Untrusted(format), _maybe(arch), _maybe(sha256))


@dataclass(frozen=True)
class InputInfo:
    """What data ran: its source, the shape and dtype of one batch, how many batches and samples.

    ``first_batch_sha256`` fingerprints the data: the hex SHA-256 of the first batch's tensors as
    they ran (dtype, shape and bytes of each, data/batch.py), None in reports that predate it.

    For images: ``preprocessing`` says in words how they became tensors, and the files that could
    not be decoded were skipped (``num_skipped_files``; the first few in ``skipped_files``).
    """

    source: Untrusted
    shape: tuple[int, ...]
    dtype: Untrusted
    num_batches: int
    num_samples: int
    num_nonfinite_values: int = 0
    first_batch_sha256: Untrusted | None = None
    preprocessing: Untrusted | None = None
    num_skipped_files: int = 0
    skipped_files: tuple[Untrusted, ...] = ()

    @property
    def is_random(self) -> bool:
        """True for seeded random input, which says nothing about a model's running statistics."""
        return self.source.raw.startswith(RANDOM_INPUT)


@dataclass(frozen=True)
class LayerState:
    """What a normalization layer holds before any data runs (read from the model, not computed).

    ``eval_uses`` says which statistics the layer would normalize with in eval mode: "running",
    or "batch" when it keeps none (its eval output then depends on the batch). ``is_training`` and
    ``affine_requires_grad`` are None where the file does not store them (a state_dict).
    ``fused_into`` is the class of the quantization-aware-training module the layer sits in
    (ConvBnReLU2d, LinearBn1d, ...; None outside one), ``is_qat_frozen`` whether that module's
    ``freeze_bn`` is set (the statistics no longer update, and it normalizes with them in train mode too).
    ``is_exported_training``: an exported graph's node fixed in training mode (ONNX
    BatchNormalization with ``training_mode=1``), which normalizes every batch with its own statistics.
    """

    name: Untrusted
    type: Untrusted
    family: str
    num_channels: int | None
    eps: float | None
    momentum: float | None
    is_cumulative_average: bool
    affine: bool
    track_running_stats: bool
    num_batches_tracked: int | None
    is_training: bool | None
    affine_requires_grad: bool | None
    buffer_dtype: str | None
    running_mean: Floats | None
    running_var: Floats | None
    weight: Floats | None
    bias: Floats | None
    is_frozen: bool
    is_lazy: bool
    eval_uses: str
    fused_into: Untrusted | None = None
    is_qat_frozen: bool = False
    is_exported_training: bool = False


@dataclass(frozen=True)
class LayerReport:
    """One call of one normalization layer (a shared module called twice gives two).

    ``num_groups`` is GroupNorm's G (None for other families and in reports that predate it).
    """

    name: Untrusted
    call: int
    type: Untrusted
    family: str
    num_channels: int | None
    input_shape: tuple[int, ...] | None
    axis_names: tuple[str, ...] | None
    reduced_axes: tuple[int, ...] | None
    values_per_channel: int | None
    eps: float | None
    momentum: float | None
    affine: bool
    track_running_stats: bool
    num_batches_tracked: int | None
    normalizes_with: str
    batch_mean: Floats | None
    batch_var: Floats | None
    batch_var_unbiased: Floats | None
    running_mean: Floats | None
    running_var: Floats | None
    weight: Floats | None
    bias: Floats | None
    explanation: Untrusted
    flags: tuple[str, ...] = ()
    num_groups: int | None = None
    moments: LayerMoments | None = None
    sample_spread: SampleSpread | None = None

    @property
    def label(self) -> Untrusted:
        """The qualified name, with the call index where the module ran more than once."""
        return self.name if self.call == 0 else Untrusted(f"{self.name.raw}#{self.call}")

    @property
    def mean_shift_z(self) -> Floats | None:
        """(batch_mean - running_mean) / sqrt(running_var + eps) per channel (report/shift.py)."""
        if self.batch_mean is None or self.running_mean is None or self.running_var is None:
            return None
        return shift.mean_shift_z(self.batch_mean, self.running_mean, self.running_var, self.eps or 0.0)

    @property
    def var_ratio(self) -> Floats | None:
        """batch_var / running_var per channel."""
        if self.batch_var is None or self.running_var is None:
            return None
        return shift.var_ratio(self.batch_var, self.running_var)

    @property
    def max_abs_shift_z(self) -> float | None:
        """The largest |mean_shift_z| over channels (NaN if any channel is NaN)."""
        return shift.max_abs(self.mean_shift_z)

    @property
    def worst_var_ratio(self) -> float | None:
        """The channel's var_ratio farthest from 1 on a log scale (NaN if any channel is NaN)."""
        return shift.worst_ratio(self.var_ratio)

    @property
    def departure(self) -> Departure | None:
        """The departure score of this call with check's default thresholds (report/departure.py);
        None where it cannot be compared."""
        return departure(self)


@dataclass(frozen=True)
class LayerListing:
    """The static listing of `bn-inspect layers`: what each normalization layer holds, no data run.

    ``types_inferred`` is True when the listing was read off a bare state_dict, whose keys cannot
    tell BatchNorm1d/2d/3d, FrozenBatchNorm2d and tracking InstanceNorm apart.
    """

    model: ModelInfo
    layers: tuple[LayerState, ...]
    types_inferred: bool = False
    schema_version: int = field(default=SCHEMA_VERSION)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data; non-finite floats become "nan", "inf" or "-inf"."""
        document = {
            "schema_version": self.schema_version,
            "kind": "layers",
            "model": asdict(self.model),
            "types_inferred": self.types_inferred,
            "layers": [asdict(layer) for layer in self.layers],
        }
        return json_ready(document)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class RankShare:
    """How much of the data one rank ran."""

    rank: int
    num_batches: int
    num_samples: int


@dataclass(frozen=True)
class SyncGroupInfo:
    """The ranks a SyncBatchNorm layer synchronizes its training batch statistics over."""

    name: Untrusted
    ranks: tuple[int, ...]
    is_world: bool


@dataclass(frozen=True)
class BufferDivergence:
    """How one buffer of one layer differs across ranks.

    Attributes:
        buffer: "running_mean", "running_var" or "num_batches_tracked".
        max_abs_difference: max over elements of (max over ranks - min over ranks), i.e. the
            largest |x_i - x_j| between any two ranks; 0.0 when all agree, NaN when an element
            is NaN on some ranks only.
        differing_ranks: ranks whose buffer is not identical to rank 0's (NaN equals NaN).
        elements: indices (channels) where some rank differs from rank 0.
    """

    buffer: str
    max_abs_difference: float
    differing_ranks: tuple[int, ...]
    elements: tuple[int, ...]

    @property
    def is_divergent(self) -> bool:
        """True when some rank holds other values than rank 0."""
        return bool(self.differing_ranks)


@dataclass(frozen=True)
class LayerDivergence:
    """How a normalization layer's running buffers differ across ranks."""

    name: Untrusted
    type: Untrusted
    buffers: tuple[BufferDivergence, ...]

    @property
    def is_divergent(self) -> bool:
        """True when any buffer differs between ranks."""
        return any(b.is_divergent for b in self.buffers)

    @property
    def differing_ranks(self) -> tuple[int, ...]:
        """Ranks that differ from rank 0 in any buffer."""
        return tuple(sorted({r for b in self.buffers for r in b.differing_ranks}))

    @property
    def max_abs_difference(self) -> float:
        """The largest max_abs_difference of its buffers (NaN if any is NaN)."""
        values = [b.max_abs_difference for b in self.buffers]
        if any(math.isnan(v) for v in values):
            return math.nan
        return max(values, default=0.0)


@dataclass(frozen=True)
class RankDivergence:
    """Per normalization layer with running buffers, how they differ across ``world_size`` ranks."""

    world_size: int
    layers: tuple[LayerDivergence, ...]

    @property
    def divergent(self) -> tuple[LayerDivergence, ...]:
        """The layers whose buffers differ between ranks."""
        return tuple(layer for layer in self.layers if layer.is_divergent)


@dataclass(frozen=True)
class DistributedInfo:
    """How a run was spread over torch.distributed ranks; the report's statistics are over all of them.

    Attributes:
        world_size: number of ranks.
        backend: the process group's backend ("gloo", "nccl").
        shares: what each rank ran (every rank reads its own shard of the input).
        sync_batch_norm: every SyncBatchNorm layer with the ranks it synchronizes over.
        divergence: each layer's running buffers compared across ranks.
    """

    world_size: int
    backend: str | None
    shares: tuple[RankShare, ...]
    sync_batch_norm: tuple[SyncGroupInfo, ...]
    divergence: RankDivergence


@dataclass(frozen=True)
class MergedPart:
    """One report a merged report was made of (`bn-inspect merge`): its path and its input."""

    path: Untrusted
    source: Untrusted
    first_batch_sha256: Untrusted | None
    num_batches: int
    num_samples: int


# repr=False: NotebookDisplay's compact repr, not every per-channel list.
@dataclass(frozen=True, repr=False)
class Report(NotebookDisplay):
    """The result of one inspection; ``to_dict`` gives the JSON document of schema version 1.

    ``torch_version``, ``bn_inspect_version`` and ``python_version`` say what produced it ("" in
    reports that predate them), so that two reports can be told comparable or not. ``merged_from``
    lists the reports a merged report was made of (empty for one run).
    """

    model: ModelInfo
    input: InputInfo
    mode: Untrusted
    device: Untrusted
    layers: tuple[LayerReport, ...]
    not_executed: tuple[Untrusted, ...] = ()
    torch_version: Untrusted = NO_VERSION
    distributed: DistributedInfo | None = None
    schema_version: int = field(default=SCHEMA_VERSION)
    bn_inspect_version: Untrusted = NO_VERSION
    python_version: Untrusted = NO_VERSION
    merged_from: tuple[MergedPart, ...] = ()

    def first_divergent(self, thresholds: Thresholds | None = None) -> LayerReport | None:
        """The first layer call in execution order whose data departs from its running statistics.

        "Departs" is check's BN201 (report/departure.py): a departure score at the warning level or
        above, or a NaN or infinite distance in some channel; the thresholds default to check's.
        """
        return next((layer for layer in self.layers if (found := departure(layer, thresholds)) and found.departs), None)

    def worst_departure(self, thresholds: Thresholds | None = None) -> tuple[LayerReport, Departure] | None:
        """The layer call with the largest departure score, and its score: the model's (None when no layer is compared)."""
        scored = [(layer, found) for layer in self.layers if (found := departure(layer, thresholds)) is not None]
        if not scored:
            return None
        return max(scored, key=lambda pair: math.inf if math.isnan(pair[1].score) else pair[1].score)

    def to_dataframe(self) -> Any:
        """A pandas DataFrame with one row per layer call and channel (the CSV export's rows)."""
        from bn_inspect.report.frame import report_frame

        return report_frame(self)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data; non-finite floats become "nan", "inf" or "-inf"."""
        layers = []
        for layer in self.layers:
            entry = asdict(layer)
            del entry["sample_spread"]  # check's alone, and check writes no layer records
            entry["mean_shift_z"] = layer.mean_shift_z
            entry["var_ratio"] = layer.var_ratio
            found = departure(layer)
            entry["departure"] = (
                None
                if found is None
                else {
                    "score": found.score,
                    "tier": found.tier,
                    "mean_distance": found.mean_distance,
                    "allowance": found.allowance,
                    "samples": found.samples,
                    "channels": list(found.channels),
                }
            )
            layers.append(entry)
        document = {
            "schema_version": self.schema_version,
            "kind": "inspect",
            "torch_version": self.torch_version.raw,
            "bn_inspect_version": self.bn_inspect_version.raw,
            "python_version": self.python_version.raw,
            "model": asdict(self.model),
            "input": asdict(self.input),
            "mode": self.mode.raw,
            "device": self.device.raw,
            "layers": layers,
            "not_executed": [name.raw for name in self.not_executed],
        }
        if self.distributed is not None:
            document["distributed"] = asdict(self.distributed)
        if self.merged_from:
            document["merged_from"] = [asdict(part) for part in self.merged_from]
        return json_ready(document)  # type: ignore[no-any-return]


def _maybe(text: str | None) -> Untrusted | None:
    return None if text is None else Untrusted(text)


def at_initial_values(running_mean: Sequence[float] | None, running_var: Sequence[float] | None) -> bool:
    """Running statistics exactly as a layer is built: mean 0 and variance 1 in every channel."""
    return bool(running_mean) and all(m == 0 for m in running_mean or ()) and all(v == 1 for v in running_var or ())


def never_updated(
    num_batches_tracked: int | None, running_mean: Sequence[float] | None, running_var: Sequence[float] | None
) -> bool:
    """Running statistics as a layer is built (mean 0, var 1) and never tracked a batch: untrained."""
    return num_batches_tracked == 0 and running_var is not None and at_initial_values(running_mean, running_var)


def json_ready(value: Any) -> Any:
    """``value`` with every non-finite float replaced by "nan", "inf" or "-inf", tuples as lists, Untrusted as its raw text."""
    # JSON has no NaN or infinity; strings keep them distinguishable from a missing value (null).
    # JSON escapes every string by construction, so the exact text read from a file goes in.
    if isinstance(value, Untrusted):
        return value.raw
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def matching_layers(report: Report, patterns: Sequence[str]) -> list[LayerReport]:
    """Layer calls whose qualified name matches any glob pattern."""
    return [
        layer
        for layer in report.layers
        if any(fnmatch.fnmatchcase(layer.name.raw, p) or fnmatch.fnmatchcase(layer.label.raw, p) for p in patterns)
    ]


def unmatched_patterns(report: Report, patterns: Sequence[str]) -> list[str]:
    """The glob patterns that match no layer call's qualified name (or name#call)."""
    return [p for p in patterns if not matching_layers(report, [p])]


def closest_names(report: Report, pattern: str, limit: int = 3) -> list[str]:
    """The layer names most like ``pattern`` (difflib), else the first few, to suggest in an error."""
    labels = list(dict.fromkeys(name.raw for layer in report.layers for name in (layer.name, layer.label)))
    return difflib.get_close_matches(pattern, labels, n=limit, cutoff=0.4) or labels[:limit]
