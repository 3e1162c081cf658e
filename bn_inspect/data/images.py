"""--input DIR of images (or one image file) -> batches, decoded in parallel worker processes and streamed.

Only the list of paths is held; images are decoded a few batches ahead of the model by a
``torch.utils.data.DataLoader`` (``workers`` processes), so memory stays flat over any number of
files. A file that cannot be decoded is skipped and counted (``strict``: the run stops there).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from bn_inspect.boundary.reading import Source, current_manifest
from bn_inspect.data.batch import Batch
from bn_inspect.data.decode import IMAGE_SUFFIXES, Preprocessing, UndecodableImage, decode_image, planned_shape
from bn_inspect.data.memory import check_fits_memory
from bn_inspect.data.workers import quiet_worker, worker_batches
from bn_inspect.errors import InputError

# Files kept in the list of skipped ones for the report; the count covers them all.
SKIPPED_NAMES_KEPT = 10


def default_workers() -> int:
    """Decoding processes: one per CPU this process may use, less one for the model, at most 8.

    Past 8 a forward pass on the CPU is the bottleneck long before decoding is; on a GPU the
    DataLoader's own advice (a handful per device) holds.
    """
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, usable - 1))


# How many folders deep the scan goes below --input: class folders are one level, dataset layouts a
# few more; a deeper tree is refused in one line rather than walked (or skipped in silence).
MAX_FOLDER_DEPTH = 64


def find_images(folder: Path) -> tuple[list[Path], list[Path]]:
    """Image files under ``folder`` (recursive, name order, hidden names left out) and other files seen.

    The order is that of torchvision's ImageFolder for its ``class_name/image.jpg`` layout
    (classes sorted, then files sorted), which keeps runs reproducible. The walk keeps its own
    stack (any depth of folders costs no recursion), goes at most MAX_FOLDER_DEPTH levels down, and
    never follows a symlinked folder (so no loop). Every image found is declared in the run's
    manifest, so that no output may replace one, however deep.

    Raises:
        InputError: an image path that is not a regular file (a named pipe would block), a folder
            that cannot be read, or folders nested deeper than MAX_FOLDER_DEPTH.
    """
    images: list[Path] = []
    others: list[Path] = []
    manifest = current_manifest()
    pending = [(folder, 0)]
    while pending:
        current, depth = pending.pop()
        subfolders, files = _folder_entries(current)
        if subfolders and depth >= MAX_FOLDER_DEPTH:
            raise InputError(
                f"input directory {folder} nests folders more than {MAX_FOLDER_DEPTH} levels deep "
                f"(e.g. {subfolders[0]})",
                "Give a folder of images that is less deeply nested",
            )
        for path in files:
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                others.append(path)
            elif not path.is_file():
                raise InputError(
                    f"{path} in input directory {folder} is not a regular file",
                    "Remove it, or save the image as a regular file",
                )
            else:
                images.append(path)
                manifest.declare(path, Source.IMAGE)
        pending.extend((subfolder, depth + 1) for subfolder in reversed(subfolders))
    return images, others


def _folder_entries(folder: Path) -> tuple[list[Path], list[Path]]:
    """The visible subfolders (symlinked ones left out: never followed) and other entries of ``folder``, sorted."""
    subfolders: list[Path] = []
    files: list[Path] = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    subfolders.append(Path(entry.path))
                elif not entry.is_dir():
                    files.append(Path(entry.path))
    except OSError as error:
        raise InputError(f"cannot read folder {folder} ({error.strerror})", "Check its permissions") from error
    return sorted(subfolders), sorted(files)


@dataclass
class SkippedImages:
    """The files the last pass over the images skipped: how many, and the first few with the reason."""

    count: int = 0
    examples: list[tuple[str, str]] = field(default_factory=list)

    def add(self, path: str, reason: str) -> None:
        """Count one more skipped file."""
        self.count += 1
        if len(self.examples) < SKIPPED_NAMES_KEPT:
            self.examples.append((path, reason))

    def summary(self) -> str | None:
        """``2 files skipped (not decodable), e.g. a.jpg (cannot be decoded (...))``, or None."""
        if not self.count:
            return None
        path, reason = self.examples[0]
        return f"{self.count:,} file{'s' if self.count != 1 else ''} skipped as not decodable, e.g. {path} ({reason})"


@dataclass(frozen=True)
class _Problem:
    """Why one file gave no image: the reason after ``image PATH``, whether the run stops, and the
    opener's whole message for a file it refused."""

    path: str
    reason: str
    is_fatal: bool = False
    refusal: tuple[str, str] | None = None


@dataclass(frozen=True)
class _Decoded:
    path: str
    image: torch.Tensor | None
    problem: _Problem | None = None


@dataclass(frozen=True)
class _DecodedBatch:
    """What a worker hands over: the stacked images (None: none decoded), problems, or two sizes that differ."""

    images: torch.Tensor | None
    first_path: str
    problems: tuple[_Problem, ...]
    differing: tuple[tuple[str, tuple[int, ...]], ...] = ()


class _ImageFileDataset(Dataset[_Decoded]):
    def __init__(self, files: Sequence[str], prep: Preprocessing) -> None:
        self.files, self.prep = files, prep

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> _Decoded:
        path = self.files[index]
        try:
            return _Decoded(path, decode_image(path, self.prep))
        except UndecodableImage as problem:
            # Raised in a worker, an exception would reach the user as that worker's traceback.
            return _Decoded(path, None, _problem_of(path, problem))


def _problem_of(path: str, problem: UndecodableImage) -> _Problem:
    return _Problem(path, problem.reason, problem.is_fatal, problem.refusal)


def _collate(items: list[_Decoded]) -> _DecodedBatch:
    """Stack the decoded images of one batch in the worker (into shared memory), keeping the problems."""
    decoded = [item for item in items if item.image is not None]
    problems = tuple(item.problem for item in items if item.problem is not None)
    first = decoded[0] if decoded else None
    if first is None or first.image is None:
        return _DecodedBatch(None, items[0].path, problems)
    for item in decoded:
        if item.image is not None and item.image.shape != first.image.shape:
            sizes = ((first.path, tuple(first.image.shape)), (item.path, tuple(item.image.shape)))
            return _DecodedBatch(None, first.path, problems, sizes)
    return _DecodedBatch(torch.stack([item.image for item in decoded if item.image is not None]), first.path, problems)


@dataclass(frozen=True)
class ImageFiles:
    """Image files streamed as batches, with the interface of InputData (``batches``, ``num_batches``).

    Under torchrun, batch b (files b × batch_size onwards, in name order) goes to rank
    b % world_size: each rank decodes only its own files, and the batches are exactly those one
    process would run, so the merged statistics are the single-process ones, in train mode too.
    """

    source: str
    files: tuple[str, ...]
    prep: Preprocessing = field(default_factory=Preprocessing)
    workers: int = 0
    strict: bool = False
    rank: int = 0
    world_size: int = 1
    skipped: SkippedImages = field(default_factory=SkippedImages, compare=False)

    def share(self, rank: int, world_size: int) -> ImageFiles:
        """This rank's share (see the class docstring); it counts its skipped files where this one does."""
        return replace(self, rank=rank, world_size=world_size)

    def with_preprocessing(self, prep: Preprocessing) -> ImageFiles:
        """The same files, preprocessed by ``prep``."""
        return replace(self, prep=prep, skipped=SkippedImages())

    def _my_files(self, batch_size: int, max_batches: int | None) -> list[str]:
        count = len(self.files) if max_batches is None else min(len(self.files), max_batches * batch_size)
        starts = range(0, count, batch_size)[self.rank :: self.world_size]
        return [path for start in starts for path in self.files[start : min(start + batch_size, count)]]

    def num_batches(self, batch_size: int, max_batches: int | None) -> int:
        """How many batches this rank runs (a batch whose files are all skipped still counts here)."""
        total = math.ceil(len(self.files) / batch_size)
        total = total if max_batches is None else min(total, max_batches)
        return len(range(self.rank, total, self.world_size))

    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one preprocessed image: the crop's when there is one, else the first decodable file's."""
        if self.prep.crop is not None:
            return (self.prep.num_channels, self.prep.crop, self.prep.crop)
        for path in self.files[:16]:
            try:
                return tuple(decode_image(path, self.prep).shape)
            except UndecodableImage as problem:
                if problem.is_fatal or self.strict:
                    raise self._problem_error(_problem_of(path, problem)) from None
        raise InputError(
            f"none of the first {min(16, len(self.files))} images in {self.source} can be decoded",
            "Check that the folder holds images",
        )

    def batches(self, batch_size: int, max_batches: int | None) -> Iterator[Batch]:
        """This rank's batches, decoded by ``workers`` processes a few batches ahead."""
        self.skipped.count, self.skipped.examples[:] = 0, []
        files = self._my_files(batch_size, max_batches)
        if not files:
            return
        planned = next(filter(None, (planned_shape(path, self.prep) for path in files[:16])), None)
        if planned is not None:
            check_fits_memory((min(batch_size, len(files)), *planned), 4)
        loader = DataLoader(
            _ImageFileDataset(files, self.prep),
            batch_size=batch_size,
            num_workers=min(self.workers, math.ceil(len(files) / batch_size)),
            collate_fn=_collate,
            prefetch_factor=2 if self.workers else None,
            worker_init_fn=quiet_worker,
        )
        first: tuple[str, tuple[int, ...]] | None = None
        decoded: _DecodedBatch
        for decoded in worker_batches(loader, "decoding images"):
            self._note_problems(decoded.problems)
            if decoded.differing:
                _refuse_sizes(*decoded.differing)
            if decoded.images is None:
                continue
            shape = (decoded.first_path, tuple(decoded.images.shape[1:]))
            first = first or shape
            if shape[1] != first[1]:
                _refuse_sizes(first, shape)
            images = decoded.images
            if self.prep.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield Batch((images,))
        if first is None and self.skipped.count and self.world_size == 1:
            # Nothing ran: the skipped files are the whole story, said once rather than as a
            # warning followed by "no batch ran".
            path, reason = self.skipped.examples[0]
            count = self.skipped.count
            what = (
                f"none of the {count:,} images read from {self.source} could be decoded, e.g. {path} ({reason})"
                if count > 1
                else f"image {path} {reason}, and no other image was read"
            )
            raise InputError(
                what,
                "Check that the folder holds JPEG, PNG, BMP, WebP or TIFF images within the pixel budget",
            )

    def _note_problems(self, problems: tuple[_Problem, ...]) -> None:
        for problem in problems:
            if problem.is_fatal or self.strict:
                raise self._problem_error(problem)
            self.skipped.add(problem.path, problem.reason)

    def _problem_error(self, problem: _Problem) -> InputError:
        if problem.refusal is not None:
            return InputError(*problem.refusal)
        if problem.is_fatal or self.source == problem.path:
            fix = "Fix or replace the file"
        else:
            fix = "Remove or replace the file, or run without --strict-data to skip it"
        return InputError(f"image {problem.path} {problem.reason}", fix)


def _refuse_sizes(*sizes: tuple[str, tuple[int, ...]]) -> None:
    (path_a, shape_a), (path_b, shape_b) = sizes
    raise InputError(
        f"images have different sizes (e.g. {path_a} is {_spell(shape_a)}, {path_b} is {_spell(shape_b)}), "
        "and a batch needs one size",
        "Pass --resize N --crop N",
    )


def _spell(shape: tuple[int, ...]) -> str:
    return "×".join(str(size) for size in shape[1:])


def open_images(
    path: Path, prep: Preprocessing, *, workers: int | None = None, strict: bool = False, files: Sequence[Path] = ()
) -> ImageFiles:
    """The image files of folder ``path`` (or ``files`` found there already, or ``path`` itself, one image).

    One image given by itself is read strictly: with nothing to skip to, its problem is the run's.

    Raises:
        InputError: no image file in the folder (naming a file of another kind seen there).
    """
    if path.is_file():
        found: Sequence[Path] = [path]
        strict = True
    else:
        found = files
        if not found:
            found, others = find_images(path)
            if not found:
                _refuse_imageless(path, others)
    chosen = default_workers() if workers is None else workers
    return ImageFiles(str(path), tuple(str(file) for file in found), prep, chosen, strict)


def _refuse_imageless(path: Path, others: list[Path]) -> None:
    tensors = ".pt, .pth, .npy, .npz files"
    if not others:
        raise InputError(
            f"input directory {path} holds no {tensors} and no images: it is empty",
            "Give a folder of images or of tensor files",
        )
    raise InputError(
        f"input directory {path} holds no {tensors} and no image of a known type ({', '.join(IMAGE_SUFFIXES)}), "
        f"only other files such as {others[0]}",
        "Convert the images to one of these types, or give a folder of tensor files",
    )
