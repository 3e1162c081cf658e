"""Data for an ONNX graph whose input declares a fixed batch size, which both exporters write unless
asked for a dynamic one: the data runs in batches of exactly that size, a short last batch left out."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from bn_inspect.errors import InputError
from bn_inspect.options import RunOptions

if TYPE_CHECKING:
    from bn_inspect.analyses.session import RunObserver
    from bn_inspect.data.batch import Batch
    from bn_inspect.model.loading import LoadedModel


def fit_batches_to_graph(options: RunOptions, observer: RunObserver, loaded: LoadedModel | None) -> RunOptions:
    """``options`` with the batch size the model (``loaded``, else the file options.model) fixes, when it
    is an ONNX graph, for data from --input or --data. The file is read before the data is opened
    and before the model is loaded, so that each is checked in its usual order.

    Raises:
        InputError: --batch-size was given and differs from the graph's, before any batch runs.
    """
    from bn_inspect.model.onnx_module import file_fixed_batch_size, fixed_batch_size

    if options.input_file is None and options.data is None:
        return options
    if loaded is not None:
        fixed = fixed_batch_size(loaded.module)
    else:
        fixed = None if options.model is None else file_fixed_batch_size(options.model)
    if fixed is None:
        return options
    name, size = fixed
    if options.batch_size is None:
        observer.note(
            f"note: the ONNX graph's input {name} is declared with a batch size of {size}, "
            f"so the data runs in batches of {size}."
        )
    return _fixed(options, f"the ONNX graph's input {name}", size)


def fit_diff_batches(options: RunOptions, sides: Sequence[tuple[str, Path]], observer: RunObserver) -> RunOptions:
    """``options`` for both sides of a diff when a side is an ONNX graph with a fixed batch size: both
    run the same batches of that size, a short last one left out on both.

    Raises:
        InputError: the sides fix different batch sizes, or --batch-size differs from the one fixed.
    """
    from bn_inspect.model.onnx_module import file_fixed_batch_size

    if options.input_file is None and options.data is None:
        return options
    fixed = [(side, found) for side, path in sides if (found := file_fixed_batch_size(path)) is not None]
    if not fixed:
        return options
    (side, (name, size)), *others = fixed
    for other, (_, other_size) in others:
        if other_size != size:
            raise InputError(
                f"the ONNX graphs of {side} and {other} are declared with batch sizes {size} and {other_size}, "
                "so no batch runs through both",
                "Export one of them with a dynamic batch dim (dynamic_axes, or dynamic_shapes with dynamo=True)",
            )
    if options.batch_size is None:
        observer.note(
            f"note: {side}'s ONNX graph input {name} is declared with a batch size of {size}, "
            f"so both models run the data in batches of {size}."
        )
    return _fixed(options, f"{side}'s ONNX graph input {name}", size)


def _fixed(options: RunOptions, graph: str, size: int) -> RunOptions:
    """``options`` with the batch size ``graph`` fixes, whole batches only; a --batch-size that differs refused."""
    if options.batch_size is not None and options.batch_size != size:
        raise InputError(
            f"--batch-size {options.batch_size} was given, but {graph} is declared with a fixed batch size of {size}",
            f"Pass --batch-size {size} (or leave it out), or export with a dynamic batch dim "
            "(dynamic_axes, or dynamic_shapes with dynamo=True)",
        )
    return replace(options, batch_size=size, whole_batches=True)


def whole_batches(batches: Iterator[Batch], size: int, observer: RunObserver) -> Iterator[Batch]:
    """``batches`` without a short last one, with a note of the samples left out.

    A short batch that is not the last is passed on: the graph's own shape check names it.
    """
    short: Batch | None = None
    for batch in batches:
        if short is not None:
            yield short
            short = None
        if batch.num_samples < size:
            short = batch
        else:
            yield batch
    if short is not None:
        observer.note(
            f"note: the last {short.num_samples} sample{'s are' if short.num_samples > 1 else ' is'} left out: "
            f"the ONNX graph takes batches of exactly {size}."
        )
