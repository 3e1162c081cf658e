"""The run behind each command, from its options to its result: what a command calls, in one function.

Each returns the result to render, or None on the ranks of a torchrun run that do not print it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from bn_inspect.analyses.exported_batches import ExportedBatches
from bn_inspect.analyses.session import (
    Rereadable,
    RunObserver,
    all_ranks,
    check_outputs,
    is_stdout,
    prepare_run,
    resolve_device,
    speaks,
    torchrun,
)
from bn_inspect.boundary.writing import Destination
from bn_inspect.errors import InputError, OutputError
from bn_inspect.options import RecalibrationChoice, RunOptions

if TYPE_CHECKING:
    from collections.abc import Iterable

    from bn_inspect.analyses.checking import CheckSettings
    from bn_inspect.data.batch import Batch
    from bn_inspect.model.loading import LoadedModel, Weights
    from bn_inspect.report.baseline import Baseline
    from bn_inspect.report.comparisons import ModeComparison, RecalibrationResult
    from bn_inspect.report.diff import DiffReport, Tolerance
    from bn_inspect.report.findings import CheckReport, Thresholds
    from bn_inspect.report.records import InputInfo, LayerListing, Report


def run_inspect(options: RunOptions, observer: RunObserver, layer_patterns: Sequence[str] = ()) -> Report | None:
    """`bn-inspect inspect`: the report of every normalization layer on the options' data.

    Raises:
        InputError: a ``layer_patterns`` glob (--layer) matches no layer call; the error names
            the closest names, in every output format.
    """
    from bn_inspect.analyses.inspection import inspect_model

    check_outputs(options)
    with torchrun(resolve_device(options.device)) as ranks:
        with all_ranks(ranks):
            prepared = prepare_run(options, observer, ranks=ranks)
        report = inspect_model(
            prepared.loaded.module,
            prepared.batches or (),
            mode=options.mode,
            model_info=prepared.model_info,
            input_source=prepared.input_source,
            materialize_lazy=True,
            distributed=ranks,
        )
        report = replace(report, input=prepared.input_details(report.input, ranks))
    if not speaks(ranks):
        return None
    _require_layer_matches(report, layer_patterns)
    _warn_nonfinite(report.input, observer)
    _note_other_data(options, report.input, observer)
    return report


def _note_other_data(options: RunOptions, data: InputInfo | None, observer: RunObserver) -> None:
    """Say that the model's statistics were recalibrated on other data than this run's (check keeps it in its notes)."""
    from bn_inspect.analyses.provenance import recalibration_data_note

    note = recalibration_data_note(options, None if data is None else data.num_samples, observer)
    if note is not None:
        observer.note(f"note: {note}.")


def _require_layer_matches(report: Report, patterns: Sequence[str]) -> None:
    from bn_inspect.report.records import closest_names, unmatched_patterns

    for pattern in unmatched_patterns(report, patterns):
        raise InputError(
            f"--layer {pattern!r} matches no normalization layer",
            f"Closest layer names: {', '.join(closest_names(report, pattern))}; a glob must match a whole "
            "qualified name, and `bn-inspect layers` lists them all",
        )


@dataclass(frozen=True)
class CheckRun:
    """What `bn-inspect check` found, and whether the run passed (rank 0's verdict under torchrun)."""

    report: CheckReport | None
    passed: bool


def run_check(options: RunOptions, gate: CheckSettings, observer: RunObserver, *, no_data: bool) -> CheckRun:
    """`bn-inspect check`: the health rules on stored state and, unless ``no_data``, on the options' data.

    With options.baseline, the BN3xx rules compare the run with that report (``gate.tolerance``); with
    options.write_baseline, rank 0 writes this run's inspection report there.
    """
    from bn_inspect.analyses.checking import check_model
    from bn_inspect.model.loading import LoadedModel
    from bn_inspect.report.baseline import Baseline

    if no_data:
        _refuse_data_options(options)
    check_outputs(options)
    baseline = _read_baseline(options, no_data)
    is_recalibrated = _is_recalibrated(options)
    with torchrun(resolve_device(options.device)) as ranks:
        with all_ranks(ranks):
            content = _weights_only(options, no_data)
            if content is not None and not isinstance(content, LoadedModel):
                known_good = None if baseline is None else Baseline(baseline, gate.tolerance)
                return _check_weights(content, gate, observer, is_recalibrated=is_recalibrated, baseline=known_good)
            prepared = prepare_run(options, observer, needs_data=not no_data, ranks=ranks, loaded=content)
        result = check_model(
            prepared.loaded.module,
            prepared.batches,
            mode=options.mode,
            thresholds=gate.thresholds,
            fail_on=gate.fail_on,
            ignore=gate.ignore,
            model_info=prepared.model_info,
            input_source=prepared.input_source,
            flags_from_file=prepared.loaded.format in ("pickle", "torchscript"),
            data_is_real=prepared.is_real_data,
            materialize_lazy=True,
            distributed=ranks,
            baseline=None if baseline is None else Baseline(baseline, gate.tolerance),
            is_recalibrated=is_recalibrated,
            fold=gate.fold,
            precision=gate.precision,
        )
        if result.input is not None:
            result = replace(result, input=prepared.input_details(result.input, ranks))
        passed = result.passed
        if ranks is not None:
            from bn_inspect.distributed.collectives import gather_json

            # Ranks whose buffers diverge (BN111) judge differently: rank 0's verdict is the run's.
            passed = bool(gather_json(passed, ranks.group, "agreeing on the verdict")[0])
    if not speaks(ranks):
        return CheckRun(None, passed)
    _warn_nonfinite(result.input, observer)
    from bn_inspect.analyses.provenance import recalibration_data_note

    other_data = recalibration_data_note(options, None if result.input is None else result.input.num_samples, observer)
    if other_data is not None:
        result = replace(result, notes=(*result.notes, other_data))
    if options.write_baseline is not None and result.inspection is not None:
        from bn_inspect.report.reading import write_report

        write_report(options.write_baseline, result.inspection, force=options.force)
        observer.note(f"note: the baseline goes to {options.write_baseline} when the check ends.")
    return CheckRun(result, passed)


def _is_recalibrated(options: RunOptions) -> bool:
    """The model file holds a readable bn-inspect recalibration record (its num_batches_tracked counts recalibration)."""
    from bn_inspect.model.provenance import read_stored_record

    return options.model is not None and read_stored_record(options.model).record is not None


def _weights_only(options: RunOptions, no_data: bool) -> LoadedModel | Weights | None:
    """The model file, read, where --no-data without --arch may meet a bare state_dict; else None (load as usual)."""
    from bn_inspect.model.loading import read_model_file

    if not no_data or options.arch is not None or options.model is None:
        return None
    return read_model_file(
        options.model,
        trust_pickle=options.trust_pickle,
        map_location=resolve_device(options.device),
        trust_remote_code=options.trust_remote_code,
    )


def _check_weights(
    content: Weights, gate: CheckSettings, observer: RunObserver, *, is_recalibrated: bool, baseline: Baseline | None
) -> CheckRun:
    """check --no-data on a bare state_dict: the rules on stored buffers over its BatchNorm-like key groups."""
    from bn_inspect.analyses.checking import check_weights
    from bn_inspect.model.layers import states_from_state_dict
    from bn_inspect.report.records import ModelInfo

    observer.loaded()
    result = check_weights(
        states_from_state_dict(content.state_dict),
        thresholds=gate.thresholds,
        fail_on=gate.fail_on,
        ignore=gate.ignore,
        model_info=ModelInfo.of(content.source, content.format, sha256=content.sha256),
        is_recalibrated=is_recalibrated,
        baseline=baseline,
    )
    return CheckRun(result, result.passed)


def _read_baseline(options: RunOptions, no_data: bool) -> Report | None:
    """check's --baseline, read, and its --write-baseline target, checked before the model loads.

    Raises:
        ReportFileError: the baseline cannot be read.
        OutputError: --write-baseline with --no-data, or to stdout.
    """
    from bn_inspect.report.reading import load_report

    target = options.write_baseline
    if target is not None:
        if no_data:
            raise OutputError(
                "--write-baseline records the statistics on the data, and --no-data runs none",
                "Drop --no-data and give the data the baseline should hold (--input)",
            )
        if is_stdout(target):
            raise OutputError("--write-baseline - would mix the baseline with the check's output", "Give a file path")
    return None if options.baseline is None else load_report(options.baseline)


def _refuse_data_options(
    options: RunOptions,
    why: str = "--no-data runs no data",
    fix: str = "Drop --no-data to check the model on the data, or drop the data options",
) -> None:
    """Refuse data options that would be ignored (next to --no-data: a CI job that passes --input
    expects its data checked).

    Raises:
        InputError: naming the data options that would be ignored.
    """
    given = {
        "--input": options.input_file,
        "--data": options.data,
        "--resize": options.resize,
        "--crop": options.crop,
        "--normalize": options.normalize,
        "--grayscale": options.grayscale or None,
        "--workers": options.workers,
        "--strict-data": options.strict_data or None,
        "--shape": options.shape,
        "--input-key": options.input_key,
        "--drop-column": options.drop_column or None,
        "--batch-size": options.batch_size,
        "--batches": options.batches,
    }
    ignored = [flag for flag, value in given.items() if value is not None]
    if ignored:
        raise InputError(f"{why}, so {', '.join(ignored)} would be ignored", fix)


def run_compare_modes(options: RunOptions, threshold: float, observer: RunObserver) -> ModeComparison:
    """`bn-inspect compare-modes`: eval against train mode, layer by layer, on the options' data."""
    from bn_inspect.analyses.modes import compare_modes

    check_outputs(options)
    prepared = prepare_run(options, observer)
    comparison = compare_modes(prepared.loaded.module, prepared.batches or (), threshold=threshold)
    return dataclasses.replace(comparison, model=prepared.model_info)


def list_layers(options: RunOptions, observer: RunObserver) -> LayerListing:
    """`bn-inspect layers`: every normalization layer of the model file and what it stores, no data run.

    A bare state_dict needs no --arch: its layers are found by their running_mean/running_var keys.
    """
    from bn_inspect.model.arch import build_arch, parse_arch_kwargs
    from bn_inspect.model.layers import iter_norm_layers, states_from_state_dict
    from bn_inspect.model.loading import LoadedModel, load_weights_into, read_model_file
    from bn_inspect.model.modules import find_layers, unwrap_compiled
    from bn_inspect.report.records import LayerListing, ModelInfo

    if options.model is None:
        raise InputError("layers needs a model file", "Give the path of a model file")
    check_outputs(options)
    kwargs = parse_arch_kwargs(options.arch_kwargs)
    content = read_model_file(
        options.model, trust_pickle=options.trust_pickle, trust_remote_code=options.trust_remote_code
    )
    observer.loaded()
    if isinstance(content, LoadedModel):
        layers, _ = find_layers(unwrap_compiled(content.module))
        info = ModelInfo.of(content.source, content.format, sha256=content.sha256)
        return LayerListing(info, tuple(layer.state() for layer in layers))
    if options.arch is not None:
        module = build_arch(options.arch, kwargs)
        for note in load_weights_into(module, content, options.arch):
            observer.note(note)
        # A state_dict stores no training flags: the fresh architecture's would pass for the file's.
        states = tuple(
            replace(layer.state(), is_training=None, affine_requires_grad=None) for layer in iter_norm_layers(module)
        )
        return LayerListing(ModelInfo.of(content.source, content.format, options.arch, content.sha256), states)
    states = tuple(states_from_state_dict(content.state_dict))
    return LayerListing(
        ModelInfo.of(content.source, content.format, sha256=content.sha256), states, types_inferred=True
    )


def run_recalibrate(
    options: RunOptions, method: RecalibrationChoice, force: bool, observer: RunObserver
) -> RecalibrationResult | None:
    """`bn-inspect recalibrate`: new running statistics from the options' data, written to options.output.

    Raises:
        InputError: no --input (random data would write noise into the running statistics).
        OutputError: the output is stdout, exists without ``force``, or is a file the run reads.
    """
    from bn_inspect.analyses.provenance import provenance_of
    from bn_inspect.analyses.recalibration import recalibrate
    from bn_inspect.analyses.sources import fit_images_to_model, open_data
    from bn_inspect.data.inputs import DEFAULT_BATCH_SIZE
    from bn_inspect.data.memory import check_fits_memory
    from bn_inspect.model.arch import parse_arch_kwargs
    from bn_inspect.model.loading import load_model
    from bn_inspect.model.saving import save_like

    model, output, input_file = _recalibration_paths(options, force)
    kwargs = parse_arch_kwargs(options.arch_kwargs)
    device = resolve_device(options.device)
    with torchrun(device) as ranks:
        with all_ranks(ranks):
            data = open_data(options, input_file)
            size = options.batch_size or DEFAULT_BATCH_SIZE
            check_fits_memory((size, *data.sample_shape()), 4)
            loaded = load_model(
                model, arch=options.arch, arch_kwargs=kwargs, trust_pickle=options.trust_pickle, map_location=device
            )
        observer.loaded()
        if loaded.format == "onnx":
            # Refused before the passes run: they would end in a file that cannot be written.
            raise OutputError(
                "recalibrate does not write ONNX files", "Recalibrate the PyTorch model, then export it again"
            )
        data = fit_images_to_model(data, loaded.module, options, kwargs)
        mine: Iterable[Batch] = Rereadable(data, size, options.batches, observer)
        if ranks is not None:
            from bn_inspect.distributed.sharding import shard_input

            mine = Rereadable(shard_input(data, ranks.rank, ranks.world_size), size, options.batches, observer)
        if loaded.format == "torch.export":
            mine = ExportedBatches(loaded.module, mine, observer)
        result = recalibrate(loaded.module, mine, method=method.value, distributed=ranks)
        result = replace(result, provenance=provenance_of(options, method.value, result.num_samples, loaded.sha256))
        # Every rank now holds the same buffers; rank 0 alone writes the one file.
        with all_ranks(ranks):
            if speaks(ranks):
                save_like(
                    model,
                    loaded.format,
                    loaded.module,
                    output,
                    force=force,
                    trust_pickle=options.trust_pickle,
                    provenance=result.provenance,
                )
    return result if speaks(ranks) else None


def _recalibration_paths(options: RunOptions, force: bool) -> tuple[Path, Path, Path]:
    """The model, output and input paths of a recalibration, checked before anything is loaded."""
    model, output, input_file = options.model, options.output, options.input_file
    if model is None or output is None:
        raise InputError("recalibrate needs a model file and --output", "Give both")
    if input_file is None:
        raise InputError(
            "recalibrate needs real data: random input would replace the running statistics with noise",
            "Pass --input FILE or --input DIR with representative data",
        )
    if is_stdout(output):
        raise OutputError(
            "--output - would write the model's bytes to stdout, where the report goes", "Give a file path"
        )
    check_outputs(replace(options, force=force), result=Destination.MODEL)
    return model, output, input_file


def _warn_nonfinite(data: InputInfo | None, observer: RunObserver) -> None:
    if data is not None and data.num_nonfinite_values:
        observer.warn(
            f"warning: {data.num_nonfinite_values:,} input values are NaN or infinite; "
            "the statistics of the layers they reach are NaN"
        )


def run_diff(
    old: Path, new: Path, options: RunOptions, tolerance: Tolerance, thresholds: Thresholds, observer: RunObserver
) -> DiffReport | None:
    """`bn-inspect diff`: two JSON reports or model files (a model file runs the options' data, as inspect).

    Under torchrun each model file's report holds the statistics merged over all ranks.

    Raises:
        InputError: data options given where both sides are JSON reports.
        ReportFileError: a side that looks like a JSON report cannot be read.
    """
    from bn_inspect.report.diff import diff_reports
    from bn_inspect.report.reading import read_diff_side

    check_outputs(options, old, new)
    # Each side is opened and judged (a regular file) before its first bytes tell a report from a model.
    read = [read_diff_side(old, "OLD"), read_diff_side(new, "NEW")]
    if all(report is not None for report in read):
        _refuse_data_options(
            options, "two JSON reports run no data", "Drop the data options, or give a model file to run them through"
        )
    from bn_inspect.analyses.graph_batches import fit_diff_batches

    models = [
        (side, path) for side, path, report in zip(("OLD", "NEW"), (old, new), read, strict=True) if report is None
    ]
    options = fit_diff_batches(options, models, observer)
    reports = [
        report if report is not None else run_inspect(replace(options, model=path), observer)
        for path, report in zip((old, new), read, strict=True)
    ]
    # On the ranks of a torchrun run that do not print, run_inspect returns None.
    if reports[0] is None or reports[1] is None:
        return None
    return diff_reports(reports[0], reports[1], tolerance, thresholds)
