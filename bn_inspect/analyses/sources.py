"""Images as input: the preprocessing the options ask for, this rank's image batches, and what the report says of them."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bn_inspect.errors import InputError
from bn_inspect.options import RunOptions
from bn_inspect.text import Untrusted

if TYPE_CHECKING:
    from torch import nn

    from bn_inspect.analyses.session import RunObserver
    from bn_inspect.data.batch import Batch
    from bn_inspect.data.decode import Preprocessing
    from bn_inspect.data.images import ImageFiles
    from bn_inspect.data.inputs import DirectoryData
    from bn_inspect.data.readers import InputData
    from bn_inspect.distributed.context import DistributedContext
    from bn_inspect.report.records import InputInfo

_IMAGE_FLAGS = {
    "--resize": "resize",
    "--crop": "crop",
    "--normalize": "normalize",
    "--grayscale": "grayscale",
    "--channels-last": "channels_last",
    "--workers": "workers",
    "--strict-data": "strict_data",
}


def is_image_input(path: Path) -> bool:
    """Whether --input names images: an image file, or a folder without tensor shards at its top."""
    from bn_inspect.data.decode import IMAGE_SUFFIXES
    from bn_inspect.data.inputs import DIRECTORY_SUFFIXES

    if path.is_dir():
        try:
            return not any(entry.suffix.lower() in DIRECTORY_SUFFIXES for entry in path.iterdir())
        except OSError:
            return False  # reading the folder again says what is wrong with it
    return path.suffix.lower() in IMAGE_SUFFIXES


def refuse_image_options(options: RunOptions, what: str, allowed: tuple[str, ...] = ()) -> None:
    """Refuse image options (but the ``allowed`` flags) for input that is not images: they would be silently ignored.

    Raises:
        InputError: naming the first such option.
    """
    defaults = RunOptions()
    for flag, name in _IMAGE_FLAGS.items():
        if flag not in allowed and getattr(options, name) != getattr(defaults, name):
            raise InputError(f"{flag} applies to images, and {what} is not a folder of images", f"Drop {flag}")


def user_preprocessing(options: RunOptions) -> Preprocessing:
    """The preprocessing the image options ask for (nothing the user left out is filled in here).

    Raises:
        InputError: --crop larger than --resize, an unreadable --normalize, or a --normalize with
            3 channels next to --grayscale.
    """
    from bn_inspect.data.decode import Preprocessing, parse_normalize

    if options.crop is not None and options.resize is not None and options.crop > options.resize:
        raise InputError(
            f"--crop {options.crop} is larger than --resize {options.resize}: the resized image has no such centre",
            f"Pass --crop {options.resize} or less, or --resize {options.crop} or more",
        )
    mean_std = parse_normalize(options.normalize) if options.normalize is not None else None
    prep = Preprocessing(
        resize=options.resize,
        crop=options.crop,
        mean=mean_std[0] if mean_std else None,
        std=mean_std[1] if mean_std else None,
        grayscale=options.grayscale,
        channels_last=options.channels_last,
    )
    check_channels(prep, "--normalize")
    return prep


def check_channels(prep: Preprocessing, origin: str) -> None:
    """Refuse a mean or std whose channel count is neither 1 nor the images' (3, or 1 with --grayscale)."""
    count = len(prep.mean or ())
    if count not in (0, 1, prep.num_channels):
        raise InputError(
            f"{origin} gives {count} channel means, and the images have {prep.num_channels} channel(s)"
            + (" with --grayscale" if prep.grayscale else ""),
            "Give one mean and std per image channel, or one for all",
        )


def open_images(options: RunOptions, path: Path) -> ImageFiles:
    """The image files of --input, with the user's preprocessing."""
    from bn_inspect.data.images import ImageFiles
    from bn_inspect.data.inputs import open_input

    data = open_input(path, prep=user_preprocessing(options), workers=options.workers, strict=options.strict_data)
    if options.input_key is not None or options.drop_column:
        raise InputError("--input-key and --drop-column apply to tensor files, not to images", "Drop them")
    if not isinstance(data, ImageFiles):
        raise InputError(f"{path} is not a folder of images", "Give a folder of images")
    return data


def open_data(options: RunOptions, path: Path) -> InputData | DirectoryData | ImageFiles:
    """--input as images (with the options' preprocessing) or as tensor files (image options refused)."""
    from bn_inspect.data.inputs import open_input

    if is_image_input(path):
        return open_images(options, path)
    refuse_image_options(options, f"--input {path}")
    return open_input(path, key=options.input_key, drop_columns=options.drop_column)


def fit_to_model(
    images: ImageFiles, module: nn.Module, options: RunOptions, arch_kwargs: Mapping[str, Any]
) -> ImageFiles:
    """``images`` with what the user left unset taken from the model's own preprocessing, if it has one.

    Raises:
        InputError: the merged preprocessing does not hold together (crop > resize, channel counts).
    """
    from bn_inspect.analyses.recipes import fitted_preprocessing, model_recipe

    recipe, origin = model_recipe(module, options, arch_kwargs)
    if not recipe:
        return images
    prep = fitted_preprocessing(images.prep, options, recipe, origin)
    check_channels(prep, f"the {origin}")
    return images.with_preprocessing(prep)


def fit_images_to_model(
    data: InputData | DirectoryData | ImageFiles, module: nn.Module, options: RunOptions, arch_kwargs: Mapping[str, Any]
) -> InputData | DirectoryData | ImageFiles:
    """fit_to_model for images; other data as it is."""
    from bn_inspect.data.images import ImageFiles

    return fit_to_model(data, module, options, arch_kwargs) if isinstance(data, ImageFiles) else data


def image_batches(
    images: ImageFiles, options: RunOptions, observer: RunObserver, shard: tuple[int, int]
) -> tuple[Iterator[Batch], str]:
    """This rank's batches of ``images``, with the observer's progress and a warning for skipped files."""
    from bn_inspect.data.inputs import DEFAULT_BATCH_SIZE

    mine = images if shard[1] == 1 else images.share(*shard)
    size = options.batch_size or DEFAULT_BATCH_SIZE
    batches = observer.progress(
        _warn_skipped(mine, size, options.batches, observer), mine.num_batches(size, options.batches)
    )
    return batches, images.source


def _warn_skipped(images: ImageFiles, size: int, max_batches: int | None, observer: RunObserver) -> Iterator[Batch]:
    yield from images.batches(size, max_batches)
    summary = images.skipped.summary()
    if summary is not None:
        observer.warn(f"warning: {summary}; --strict-data stops at such a file instead")


def describe_images(info: InputInfo, images: ImageFiles, ranks: DistributedContext | None) -> InputInfo:
    """The report's input section with the preprocessing applied and the files skipped (on every rank)."""
    count, examples = images.skipped.count, [path for path, _ in images.skipped.examples]
    if ranks is not None:
        from bn_inspect.distributed.collectives import gather_json

        shared = gather_json([count, examples], ranks.group, "counting skipped images")
        count = sum(rank_count for rank_count, _ in shared)
        examples = [path for _, rank_examples in shared for path in rank_examples]
    from bn_inspect.data.images import SKIPPED_NAMES_KEPT

    return replace(
        info,
        preprocessing=Untrusted(images.prep.describe()),
        num_skipped_files=count,
        skipped_files=tuple(Untrusted(path) for path in sorted(examples)[:SKIPPED_NAMES_KEPT]),
    )
