"""The run behind each command, from its options to its result: what a command calls, in one function.

Each returns the result to render, or None on the ranks of a torchrun run that do not print it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from bn_inspect.analyses.session import (
    ExportedBatches,
    Rereadable,
    RunObserver,
    all_ranks,
    check_output,
    is_stdout,
    prepare_run,
    protected_inputs,
    resolve_device,
    speaks,
    torchrun,
)
from bn_inspect.errors import InputError, OutputError
from bn_inspect.options import FailOn, RecalibrationChoice, RunOptions

if TYPE_CHECKING:
    from collections.abc import Iterable

    from bn_inspect.data.batch import Batch
    from bn_inspect.report.comparisons import ModeComparison, RecalibrationResult
    from bn_inspect.report.findings import CheckReport, Thresholds
    from bn_inspect.report.records import InputInfo, LayerListing, Report


def run_inspect(options: RunOptions, observer: RunObserver, layer_patterns: Sequence[str] = ()) -> Report | None:
    """`bn-inspect inspect`: the report of every normalization layer on the options' data.

    Raises:
        InputError: a ``layer_patterns`` glob (--layer) matches no layer call; the error names
            the closest names, in every output format.
    """
    from bn_inspect.analyses.inspection import inspect_model

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
    return report


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


def run_check(
    options: RunOptions,
    thresholds: Thresholds,
    fail_on: FailOn,
    ignore: list[str],
    observer: RunObserver,
    *,
    no_data: bool,
) -> CheckRun:
    """`bn-inspect check`: the health rules on stored state and, unless ``no_data``, on the options' data."""
    from bn_inspect.analyses.checking import check_model

    if no_data:
        _refuse_data_options(options)
    with torchrun(resolve_device(options.device)) as ranks:
        with all_ranks(ranks):
            prepared = prepare_run(options, observer, needs_data=not no_data, ranks=ranks)
        result = check_model(
            prepared.loaded.module,
            prepared.batches,
            mode=options.mode,
            thresholds=thresholds,
            fail_on=fail_on,
            ignore=ignore,
            model_info=prepared.model_info,
            input_source=prepared.input_source,
            flags_from_file=prepared.loaded.format in ("pickle", "torchscript"),
            data_is_real=prepared.is_real_data,
            materialize_lazy=True,
            distributed=ranks,
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
    return CheckRun(result, passed)


def _refuse_data_options(options: RunOptions) -> None:
    """Refuse data options next to --no-data: a CI job that passes --input expects its data checked.

    Raises:
        InputError: naming the data options that --no-data would ignore.
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
        raise InputError(
            f"--no-data runs no data, so {', '.join(ignored)} would be ignored",
            "Drop --no-data to check the model on the data, or drop the data options",
        )


def run_compare_modes(options: RunOptions, threshold: float, observer: RunObserver) -> ModeComparison:
    """`bn-inspect compare-modes`: eval against train mode, layer by layer, on the options' data."""
    from bn_inspect.analyses.modes import compare_modes

    prepared = prepare_run(options, observer)
    comparison = compare_modes(prepared.loaded.module, prepared.batches or (), threshold=threshold)
    return dataclasses.replace(comparison, model=prepared.model_info)


def list_layers(options: RunOptions, observer: RunObserver) -> LayerListing:
    """`bn-inspect layers`: every normalization layer of the model file and what it stores, no data run.

    A bare state_dict needs no --arch: its layers are found by their running_mean/running_var keys.
    """
    from bn_inspect.model.arch import build_arch, parse_arch_kwargs
    from bn_inspect.model.layers import iter_norm_layers, states_from_state_dict
    from bn_inspect.model.loading import LoadedModel, read_model_file
    from bn_inspect.model.modules import find_layers, unwrap_compiled
    from bn_inspect.model.state_dict import load_state_into
    from bn_inspect.report.records import LayerListing, ModelInfo

    if options.model is None:
        raise InputError("layers needs a model file", "Give the path of a model file")
    check_output(options.output, protected_inputs(options.model, None, options.arch))
    kwargs = parse_arch_kwargs(options.arch_kwargs)
    content = read_model_file(options.model, trust_pickle=options.trust_pickle)
    observer.loaded()
    if isinstance(content, LoadedModel):
        layers, _ = find_layers(unwrap_compiled(content.module))
        return LayerListing(ModelInfo(content.source, content.format), tuple(layer.state() for layer in layers))
    if options.arch is not None:
        module = build_arch(options.arch, kwargs)
        load_state_into(module, content.state_dict, options.arch)
        # A state_dict stores no training flags: the fresh architecture's would pass for the file's.
        states = tuple(
            replace(layer.state(), is_training=None, affine_requires_grad=None) for layer in iter_norm_layers(module)
        )
        return LayerListing(ModelInfo(content.source, content.format, options.arch), states)
    states = tuple(states_from_state_dict(content.state_dict))
    return LayerListing(ModelInfo(content.source, content.format), states, types_inferred=True)


def run_recalibrate(
    options: RunOptions, method: RecalibrationChoice, force: bool, observer: RunObserver
) -> RecalibrationResult | None:
    """`bn-inspect recalibrate`: new running statistics from the options' data, written to options.output.

    Raises:
        InputError: no --input (random data would write noise into the running statistics).
        OutputError: the output is stdout, exists without ``force``, or is a file the run reads.
    """
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
        data = fit_images_to_model(data, loaded.module, options, kwargs)
        mine: Iterable[Batch] = Rereadable(data, size, options.batches, observer)
        if ranks is not None:
            from bn_inspect.distributed.sharding import shard_input

            mine = Rereadable(shard_input(data, ranks.rank, ranks.world_size), size, options.batches, observer)
        if loaded.format == "torch.export":
            mine = ExportedBatches(loaded.module, mine, observer)
        result = recalibrate(loaded.module, mine, method=method.value, distributed=ranks)
        # Every rank now holds the same buffers; rank 0 alone writes the one file.
        with all_ranks(ranks):
            if speaks(ranks):
                save_like(model, loaded.format, loaded.module, output, force=force, trust_pickle=options.trust_pickle)
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
    check_output(output, protected_inputs(model, input_file, options.arch))
    if output.exists() and not force:
        raise OutputError(f"--output {output} already exists", "Pass --force to replace it, or choose another path")
    return model, output, input_file


def _warn_nonfinite(data: InputInfo | None, observer: RunObserver) -> None:
    if data is not None and data.num_nonfinite_values:
        observer.warn(
            f"warning: {data.num_nonfinite_values:,} input values are NaN or infinite; "
            "the statistics of the layers they reach are NaN"
        )
