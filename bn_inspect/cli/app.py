"""Typer app: parse, call the library, render or export, and map errors to exit codes.

Exit codes: 0 ran and nothing failed; 1 ran and a check failed; 2 could not run (bad usage,
unreadable or untrusted model, input that does not fit); 3 internal error (a bug: please report);
130 and 143 stopped by SIGINT or SIGTERM, leaving no partial file.
torch and pandas are imported inside the commands so that ``bn-inspect --help`` stays fast.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from bn_inspect.atomic import ProtectedFile, check_target, interruption, write_text
from bn_inspect.errors import BnInspectError, DeviceError, InputError, Interrupted, OutputError
from bn_inspect.options import (
    CheckFormat,
    DeviceChoice,
    FailOn,
    ListingFormat,
    Mode,
    OutputFormat,
    RecalibrationChoice,
)
from bn_inspect.text import inert, one_line

if TYPE_CHECKING:
    from rich.console import RenderableType
    from torch import nn

    from bn_inspect.data.batch import Batch
    from bn_inspect.data.inputs import DirectoryData
    from bn_inspect.data.readers import InputData
    from bn_inspect.distributed.context import DistributedContext
    from bn_inspect.distributed.sharding import ShardedInput
    from bn_inspect.model.loading import LoadedModel
    from bn_inspect.report.findings import CheckReport
    from bn_inspect.report.records import Report

EXIT_OK, EXIT_CHECK_FAILED, EXIT_CANNOT_RUN, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_INTERRUPTED = 128 + signal.SIGINT
INTERRUPTED_LINE = "Error: interrupted; nothing written."

# Only main() sets this: a CLI process owns its garbage collector, a program that calls run() does not.
_is_collector_paused = False
# The signal main()'s handler caught during this run(), if any.
_signal_received: int | None = None

app = typer.Typer(
    name="bn-inspect",
    help="See what every BatchNorm layer of a saved PyTorch model computes on your data.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)


@app.callback()
def _root() -> None:
    """See what every BatchNorm layer of a saved PyTorch model computes on your data."""


def _resolve_device(choice: DeviceChoice) -> str:
    import torch

    has_cuda = torch.cuda.is_available()
    if choice is DeviceChoice.CUDA and not has_cuda:
        raise DeviceError(
            "--device cuda was asked for, but this torch build sees no CUDA device", "Use --device cpu or auto"
        )
    if choice is DeviceChoice.AUTO:
        return "cuda" if has_cuda else "cpu"
    return str(choice.value)


def _is_stdout(output: Path) -> bool:
    """``--output -``: the report goes to stdout, as without --output."""
    return str(output) == "-"


def _protected_inputs(model: Path | None, input_file: Path | None, arch: str | None) -> list[ProtectedFile]:
    """Every file the run reads: --output may name none of them."""
    protected = [ProtectedFile("the model file", model)] if model is not None else []
    if input_file is not None and input_file.is_dir():
        try:
            shards = list(input_file.iterdir())
        except OSError:
            shards = []  # an unreadable folder is reported when the data is opened
        protected.extend(ProtectedFile("a shard of the --input folder", shard) for shard in shards)
    elif input_file is not None:
        protected.append(ProtectedFile("the --input file", input_file))
    # The path/to/file.py:callable form, told apart as the loader does.
    arch_target = (arch or "").rpartition(":")[0]
    if arch_target.endswith(".py") or "/" in arch_target or os.sep in arch_target:
        protected.append(ProtectedFile("the --arch file", Path(arch_target)))
    return protected


def _check_output(output: Path | None, protected: Sequence[ProtectedFile]) -> None:
    if output is not None and not _is_stdout(output):
        check_target(output, protected)


def _silent(_message: str) -> None:
    """A note sink for --quiet."""


def _note(message: str) -> None:
    from rich.console import Console
    from rich.text import Text

    # A note quotes the model's path and layer names: as Text, never as markup; control characters escaped.
    Console(stderr=True, highlight=False, soft_wrap=True).print(Text(inert(message), style="dim"))


ModelArg = Annotated[
    Path | None,
    typer.Argument(
        help="Model file: state_dict or checkpoint (.pt/.pth), safetensors, TorchScript or pickled model. "
        "Omit it with --arch to inspect a fresh architecture.",
        show_default=False,
    ),
]
ArchOpt = Annotated[
    str | None,
    typer.Option(
        "--arch",
        help="Callable that builds the model: package.module:callable or path/to/file.py:callable "
        "(imports and runs that code).",
    ),
]
ArchKwargsOpt = Annotated[
    str | None,
    typer.Option("--arch-kwargs", help="JSON object of keyword arguments for --arch, e.g. '{\"num_classes\": 10}'."),
]
TrustPickleOpt = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help="Allow a pickle to import the classes it names, and an archive to unpickle or call file operators. "
        "This runs code from the file: only for files you trust.",
    ),
]
ShapeOpt = Annotated[str | None, typer.Option("--shape", help="Random normal input of this shape, e.g. 16,3,32,32.")]
InputOpt = Annotated[
    Path | None,
    typer.Option("--input", help="Data: .pt/.pth (tensor, tuple/list or dict of tensors), .npy, .npz, .csv, .parquet."),
]
InputKeyOpt = Annotated[str | None, typer.Option("--input-key", help="Array of an .npz (or entry of a dict .pt).")]
DropColumnOpt = Annotated[
    list[str] | None, typer.Option("--drop-column", help="Table column to leave out, e.g. a label (repeatable).")
]
BatchSizeOpt = Annotated[
    int | None,
    typer.Option("--batch-size", min=1, help="Samples per batch for --input (default 64) or an inferred shape (8)."),
]
BatchesOpt = Annotated[
    int | None, typer.Option("--batches", min=1, help="Run at most this many batches (default: all; 1 for --shape).")
]
# torch seeds any integer that fits in 64 bits, signed or not.
SeedOpt = Annotated[
    int,
    typer.Option("--seed", min=-(2**63), max=2**64 - 1, help="Seed for random input and for dropout in train mode."),
]
ModeOpt = Annotated[
    Mode,
    typer.Option("--mode", help="eval: as deployed (running statistics); train: as in training (batch statistics)."),
]
DeviceOpt = Annotated[DeviceChoice, typer.Option("--device", help="Where the model runs.")]
OutputOpt = Annotated[
    Path | None,
    typer.Option("--output", help="Write the report to this file (atomically) instead of stdout; - is stdout."),
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the traceback of any error.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no notes on stderr.")]


@dataclass(frozen=True)
class _Prepared:
    """A loaded model and the batches to run, as both commands need them."""

    loaded: LoadedModel
    batches: Iterator[Batch] | None
    input_source: str
    is_real_data: bool


def _prepare(
    model: Path | None,
    arch: str | None,
    arch_kwargs: str | None,
    trust_pickle: bool,
    shape: str | None,
    input_file: Path | None,
    input_key: str | None,
    drop_column: list[str] | None,
    batch_size: int | None,
    batches: int | None,
    seed: int,
    device: DeviceChoice,
    output: Path | None,
    mode: Mode,
    *,
    needs_data: bool = True,
    quiet: bool = False,
    shard: tuple[int, int] = (0, 1),
) -> _Prepared:
    """Validate the shared options, load the model and build this rank's batches (guessing a shape if needed)."""
    from bn_inspect.model.arch import parse_arch_kwargs
    from bn_inspect.model.loading import LoadedModel, load_model

    # Rank 0 speaks for the run; the other ranks' notes would repeat its own.
    note = _silent if quiet or shard[0] != 0 else _note

    if shape is not None and input_file is not None:
        raise InputError("--shape and --input were both given", "Use one of them")
    if shape is not None and batch_size is not None:
        raise InputError("--batch-size does not apply to --shape", "Set the batch size as the first dim of --shape")
    _check_output(output, _protected_inputs(model, input_file, arch))
    kwargs = parse_arch_kwargs(arch_kwargs)
    target_device = _resolve_device(device)
    batch_iter: Iterator[Batch] | None = None
    input_source = ""
    if needs_data:
        batch_iter, input_source = _make_batches(
            shape, input_file, input_key, drop_column or [], batch_size, batches, seed, quiet or shard[0] != 0, shard
        )
    import torch

    torch.manual_seed(seed)
    loaded = load_model(model, arch=arch, arch_kwargs=kwargs, trust_pickle=trust_pickle, map_location=target_device)
    if model is None:
        loaded = LoadedModel(loaded.module.to(target_device), loaded.source, loaded.format, loaded.arch)
    elif arch is not None and loaded.arch is None:
        note(f"note: --arch is not used: {model} holds a whole {loaded.format} model, architecture included.")
    if loaded.format == "torch.export":
        from bn_inspect.model.graph import exported_training_mode, iter_graph_norm_layers, lowered_graph_norm_modules

        graph_layers = iter_graph_norm_layers(loaded.module)
        lowered = lowered_graph_norm_modules(loaded.module, (layer.name for layer in graph_layers))
        if graph_layers and lowered:
            note(
                f"note: {len(lowered)} normalization module(s) of this archive, e.g. {lowered[0][0]} "
                f"({lowered[0][1]}), are plain arithmetic in its graph and are not inspected; "
                "inspect the state_dict with --arch to see them."
            )
        training = exported_training_mode(graph_layers)
        # On a mismatch the error says it all; a note on top would make it two lines.
        if training is not None and training == (mode is Mode.TRAIN):
            note(
                f"note: this torch.export archive was exported in {'train' if training else 'eval'} mode, "
                "which its graph fixes."
            )
    if needs_data and batch_iter is None:
        batch_iter, input_source = _guessed_batches(loaded.module, batch_size or 8, batches or 1, seed, note, shard)
    _end_startup()
    return _Prepared(loaded, batch_iter, input_source, is_real_data=input_file is not None)


@contextmanager
def _all_or_none(context: DistributedContext) -> Iterator[None]:
    """Under torchrun: if the block fails on any rank, it fails on every rank, so none waits on the others."""
    from bn_inspect.distributed.collectives import fail_together

    if not context.is_distributed:
        yield
        return
    with fail_together(context.group):
        yield


def _emit(text: str, output: Path | None) -> None:
    if output is None or _is_stdout(output):
        sys.stdout.write(text)
    else:
        write_text(output, text)


@app.command("inspect")
def inspect_command(
    model: ModelArg = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    shape: ShapeOpt = None,
    input_file: InputOpt = None,
    input_key: InputKeyOpt = None,
    drop_column: DropColumnOpt = None,
    batch_size: BatchSizeOpt = None,
    batches: BatchesOpt = None,
    seed: SeedOpt = 0,
    mode: ModeOpt = Mode.EVAL,
    device: DeviceOpt = DeviceChoice.CPU,
    layer: Annotated[
        list[str] | None,
        typer.Option("--layer", help="Glob on qualified layer names that adds a per-channel table (repeatable)."),
    ] = None,
    output_format: Annotated[
        OutputFormat, typer.Option("--format", help="table for people; json, csv or markdown for machines and CI.")
    ] = OutputFormat.TABLE,
    output: OutputOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Run data through a model and show, per normalization layer, batch vs running statistics.

    Examples:

      bn-inspect inspect sample_models/digits_cnn/torchscript.pt --input sample_models/digits_cnn/test_images.npy

      bn-inspect inspect state_dict.pt --arch mypkg.models:resnet18 --arch-kwargs '{"num_classes": 10}' --shape 8,3,224,224

      bn-inspect inspect model.pt --input val.npy --batch-size 32 --mode train --layer 'layer1.*'

      bn-inspect inspect model.ts --shape 16,3,32,32 --format json --output report.json
    """
    from bn_inspect.analyses.inspection import inspect_model
    from bn_inspect.distributed.context import distributed_context
    from bn_inspect.output.export import to_csv, to_json, to_markdown
    from bn_inspect.report.records import ModelInfo

    with distributed_context(device=_resolve_device(device)) as context:
        with _all_or_none(context):
            prepared = _prepare(
                model,
                arch,
                arch_kwargs,
                trust_pickle,
                shape,
                input_file,
                input_key,
                drop_column,
                batch_size,
                batches,
                seed,
                device,
                output,
                mode,
                quiet=quiet,
                shard=(context.rank, context.world_size),
            )
        loaded = prepared.loaded
        report = inspect_model(
            loaded.module,
            prepared.batches or (),
            mode=mode,
            model_info=ModelInfo(loaded.source, loaded.format, loaded.arch),
            input_source=prepared.input_source,
            materialize_lazy=True,
            distributed=context,
        )
        if not context.is_main:
            return
        _warn_nonfinite(report.input.num_nonfinite_values)
        patterns = tuple(layer or ())
        if output_format is OutputFormat.JSON:
            _emit(to_json(report), output)
        elif output_format is OutputFormat.CSV:
            _emit(to_csv(report), output)
        elif output_format is OutputFormat.MARKDOWN:
            _emit(to_markdown(report, patterns), output)
        else:
            _print_table(report, patterns, output)


def _warn_nonfinite(count: int) -> None:
    if count:
        _note(f"warning: {count:,} input values are NaN or infinite; the statistics of the layers they reach are NaN")


@app.command("check")
def check_command(
    model: ModelArg = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    shape: ShapeOpt = None,
    input_file: InputOpt = None,
    input_key: InputKeyOpt = None,
    drop_column: DropColumnOpt = None,
    batch_size: BatchSizeOpt = None,
    batches: BatchesOpt = None,
    seed: SeedOpt = 0,
    mode: ModeOpt = Mode.EVAL,
    device: DeviceOpt = DeviceChoice.CPU,
    no_data: Annotated[
        bool, typer.Option("--no-data", help="Run only the rules on stored state: no forward pass, no input needed.")
    ] = False,
    fail_on: Annotated[
        FailOn | None, typer.Option("--fail-on", help="Lowest severity that fails the check (default error).")
    ] = None,
    max_shift: Annotated[
        float | None, typer.Option("--max-shift", min=0, help="|shift z| above this is shifted (default 3).")
    ] = None,
    max_var_ratio: Annotated[
        float | None,
        typer.Option("--max-var-ratio", min=1, help="Var ratio outside [1/R, R] is shifted (default 4)."),
    ] = None,
    max_share: Annotated[
        float | None,
        typer.Option("--max-share", min=0, max=1, help="Share of shifted channels a layer may have (default 0.1)."),
    ] = None,
    min_values: Annotated[
        int | None, typer.Option("--min-values", min=1, help="Fewer values per channel per batch warn (default 16).")
    ] = None,
    ignore: Annotated[
        list[str] | None, typer.Option("--ignore", help="Rule code or name to leave out, e.g. BN106 (repeatable).")
    ] = None,
    strict: Annotated[
        bool | None, typer.Option("--strict/--no-strict", help="Untrained statistics (BN104) are an error.")
    ] = None,
    output_format: Annotated[
        CheckFormat, typer.Option("--format", help="table for people; json, markdown or junit for CI.")
    ] = CheckFormat.TABLE,
    output: OutputOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Check a model's normalization layers for broken state; exit 1 when a finding reaches --fail-on.

    Thresholds can be pinned in pyproject.toml under [tool.bn-inspect] (max-shift, max-var-ratio,
    max-share, min-values, fail-on, strict, ignore); flags override them.

    Examples:

      bn-inspect check model.ts --no-data

      bn-inspect check state_dict.pt --arch mypkg.models:resnet18 --input val.npy --format junit --output bn.xml

      bn-inspect check model.pt --input val.npy --fail-on warning --max-shift 2 --ignore BN106
    """
    from bn_inspect.analyses.checking import check_model
    from bn_inspect.config import load_check_config
    from bn_inspect.distributed.collectives import gather_json
    from bn_inspect.distributed.context import distributed_context
    from bn_inspect.report.findings import Thresholds
    from bn_inspect.report.records import ModelInfo
    from bn_inspect.report.rules import unknown_codes

    config = load_check_config(Path.cwd())
    ignored = [*config.ignore, *(ignore or [])]
    unknown = unknown_codes(ignored)
    if unknown:
        raise InputError(f"--ignore {', '.join(unknown)}: no such rule", "See the rule codes in bn-inspect's README")
    defaults = Thresholds()
    thresholds = Thresholds(
        max_shift=_first(max_shift, config.max_shift, defaults.max_shift),
        max_var_ratio=_first(max_var_ratio, config.max_var_ratio, defaults.max_var_ratio),
        max_share=_first(max_share, config.max_share, defaults.max_share),
        min_values=int(_first(min_values, config.min_values, defaults.min_values)),
        strict=bool(_first(strict, config.strict, defaults.strict)),
    )
    try:
        gate = FailOn(fail_on or config.fail_on or FailOn.ERROR)
    except ValueError:
        raise InputError(f"fail-on {config.fail_on!r} in {config.source}", "Use error or warning") from None
    with distributed_context(device=_resolve_device(device)) as context:
        with _all_or_none(context):
            prepared = _prepare(
                model,
                arch,
                arch_kwargs,
                trust_pickle,
                shape,
                input_file,
                input_key,
                drop_column,
                batch_size,
                batches,
                seed,
                device,
                output,
                mode,
                needs_data=not no_data,
                quiet=quiet,
                shard=(context.rank, context.world_size),
            )
        loaded = prepared.loaded
        result = check_model(
            loaded.module,
            prepared.batches,
            mode=mode,
            thresholds=thresholds,
            fail_on=gate,
            ignore=ignored,
            model_info=ModelInfo(loaded.source, loaded.format, loaded.arch),
            input_source=prepared.input_source,
            flags_from_file=loaded.format in ("pickle", "torchscript"),
            data_is_real=prepared.is_real_data,
            materialize_lazy=True,
            distributed=context,
        )
        passed = result.passed
        if context.is_distributed:
            # Ranks whose buffers diverge (BN111) judge differently: rank 0's verdict is the run's.
            passed = bool(gather_json(passed, context.group, "agreeing on the verdict")[0])
        if context.is_main:
            _report_check(result, output_format, output)
    if not passed:
        raise typer.Exit(EXIT_CHECK_FAILED)


def _report_check(result: CheckReport, output_format: CheckFormat, output: Path | None) -> None:
    from bn_inspect.output.export import check_to_json, check_to_junit, check_to_markdown

    if result.input is not None:
        _warn_nonfinite(result.input.num_nonfinite_values)
    if output_format is CheckFormat.JSON:
        _emit(check_to_json(result), output)
    elif output_format is CheckFormat.MARKDOWN:
        _emit(check_to_markdown(result), output)
    elif output_format is CheckFormat.JUNIT:
        _emit(check_to_junit(result), output)
    else:
        from bn_inspect.output.render import render_check

        _print_renderable(render_check(result), output)


@app.command("layers")
def layers_command(
    model: Annotated[Path, typer.Argument(help="Model file (any format bn-inspect reads).", show_default=False)],
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    output_format: Annotated[
        ListingFormat, typer.Option("--format", help="table for people; json or markdown for machines and CI.")
    ] = ListingFormat.TABLE,
    output: OutputOpt = None,
    debug: DebugOpt = False,
) -> None:
    """List every normalization layer and what it stores, without running any data.

    A bare state_dict needs no --arch: layers are found by their running_mean/running_var keys
    (their exact classes are then inferred, and eps and momentum unknown).

    Examples:

      bn-inspect layers sample_models/digits_cnn/state_dict.pt

      bn-inspect layers sample_models/digits_cnn/torchscript.pt --format json
    """
    from bn_inspect.model.arch import build_arch, parse_arch_kwargs
    from bn_inspect.model.loading import LoadedModel, read_model_file
    from bn_inspect.model.state_dict import load_state_into
    from bn_inspect.output.export import listing_to_json, listing_to_markdown
    from bn_inspect.report.records import LayerListing, ModelInfo

    _check_output(output, _protected_inputs(model, None, arch))
    kwargs = parse_arch_kwargs(arch_kwargs)
    content = read_model_file(model, trust_pickle=trust_pickle)
    _end_startup()
    if isinstance(content, LoadedModel):
        from bn_inspect.model.modules import find_layers, unwrap_compiled

        layers, _ = find_layers(unwrap_compiled(content.module))
        listing = LayerListing(ModelInfo(content.source, content.format), tuple(layer.state() for layer in layers))
    elif arch is not None:
        module = build_arch(arch, kwargs)
        load_state_into(module, content.state_dict, arch)
        from bn_inspect.model.layers import iter_norm_layers

        states = tuple(layer.state() for layer in iter_norm_layers(module))
        listing = LayerListing(ModelInfo(content.source, content.format, arch), states)
    else:
        from bn_inspect.model.layers import states_from_state_dict

        states = tuple(states_from_state_dict(content.state_dict))
        listing = LayerListing(ModelInfo(content.source, content.format), states, types_inferred=True)
    if output_format is ListingFormat.JSON:
        _emit(listing_to_json(listing), output)
    elif output_format is ListingFormat.MARKDOWN:
        _emit(listing_to_markdown(listing), output)
    else:
        from bn_inspect.output.render import render_listing

        _print_renderable(render_listing(listing), output)


@app.command("compare-modes")
def compare_modes_command(
    model: ModelArg = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    shape: ShapeOpt = None,
    input_file: InputOpt = None,
    input_key: InputKeyOpt = None,
    drop_column: DropColumnOpt = None,
    batch_size: BatchSizeOpt = None,
    batches: BatchesOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = DeviceChoice.CPU,
    threshold: Annotated[
        float,
        typer.Option(
            "--threshold",
            min=0,
            help="Relative output difference at which a layer counts as departing (default 0.1: train-mode "
            "batch statistics alone differ by a few percent from running ones on a healthy model).",
        ),
    ] = 0.1,
    output_format: Annotated[
        ListingFormat, typer.Option("--format", help="table for people; json or markdown for machines.")
    ] = ListingFormat.TABLE,
    output: OutputOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Run the same batches in eval and in train mode and show, per layer, where the outputs part.

    "Fine in train mode, bad in eval": each normalization layer's output is compared between the
    modes (relative difference), with its input's difference and its own share, and the first
    layer where the gap opens is named. Dropout is off in both modes. The model is restored.

    Examples:

      bn-inspect compare-modes sample_models/digits_cnn/torchscript.pt --input sample_models/digits_cnn/test_images.npy

      bn-inspect compare-modes model.pt --arch mypkg.models:net --input val.npy --threshold 0.02 --format json
    """
    from bn_inspect.analyses.modes import compare_modes
    from bn_inspect.output.export import dataclass_to_json

    prepared = _prepare(
        model,
        arch,
        arch_kwargs,
        trust_pickle,
        shape,
        input_file,
        input_key,
        drop_column,
        batch_size,
        batches,
        seed,
        device,
        output,
        Mode.EVAL,
        quiet=quiet,
    )
    comparison = compare_modes(prepared.loaded.module, prepared.batches or (), threshold=threshold)
    if output_format is ListingFormat.JSON:
        _emit(dataclass_to_json(comparison, "compare-modes"), output)
    elif output_format is ListingFormat.MARKDOWN:
        from bn_inspect.output.export import comparison_to_markdown

        _emit(comparison_to_markdown(comparison), output)
    else:
        from bn_inspect.output.render import render_mode_comparison

        _print_renderable(render_mode_comparison(comparison), output)


class _Rereadable:
    """Batches that can be read again: recalibration makes several passes over the same data."""

    def __init__(
        self, data: InputData | DirectoryData | ShardedInput, batch_size: int, max_batches: int | None
    ) -> None:
        self._data, self._batch_size, self._max_batches = data, batch_size, max_batches

    def __iter__(self) -> Iterator[Batch]:
        return self._data.batches(self._batch_size, self._max_batches)


@app.command("recalibrate")
def recalibrate_command(
    model: Annotated[Path, typer.Argument(help="Model file to recalibrate (it is never written).", show_default=False)],
    output: Annotated[Path, typer.Option("--output", help="Where to write the recalibrated model (same format).")],
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    input_file: Annotated[
        Path | None, typer.Option("--input", help="Representative data: a file or a directory of shards (required).")
    ] = None,
    input_key: InputKeyOpt = None,
    drop_column: DropColumnOpt = None,
    batch_size: BatchSizeOpt = None,
    batches: BatchesOpt = None,
    device: DeviceOpt = DeviceChoice.CPU,
    method: Annotated[
        RecalibrationChoice,
        typer.Option(
            "--method",
            help="precise: one pass with norm layers in train mode (PreciseBN, update_bn); "
            "sequential: layer by layer in eval mode, exact for the deployed model.",
        ),
    ] = RecalibrationChoice.PRECISE,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --output file.")] = False,
    output_format: Annotated[
        ListingFormat, typer.Option("--format", help="How to print the before/after report.")
    ] = ListingFormat.TABLE,
    debug: DebugOpt = False,
) -> None:
    """Recompute every layer's running mean and (unbiased) variance from your data; write a new file.

    The new statistics are the exact population statistics of every value each layer sees over
    the data. The input file is never overwritten; the output is written atomically, in the input's
    format (state_dict, checkpoint, safetensors, TorchScript or pickle).

    Examples:

      bn-inspect recalibrate sample_models/digits_cnn/torchscript.pt --input sample_models/digits_cnn/train_images.npy --output digits_recalibrated.pt

      bn-inspect recalibrate state_dict.pt --arch mypkg.models:net --input train_shards/ --method sequential --output new.pt
    """
    from bn_inspect.analyses.recalibration import recalibrate
    from bn_inspect.data.inputs import DEFAULT_BATCH_SIZE, open_input
    from bn_inspect.data.memory import check_fits_memory
    from bn_inspect.distributed.context import distributed_context
    from bn_inspect.distributed.sharding import shard_input
    from bn_inspect.model.arch import parse_arch_kwargs
    from bn_inspect.model.loading import load_model
    from bn_inspect.model.saving import save_like
    from bn_inspect.output.export import dataclass_to_json

    if input_file is None:
        raise InputError(
            "recalibrate needs real data: random input would replace the running statistics with noise",
            "Pass --input FILE or --input DIR with representative data",
        )
    if _is_stdout(output):
        raise OutputError(
            "--output - would write the model's bytes to stdout, where the report goes", "Give a file path"
        )
    _check_output(output, _protected_inputs(model, input_file, arch))
    if output.exists() and not force:
        raise OutputError(f"--output {output} already exists", "Pass --force to replace it, or choose another path")
    kwargs = parse_arch_kwargs(arch_kwargs)
    target_device = _resolve_device(device)
    with distributed_context(device=target_device) as context:
        with _all_or_none(context):
            data = open_input(input_file, key=input_key, drop_columns=drop_column or [])
            size = batch_size or DEFAULT_BATCH_SIZE
            check_fits_memory((size, *data.sample_shape()), 4)
            loaded = load_model(
                model, arch=arch, arch_kwargs=kwargs, trust_pickle=trust_pickle, map_location=target_device
            )
        _end_startup()
        mine = data if not context.is_distributed else shard_input(data, context.rank, context.world_size)
        result = recalibrate(loaded.module, _Rereadable(mine, size, batches), method=method.value, distributed=context)
        # Every rank now holds the same buffers; rank 0 alone writes the one file.
        with _all_or_none(context):
            if context.is_main:
                save_like(model, loaded.format, loaded.module, output, force=force)
    if not context.is_main:
        return
    if output_format is ListingFormat.JSON:
        _emit(dataclass_to_json(result, "recalibrate"), None)
    elif output_format is ListingFormat.MARKDOWN:
        from bn_inspect.output.export import recalibration_to_markdown

        _emit(recalibration_to_markdown(result, str(output)), None)
    else:
        from bn_inspect.output.render import render_recalibration

        _print_renderable(render_recalibration(result, str(output)), None)


def _first(*values: float | bool | None) -> float:
    return float(next(v for v in values if v is not None))


def _print_renderable(renderable: RenderableType, output: Path | None) -> None:
    import io

    from rich.console import Console

    if output is None or _is_stdout(output):
        Console(highlight=False).print(renderable)
        return
    console = Console(record=True, width=160, no_color=True, highlight=False, file=io.StringIO())
    console.print(renderable)
    write_text(output, console.export_text())


def _print_table(report: Report, patterns: tuple[str, ...], output: Path | None) -> None:
    from rich.console import Console

    from bn_inspect.output.render import render_report

    width = Console().width if output is None or _is_stdout(output) else 160
    _print_renderable(render_report(report, patterns, width), output)


def _make_batches(
    shape: str | None,
    input_file: Path | None,
    input_key: str | None,
    drop_columns: list[str],
    batch_size: int | None,
    max_batches: int | None,
    seed: int,
    quiet: bool,
    shard: tuple[int, int] = (0, 1),
) -> tuple[Iterator[Batch] | None, str]:
    from bn_inspect.data.inputs import DEFAULT_BATCH_SIZE, open_input
    from bn_inspect.data.memory import check_fits_memory
    from bn_inspect.data.shapes import parse_shape, random_batches

    rank, world_size = shard
    if shape is not None:
        from bn_inspect.distributed.sharding import shard_batches

        parsed = parse_shape(shape)
        count = max_batches or 1
        # Every rank draws the same seeded sequence and keeps its share, so the run equals one process's.
        mine = shard_batches(random_batches(parsed, count, seed), rank, world_size)
        return _with_progress(mine, len(range(rank, count, world_size)), quiet), f"random normal, seed {seed}"
    if input_file is not None:
        from bn_inspect.distributed.sharding import shard_input

        data = open_input(input_file, key=input_key, drop_columns=drop_columns)
        size = batch_size or DEFAULT_BATCH_SIZE
        check_fits_memory((size, *data.sample_shape()), 4)
        source = data if world_size == 1 else shard_input(data, rank, world_size)
        total = source.num_batches(size, max_batches)
        return _with_progress(source.batches(size, max_batches), total, quiet), str(input_file)
    return None, ""


def _with_progress(batches: Iterator[Batch], total: int | None, quiet: bool) -> Iterator[Batch]:
    """A rich progress bar on stderr while batches run; none when quiet, for one batch, or off a terminal."""
    if quiet or total == 1 or not sys.stderr.isatty():
        yield from batches
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("batches"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("batches", total=total)
        for batch in batches:
            yield batch
            progress.advance(task)


def _guessed_batches(
    module: nn.Module,
    batch_size: int,
    num_batches: int,
    seed: int,
    note: Callable[[str], None],
    shard: tuple[int, int],
) -> tuple[Iterator[Batch], str]:
    from bn_inspect.analyses.inspection import find_working_shape
    from bn_inspect.data.shapes import guess_input_shapes, random_batches
    from bn_inspect.distributed.sharding import shard_batches

    guess = guess_input_shapes(module, batch_size)
    chosen = find_working_shape(module, guess.shapes) if guess else None
    if guess is None or chosen is None:
        raise InputError(
            "cannot tell which input shape the model takes"
            + (f" ({guess.reason}, but no tried size ran)" if guess else ""),
            "Pass --shape N,C,... or --input FILE",
        )
    note(
        f"No --shape or --input: using random normal input of shape {tuple(chosen)}, because {guess.reason}. "
        "Pass --shape to choose."
    )
    mine = shard_batches(random_batches(chosen, num_batches, seed), *shard)
    return mine, f"random normal, seed {seed} (shape inferred)"


def run(argv: Sequence[str]) -> int:
    """Run the CLI on ``argv`` and return the exit code; errors become one line on stderr."""
    global _signal_received
    debug = "--debug" in argv
    _signal_received = None
    try:
        try:
            result = app(args=list(argv), prog_name="bn-inspect", standalone_mode=False)
        except BaseException as error:
            code = _interrupted_exit_code(error)
            if code is None:
                raise
            if debug:
                traceback.print_exc()
            print(INTERRUPTED_LINE, file=sys.stderr)
            return code
    except BnInspectError as error:
        if debug:
            traceback.print_exc()
        print(f"Error: {error.line()}", file=sys.stderr)
        return error.exit_code
    except typer.TyperException as error:
        if debug:
            traceback.print_exc()
        format_message = getattr(error, "format_message", None)
        message = format_message() if callable(format_message) else str(error)
        text = one_line(str(message)).replace("Value error, ", "").rstrip(".")
        print(f"Error: {text}. See bn-inspect --help.", file=sys.stderr)
        return int(getattr(error, "exit_code", EXIT_CANNOT_RUN))
    except SystemExit as error:
        # Only code bn-inspect was told to run raises this (an --arch module or factory, a trusted
        # pickle): it did not finish, and exit 0 would say that everything was checked.
        if debug:
            traceback.print_exc()
        print(
            f"Error: code run for the model (--arch, or a pickle under --trust-pickle) called exit({one_line(repr(error.code))}) "
            "before bn-inspect finished. Check what that code runs when imported and called.",
            file=sys.stderr,
        )
        return EXIT_CANNOT_RUN
    except Exception:
        traceback.print_exc()
        print(
            "Error: bn-inspect hit an internal error (a bug); please report it with the traceback above.",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
    if result == EXIT_INTERRUPTED:
        # typer answers a KeyboardInterrupt (SIGINT where main() did not install its handler) with
        # a silent exit 130; no command returns 130 itself.
        print(INTERRUPTED_LINE, file=sys.stderr)
    return int(result) if isinstance(result, int) else EXIT_OK


def main() -> None:
    """Console-script entry point."""
    global _is_collector_paused
    gc.disable()
    _is_collector_paused = True
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        # A SIGINT ignored by the parent (a background job of a script) stays ignored.
        if signal.getsignal(signal_number) is not signal.SIG_IGN:
            signal.signal(signal_number, _raise_interrupted)
    sys.exit(run(sys.argv[1:]))


def _raise_interrupted(signal_number: int, _frame: object) -> None:
    """Turn SIGINT and SIGTERM into an exception, so that every ``finally`` (temporary files) runs."""
    global _signal_received
    _signal_received = signal_number
    raise Interrupted(signal_number)


def _interrupted_exit_code(error: BaseException) -> int | None:
    """128 + the signal number when ``error`` ends a run that a signal interrupted, else None.

    A signal can surface as something else: torch's zip writer turns it into a RuntimeError, a
    forward through TorchScript into a ForwardError; the signal handler's record and the
    exception chain both tell.
    """
    interrupt = interruption(error)
    if isinstance(interrupt, Interrupted):
        return 128 + interrupt.signal_number
    if _signal_received is not None:
        return 128 + _signal_received
    if interrupt is not None:
        return EXIT_INTERRUPTED
    return None


def _end_startup() -> None:
    """Freeze what startup built and turn the garbage collector that main() paused back on.

    Importing torch and loading the model make a few hundred thousand objects that live until
    exit. With the collector on, every full collection while they are being made scans them all
    again: a bare script that imports torch and runs the digits sample takes 0.5-1.0 s less with
    this pause (docs/benchmarks.md). Frozen, they are also skipped by the collections between
    batches.

    No collection runs before the freeze, as it would cost what the pause saves; the few cycles
    startup leaves (a failed trial forward's traceback) are kept until exit.
    """
    global _is_collector_paused
    if _is_collector_paused:
        _is_collector_paused = False
        gc.freeze()
        gc.enable()
