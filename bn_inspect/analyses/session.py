"""From the commands' options to a loaded model and this rank's batches: the steps every command shares.

What the user should hear on the way (notes, a progress bar) goes through a RunObserver, so this
module never imports the terminal library; under torchrun only rank 0's observer speaks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from bn_inspect.boundary.reading import Source, current_manifest
from bn_inspect.boundary.writing import Destination, check_output_target
from bn_inspect.errors import DeviceError, InputError, OutputError
from bn_inspect.options import DeviceChoice, Mode, RunOptions
from bn_inspect.report.records import RANDOM_INPUT, InputInfo, ModelInfo

if TYPE_CHECKING:
    from torch import nn

    from bn_inspect.data.batch import Batch
    from bn_inspect.data.images import ImageFiles
    from bn_inspect.data.inputs import DirectoryData
    from bn_inspect.data.readers import InputData
    from bn_inspect.distributed.context import DistributedContext
    from bn_inspect.distributed.sharding import ShardedInput
    from bn_inspect.model.loading import LoadedModel


class RunObserver(Protocol):
    """Who hears about a run: notes (left out with --quiet), warnings, progress, the end of startup."""

    def note(self, message: str) -> None:
        """A remark on how the run was set up."""

    def warn(self, message: str) -> None:
        """Something about the data the user must know, even with --quiet."""

    def progress(self, batches: Iterator[Batch], total: int | None) -> Iterator[Batch]:
        """The batches, unchanged, while showing how many have run."""
        ...

    def loaded(self) -> None:
        """Startup (imports, loading the model) is over; the batches come next."""


class SilentObserver:
    """An observer that shows nothing: the other ranks' view, and the Python API's."""

    def note(self, message: str) -> None:
        """Nothing."""

    def warn(self, message: str) -> None:
        """Nothing."""

    def progress(self, batches: Iterator[Batch], total: int | None) -> Iterator[Batch]:
        """The batches, unchanged."""
        return batches

    def loaded(self) -> None:
        """Nothing."""


def resolve_device(choice: DeviceChoice) -> str:
    """The torch device for --device: ``auto`` is CUDA where there is one.

    Raises:
        DeviceError: CUDA was asked for and this torch build sees none.
    """
    import torch

    has_cuda = torch.cuda.is_available()
    if choice is DeviceChoice.CUDA and not has_cuda:
        raise DeviceError(
            "--device cuda was asked for, but this torch build sees no CUDA device", "Use --device cpu or auto"
        )
    if choice is DeviceChoice.AUTO:
        return "cuda" if has_cuda else "cpu"
    return str(choice.value)


def is_stdout(output: Path | None) -> bool:
    """No --output, or ``--output -``: the report goes to stdout."""
    return output is None or str(output) == "-"


def check_outputs(options: RunOptions, *sides: Path, result: Destination = Destination.RESULT) -> None:
    """Refuse, before the run, every output that the writer policy would refuse at its end.

    --output (as ``result``: recalibrate's is the model), --report and --write-baseline: each must
    have its own path and pass ``check_output_target``, against a manifest that already holds every
    file the options name for reading (``sides`` are diff's OLD and NEW).

    Raises:
        OutputError: naming the first output refused.
    """
    if options.report is not None and is_stdout(options.report):
        raise OutputError(
            "--report - would mix the HTML page with the output on stdout", "Give the page a file path (report.html)"
        )
    _declare_inputs(options, sides)
    targets = [(options.output, result), (options.write_baseline, Destination.BASELINE)]
    targets.append((options.report, Destination.PAGE))
    files = [(target, destination) for target, destination in targets if target is not None and not is_stdout(target)]
    for index, (target, destination) in enumerate(files):
        for other, other_destination in files[:index]:
            if other.resolve() == target.resolve():
                raise OutputError(
                    f"{destination.option} and {other_destination.option} name the same file {target}",
                    "Give them different paths",
                )
        check_output_target(target, destination, force=options.force)


def _declare_inputs(options: RunOptions, sides: tuple[Path, ...]) -> None:
    """Record in the run's manifest every file the options name for reading, before any is opened.

    The model file, the --input file or the files at the top of an --input folder of shards,
    the --baseline, the files of --arch and --data in their path/to/file.py:callable form, and
    ``sides`` (diff's OLD and NEW). Sources in module form and the images of a folder are recorded
    when they are found.
    """
    from bn_inspect.analyses.sources import is_image_input

    manifest = current_manifest()
    named = [(options.model, Source.MODEL), (options.baseline, Source.BASELINE)]
    named += [(side, Source.DIFF_SIDE) for side in sides]
    named += [(_code_file(options.arch), Source.ARCH_CODE), (_code_file(options.data), Source.DATA_CODE)]
    source = options.input_file
    if source is not None and source.is_dir() and not is_image_input(source):
        # An unreadable folder is reported when the data is opened.
        with suppress(OSError):
            named += [(shard, Source.INPUT_SHARD) for shard in source.iterdir()]
    elif source is not None and not source.is_dir():
        named.append((source, Source.INPUT_FILE))
    for path, role in named:
        if path is not None:
            manifest.declare(path, role)


def _code_file(spec: str | None) -> Path | None:
    """The file of a path/to/file.py:callable spec (told apart as the loader does); None for module form."""
    target = (spec or "").rpartition(":")[0]
    if target.endswith(".py") or "/" in target or os.sep in target:
        return Path(target)
    return None


@contextmanager
def torchrun(device: str) -> Iterator[DistributedContext | None]:
    """The run over several ranks this process joins under torchrun (WORLD_SIZE > 1), else None.

    A single process never imports bn_inspect.distributed.
    """
    if int(os.environ.get("WORLD_SIZE", "1") or "1") <= 1:
        yield None
        return
    from bn_inspect.distributed.context import distributed_context

    with distributed_context(device=device) as context:
        yield context if context.is_distributed else None


def all_ranks(ranks: DistributedContext | None) -> AbstractContextManager[None]:
    """Under torchrun: if the block fails on any rank, it fails on every rank, so none waits on the others."""
    if ranks is None:
        return nullcontext()
    from bn_inspect.distributed.collectives import fail_together

    return fail_together(ranks.group)


def speaks(ranks: DistributedContext | None) -> bool:
    """Whether this process prints the run's report and notes: a single process, or rank 0."""
    return ranks is None or ranks.is_main


@dataclass(frozen=True)
class PreparedRun:
    """A loaded model and this rank's batches to run through it."""

    loaded: LoadedModel
    batches: Iterator[Batch] | None
    input_source: str
    is_real_data: bool
    images: ImageFiles | None = None

    @property
    def model_info(self) -> ModelInfo:
        """Where the model came from, for the report."""
        return ModelInfo.of(self.loaded.source, self.loaded.format, self.loaded.arch, self.loaded.sha256)

    def input_details(self, info: InputInfo, ranks: DistributedContext | None) -> InputInfo:
        """The report's input section, with what was done to images (call it on every rank)."""
        if self.images is None:
            return info
        from bn_inspect.analyses.sources import describe_images

        return describe_images(info, self.images, ranks)


def prepare_run(
    options: RunOptions,
    observer: RunObserver,
    *,
    needs_data: bool = True,
    ranks: DistributedContext | None = None,
    loaded: LoadedModel | None = None,
) -> PreparedRun:
    """Check the options, load the model (unless ``loaded`` is it) and build this rank's batches (guessing a shape if needed).

    Raises:
        InputError, OutputError, DeviceError, and what loading the model raises.
    """
    from bn_inspect.model.arch import parse_arch_kwargs
    from bn_inspect.model.loading import LoadedModel, load_model

    if options.shape is not None and options.input_file is not None:
        raise InputError("--shape and --input were both given", "Use one of them")
    if options.shape is not None and options.batch_size is not None:
        raise InputError("--batch-size does not apply to --shape", "Set the batch size as the first dim of --shape")
    kwargs = parse_arch_kwargs(options.arch_kwargs)
    device = resolve_device(options.device)
    shard = (0, 1) if ranks is None else (ranks.rank, ranks.world_size)
    images = _images_of(options) if needs_data else None
    if needs_data:
        from bn_inspect.analyses.graph_batches import fit_batches_to_graph

        options = fit_batches_to_graph(options, observer, loaded)
    batches, source = _batches_from_options(options, observer, shard) if needs_data and images is None else (None, "")
    if needs_data and options.data is not None:
        from bn_inspect.analyses.user_data import data_batches

        batches, source = data_batches(options, observer, shard)
    import torch

    torch.manual_seed(options.seed)
    if loaded is None:
        loaded = load_model(
            options.model,
            arch=options.arch,
            arch_kwargs=kwargs,
            trust_pickle=options.trust_pickle,
            map_location=device,
            trust_remote_code=options.trust_remote_code,
        )
    for note in loaded.notes:
        observer.note(note)
    if options.model is None:
        loaded = LoadedModel(loaded.module.to(device), loaded.source, loaded.format, loaded.arch, loaded.sha256)
    elif options.arch is not None and loaded.arch is None:
        observer.note(
            f"note: --arch is not used: {options.model} holds a whole {loaded.format} model, architecture included."
        )
    if loaded.format == "torch.export":
        _note_exported(loaded.module, options.mode, observer)
    if images is not None:
        from bn_inspect.analyses.sources import fit_to_model, image_batches

        images = fit_to_model(images, loaded.module, options, kwargs)
        batches, source = image_batches(images, options, observer, shard)
    if needs_data and batches is None:
        batches, source = _guessed_batches(loaded, options, observer, shard)
    if batches is not None and options.whole_batches:
        from bn_inspect.analyses.graph_batches import whole_batches

        batches = whole_batches(batches, options.batch_size or 1, observer)
    if batches is not None and loaded.format == "torch.export":
        from bn_inspect.analyses.exported_batches import ExportedBatches

        batches = iter(ExportedBatches(loaded.module, batches, observer))
    if needs_data and device == "cpu":
        from bn_inspect.engine.fused.cpu import prepare_note

        is_eager_eval = options.mode is Mode.EVAL and loaded.format not in ("torchscript", "torch.export")
        if kernel_note := prepare_note(is_eager_eval, observer.note):
            observer.note(kernel_note)
    observer.loaded()
    is_real_data = options.input_file is not None or options.data is not None
    return PreparedRun(loaded, batches, source, is_real_data=is_real_data, images=images)


def _images_of(options: RunOptions) -> ImageFiles | None:
    """The image files of --input; None for other input, next to which image options are refused."""
    from bn_inspect.analyses.sources import is_image_input, open_images, refuse_image_options

    if options.data is not None and (options.input_file is not None or options.shape is not None):
        raise InputError(
            f"--data and {'--input' if options.input_file else '--shape'} were both given", "Use one of them"
        )
    if options.input_file is not None and is_image_input(options.input_file):
        return open_images(options, options.input_file)
    if options.data is not None:
        # The workers that decode images also load a Dataset that --data returns.
        refuse_image_options(options, f"--data {options.data}", allowed=("--workers",))
    else:
        refuse_image_options(options, f"--input {options.input_file}" if options.input_file else "the input")
    return None


def _note_exported(module: nn.Module, mode: Mode, observer: RunObserver) -> None:
    """What a user should know about a torch.export archive before its layers are read off the graph."""
    from bn_inspect.model.graph import exported_training_mode, iter_graph_norm_layers, lowered_graph_norm_modules

    graph_layers = iter_graph_norm_layers(module)
    lowered = lowered_graph_norm_modules(module, (layer.name for layer in graph_layers))
    if graph_layers and lowered:
        observer.note(
            f"note: {len(lowered)} normalization module(s) of this archive, e.g. {lowered[0][0]} "
            f"({lowered[0][1]}), are plain arithmetic in its graph and are not inspected; "
            "inspect the state_dict with --arch to see them."
        )
    training = exported_training_mode(graph_layers)
    # On a mismatch the error says it all; a note on top would make it two lines.
    if training is not None and training == (mode is Mode.TRAIN):
        observer.note(
            f"note: this torch.export archive was exported in {'train' if training else 'eval'} mode, "
            "which its graph fixes."
        )


def _batches_from_options(
    options: RunOptions, observer: RunObserver, shard: tuple[int, int]
) -> tuple[Iterator[Batch] | None, str]:
    """This rank's batches for --shape or --input, with the observer's progress; None for neither."""
    from bn_inspect.data.inputs import DEFAULT_BATCH_SIZE, open_input
    from bn_inspect.data.memory import check_fits_memory
    from bn_inspect.data.readers import InputData
    from bn_inspect.data.shapes import parse_shape, random_batches

    rank, world_size = shard
    if options.shape is not None:
        count = options.batches or 1
        mine = _my_share(random_batches(parse_shape(options.shape), count, options.seed), shard)
        return observer.progress(mine, len(range(rank, count, world_size))), f"{RANDOM_INPUT}, seed {options.seed}"
    if options.input_file is not None:
        data = open_input(options.input_file, key=options.input_key, drop_columns=options.drop_column)
        for note in data.notes if isinstance(data, InputData) else ():
            observer.note(note)
        size = options.batch_size or DEFAULT_BATCH_SIZE
        check_fits_memory((size, *data.sample_shape()), 4)
        source = data if world_size == 1 else _shard(data, rank, world_size)
        total = source.num_batches(size, options.batches)
        return observer.progress(source.batches(size, options.batches), total), str(options.input_file)
    return None, ""


def _shard(data: InputData | DirectoryData | ImageFiles, rank: int, world_size: int) -> ShardedInput | ImageFiles:
    from bn_inspect.distributed.sharding import shard_input

    return shard_input(data, rank, world_size)


def _my_share(batches: Iterator[Batch], shard: tuple[int, int]) -> Iterator[Batch]:
    """This rank's share of seeded random batches: every rank draws the same sequence and keeps its
    own, so the run equals one process's."""
    if shard[1] == 1:
        return batches
    from bn_inspect.distributed.sharding import shard_batches

    return shard_batches(batches, *shard)


def _guessed_batches(
    loaded: LoadedModel, options: RunOptions, observer: RunObserver, shard: tuple[int, int]
) -> tuple[Iterator[Batch], str]:
    """Random batches of the shape the model file gives (a model folder's config), else one read off
    the model's first layer, when one of the tried sizes runs."""
    from bn_inspect.data.shapes import random_batches

    if loaded.sample_shape is not None:
        chosen = (options.batch_size or 8, *loaded.sample_shape)
        reason = "the model folder's config.json gives that input size"
    else:
        chosen, reason = _input_shape_of(loaded.module, options.batch_size or 8)
    observer.note(
        f"No --shape or --input: using random normal input of shape {tuple(chosen)}, because {reason}. "
        "Pass --shape to choose."
    )
    mine = _my_share(random_batches(chosen, options.batches or 1, options.seed), shard)
    return mine, f"{RANDOM_INPUT}, seed {options.seed} (shape inferred)"


def _input_shape_of(module: nn.Module, batch_size: int) -> tuple[tuple[int, ...], str]:
    """An input shape the model runs, and why: an ONNX graph's or a torch.export archive's own
    specification, else the first layer's.

    Raises:
        InputError: neither tells, or no tried size runs.
    """
    from bn_inspect.analyses.inspection import find_working_shape
    from bn_inspect.data.memory import check_fits_memory
    from bn_inspect.data.shapes import guess_input_shapes
    from bn_inspect.model.graph import exported_input_shapes
    from bn_inspect.model.onnx_module import onnx_input_shape

    declared = onnx_input_shape(module)
    if declared is not None and len(declared) >= 2 and all(size is not None for size in declared[1:]):
        shape = tuple(batch_size if size is None else size for size in declared)
        check_fits_memory(shape, 4)
        return shape, "the ONNX graph's input is declared with that shape"
    exported = exported_input_shapes(module)
    if len(exported) == 1 and len(exported[0]) >= 2 and all(size is not None for size in exported[0][1:]):
        first = exported[0][0]
        sample = tuple(size for size in exported[0][1:] if size is not None)
        return (
            batch_size if first is None else first,
            *sample,
        ), "the torch.export archive's input specification says so"
    guess = guess_input_shapes(module, batch_size)
    chosen = find_working_shape(module, guess.shapes) if guess else None
    if guess is None or chosen is None:
        raise InputError(
            "cannot tell which input shape the model takes"
            + (f" ({guess.reason}, but no tried size ran)" if guess else ""),
            "Pass --shape N,C,... or --input FILE",
        )
    return chosen, guess.reason


class Rereadable:
    """Batches that can be read again: recalibration makes several passes over the same data.

    Each pass shows the observer's progress over its batches (a pass that stops early ends its bar).
    """

    def __init__(
        self,
        data: InputData | DirectoryData | ShardedInput | ImageFiles,
        batch_size: int,
        max_batches: int | None,
        observer: RunObserver,
    ) -> None:
        self._data, self._batch_size, self._max_batches = data, batch_size, max_batches
        self._observer = observer
        self._total = data.num_batches(batch_size, max_batches)

    def __iter__(self) -> Iterator[Batch]:
        return self._observer.progress(self._data.batches(self._batch_size, self._max_batches), self._total)
