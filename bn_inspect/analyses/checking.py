"""check: the health rules over a model's stored state and, given data, over what its layers saw."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from bn_inspect.analyses.folding import folding_findings
from bn_inspect.analyses.inspection import run_inspection
from bn_inspect.analyses.passes import joined_run
from bn_inspect.config import CheckConfig, load_check_config
from bn_inspect.data.batch import Batch, as_batch
from bn_inspect.errors import InputError, NoNormLayersError
from bn_inspect.model.layers import functional_candidates
from bn_inspect.model.modules import find_layers, in_memory_model_info, model_device, model_float_dtype, unwrap_compiled
from bn_inspect.model.onnx_module import OnnxModel
from bn_inspect.options import FailOn, Mode, Precision
from bn_inspect.report.baseline import Baseline, baseline_findings
from bn_inspect.report.causes import with_causes
from bn_inspect.report.departure import departure
from bn_inspect.report.diff import Tolerance
from bn_inspect.report.findings import CheckReport, Finding, Thresholds, departing_past_error
from bn_inspect.report.records import LayerState, ModelInfo, Report
from bn_inspect.report.rules import filter_ignored, report_findings, state_findings, unknown_codes
from bn_inspect.report.small_batch import inconclusive_note
from bn_inspect.text import Untrusted

# BatchNorm's eps unless the constructor says otherwise; a state_dict does not store it.
DEFAULT_EPS = 1e-5

if TYPE_CHECKING:
    from bn_inspect.distributed.context import DistributedContext


ONNX_RULES_NOTE = (
    "ONNX model: BN106-BN108 need a PyTorch module (momentum None, training flags, requires_grad are not "
    "exported) and did not run; with no num_batches_tracked exported, BN104 judges the statistics alone"
)


def check_model(
    model: nn.Module,
    batches: Iterable[Any] | None = None,
    *,
    mode: Mode | str = Mode.EVAL,
    thresholds: Thresholds | None = None,
    fail_on: FailOn | str = FailOn.ERROR,
    ignore: Sequence[str] = (),
    model_info: ModelInfo | None = None,
    input_source: str = "<batches>",
    flags_from_file: bool = True,
    data_is_real: bool = True,
    materialize_lazy: bool = False,
    distributed: DistributedContext | None = None,
    baseline: Baseline | None = None,
    is_recalibrated: bool = False,
    fold: bool = False,
    precision: Precision | str | None = None,
) -> CheckReport:
    """Run the BatchNorm health rules on ``model`` (and on ``batches``, when given).

    Args:
        model: the model to check; left unchanged, as by inspect_model.
        batches: data for the rules that need a forward pass; None runs only the rules on
            stored state (buffers, flags).
        mode: mode of the forward pass.
        thresholds: limits for the data rules.
        fail_on: the lowest severity that makes the check fail.
        ignore: rule codes (BN201) or names (shifted) to leave out.
        model_info: where the model came from, for the report.
        input_source: where the batches came from, for the report.
        flags_from_file: the model's training flags were saved with it (False for a state_dict
            loaded into a fresh --arch, whose flags say nothing about the checkpoint).
        data_is_real: the batches are real data; random input makes every layer look shifted, so
            the shift and dead-channel rules only run on real data.
        materialize_lazy: as for inspect_model.
        distributed: as for inspect_model; across several ranks the data rules see the
            statistics of all ranks' data, and the running buffers are compared across ranks
            (BN111). Every rank judges the global statistics against its own running ones, so
            ranks agree unless their buffers diverge; report rank 0's verdict.
        baseline: a known-good report and tolerance: the BN3xx rules (report/baseline.py), over all ranks.
        is_recalibrated: the model file holds bn-inspect's recalibration record (BN114 does not apply).
        fold, precision: the folding rules BN401-BN402; a deployment format (fp16, bf16, int8) adds
            BN403 and, on the first batch, BN404 (analyses/folding.py).

    Returns:
        The CheckReport; ``passed`` is False when a finding reaches ``fail_on``.
    """
    thresholds, run = thresholds or Thresholds(), joined_run(distributed)
    model = unwrap_compiled(model)
    states, findings, kind_notes = _stored_state(model, thresholds, flags_from_file, is_recalibrated)
    batches, notes = _folding(model, batches, fold, precision, findings, kind_notes)
    report: Report | None = None
    if batches is not None:
        report = _inspected(model, batches, Mode(mode), model_info, input_source, materialize_lazy, run, data_is_real)
        findings = _with_data_findings(findings, report, thresholds, data_is_real, Mode(mode), notes)
    findings += _comparisons(model, report, states, run, baseline, thresholds, notes)
    first = report.first_divergent(thresholds) if report is not None and data_is_real else None
    return CheckReport(
        model=model_info or in_memory_model_info(model),
        input=report.input if report else None,
        mode=Untrusted(Mode(mode).value),
        thresholds=thresholds,
        fail_on=FailOn(fail_on),
        findings=tuple(filter_ignored(with_causes(findings, report, states), ignore)),
        layers=tuple(layer.label for layer in report.layers) if report else tuple(state.name for state in states),
        notes=tuple(notes),
        ignored=tuple(ignore),
        first_divergent=first.label if first else None,
        inspection=report,
    )


def _inspected(
    model: nn.Module,
    batches: Iterable[Any],
    mode: Mode,
    model_info: ModelInfo | None,
    input_source: str,
    materialize_lazy: bool,
    run: DistributedContext | None,
    data_is_real: bool,
) -> Report:
    """inspect_model's run, with the per-sample moments BN205 reads where the data is real and the mode eval."""
    return run_inspection(
        model,
        batches,
        mode,
        model_info=model_info,
        input_source=input_source,
        require_norm_layers=True,
        materialize_lazy=materialize_lazy,
        run=run,
        sample_means=data_is_real and mode is Mode.EVAL,
    )


def _folding(
    model: nn.Module,
    batches: Iterable[Any] | None,
    fold: bool,
    precision: Precision | str | None,
    findings: list[Finding],
    notes_so_far: list[str],
) -> tuple[Iterable[Any] | None, list[str]]:
    """The folding rules' findings, added to ``findings``; the batches to run (the first one peeked)
    and ``notes_so_far`` with what did not run added."""
    folding = fold or precision is not None
    notes = notes_so_far + (
        []
        if batches is not None
        else [f"no data: only the rules on stored state (BN1xx{', BN401-BN403' * folding}) ran"]
    )
    if not folding:
        return batches, notes
    deployed = None if precision is None else Precision(precision)
    sample, batches = _first_batch(model, batches) if deployed is not None else (None, batches)
    folded, said = folding_findings(model, deployed, sample)
    findings += folded
    return batches, notes + said


def _first_batch(model: nn.Module, batches: Iterable[Any] | None) -> tuple[Batch | None, Iterable[Any] | None]:
    """The first batch on the model's device and in its dtype (for BN404), and all the batches, that one included."""
    if batches is None:
        return None, None
    items = iter(batches)
    first = next(items, None)
    if first is None:
        return None, ()
    return as_batch(first).to(model_device(model), model_float_dtype(model)), itertools.chain([first], items)


def _stored_state(
    model: nn.Module, thresholds: Thresholds, flags_from_file: bool, is_recalibrated: bool
) -> tuple[list[LayerState], list[Finding], list[str]]:
    """The model's normalization layers as stored, the BN1xx findings on them, and the notes on which
    rules this kind of model leaves out (an ONNX graph carries no training flags).

    Raises:
        NoNormLayersError: the model has none.
    """
    layers, _ = find_layers(model)
    if not layers and not functional_candidates(model, []):
        raise NoNormLayersError.for_action("check")
    states = [layer.state() for layer in layers]
    flags_from_file, notes = _model_kind_notes(model, flags_from_file)
    findings = state_findings(
        states,
        thresholds,
        flags_from_file=flags_from_file,
        model_is_training=model.training,
        is_recalibrated=is_recalibrated,
    )
    return states, findings, notes


# What a bare state_dict cannot tell: check's one line on the rules it left out.
WEIGHTS_ONLY_NOTE = (
    "a state_dict without --arch: the rules on stored buffers ran (BN101-BN104, BN109, BN114) with eps taken "
    "as PyTorch's default 1e-5; momentum (BN105, BN106), train mode and requires_grad (BN107, BN108), the "
    "folding rules (BN4xx) and the data rules need --arch"
)


def check_weights(
    states: Sequence[LayerState],
    *,
    thresholds: Thresholds | None = None,
    fail_on: FailOn | str = FailOn.ERROR,
    ignore: Sequence[str] = (),
    model_info: ModelInfo,
    is_recalibrated: bool = False,
    baseline: Baseline | None = None,
) -> CheckReport:
    """The rules on stored buffers over the layers a bare state_dict holds (``states_from_state_dict``).

    A state_dict stores neither eps nor momentum nor any flag: eps is taken as PyTorch's default
    (so BN103 can judge), and the rules on momentum, modes and gradients are left out, as the
    report's note says. With ``baseline``, BN301 and BN303 compare the stored statistics, as
    check_model does without data.

    Raises:
        NoNormLayersError: no key group with running_mean and running_var.
    """
    if not states:
        raise NoNormLayersError.for_action("check")
    thresholds = thresholds or Thresholds()
    states = [replace(state, eps=DEFAULT_EPS if state.eps is None else state.eps) for state in states]
    findings = state_findings(
        states, thresholds, flags_from_file=False, model_is_training=False, is_recalibrated=is_recalibrated
    )
    notes = [WEIGHTS_ONLY_NOTE]
    if baseline is not None:
        found, said = baseline_findings(baseline, None, states, thresholds)
        findings, notes = findings + found, notes + said
    return CheckReport(
        model=model_info,
        input=None,
        mode=Untrusted(Mode.EVAL.value),
        thresholds=thresholds,
        fail_on=FailOn(fail_on),
        findings=tuple(filter_ignored(with_causes(findings, None, states), ignore)),
        layers=tuple(state.name for state in states),
        notes=tuple(notes),
        ignored=tuple(ignore),
    )


def _model_kind_notes(model: nn.Module, flags_from_file: bool) -> tuple[bool, list[str]]:
    """Whether the train-mode rules may run, and what check's notes start with, for this kind of model."""
    if isinstance(model, OnnxModel):
        # An ONNX graph's stand-in modules carry no training flags or requires_grad of the exported model.
        return False, [ONNX_RULES_NOTE]
    return flags_from_file, []


def _with_data_findings(
    findings: list[Finding], report: Report, thresholds: Thresholds, data_is_real: bool, mode: Mode, notes: list[str]
) -> list[Finding]:
    """``findings`` and the data rules' findings: real data in eval mode may overrule BN114 and notes an
    inconclusive BN205; random data leaves out the shift, dead-channel and small-batch rules."""
    found = report_findings(report, thresholds)
    if data_is_real and mode is Mode.EVAL:
        notes += [note] if (note := inconclusive_note(report.layers, departing_past_error(found))) is not None else []
        return _few_batches_overruled(findings + found, report, thresholds, notes)
    if data_is_real:
        notes.append(
            "train mode: the small-batch rule (BN205) reads running statistics against eval-mode data and did not run"
        )
        return findings + found
    notes.append(
        "random input: the shift (BN201), dead-channel (BN202) and small-batch (BN205) rules need real data "
        "(--input) and did not run"
    )
    return findings + [f for f in found if f.code not in ("BN201", "BN202", "BN205")]


def _few_batches_overruled(
    findings: list[Finding], report: Report, thresholds: Thresholds, notes: list[str]
) -> list[Finding]:
    """``findings`` without BN114 on the layers whose data, at every call, fits their running statistics.

    BN114 reads only num_batches_tracked and assumes momentum 0.1; statistics computed exactly over
    a few batches (``torch.optim.swa_utils.update_bn`` leaves num_batches_tracked at the batch count
    and momentum at 0.1 again) look the same. The data tells the two apart: where it sits within the
    warning level of the running statistics, their initial values do not weigh in them.
    """
    verdicts: dict[str, bool] = {}
    for layer in report.layers:
        measured = departure(layer, thresholds)
        fits = measured is not None and not measured.departs and not measured.is_nonfinite
        verdicts[layer.name.raw] = verdicts.get(layer.name.raw, True) and fits
    kept = [f for f in findings if not (f.code == "BN114" and f.layer is not None and verdicts.get(f.layer.raw))]
    if len(kept) < len(findings):
        notes.append(
            f"BN114 left out for {len(findings) - len(kept):,} layer(s) that saw few batches but whose statistics "
            "fit this data (within the warning level): they were computed well, not still near their initial values"
        )
    return kept


def _comparisons(
    model: nn.Module,
    report: Report | None,
    states: list[LayerState],
    run: DistributedContext | None,
    baseline: Baseline | None,
    thresholds: Thresholds,
    notes: list[str],
) -> list[Finding]:
    """The rules that compare: BN111 across ranks, BN3xx against a baseline; their notes go to ``notes``."""
    findings = [] if run is None else _rank_findings(model, report, run, notes)
    if baseline is not None:
        found, said = baseline_findings(baseline, report, states, thresholds)
        findings += found
        notes += said
    return findings


def _rank_findings(model: nn.Module, report: Report | None, run: DistributedContext, notes: list[str]) -> list[Finding]:
    """BN111 across ranks, with a note on what the data rules saw."""
    from bn_inspect.distributed.divergence import divergence_findings, rank_divergence

    divergence = report.distributed.divergence if report and report.distributed else None
    divergence = divergence or rank_divergence(model, run.group)
    notes.append(
        f"{run.world_size} ranks: the data rules saw the statistics of all ranks' data; "
        + (
            "running buffers identical on all ranks"
            if not divergence.divergent
            else f"running buffers differ between ranks in {len(divergence.divergent)} layer(s) (BN111)"
        )
    )
    return divergence_findings(divergence)


@dataclass(frozen=True)
class CheckSettings:
    """The gate of one check: thresholds, the failing severity and the rules left out."""

    thresholds: Thresholds
    fail_on: FailOn
    ignore: list[str]
    tolerance: Tolerance = field(default_factory=Tolerance)
    fold: bool = False
    precision: Precision | None = None


def check_settings(
    config: CheckConfig,
    departure_warning: float | None = None,
    departure_error: float | None = None,
    min_values: int | None = None,
    *,
    strict: bool | None = None,
    fail_on: FailOn | None = None,
    ignore: Sequence[str] = (),
    max_drift: float | None = None,
    max_drift_var_ratio: float | None = None,
) -> CheckSettings:
    """Flags over [tool.bn-inspect] over the defaults; ignored rules add up.

    ``max_drift`` and ``max_drift_var_ratio`` are the tolerance of diff and of check --baseline.

    Raises:
        InputError: an ignored rule that does not exist, a fail-on in the config that is not one, or a
            departure warning level above the error level.
    """
    ignored = [*config.ignore, *ignore]
    unknown = unknown_codes(ignored)
    if unknown:
        raise InputError(f"--ignore {', '.join(unknown)}: no such rule", "See the rule codes in bn-inspect's README")
    defaults = Thresholds()
    thresholds = Thresholds(
        warning=_first(departure_warning, config.departure_warning, defaults.warning),
        error=_first(departure_error, config.departure_error, defaults.error),
        min_values=int(_first(min_values, config.min_values, defaults.min_values)),
        strict=bool(_first(strict, config.strict, defaults.strict)),
    )
    if thresholds.warning > thresholds.error:
        raise InputError(
            f"the departure warning level {thresholds.warning:g} is above the error level {thresholds.error:g}",
            "Set --departure-warning at or below --departure-error (or departure-warning in [tool.bn-inspect])",
        )
    try:
        gate = FailOn(fail_on or config.fail_on or FailOn.ERROR)
    except ValueError:
        raise InputError(f"fail-on {config.fail_on!r} in {config.source}", "Use error or warning") from None
    tolerance = Tolerance(
        max_mean_change=_first(max_drift, config.max_drift, Tolerance.max_mean_change),
        max_var_ratio=_first(max_drift_var_ratio, config.max_drift_var_ratio, Tolerance.max_var_ratio),
    )
    return CheckSettings(thresholds, gate, ignored, tolerance)


def check_gate(
    flags: Mapping[str, Any], folder: Path | None = None, *, config: CheckConfig | None = None
) -> CheckSettings:
    """check_settings from a command's flags (by parameter name) over ``config``, or else the
    [tool.bn-inspect] of ``folder``'s project (the current directory's by default).

    Raises:
        ConfigError, InputError: as load_check_config and check_settings.
    """
    settings = check_settings(
        config if config is not None else load_check_config(folder or Path.cwd()),
        flags.get("departure_warning"),
        flags.get("departure_error"),
        flags.get("min_values"),
        strict=flags.get("strict"),
        fail_on=flags.get("fail_on"),
        ignore=flags.get("ignore") or [],
        max_drift=flags.get("max_drift"),
        max_drift_var_ratio=flags.get("max_drift_var_ratio"),
    )
    return replace(settings, fold=bool(flags.get("fold")), precision=flags.get("precision"))


def _first(*values: float | bool | None) -> float:
    return float(next(v for v in values if v is not None))
