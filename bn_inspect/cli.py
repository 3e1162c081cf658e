"""Typer app: parse, call the library, render or export, and map errors to exit codes.

Exit codes: 0 ran and nothing failed; 1 ran and a check failed; 2 could not run (bad usage,
unreadable or untrusted model, input that does not fit); 3 internal error (a bug: please report).
torch and pandas are imported inside the commands so that ``bn-inspect --help`` stays fast.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from bn_inspect.errors import BnInspectError, DeviceError, InputError, OutputError
from bn_inspect.options import DeviceChoice, Mode, OutputFormat

if TYPE_CHECKING:
    from collections.abc import Iterator

    from torch import nn

    from bn_inspect.inspection import Batch
    from bn_inspect.report import Report

EXIT_OK, EXIT_CHECK_FAILED, EXIT_CANNOT_RUN, EXIT_INTERNAL = 0, 1, 2, 3

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


def _check_output(output: Path | None, protected: Sequence[Path | None]) -> None:
    if output is None:
        return
    if output.is_dir():
        raise OutputError(f"--output {output} is a directory", "Give a file path")
    parent = output.resolve().parent
    if not parent.is_dir():
        raise OutputError(f"--output {output}: folder {parent} does not exist", "Create it or choose another path")
    import os

    if not os.access(parent, os.W_OK):
        raise OutputError(f"--output {output}: folder {parent} is not writable", "Choose a writable folder")
    for path in protected:
        if path is not None and path.exists() and output.exists() and output.resolve() == path.resolve():
            raise OutputError(f"--output {output} is the file being inspected", "Write the report somewhere else")


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it over: never a torn file."""
    import os
    import tempfile

    descriptor, temporary = tempfile.mkstemp(dir=path.resolve().parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _note(message: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False).print(message, style="dim")


@app.command("inspect")
def inspect_command(
    model: Annotated[
        Path | None,
        typer.Argument(
            help="Model file: state_dict/checkpoint (.pt/.pth), safetensors, TorchScript or pickled model. Omit with --arch to inspect a fresh architecture.",
            show_default=False,
        ),
    ] = None,
    arch: Annotated[
        str | None,
        typer.Option(
            "--arch",
            help="Callable that builds the model: package.module:callable or path/to/file.py:callable (imports and runs that code).",
        ),
    ] = None,
    arch_kwargs: Annotated[
        str | None,
        typer.Option(
            "--arch-kwargs", help="JSON object of keyword arguments for --arch, e.g. '{\"num_classes\": 10}'."
        ),
    ] = None,
    trust_pickle: Annotated[
        bool,
        typer.Option(
            "--trust-pickle",
            help="Allow a pickle to import the classes it names. This runs code from the file: only for files you trust.",
        ),
    ] = False,
    shape: Annotated[
        str | None, typer.Option("--shape", help="Random normal input of this shape, e.g. 16,3,32,32 (N,C,...).")
    ] = None,
    input_file: Annotated[
        Path | None,
        typer.Option(
            "--input",
            help="Input file: .pt/.pth (tensor, tuple/list or dict of tensors), .npy, .npz, .csv or .parquet.",
        ),
    ] = None,
    input_key: Annotated[
        str | None, typer.Option("--input-key", help="Array of an .npz (or entry of a dict .pt) to use.")
    ] = None,
    drop_column: Annotated[
        list[str] | None, typer.Option("--drop-column", help="Table column to leave out, e.g. a label (repeatable).")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            min=1,
            help="Samples per batch when splitting --input (default 64), or when the shape is inferred (default 8).",
        ),
    ] = None,
    batches: Annotated[
        int | None,
        typer.Option(
            "--batches", min=1, help="Run at most this many batches (default: all of --input; 1 for --shape)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for random input and for dropout in train mode.")] = 0,
    mode: Annotated[
        Mode,
        typer.Option(
            "--mode", help="eval: as deployed (running statistics); train: as in training (batch statistics)."
        ),
    ] = Mode.EVAL,
    device: Annotated[DeviceChoice, typer.Option("--device", help="Where the model runs.")] = DeviceChoice.CPU,
    layer: Annotated[
        list[str] | None,
        typer.Option("--layer", help="Glob on qualified layer names that adds a per-channel table (repeatable)."),
    ] = None,
    output_format: Annotated[
        OutputFormat, typer.Option("--format", help="table for people; json, csv or markdown for machines and CI.")
    ] = OutputFormat.TABLE,
    output: Annotated[
        Path | None, typer.Option("--output", help="Write the report to this file (atomically) instead of stdout.")
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of any error.")] = False,
) -> None:
    """Run data through a model and show, per normalization layer, batch vs running statistics.

    Examples:

      bn-inspect inspect sample_models/digits_cnn/torchscript.pt --input sample_models/digits_cnn/test_images.npy

      bn-inspect inspect state_dict.pt --arch mypkg.models:resnet18 --arch-kwargs '{"num_classes": 10}' --shape 8,3,224,224

      bn-inspect inspect model.pt --input val.npy --batch-size 32 --mode train --layer 'layer1.*'

      bn-inspect inspect model.ts --shape 16,3,32,32 --format json --output report.json
    """
    from bn_inspect.export import to_csv, to_json, to_markdown
    from bn_inspect.loading import load_model, parse_arch_kwargs
    from bn_inspect.report import ModelInfo

    if shape is not None and input_file is not None:
        raise InputError("--shape and --input were both given", "Use one of them")
    if shape is not None and batch_size is not None:
        raise InputError("--batch-size does not apply to --shape", "Set the batch size as the first dim of --shape")
    _check_output(output, [model, input_file])
    kwargs = parse_arch_kwargs(arch_kwargs)
    target_device = _resolve_device(device)
    batch_iter, input_source = _make_batches(shape, input_file, input_key, drop_column or [], batch_size, batches, seed)
    import torch

    from bn_inspect.inspection import inspect_model

    torch.manual_seed(seed)
    loaded = load_model(model, arch=arch, arch_kwargs=kwargs, trust_pickle=trust_pickle, map_location=target_device)
    module = loaded.module.to(target_device) if model is None else loaded.module
    if batch_iter is None:
        batch_iter, input_source = _guessed_batches(module, batch_size or 8, batches or 1, seed)
    report = inspect_model(
        module,
        batch_iter,
        mode=mode,
        model_info=ModelInfo(loaded.source, loaded.format, loaded.arch),
        input_source=input_source,
        materialize_lazy=True,
    )
    if report.input.num_nonfinite_values:
        _note(
            f"warning: {report.input.num_nonfinite_values:,} input values are NaN or infinite; the statistics of the layers they reach are NaN"
        )
    patterns = tuple(layer or ())
    if output_format is OutputFormat.JSON:
        text = to_json(report)
    elif output_format is OutputFormat.CSV:
        text = to_csv(report)
    elif output_format is OutputFormat.MARKDOWN:
        text = to_markdown(report, patterns)
    else:
        _print_table(report, patterns, output)
        return
    if output is None:
        sys.stdout.write(text)
    else:
        write_atomically(output, text)


def _print_table(report: Report, patterns: tuple[str, ...], output: Path | None) -> None:
    import io

    from rich.console import Console

    from bn_inspect.render import render_report

    if output is None:
        console = Console(highlight=False)
        console.print(render_report(report, patterns, console.width))
        return
    console = Console(record=True, width=160, no_color=True, highlight=False, file=io.StringIO())
    console.print(render_report(report, patterns, console.width))
    write_atomically(output, console.export_text())


def _make_batches(
    shape: str | None,
    input_file: Path | None,
    input_key: str | None,
    drop_columns: list[str],
    batch_size: int | None,
    max_batches: int | None,
    seed: int,
) -> tuple[Iterator[Batch] | None, str]:
    from bn_inspect.inputs import (
        DEFAULT_BATCH_SIZE,
        check_fits_memory,
        parse_shape,
        random_batches,
        read_input,
    )

    if shape is not None:
        parsed = parse_shape(shape)
        return random_batches(parsed, max_batches or 1, seed), f"random normal, seed {seed}"
    if input_file is not None:
        data = read_input(input_file, key=input_key, drop_columns=drop_columns)
        size = batch_size or DEFAULT_BATCH_SIZE
        first = (data.args or tuple(data.kwargs.values()))[0]
        check_fits_memory((min(size, data.num_samples), *first.shape[1:]), 4)
        return data.batches(size, max_batches), str(input_file)
    return None, ""


def _guessed_batches(module: nn.Module, batch_size: int, num_batches: int, seed: int) -> tuple[Iterator[Batch], str]:
    from bn_inspect.inputs import guess_input_shapes, random_batches
    from bn_inspect.inspection import find_working_shape

    guess = guess_input_shapes(module, batch_size)
    chosen = find_working_shape(module, guess.shapes) if guess else None
    if guess is None or chosen is None:
        raise InputError(
            "cannot tell which input shape the model takes"
            + (f" ({guess.reason}, but no tried size ran)" if guess else ""),
            "Pass --shape N,C,... or --input FILE",
        )
    _note(
        f"No --shape or --input: using random normal input of shape {tuple(chosen)}, because {guess.reason}. Pass --shape to choose."
    )
    return random_batches(chosen, num_batches, seed), f"random normal, seed {seed} (shape inferred)"


def run(argv: Sequence[str]) -> int:
    """Run the CLI on ``argv`` and return the exit code; errors become one line on stderr."""
    debug = "--debug" in argv
    try:
        result = app(args=list(argv), prog_name="bn-inspect", standalone_mode=False)
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
        print(f"Error: {' '.join(str(message).split())} (see bn-inspect --help).", file=sys.stderr)
        return int(getattr(error, "exit_code", EXIT_CANNOT_RUN))
    except KeyboardInterrupt:
        print("Error: interrupted.", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print(
            "Error: bn-inspect hit an internal error (a bug); please report it with the traceback above.",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
    return int(result) if isinstance(result, int) else EXIT_OK


def main() -> None:
    """Console-script entry point."""
    sys.exit(run(sys.argv[1:]))
