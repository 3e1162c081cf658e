"""The run behind each command, from its options to its result: what a command calls, in one function.

Each returns the result to render, or None on the ranks of a torchrun run that do not print it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bn_inspect.analyses.session import (
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
    from bn_inspect.report.comparisons import ModeComparison, RecalibrationResult
    from bn_inspect.report.findings import CheckReport, Thresholds
    from bn_inspect.report.records import InputInfo, LayerListing, Report


def run_inspect(options: RunOptions, observer: RunObserver) -> Report | None:
    """`bn-inspect inspect`: the report of every normalization layer on the options' data."""
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
    if not speaks(ranks):
        return None
    _warn_nonfinite(report.input, observer)
    return report


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
        passed = result.passed
        if ranks is not None:
            from bn_inspect.distributed.collectives import gather_json

            # Ranks whose buffers diverge (BN111) judge differently: rank 0's verdict is the run's.
            passed = bool(gather_json(passed, ranks.group, "agreeing on the verdict")[0])
    if not speaks(ranks):
        return CheckRun(None, passed)
    _warn_nonfinite(result.input, observer)
    return CheckRun(result, passed)


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
        states = tuple(layer.state() for layer in iter_norm_layers(module))
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
    from bn_inspect.data.inputs import DEFAULT_BATCH_SIZE, open_input
    from bn_inspect.data.memory import check_fits_memory
    from bn_inspect.model.arch import parse_arch_kwargs
    from bn_inspect.model.loading import load_model
    from bn_inspect.model.saving import save_like

    model, output, input_file = _recalibration_paths(options, force)
    kwargs = parse_arch_kwargs(options.arch_kwargs)
    device = resolve_device(options.device)
    with torchrun(device) as ranks:
        with all_ranks(ranks):
            data = open_input(input_file, key=options.input_key, drop_columns=options.drop_column)
            size = options.batch_size or DEFAULT_BATCH_SIZE
            check_fits_memory((size, *data.sample_shape()), 4)
            loaded = load_model(
                model, arch=options.arch, arch_kwargs=kwargs, trust_pickle=options.trust_pickle, map_location=device
            )
        observer.loaded()
        mine = Rereadable(data, size, options.batches)
        if ranks is not None:
            from bn_inspect.distributed.sharding import shard_input

            mine = Rereadable(shard_input(data, ranks.rank, ranks.world_size), size, options.batches)
        result = recalibrate(loaded.module, mine, method=method.value, distributed=ranks)
        # Every rank now holds the same buffers; rank 0 alone writes the one file.
        with all_ranks(ranks):
            if speaks(ranks):
                save_like(model, loaded.format, loaded.module, output, force=force)
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
