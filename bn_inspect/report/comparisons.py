"""What compare-modes and recalibrate produce: frozen records of floats, no torch inside."""

from __future__ import annotations

import math
from dataclasses import dataclass

from bn_inspect.report.display import NotebookDisplay
from bn_inspect.report.provenance import RecalibrationProvenance
from bn_inspect.report.records import ModelInfo
from bn_inspect.text import Untrusted

Floats = tuple[float, ...]


@dataclass(frozen=True)
class LayerModeGap:
    """One call of one normalization layer: how its input and output differ between the modes.

    Attributes:
        name, call: qualified module path and call index within a forward.
        type, family: class name and normalization family.
        eval_uses: statistics the layer normalizes with in eval: "running" or "batch".
        input_rel_diff: ||x_train - x_eval|| / ||x_eval|| over all batches.
        output_rel_diff: ||y_train - y_eval|| / ||y_eval|| over all batches.
        own_rel_diff: ||f_train(x_eval) - f_eval(x_eval)|| / ||f_eval(x_eval)||: this layer's
            own contribution, with the same (eval) input in both modes.
        values_per_channel: values behind each per-channel statistic of the eval pass.
        max_abs_shift_z, mean_abs_shift_z: of z = (batch_mean - running_mean) /
            sqrt(running_var + eps) over channels, for the eval pass's input (None without
            running statistics).
        worst_var_ratio: batch_var / running_var farthest from 1 on a log scale (biased batch
            variance, as BatchNorm normalizes with).
        departure, departure_tier: the departure score of the eval pass's input from the running
            statistics and its tier (report/departure.py; None without running statistics).
    """

    name: Untrusted
    call: int
    type: Untrusted
    family: str
    eval_uses: str
    input_rel_diff: float
    output_rel_diff: float
    own_rel_diff: float
    values_per_channel: int | None
    max_abs_shift_z: float | None
    mean_abs_shift_z: float | None
    worst_var_ratio: float | None
    departure: float | None = None
    departure_tier: str | None = None

    @property
    def label(self) -> Untrusted:
        """The qualified name, with the call index where the module ran more than once."""
        return self.name if self.call == 0 else Untrusted(f"{self.name.raw}#{self.call}")


@dataclass(frozen=True)
class OutputGap:
    """The model output in both modes.

    Attributes:
        rel_diff: ||out_train - out_eval|| / ||out_eval|| over every floating-point output tensor
            with a batch dim, over all batches.
        argmax_change_fraction: for a single 2-D floating-point output (logits of shape (N, K)),
            the fraction of samples whose argmax over dim 1 differs between the modes; else None.
        num_samples: samples compared.
    """

    rel_diff: float
    argmax_change_fraction: float | None
    num_samples: int


@dataclass(frozen=True)
class ModeComparison(NotebookDisplay):
    """Eval against train mode, per normalization layer call in execution order.

    Attributes:
        layers: one entry per layer call, in execution order.
        output: the model output's difference, or None when the output has no batch dim.
        threshold: the relative difference above which a layer counts as departing.
        gap_opens_at: label of the first layer call whose output_rel_diff exceeds ``threshold``
            (or is NaN) and whose eval input departs from its running statistics (departure
            warning or error); its input_rel_diff says how much came from upstream and its
            own_rel_diff how much it adds itself. None when no such layer exists.
        batch_noise_from: when no layer departs, the first layer call whose output still differs
            beyond ``threshold``: train mode's per-batch statistics differ from the running ones
            that match the data (small or unshuffled batches), which is no fault of the model.
        not_executed: normalization layers that never ran.
        num_batches, num_samples: the data.
        model: where the model came from, when it came from a file.
    """

    layers: tuple[LayerModeGap, ...]
    output: OutputGap | None
    threshold: float
    gap_opens_at: Untrusted | None
    not_executed: tuple[Untrusted, ...]
    num_batches: int
    num_samples: int
    model: ModelInfo | None = None
    batch_noise_from: Untrusted | None = None

    def layer(self, label: str) -> LayerModeGap:
        """The entry of that label (``name`` or ``name#call``); KeyError if none."""
        for entry in self.layers:
            if entry.label.raw == label:
                return entry
        raise KeyError(label)


@dataclass(frozen=True)
class RecalibratedLayer:
    """One layer whose running statistics were rewritten.

    Attributes:
        name: qualified module path.
        type: class name (``BatchNorm2d``, ``InstanceNorm2d``, ...).
        family: "batch" or "instance".
        num_channels: C.
        num_calls: forward calls of the layer over all batches (a module called twice per
            forward counts twice); written to ``num_batches_tracked`` for batch-style layers.
        calls_per_forward: the most calls of the layer in one forward; above 1 the layer's later
            calls depend on its own statistics, which no single recalibration makes exact.
        values_per_channel: n, the values behind each new statistic (for InstanceNorm, instances
            times values per instance).
        wave: for ``sequential``, the pass whose data gave the statistics (0: the first pass);
            0 for ``precise``.
        old_running_mean, old_running_var: the buffers before (float64 copies).
        new_running_mean, new_running_var: the buffers after, as stored (rounded to their dtype).
        old_num_batches_tracked, new_num_batches_tracked: that buffer before and after.
        max_abs_shift_z_before: max over channels of |mean - old_running_mean| /
            sqrt(old_running_var + eps) for the layer's inputs in the model as given (an eval
            forward for ``sequential``, as ``inspect`` shows; the train-mode pass for ``precise``).
        worst_var_ratio_before: biased variance of those inputs / old_running_var, the channel
            farthest from 1 on a log scale.
        max_abs_shift_z_after, worst_var_ratio_after: the same for the layer's inputs in an eval
            forward of the recalibrated model, against the new statistics (None without the
            verification pass). About 0 and (n - 1) / n for ``sequential``.
        departure_after: the departure score (report/departure.py, what check's BN201 judges) of
            those same inputs against the new statistics, over ``samples`` = samples per pass times
            ``calls_per_forward``; about 0 for ``sequential``, None without the verification pass.
        departure_before: the departure score of the "before" inputs against the old statistics.
    """

    name: Untrusted
    type: Untrusted
    family: str
    num_channels: int
    num_calls: int
    calls_per_forward: int
    values_per_channel: int
    wave: int
    old_running_mean: Floats
    old_running_var: Floats
    new_running_mean: Floats
    new_running_var: Floats
    old_num_batches_tracked: int | None
    new_num_batches_tracked: int | None
    max_abs_shift_z_before: float
    worst_var_ratio_before: float
    max_abs_shift_z_after: float | None
    worst_var_ratio_after: float | None
    departure_after: float | None = None
    departure_before: float | None = None


@dataclass(frozen=True)
class SkippedLayer:
    """A normalization layer left as it was, and why."""

    name: Untrusted
    type: Untrusted
    reason: str


@dataclass(frozen=True)
class RecalibrationResult(NotebookDisplay):
    """What ``recalibrate`` changed.

    Attributes:
        method: "precise" or "sequential".
        layers: the recalibrated layers, in execution order.
        skipped: layers left unchanged, with the reason.
        num_batches, num_samples: the data, per pass.
        num_passes: passes over the batches, early-stopped ones and the verification included.
        num_waves: ``sequential``: passes that produced statistics (1 for ``precise``).
        notes: caveats that apply to this run (data-dependent control flow, shared modules).
        provenance: the source model, the data and the method, as stored in the new model file
            (None from the Python API, which knows no file or path).
    """

    method: str
    layers: tuple[RecalibratedLayer, ...]
    skipped: tuple[SkippedLayer, ...]
    num_batches: int
    num_samples: int
    num_passes: int
    num_waves: int
    notes: tuple[str, ...] = ()
    provenance: RecalibrationProvenance | None = None

    def departing_after(self, warning: float) -> tuple[Untrusted, ...]:
        """The layers whose eval-mode input after recalibration still departs from the new statistics.

        A layer counts when its ``departure_after`` reaches ``warning`` (check's BN201 warning level,
        ``Thresholds.warning``) or is NaN. ``sequential`` leaves none on its own data; ``precise``
        can, in deep layers and with small batches.
        """
        return tuple(
            entry.name
            for entry in self.layers
            if entry.departure_after is not None
            and (math.isnan(entry.departure_after) or entry.departure_after >= warning)
        )

    def layer(self, name: str) -> RecalibratedLayer:
        """The recalibrated layer of that qualified name (KeyError if none)."""
        for entry in self.layers:
            if entry.name.raw == name:
                return entry
        raise KeyError(name)
