"""BatchNorm health rules: layer states and an inspection report -> findings (pure, no torch).

Every rule has a stable code. Rules on stored state (BN1xx) need no data; rules on what the data
did (BN2xx) need a forward pass over real input, because on random input every layer looks
shifted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from bn_inspect.report.departure import ERROR, Thresholds, departure
from bn_inspect.report.findings import RULES, Finding, Severity, departing_past_error
from bn_inspect.report.records import LayerReport, LayerState, Report, at_initial_values, never_updated
from bn_inspect.report.small_batch import estimate_beside, first_layer_departure
from bn_inspect.text import Untrusted

FLOAT16_MAX = 65504.0
EPS_DOMINANCE = 10.0
# BN114: with PyTorch's default momentum 0.1 the initial running_var (1) and running_mean (0) still
# weigh 0.9**n in the statistics after n batches: 12% at n = 20, 4% at 30. Up to 20 batches the
# initial values are a visible part of the statistics; past it they are below one part in eight.
FEW_BATCHES = 20
DEFAULT_MOMENTUM = 0.1


def _channels(values: Sequence[float] | None, bad: Any) -> tuple[int, ...]:
    return tuple(i for i, v in enumerate(values or ()) if bad(v))


def _listed(channels: Sequence[int | Untrusted], limit: int = 8) -> str:
    shown = ", ".join(str(c) for c in channels[:limit])
    return shown + (f" and {len(channels) - limit} more" if len(channels) > limit else "")


def _in_channels(channels: Sequence[int], total: int | None = None, limit: int = 8) -> str:
    """``channel 3``, ``channels 0, 2 and 5``, ``channels 0–7 and 8 more (16 of 16)``: runs of three or
    more as ranges, so that the count of the rest is not read as one more channel."""
    if len(channels) == 1:
        return f"channel {channels[0]}"
    runs: list[list[int]] = []
    for channel in channels[:limit]:
        if runs and channel == runs[-1][-1] + 1:
            runs[-1].append(channel)
        else:
            runs.append([channel])
    items = [
        f"{run[0]}–{run[-1]}" if len(run) >= 3 else str(c) for run in runs for c in (run if len(run) < 3 else run[:1])
    ]
    if len(channels) > limit:
        of = f" of {total}" if total else ""
        return f"channels {', '.join(items)} and {len(channels) - limit} more ({len(channels)}{of})"
    return "channels " + (f"{', '.join(items[:-1])} and {items[-1]}" if len(items) > 1 else items[0])


def _finding(
    code: str,
    layer: Untrusted | None,
    message: str,
    *,
    call: int | None = 0,
    channels: Sequence[int] = (),
    severity: Severity | None = None,
) -> Finding:
    rule = RULES[code]
    return Finding(code, rule.name, severity or rule.severity, layer, call, tuple(channels), message)


def state_findings(
    states: Sequence[LayerState],
    thresholds: Thresholds,
    *,
    flags_from_file: bool,
    model_is_training: bool,
    is_recalibrated: bool = False,
) -> list[Finding]:
    """Rules on stored buffers and flags (no data needed).

    Args:
        states: the model's normalization layers.
        thresholds: only ``strict`` matters here.
        flags_from_file: training flags were saved with the model (pickle, TorchScript), not set
            by the --arch constructor; the train-mode rules need that.
        model_is_training: the root module's training flag.
        is_recalibrated: the file holds bn-inspect's recalibration record, so num_batches_tracked
            counts recalibration batches, not training ones: BN114 does not apply.
    """
    findings: list[Finding] = []
    batch_like = [s for s in states if s.family in ("batch", "instance")]
    for s in batch_like:
        findings += _buffer_findings(s, thresholds)
        if not is_recalibrated:
            findings += _few_batches_findings(s)
    findings += [_exported_training_finding(s) for s in states if s.is_exported_training]
    if flags_from_file:
        findings += _mode_findings(batch_like, model_is_training)
    return findings


def _exported_training_finding(s: LayerState) -> Finding:
    """BN112: a graph node whose mode the export fixed to training."""
    return _finding(
        "BN112",
        s.name,
        "exported in training mode: every inference batch is normalized with its own statistics, so "
        "outputs depend on the batch and the stored statistics are never used. Export again after "
        "model.eval() (torch.onnx.export's training=TrainingMode.EVAL or PRESERVE)",
    )


def _buffer_findings(s: LayerState, thresholds: Thresholds) -> list[Finding]:
    return [*_nonfinite_findings(s), *_running_var_findings(s), *_update_findings(s, thresholds), *_qat_findings(s)]


def _qat_findings(s: LayerState) -> list[Finding]:
    """BN113: the BatchNorm of a quantization-aware-training module whose statistics are frozen."""
    if not s.is_qat_frozen or s.fused_into is None:
        return []
    return [
        _finding(
            "BN113",
            s.name,
            f"this BatchNorm sits in a QAT {s.fused_into.inert()} whose freeze_bn is set: its running statistics "
            "no longer update, and it normalizes with them in train mode too, as the converted model will. "
            "Usual in the last epochs of QAT; if it was frozen from the start, they are the float model's "
            "(update_bn_stats unfreezes it)",
        )
    ]


def _nonfinite_findings(s: LayerState) -> list[Finding]:
    """BN101: NaN or infinite buffers."""
    out: list[Finding] = []
    for what, values in (
        ("running_mean", s.running_mean),
        ("running_var", s.running_var),
        ("weight", s.weight),
        ("bias", s.bias),
    ):
        bad = _channels(values, lambda v: not math.isfinite(v))
        if bad:
            nan = any(math.isnan((values or ())[c]) for c in bad)
            kind = (
                ("NaN" if all(math.isnan((values or ())[c]) for c in bad) else "NaN or infinite") if nan else "infinite"
            )
            those = "that channel" if len(bad) == 1 else "those channels"
            # x / sqrt(inf) is 0: an infinite variance leaves the bias; only NaN makes every output NaN.
            effect = (
                f"every output of {those} will be NaN"
                if nan
                else f"every output of {those} collapses to the bias (x / √∞ = 0)"
                if what == "running_var"
                else f"every output of {those} will be infinite or NaN"
            )
            out.append(
                _finding(
                    "BN101",
                    s.name,
                    f"{what} is {kind} in {_in_channels(bad, len(values or ()))}; {effect}. Retrain or restore the "
                    "checkpoint from before the divergence (often a too-high learning rate or fp16 overflow)",
                    channels=bad,
                )
            )
    return out


def _running_var_findings(s: LayerState) -> list[Finding]:
    """BN102, BN103, BN109: running variances no data could give, or that eps or float16 ruin."""
    out: list[Finding] = []
    if s.running_var is not None:
        nonpositive = _channels(s.running_var, lambda v: v <= 0)
        if nonpositive:
            out.append(
                _finding(
                    "BN102",
                    s.name,
                    f"running_var is zero or negative in "
                    f"{_in_channels(nonpositive, len(s.running_var))}; a variance cannot be, so the buffer was overwritten or "
                    "corrupted. Recalibrate the statistics on real data",
                    channels=nonpositive,
                )
            )
        eps = s.eps or 0.0
        # Dominated: eps makes up over 90% of running_var + eps, the denominator of the normalization.
        tiny = _channels(s.running_var, lambda v: 0 < v < eps / EPS_DOMINANCE)
        if tiny:
            out.append(
                _finding(
                    "BN103",
                    s.name,
                    f"running_var is below eps/{EPS_DOMINANCE:g} = {eps / EPS_DOMINANCE:g} in {_in_channels(tiny, len(s.running_var))}, so "
                    "eps, not the data, sets their scale. Check that eps was not ported in the wrong "
                    "units, or that those channels are not dead",
                    channels=tiny,
                )
            )
        if s.buffer_dtype in ("float16", "bfloat16"):
            out.append(
                _finding(
                    "BN109",
                    s.name,
                    f"running statistics are stored in {s.buffer_dtype}, "
                    + (
                        "which rounds them coarsely (11-bit mantissa) and overflows past 65,504"
                        if s.buffer_dtype == "float16"
                        else "whose 8-bit mantissa rounds them coarsely (by up to about 0.4%)"
                    )
                    + ". Keep BatchNorm buffers in float32",
                )
            )
        large = _channels(s.running_var, lambda v: v > FLOAT16_MAX)
        if large and s.buffer_dtype not in ("float16", "bfloat16"):
            out.append(
                _finding(
                    "BN109",
                    s.name,
                    f"running_var exceeds the float16 maximum (65,504) in "
                    f"{_in_channels(large, len(s.running_var))}; the model breaks if run or exported in half precision",
                    channels=large,
                    severity=Severity.INFO,
                )
            )
    return out


def _update_findings(s: LayerState, thresholds: Thresholds) -> list[Finding]:
    """BN104, BN105, BN106, BN110: how (and whether) the running statistics were updated."""
    out: list[Finding] = []
    if never_updated(s.num_batches_tracked, s.running_mean, s.running_var):
        out.append(
            _finding(
                "BN104",
                s.name,
                "running statistics were never updated (num_batches_tracked is 0, "
                "running_mean 0, running_var 1), so eval normalizes with nothing learned. Train, or "
                "recalibrate on real data before evaluating",
                severity=Severity.ERROR if thresholds.strict else None,
            )
        )
    elif s.num_batches_tracked and at_initial_values(s.running_mean, s.running_var):
        out.append(
            _finding(
                "BN104",
                s.name,
                f"running statistics are still exactly their initial values (running_mean 0, running_var 1) "
                f"although num_batches_tracked is {s.num_batches_tracked:,}: they were tracked with momentum 0, "
                "or reset or never loaded afterwards, so eval normalizes with nothing learned. Recalibrate on "
                "real data (bn-inspect recalibrate), and look for momentum 0 in training",
                severity=Severity.ERROR if thresholds.strict else None,
            )
        )
    if s.momentum is not None and s.family == "batch" and not s.is_frozen:
        if s.momentum >= 0.5:
            out.append(
                _finding(
                    "BN105",
                    s.name,
                    f"momentum is {s.momentum:g}: PyTorch weights the NEW batch by "
                    "momentum, Keras/TF weight the OLD statistics by theirs (0.99 there is 0.01 here). "
                    "Use 1 - momentum when porting",
                )
            )
        elif s.momentum == 0:
            out.append(
                _finding(
                    "BN105",
                    s.name,
                    "momentum is 0: running statistics never change in training. If "
                    "that is not deliberate, use 0.1 (the default)",
                )
            )
    if s.is_cumulative_average:
        out.append(
            _finding(
                "BN106",
                s.name,
                f"momentum is None: running statistics are the plain average of all "
                f"{s.num_batches_tracked or 0:,} batches tracked so far (num_batches_tracked sets each new "
                "batch's weight, 1/num_batches_tracked), so early batches count as much as late ones",
            )
        )
    if s.eval_uses == "batch" and s.family == "batch" and not s.is_exported_training:  # BN112 says more
        out.append(
            _finding(
                "BN110",
                s.name,
                "the layer keeps no running statistics (track_running_stats=False), "
                "so even in eval it normalizes with the statistics of the batch it is given: outputs "
                "depend on batch size and on the other samples. Track running statistics, or document it",
            )
        )
    return out


def _few_batches_findings(s: LayerState) -> list[Finding]:
    """BN114: statistics from so few batches that their initial values still weigh in them.

    A cumulative average (momentum None) keeps nothing of the initial values after one batch, so
    it is left to BN106; an unknown momentum (a state_dict read without --arch) is taken as
    PyTorch's default.
    """
    tracked = s.num_batches_tracked
    if tracked is None or not 1 <= tracked <= FEW_BATCHES or s.is_cumulative_average or not s.track_running_stats:
        return []
    momentum = DEFAULT_MOMENTUM if s.momentum is None else s.momentum
    assumed = " (PyTorch's default; the file does not store it)" if s.momentum is None else ""
    return [
        _finding(
            "BN114",
            s.name,
            f"statistics saw only {tracked:,} batch{'es' if tracked > 1 else ''} (num_batches_tracked): with "
            f"momentum {momentum:g}{assumed} the initial running_mean 0 and running_var 1 still make up "
            f"{(1 - momentum) ** tracked:.0%} of them. Train longer, or recalibrate on real data "
            "(bn-inspect recalibrate)",
        )
    ]


def _mode_findings(states: Sequence[LayerState], model_is_training: bool) -> list[Finding]:
    out: list[Finding] = []
    training = [s.name for s in states if s.is_training and not s.is_frozen]
    if model_is_training:
        out.append(
            _finding(
                "BN107",
                None,
                "the model was saved in train mode: whoever loads it and forgets "
                "model.eval() normalizes with batch statistics and updates the buffers. Call "
                "model.eval() before saving",
                call=None,
            )
        )
    elif training:
        out.append(
            _finding(
                "BN107",
                None,
                f"the model is in eval mode but {len(training):,} normalization layers are "
                f"in train mode ({_listed(training)}); they normalize with batch statistics. Call "
                "model.eval() after any .train() on submodules",
                call=None,
            )
        )
    for s in states:
        if s.is_training and s.affine_requires_grad is False and not s.is_frozen:
            out.append(
                _finding(
                    "BN108",
                    s.name,
                    "weight and bias have requires_grad=False, so the layer looks frozen, "
                    "but it is in train mode, so its running statistics still update. Put it in eval "
                    "mode too (or replace it with FrozenBatchNorm2d)",
                )
            )
    return out


def report_findings(report: Report, thresholds: Thresholds) -> list[Finding]:
    """Rules on what the data did at each layer call."""
    findings: list[Finding] = []
    for layer in report.layers:
        findings += _data_findings(layer, thresholds)
    return findings + _small_batch_findings(report, findings)


def _layers(count: int) -> str:
    return "1 layer" if count == 1 else f"{count:,} layers"


def _small_batch_findings(report: Report, findings: Iterable[Finding]) -> list[Finding]:
    """BN205 (report/small_batch.py): running variances that lack the between-sample spread small batches leave out."""
    found = estimate_beside(report.layers, departing_past_error(findings))
    if found is None or not found.fires:
        return []
    gap = (
        f"the running variances lack {min(1.0, found.inverse_batch):.0%} of the spread between samples on this "
        f"data (1/B = {found.inverse_batch:.2f} ± {found.noise:.2f} over {_layers(len(found.layers))}, mostly "
        f"{found.strongest().label})"
    )
    first = first_layer_departure(report.layers)
    if first is None:
        message = (
            f"{gap}: the statistics look accumulated from batches of 3 samples or fewer (estimated "
            f"{found.batch_size:.1f}), so BatchNorm trained on noisy batch statistics. Train with 16 or more samples "
            "per batch, or fine-tune with BatchNorm frozen in eval mode"
        )
    else:
        message = (
            f"{gap}. Statistics accumulated from batches of 3 samples or fewer (estimated {found.batch_size:.1f}) "
            "leave such a gap, and so does data whose samples differ more among themselves than the training "
            f"data's (exposure, gain or source varying per sample); here the first layer's data departs too "
            f"(score {first:.2g}), so the data may be the cause. Check on data like the training data, or against "
            "a --baseline"
        )
    return [_finding("BN205", None, message, call=None)]


def _per_batch_values(layer: LayerReport) -> int | None:
    # Only a layer that normalizes each batch with that batch's own statistics is hurt by a small
    # batch; in eval mode the comparison pools every batch, whatever --batch-size is.
    if layer.family != "batch" or layer.normalizes_with != "batch":
        return None
    if layer.input_shape is None or layer.reduced_axes is None:
        return None
    return math.prod(layer.input_shape[d] for d in layer.reduced_axes)


def _data_findings(layer: LayerReport, thresholds: Thresholds) -> list[Finding]:
    out: list[Finding] = []
    nonfinite = _channels(layer.batch_mean, lambda v: not math.isfinite(v))
    if nonfinite:
        out.append(
            _finding(
                "BN204",
                layer.name,
                f"the input holds NaN or Inf in {_in_channels(nonfinite, len(layer.batch_mean or ()))}: "
                "something upstream (the data, or a layer before this one) produces them",
                call=layer.call,
                channels=nonfinite,
            )
        )
    departed = departure(layer, thresholds)
    # NaN or Inf figures are BN204's (input) or BN101/BN102's (buffers), not a shift.
    if departed is not None and departed.departs and not departed.is_nonfinite:
        out.append(
            _finding(
                "BN201",
                layer.name,
                f"{departed.describe()}. The data does not match the running statistics this layer "
                "normalizes with in eval",
                call=layer.call,
                channels=departed.channels,
                severity=Severity.ERROR if departed.tier == ERROR else Severity.WARNING,
            )
        )
    variances = layer.batch_var or ()
    dead = [
        c
        for c, v in enumerate(variances)
        if math.isfinite(v) and v <= 1e-12 * max(1.0, (layer.batch_mean or (0.0,) * len(variances))[c] ** 2)
    ]
    if dead:
        out.append(
            _finding(
                "BN202",
                layer.name,
                f"{_in_channels(dead, len(variances))} {'is' if len(dead) == 1 else 'are'} constant on this data "
                "(batch variance 0): their upstream units are dead, or the data never varies there",
                call=layer.call,
                channels=dead,
            )
        )
    per_batch = _per_batch_values(layer)
    # One value per channel never gets here: BatchNorm itself refuses it when it normalizes with
    # batch statistics ('Expected more than 1 value per channel'), and the run ends in that one line.
    if per_batch is not None and per_batch < thresholds.min_values:
        out.append(
            _finding(
                "BN203",
                layer.name,
                f"only {per_batch:,} values per channel per batch (fewer than "
                f"{thresholds.min_values:,}): batch statistics this noisy make training unstable and the "
                "comparison here unreliable. Use larger batches or --min-values",
                call=layer.call,
            )
        )
    return out


def filter_ignored(findings: Iterable[Finding], ignore: Sequence[str]) -> list[Finding]:
    """Drop findings whose code or rule name is in ``ignore``."""
    wanted = {code.upper() for code in ignore} | {code.lower() for code in ignore}
    return [f for f in findings if f.code not in wanted and f.rule not in wanted]


def unknown_codes(ignore: Sequence[str]) -> list[str]:
    """Entries of --ignore that name no rule."""
    names = {r.name for r in RULES.values()}
    return [code for code in ignore if code.upper() not in RULES and code.lower() not in names]
