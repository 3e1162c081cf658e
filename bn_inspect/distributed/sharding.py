"""Each rank's share of the data: every batch runs exactly once, on exactly one rank.

Batch b of the stream goes to rank b % world_size (file i of a directory to rank i % world_size),
so the union of all ranks' batches is exactly the batches one process would run.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from bn_inspect.boundary.reading import Source
from bn_inspect.data.images import ImageFiles
from bn_inspect.data.inputs import DirectoryData
from bn_inspect.data.readers import InputData, read_input
from bn_inspect.errors import DistributedError

if TYPE_CHECKING:
    from bn_inspect.data.batch import Batch

T = TypeVar("T")


def shard_batches(batches: Iterable[T], rank: int, world_size: int) -> Iterator[T]:
    """This rank's share of ``batches``: items rank, rank + world_size, rank + 2 * world_size, ...

    The batches themselves are unchanged, so every batch runs exactly once somewhere and the
    merged statistics are those of the whole stream. Items of other ranks are still produced
    (and dropped); for files prefer ``shard_input``, which reads only this rank's part.
    """
    _check_rank(rank, world_size)
    return islice(batches, rank, None, world_size)


def shard_files(files: Sequence[Path], rank: int, world_size: int) -> tuple[Path, ...]:
    """This rank's files: file i (in name order) goes to rank i % world_size; may be empty."""
    _check_rank(rank, world_size)
    return tuple(sorted(files)[rank::world_size])


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise DistributedError(f"rank {rank} is not in a world of {world_size}", "Launch with torchrun")


@dataclass(frozen=True)
class ShardedInput:
    """This rank's share of an input file or directory, with the interface of InputData.

    * one file: batch b (consecutive slices of ``batch_size`` samples) goes to rank b % world_size;
      only this rank's slices are read (a .npy file is memory-mapped);
    * a directory: file i goes to rank i % world_size and is read by that rank alone; with
      ``max_batches`` the cap is on the whole run, as in one process, so batch b of the
      concatenated stream goes to rank b % world_size instead (each rank then opens every file,
      reading only its own batches of .npy files).

    Either way the union of all ranks' batches is exactly the batches one process would run.
    """

    data: InputData | DirectoryData
    rank: int
    world_size: int

    @property
    def source(self) -> str:
        """Where the whole input came from (the same on every rank)."""
        return self.data.source

    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample, read from the whole input (so a rank without files can tell)."""
        return self.data.sample_shape()

    def batches(self, batch_size: int, max_batches: int | None) -> Iterator[Batch]:
        """This rank's batches, in stream order."""
        if isinstance(self.data, InputData):
            yield from _slices(self.data, batch_size, max_batches, self.rank, self.world_size, 0)
            return
        if max_batches is None:
            own = DirectoryData(
                self.data.source, shard_files(self.data.files, self.rank, self.world_size), self.data.key
            )
            yield from own.batches(batch_size, None)
            return
        first_index = 0
        for path in self.data.files:
            if first_index >= max_batches:
                return
            data = read_input(path, key=self.data.key, source=Source.INPUT_SHARD)
            remaining = max_batches - first_index
            yield from _slices(data, batch_size, remaining, self.rank, self.world_size, first_index)
            first_index += data.num_batches(batch_size, remaining)

    def num_batches(self, batch_size: int, max_batches: int | None) -> int | None:
        """How many batches this rank runs, when it can be told without reading the data."""
        if isinstance(self.data, DirectoryData) and max_batches is None:
            own = DirectoryData(
                self.data.source, shard_files(self.data.files, self.rank, self.world_size), self.data.key
            )
            return own.num_batches(batch_size, None) if own.files else 0
        total = self.data.num_batches(batch_size, max_batches)
        return None if total is None else len(range(self.rank, total, self.world_size))


def _slices(
    data: InputData, batch_size: int, max_batches: int | None, rank: int, world_size: int, first_index: int
) -> Iterator[Batch]:
    """Batches of one file whose global index (``first_index`` + local index) is this rank's.

    Each batch is cut from the (memory-mapped) arrays first and converted by InputData itself, so
    only this rank's batches are read, with the same conversion as in one process.
    """
    starts = range(0, data.num_samples, batch_size)
    if max_batches is not None:
        starts = starts[:max_batches]
    offset = (rank - first_index) % world_size
    for start in starts[offset::world_size]:
        stop = start + batch_size
        piece = InputData(
            data.source,
            tuple(a[start:stop] for a in data.args),
            {name: a[start:stop] for name, a in data.kwargs.items()},
            min(stop, data.num_samples) - start,
        )
        yield from piece.batches(batch_size, 1)


def shard_input(data: InputData | DirectoryData | ImageFiles, rank: int, world_size: int) -> ShardedInput | ImageFiles:
    """This rank's share of ``data`` (see ShardedInput and ImageFiles); use it wherever InputData is used."""
    _check_rank(rank, world_size)
    if isinstance(data, ImageFiles):
        return data.share(rank, world_size)
    return ShardedInput(data, rank, world_size)
