"""--data module:function: the user's Dataset, DataLoader or iterable of batches, as this rank's batches.

The function is the user's code, imported and called (with no arguments) on purpose, like --arch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sized
from typing import TYPE_CHECKING, Any

from bn_inspect.errors import BnInspectError, InputError
from bn_inspect.options import RunOptions

if TYPE_CHECKING:
    from bn_inspect.analyses.session import RunObserver
    from bn_inspect.data.batch import Batch

# Keys a dict batch's input is usually stored under (torchvision-style datasets, Hugging Face
# image processors, generic code), tried in this order when --input-key does not say.
INPUT_KEYS = ("image", "images", "pixel_values", "input", "inputs", "x")


def data_batches(options: RunOptions, observer: RunObserver, shard: tuple[int, int]) -> tuple[Iterator[Batch], str]:
    """This rank's batches from the --data function, with the observer's progress.

    A map-style Dataset is batched here (--batch-size, --workers); batch b goes to rank
    b % world_size. A DataLoader with a DistributedSampler already gives each rank its share; any
    other iterable is read whole by every rank, which keeps item b % world_size, so the union of
    the ranks' batches is what one process would run.

    Raises:
        InputError: the function raises, returns something that is not iterable, or yields items
            that hold no tensor input.
        ArchError: the spec cannot be imported or names no callable.
    """
    import torch.utils.data

    from bn_inspect.model.arch import resolve_callable

    spec = options.data or ""
    function = resolve_callable(spec, "--data")
    try:
        returned = function()
    except Exception as error:
        raise InputError(
            f"--data {spec!r} raised {type(error).__name__} when called: {_first_line(error)}",
            "Fix the function; it is called with no arguments",
        ) from error
    rank, world_size = shard
    items: Iterable[Any]
    total: int | None
    if _is_map_dataset(returned):
        items, total = _batched(returned, options, shard)
        rank, world_size = 0, 1
    elif isinstance(returned, Iterable) and not isinstance(returned, (str, bytes, Mapping)):
        items = returned
        total = len(returned) if isinstance(returned, Sized) else None
        if options.batches is not None:
            total = options.batches if total is None else min(total, options.batches)
        sharded_already = isinstance(returned, torch.utils.data.DataLoader) and isinstance(
            returned.sampler, torch.utils.data.DistributedSampler
        )
        if world_size > 1 and not sharded_already:
            total = None if total is None else len(range(rank, total, world_size))
        else:
            rank, world_size = 0, 1
    else:
        raise InputError(
            f"--data {spec!r} returned an object of type {type(returned).__name__}, which is not iterable",
            "Return a Dataset, a DataLoader or an iterable of batches",
        )
    batches = _picked(items, spec, options.input_key, options.batches, rank, world_size)
    return observer.progress(batches, total), f"--data {spec}"


def _is_map_dataset(value: Any) -> bool:
    import torch.utils.data

    return (
        isinstance(value, torch.utils.data.Dataset)
        and not isinstance(value, torch.utils.data.IterableDataset)
        and hasattr(value, "__len__")
    )


def _batched(dataset: Any, options: RunOptions, shard: tuple[int, int]) -> tuple[Iterable[Any], int]:
    """A DataLoader over this rank's batches of ``dataset``: batch b (consecutive indices) to rank b % world_size."""
    import math

    from torch.utils.data import DataLoader

    from bn_inspect.data.images import default_workers
    from bn_inspect.data.inputs import DEFAULT_BATCH_SIZE
    from bn_inspect.data.workers import quiet_worker, worker_batches

    size = options.batch_size or DEFAULT_BATCH_SIZE
    count = len(dataset)
    num_batches = math.ceil(count / size) if options.batches is None else min(math.ceil(count / size), options.batches)
    rank, world_size = shard
    mine = [list(range(b * size, min((b + 1) * size, count))) for b in range(rank, num_batches, world_size)]
    workers = default_workers() if options.workers is None else options.workers
    loader = DataLoader(dataset, batch_sampler=mine, num_workers=min(workers, len(mine)), worker_init_fn=quiet_worker)
    return worker_batches(loader, "loading the --data Dataset"), len(mine)


def _picked(
    items: Iterable[Any], spec: str, key: str | None, max_batches: int | None, rank: int, world_size: int
) -> Iterator[Batch]:
    """Each item as a Batch; the user's iteration errors as one line."""
    iterator = iter(items)
    index = 0
    while max_batches is None or index < max_batches:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except BnInspectError:
            raise
        except Exception as error:
            raise InputError(
                f"--data {spec!r}: reading batch {index} raised {type(error).__name__}: {_first_line(error)}",
                "Fix the Dataset or iterable the function returns",
            ) from error
        if index % world_size == rank:
            yield as_input_batch(item, key)
        index += 1


def as_input_batch(item: Any, key: str | None) -> Batch:
    """The model's input in one item of the user's data: a tensor, the first of a tuple, or a dict's entry.

    A dict gives the entry ``key`` (--input-key), else the first of INPUT_KEYS it has, else all
    its entries as keyword inputs when they are all tensors (input_ids, attention_mask, ...).

    Raises:
        InputError: naming the keys there are, or the type that is no tensor input.
    """
    import numpy as np
    import torch

    from bn_inspect.data.batch import Batch, as_batch

    if isinstance(item, Mapping):
        chosen = key if key is not None else next((k for k in INPUT_KEYS if k in item), None)
        if chosen is None and all(isinstance(v, torch.Tensor) for v in item.values()) and item:
            return as_batch(Batch((), dict(item)), "a --data batch")
        if chosen is None or chosen not in item:
            raise InputError(
                f"the --data batches are dicts with keys {', '.join(map(str, item)) or '(none)'}"
                + (f", not {key!r}" if key is not None else ", none of them a known input name"),
                "Pass --input-key NAME to say which entry is the model's input",
            )
        item = item[chosen]
    if isinstance(item, (tuple, list)) and item:
        item = item[0]
    if isinstance(item, np.ndarray):
        item = torch.from_numpy(item)
    return as_batch(item, "a --data batch")


def _first_line(error: BaseException) -> str:
    """What went wrong, without a DataLoader worker's copy of the traceback."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and "Original Traceback" in str(error):
        return lines[-1].strip().removeprefix(f"{type(error).__name__}: ")
    return lines[0] if lines else ""
