"""--shape / --input FILE -> batches of tensors, checked before anything large is allocated."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bn_inspect.boundary.reading import Source, open_checked
from bn_inspect.data.readers import InputData, load_npy, open_input_file, read_input
from bn_inspect.errors import InputError

if TYPE_CHECKING:
    from bn_inspect.data.batch import Batch
    from bn_inspect.data.decode import Preprocessing
    from bn_inspect.data.images import ImageFiles

INPUT_SUFFIXES = (".pt", ".pth", ".npy", ".npz", ".csv", ".parquet")
DEFAULT_BATCH_SIZE = 64


DIRECTORY_SUFFIXES = (".pt", ".pth", ".npy", ".npz")


@dataclass(frozen=True)
class DirectoryData:
    """A directory of .pt/.pth/.npy/.npz files, read one file at a time in name order.

    Only the current file is in memory (.npy files are memory-mapped and read a batch at a
    time), so a dataset of any size streams through with flat memory. Batches do not span files.
    """

    source: str
    files: tuple[Path, ...]
    key: str | None = None

    def batches(self, batch_size: int, max_batches: int | None) -> Iterator[Batch]:
        """The batches of every file in turn, at most ``max_batches`` in all."""
        remaining = max_batches
        for path in self.files:
            if remaining is not None and remaining <= 0:
                return
            data = read_input(path, key=self.key, source=Source.INPUT_SHARD)
            for batch in data.batches(batch_size, remaining):
                yield batch
                if remaining is not None:
                    remaining -= 1

    def num_batches(self, batch_size: int, max_batches: int | None) -> int | None:
        """How many batches ``batches`` yields, when the files' headers tell (.npy); else None.

        Raises:
            InputError: a .npy file that is not a numeric array.
        """
        total = 0
        for path in self.files:
            array = load_npy(path) if path.suffix.lower() == ".npy" else None
            if array is None or array.ndim == 0:
                # Not told by a header: reading the file will tell, or say what is wrong with it.
                return max_batches
            total += math.ceil(array.shape[0] / batch_size)
        return total if max_batches is None else min(total, max_batches)

    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample of the first file."""
        return read_input(self.files[0], key=self.key, source=Source.INPUT_SHARD).sample_shape()


def open_input(
    path: Path,
    *,
    key: str | None = None,
    drop_columns: Sequence[str] = (),
    prep: Preprocessing | None = None,
    workers: int | None = None,
    strict: bool = False,
) -> InputData | DirectoryData | ImageFiles:
    """An input file, a directory of input files to stream, or images (a folder of them, or one).

    A directory is a folder of tensor shards when it holds .pt/.pth/.npy/.npz files (shards are
    not searched for in subfolders), else a folder of images, searched recursively. ``prep``,
    ``workers`` and ``strict`` apply to images only.

    Raises:
        InputError: as read_input; a directory without readable files, or with both shards and images.
    """
    from bn_inspect.data.decode import IMAGE_SUFFIXES, Preprocessing

    if path.is_dir():
        files = tuple(sorted(p for p in path.iterdir() if p.suffix.lower() in DIRECTORY_SUFFIXES))
        if not files:
            return _open_images(path, prep or Preprocessing(), workers, strict)
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if images:
            raise InputError(
                f"input directory {path} holds both tensor files ({files[0].name}) and images ({images[0].name})",
                "Put the images in a folder of their own and give that folder",
            )
        for file in files:
            # Every shard is opened and judged now, and recorded in the run's manifest: one that is a
            # pipe or a device would block or never end when its turn came, and skipping it would drop
            # data. Each is opened (and judged) again when it is read.
            with open_input_file(file, Source.INPUT_SHARD):
                pass
        return DirectoryData(str(path), files, key)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        with open_checked(
            path, Source.IMAGE, noun="input image", error=InputError, fix="Save the image to a regular file"
        ):
            pass
        return _open_images(path, prep or Preprocessing(), workers, strict)
    return read_input(path, key=key, drop_columns=drop_columns)


def _open_images(path: Path, prep: Preprocessing, workers: int | None, strict: bool) -> ImageFiles:
    from bn_inspect.data.images import open_images

    return open_images(path, prep, workers=workers, strict=strict)
