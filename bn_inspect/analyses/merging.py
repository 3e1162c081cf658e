"""`bn-inspect merge`: the reports of runs over parts of the data, as the report of one run over all of it.

Every batch-style layer call of a report carries its exact float64 moments (count, mean, centred
sum of squares; for InstanceNorm the sums of the per-instance statistics). The parts' moments fold
in the order given with the one merge of engine/moments.py (Chan's formula; sums for InstanceNorm),
the merge torchrun's ranks use, so the statistics are those of one run over the parts' batches in
that order to float64 rounding, and every verdict drawn from them (the departure score) is the
same. Reports merge only when they can describe one run: the same model, mode, layers and dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from bn_inspect.analyses.inspection import run_summary
from bn_inspect.boundary.reading import Source
from bn_inspect.data.images import SKIPPED_NAMES_KEPT
from bn_inspect.engine.moment_records import engine_moments, layer_moments
from bn_inspect.engine.moments import ChannelMoments, InstanceMoments, Moments
from bn_inspect.errors import MergeError
from bn_inspect.report.reading import load_report
from bn_inspect.report.records import InputInfo, LayerReport, MergedPart, Report
from bn_inspect.text import Untrusted

# Families whose calls carry moments in a report written by this version; others hold no batch statistics.
_WITH_MOMENTS = ("batch", "instance")
_NONFINITE_INPUT = "nonfinite-input"
# The flags that come before "nonfinite-input" in a layer's flags (inspection's order).
_FLAGS_BEFORE = ("lazy", "frozen")
_RERUN = "Run `bn-inspect inspect --format json` on each part with this bn-inspect, then merge those reports"


def merge_report_files(paths: Sequence[Path]) -> Report:
    """Read each report (through the boundary's opener) and merge them in the order given.

    Raises:
        MergeError: a path given twice, or reports that cannot merge (see ``merge_reports``).
        ReportFileError: a file is no readable report.
    """
    seen: dict[Path, Path] = {}
    for path in paths:
        if (earlier := seen.setdefault(path.resolve(), path)) is not path:
            raise MergeError(
                f"report {path} is given twice ({earlier} and {path}): merging it would count its data twice",
                "Give each part's report once",
            )
    return merge_reports([load_report(path, Source.MERGE_PART) for path in paths], [str(p) for p in paths])


def merge_reports(reports: Sequence[Report], names: Sequence[str]) -> Report:
    """One report of the data of every report, as one run over the parts in this order would give.

    Per layer call, the moments add up exactly; values per channel, batches and samples add; the
    input shape, the first batch's fingerprint and the explanation's axes are the first part's, as
    they would be in one run. ``merged_from`` lists each part's name (path) and input.

    Raises:
        MergeError: no report; reports of other models (fingerprint, stored statistics), modes,
            layer sets or input dtypes than the first; a report without moments (written before
            they were recorded); two reports of the same data.
    """
    if not reports:
        raise MergeError("no report to merge", "Give the JSON reports of the parts: bn-inspect merge part-*.json")
    first, first_name = reports[0], names[0]
    for index, (report, name) in enumerate(zip(reports, names, strict=True)):
        _refuse_without_moments(report, name)
        if index:
            _refuse_other_run(first, first_name, report, name)
            _refuse_same_data(reports[:index], names[:index], report, name)
    layers = tuple(_merged_layer([report.layers[i] for report in reports]) for i in range(len(first.layers)))
    parts = tuple(
        MergedPart(
            Untrusted(name), r.input.source, r.input.first_batch_sha256, r.input.num_batches, r.input.num_samples
        )
        for r, name in zip(reports, names, strict=True)
    )
    return dataclasses.replace(
        first, input=_merged_input([r.input for r in reports]), layers=layers, distributed=None, merged_from=parts
    )


def _refuse_without_moments(report: Report, name: str) -> None:
    for layer in report.layers:
        if layer.family in _WITH_MOMENTS and layer.moments is None:
            version = report.bn_inspect_version.inert() or "an earlier version"
            raise MergeError(
                f"report {name} holds no exact moments for layer {layer.label.inert()} (written by bn-inspect "
                f"{version}, before reports recorded them), so it cannot merge exactly",
                _RERUN,
            )


def _refuse_other_run(first: Report, first_name: str, report: Report, name: str) -> None:
    """Refuse a report that cannot be a part of the same run as the first: one line naming the first difference."""

    def refuse(what: str, detail: str, fix: str) -> MergeError:
        return MergeError(f"report {name} is of {what} than {first_name} ({detail})", fix)

    same_model = "Merge only reports of one model file (the same SHA-256), run alike"
    if (report.model.sha256, report.model.arch) != (first.model.sha256, first.model.arch):
        shown = [_shown(r.model.sha256 or r.model.arch) for r in (report, first)]
        raise refuse("another model", f"{shown[0]}, not {shown[1]}", same_model)
    if report.mode != first.mode:
        detail = f"{report.mode.inert()}, not {first.mode.inert()}"
        raise refuse("another mode", detail, "Run every part with the same --mode")
    if report.input.dtype != first.input.dtype:
        detail = f"{report.input.dtype.inert()}, not {first.input.dtype.inert()}"
        raise refuse("another input dtype", detail, "Give every part's data one dtype")
    if (difference := _layer_difference(first, report)) is not None:
        raise refuse("other layers", difference, same_model)
    for mine, theirs in zip(first.layers, report.layers, strict=True):
        if _stored_state(mine) != _stored_state(theirs):
            raise refuse("a model with other stored statistics", f"layer {theirs.label.inert()} differs", same_model)


def _layer_difference(first: Report, report: Report) -> str | None:
    """How the layer calls of ``report`` first differ from those of ``first``; None when they are the same."""
    labels, other = [_layer_key(layer) for layer in first.layers], [_layer_key(layer) for layer in report.layers]
    for mine, theirs in zip(labels, other, strict=False):
        if mine != theirs:
            return f"{theirs}, not {mine}"
    if len(other) != len(labels):
        return f"{len(other)} layer calls, not {len(labels)}"
    if report.not_executed != first.not_executed:
        shown = [", ".join(n.inert() for n in r.not_executed) or "none" for r in (report, first)]
        return f"never called: {shown[0]}, not {shown[1]}"
    return None


def _refuse_same_data(earlier: Sequence[Report], names: Sequence[str], report: Report, name: str) -> None:
    # Parts without a value (empty batches only) add nothing, however often they come.
    if not any(layer.moments is not None and layer.moments.count for layer in report.layers):
        return
    for other, other_name in zip(earlier, names, strict=True):
        if other.input.first_batch_sha256 == report.input.first_batch_sha256 and [
            layer.moments for layer in other.layers
        ] == [layer.moments for layer in report.layers]:
            raise MergeError(
                f"reports {other_name} and {name} hold the same data (the same input fingerprint and moments): "
                "merging them would count it twice",
                "Give each part's report once",
            )


def _shown(text: Untrusted | None) -> str:
    return "none" if text is None else text.inert()[:16]


def _layer_key(layer: LayerReport) -> str:
    return f"{layer.label.inert()} ({layer.type.inert()}, {layer.num_channels} channels)"


def _stored_state(layer: LayerReport) -> tuple[object, ...]:
    """What the model holds for a layer: the same in every report of one model (NaN equal to NaN)."""
    stored = (layer.running_mean, layer.running_var, layer.weight, layer.bias)
    as_text = tuple(None if values is None else tuple(map(repr, values)) for values in stored)
    return (*as_text, repr(layer.eps), repr(layer.momentum), layer.num_batches_tracked, layer.affine)


def _merged_layer(parts: Sequence[LayerReport]) -> LayerReport:
    first = parts[0]
    if first.moments is None:
        return first
    recorded = [part.moments for part in parts if part.moments is not None]
    if any(m.kind != first.moments.kind for m in recorded):
        raise MergeError(
            f"layer {first.label.inert()} holds {first.moments.kind} moments in one report and other moments in another",
            _RERUN,
        )
    moments = _fold([engine_moments(m) for m in recorded])
    num_batches = sum(m.num_batches for m in recorded)
    batch_sizes: Counter[int] = Counter()
    for m in recorded:
        batch_sizes.update(dict(m.batch_sizes))
    values_per_channel = moments.values_per_channel
    batch_mean = batch_var = batch_var_unbiased = None
    if values_per_channel:
        batch_mean, batch_var = _floats(moments.mean), _floats(moments.biased_var())
        batch_var_unbiased = _floats(moments.unbiased_var())
    first_summary = run_summary(
        first.values_per_channel, first.moments.num_batches, Counter(dict(first.moments.batch_sizes))
    )
    axes = first.explanation.raw.removesuffix(first_summary)
    flags = [flag for flag in first.flags if flag != _NONFINITE_INPUT]
    if any(not math.isfinite(v) for v in (*(batch_mean or ()), *(batch_var or ()))):
        flags.insert(sum(flag in _FLAGS_BEFORE for flag in flags), _NONFINITE_INPUT)
    return dataclasses.replace(
        first,
        values_per_channel=values_per_channel,
        batch_mean=batch_mean,
        batch_var=batch_var,
        batch_var_unbiased=batch_var_unbiased,
        explanation=Untrusted(axes + run_summary(values_per_channel, num_batches, batch_sizes)),
        flags=tuple(flags),
        moments=layer_moments(moments, num_batches, batch_sizes),
    )


def _fold(parts: Sequence[Moments]) -> Moments:
    """The parts' moments merged in order (engine/moments.py's merge); all of one kind."""
    if all(isinstance(m, ChannelMoments) for m in parts):
        return functools.reduce(ChannelMoments.merge, [m for m in parts if isinstance(m, ChannelMoments)])
    return functools.reduce(InstanceMoments.merge, [m for m in parts if isinstance(m, InstanceMoments)])


def _floats(tensor: torch.Tensor) -> tuple[float, ...]:
    return tuple(float(v) for v in tensor.tolist())


def _merged_input(inputs: Sequence[InputInfo]) -> InputInfo:
    first = inputs[0]
    return dataclasses.replace(
        first,
        source=Untrusted(f"{len(inputs)} merged reports (merged_from lists them)"),
        num_batches=sum(i.num_batches for i in inputs),
        num_samples=sum(i.num_samples for i in inputs),
        num_nonfinite_values=sum(i.num_nonfinite_values for i in inputs),
        num_skipped_files=sum(i.num_skipped_files for i in inputs),
        skipped_files=tuple(name for i in inputs for name in i.skipped_files)[:SKIPPED_NAMES_KEPT],
    )
