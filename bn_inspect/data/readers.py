"""One input file -> tensors: .pt/.pth, .npy, .npz, .csv, .parquet, checked before anything is allocated."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from bn_inspect.boundary.reading import OpenedInput, Source, open_checked
from bn_inspect.data.memory import available_memory_bytes
from bn_inspect.errors import InputError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from bn_inspect.data.batch import Batch

INPUT_SUFFIXES = (".pt", ".pth", ".npy", ".npz", ".csv", ".parquet")
DEFAULT_BATCH_SIZE = 64


@dataclass(frozen=True)
class InputData:
    """Input read from a file: positional and keyword arrays sharing their first dim."""

    source: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    num_samples: int
    notes: tuple[str, ...] = ()

    def batches(self, batch_size: int, max_batches: int | None) -> Iterator[Batch]:
        """Consecutive slices along dim 0, converted to tensors one batch at a time."""
        from bn_inspect.data.batch import Batch

        starts = range(0, self.num_samples, batch_size)
        for start in starts if max_batches is None else starts[:max_batches]:
            stop = start + batch_size
            yield Batch(
                tuple(_as_tensor(a[start:stop]) for a in self.args),
                {k: _as_tensor(v[start:stop]) for k, v in self.kwargs.items()},
            )

    def num_batches(self, batch_size: int, max_batches: int | None) -> int:
        """How many batches ``batches`` yields."""
        total = math.ceil(self.num_samples / batch_size)
        return total if max_batches is None else min(total, max_batches)

    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample of the first input tensor."""
        first = (self.args or tuple(self.kwargs.values()))[0]
        return tuple(int(s) for s in first.shape[1:])


def _as_tensor(array: Any) -> torch.Tensor:
    import numpy as np
    import torch

    if isinstance(array, torch.Tensor):
        return array
    # Slices of a memory-mapped file are read-only; the copy also reads only this batch from disk,
    # and turns big-endian data from other machines into the native byte order torch needs.
    return torch.from_numpy(np.array(array, dtype=array.dtype.newbyteorder("="), copy=True))


# Budgets for files read whole into memory (a .npy file is memory-mapped and an .npz member is
# checked against the memory available, so they need none): a table's text becomes several times
# its size once parsed, and a .pt file's tensors are as large as the file.
TABLE_BUDGET = 2**30
_NOT_REGULAR_FIX = "Save the data to a regular file and give its path"
_NOUNS = {Source.INPUT_FILE: "input file", Source.INPUT_SHARD: "input shard"}


def open_input_file(
    path: Path, source: Source = Source.INPUT_FILE, max_bytes: int | None = None
) -> AbstractContextManager[OpenedInput]:
    """An input file or shard opened through the boundary's opener (a regular file, recorded).

    Raises:
        InputError: the path is missing, unreadable, not a regular file, or over ``max_bytes``.
    """
    noun = _NOUNS.get(source, "input file")
    return open_checked(path, source, noun=noun, error=InputError, max_bytes=max_bytes, fix=_NOT_REGULAR_FIX)


def read_input(
    path: Path, *, key: str | None = None, drop_columns: Sequence[str] = (), source: Source = Source.INPUT_FILE
) -> InputData:
    """Read ``path`` (.pt/.pth, .npy, .npz, .csv, .parquet) into arrays of floating-point data.

    Args:
        path: the input file.
        key: which array of an .npz, or which entry of a dict in a .pt file, to use alone.
        drop_columns: table columns to leave out (labels, ids).
        source: what the file is to the run (the --input file, or a shard of the --input folder).

    Raises:
        InputError: unreadable file, unknown suffix, wrong dtype, empty data, ambiguous content, or a
            .pt file or table over its budget (half the memory available; TABLE_BUDGET).
    """
    suffix = path.suffix.lower()
    budget = {".pt": available_memory_bytes() // 2, ".csv": TABLE_BUDGET, ".parquet": TABLE_BUDGET}
    with open_input_file(path, source, budget.get(".pt" if suffix == ".pth" else suffix)) as opened:
        if suffix in (".pt", ".pth"):
            data = _read_torch(opened, key)
        elif suffix == ".npy":
            data = InputData(str(path), (_checked(_memory_mapped(opened), path),), {}, 0)
        elif suffix == ".npz":
            data = InputData(str(path), (_checked(_read_npz(opened, key), path),), {}, 0)
        elif suffix in (".csv", ".parquet"):
            data = InputData(str(path), (_read_table(opened, drop_columns),), {}, 0)
        else:
            raise InputError(
                f"input file {path} has suffix {suffix or '(none)'!r}, which bn-inspect cannot read",
                f"Give one of {', '.join(INPUT_SUFFIXES)}",
            )
    arrays = [*data.args, *data.kwargs.values()]
    lengths = {int(a.shape[0]) for a in arrays}
    if len(lengths) != 1:
        raise InputError(
            f"the tensors in {path} differ in their first dim: {sorted(lengths)}", "Give tensors with one sample count"
        )
    num_samples = lengths.pop()
    if num_samples == 0:
        raise InputError(f"input file {path} holds no samples", "Give a file with at least one sample")
    return InputData(data.source, data.args, data.kwargs, num_samples, data.notes)


@dataclass(frozen=True)
class _NpyHeader:
    shape: tuple[int, ...]
    dtype: np.dtype


def _read_npy_header(stream: IO[bytes], size: int, name: str) -> _NpyHeader:
    """The header of the .npy data in ``stream`` of ``size`` bytes, checked against what follows it.

    Shared by .npy files and .npz members, so that neither reaches numpy's reader with a header
    that would make it allocate what the file does not hold, or unpickle.

    Raises:
        InputError: no NUMPY magic, a damaged or unknown header, Python objects, or a shape that
            needs more bytes than follow the header.
    """
    import numpy as np

    magic = stream.read(8)
    if magic[:6] != b"\x93NUMPY":
        # np.load takes any other file for a pickle (and NpzFile returns such a member as raw bytes).
        raise InputError(f"{name} is not a .npy file (no NUMPY header)", "Save the array with numpy.save")
    version = (magic[6], magic[7]) if len(magic) == 8 else None
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise InputError(
            f"cannot read {name} as a .npy array: unknown .npy format version {version}", "Re-save it with numpy.save"
        )
    try:
        shape, _, dtype = readers[version](stream)
    except Exception as error:
        # A damaged header reaches numpy's header parser, which raises whatever it meets.
        raise InputError(
            f"cannot read {name} as a .npy array: its header is damaged ({type(error).__name__}: {error})",
            "Re-save it with numpy.save",
        ) from error
    if any(s < 0 for s in shape):
        raise InputError(
            f"cannot read {name} as a .npy array: its header declares the negative shape {shape}",
            "Re-save it with numpy.save",
        )
    if dtype.hasobject:
        raise InputError(f"{name} holds Python objects, not numbers", "Save a numeric array")
    declared = math.prod(shape) * dtype.itemsize
    available = size - stream.tell()
    if declared > available:
        raise InputError(
            f"cannot read {name} as a .npy array: its header declares shape {shape} of {dtype}, "
            f"{declared:,} bytes, but only {max(available, 0):,} bytes follow it",
            "The file is truncated or damaged; save the array again",
        )
    return _NpyHeader(tuple(shape), dtype)


def load_npy(path: Path, source: Source = Source.INPUT_SHARD) -> np.ndarray:
    """A .npy file memory-mapped (``_memory_mapped``), opened through the boundary's opener."""
    with open_input_file(path, source) as opened:
        return _memory_mapped(opened)


def _memory_mapped(opened: OpenedInput) -> np.ndarray:
    """The opened .npy file memory-mapped, its header checked against the file's size first, no pickles.

    The map is made through the checked descriptor's own path and outlives the descriptor.
    """
    import numpy as np

    path = opened.path
    with opened.stream() as stream:
        _read_npy_header(stream, opened.size, str(path))
    try:
        array: np.ndarray = np.load(opened.library_path(), mmap_mode="r", allow_pickle=False)
        return array
    except (ValueError, OSError) as error:
        # The header was checked above; what is left is the memory map itself failing.
        raise InputError(f"cannot read {path} as a .npy array ({error})", "Re-save it with numpy.save") from error


def _read_npz(opened: OpenedInput, key: str | None) -> np.ndarray:
    import zipfile

    import numpy as np

    path = opened.path
    # The archive is read with zipfile rather than np.load: NpzFile hands back a member without the
    # NUMPY magic as raw bytes, and lets numpy allocate whatever a member's header declares.
    whole = opened.stream()
    try:
        archive = zipfile.ZipFile(whole)
    except (ValueError, OSError, zipfile.BadZipFile) as error:
        whole.close()
        raise InputError(f"cannot read {path} as a .npz archive ({error})", "Re-save it with numpy.savez") from error
    with whole, archive:
        members = {name.removesuffix(".npy"): name for name in archive.namelist()}
        names = list(members)
        if key is None and len(names) == 1:
            key = names[0]
        if key is None:
            raise InputError(
                f"{path} holds {len(names)} arrays ({', '.join(names)}) and none was chosen",
                "Pick one with --input-key NAME",
            )
        if key not in members:
            raise InputError(
                f"{path} has no array {key!r} (it has {', '.join(names)})", "Pick one with --input-key NAME"
            )
        member = archive.getinfo(members[key])
        name = f"array {key!r} in {path}"
        try:
            with archive.open(member) as stream:
                header = _read_npy_header(stream, member.file_size, name)
        except InputError:
            raise
        except Exception as error:
            raise _damaged_npz_error(name, error) from error
        # Unlike a .npy file, an .npz member cannot be memory-mapped: all of it is read at once.
        needed = math.prod(header.shape) * header.dtype.itemsize
        available = available_memory_bytes()
        if needed > available // 2:
            raise InputError(
                f"{name} of shape {header.shape} needs {needed / 2**30:,.1f} GiB once read, more than half of "
                f"the {available / 2**30:,.1f} GiB of memory available",
                "Save it with numpy.save as a .npy file (read a batch at a time), or as shards in a directory",
            )
        try:
            with archive.open(member) as stream:
                chosen: np.ndarray = np.lib.format.read_array(stream, allow_pickle=False)
                return chosen
        except Exception as error:
            raise _damaged_npz_error(name, error) from error


def _damaged_npz_error(name: str, error: Exception) -> InputError:
    # zipfile and zlib raise whatever a damaged archive makes them meet (bad CRC, early end of data).
    return InputError(
        f"cannot read {name}: the archive is damaged ({type(error).__name__}: {error})", "Re-save it with numpy.savez"
    )


def _checked(array: np.ndarray, path: Path) -> np.ndarray:
    kind = array.dtype.kind
    if kind == "f" and array.dtype.itemsize > 8:
        raise InputError(
            f"{path} holds {array.dtype} (extended precision), which torch cannot take",
            "Save it as float32 or float64",
        )
    if kind == "f":
        if array.ndim < 2:
            raise InputError(
                f"{path} holds a {array.ndim}-D array of shape {array.shape}; the model needs (N, C, ...)",
                "Add the batch dim (e.g. x[None]) or the feature dim",
            )
        _require_values(tuple(array.shape), path)
        return array
    described = {
        "i": "integers",
        "u": "integers",
        "b": "booleans",
        "c": "complex numbers",
        "U": "strings",
        "S": "bytes",
        "O": "Python objects",
    }
    raise InputError(
        f"{path} holds {described.get(kind, str(array.dtype))} ({array.dtype}); normalization layers need floating-point input",
        "Convert it to float32 first (e.g. x.astype('float32') / 255 for images)",
    )


def _read_torch(opened: OpenedInput, key: str | None) -> InputData:
    import pickle
    import warnings

    import torch

    path = opened.path
    try:
        # A stream, not a path: torch.load hands any path ending in .safetensors to safetensors.
        with opened.stream() as stream, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the error says enough
            obj = torch.load(stream, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise InputError(
            f"{path} needs code to unpickle; bn-inspect reads only tensors from input files",
            "Save a tensor, a tuple/list of tensors or a dict of tensors",
        ) from error
    except Exception as error:
        raise InputError(
            f"cannot read input file {path} ({type(error).__name__})", "Re-save it with torch.save"
        ) from error
    if isinstance(obj, dict) and key is not None:
        if key not in obj:
            raise InputError(
                f"{path} has no entry {key!r} (it has {', '.join(map(str, obj))})", "Pick one with --input-key NAME"
            )
        obj = obj[key]
    if isinstance(obj, torch.Tensor):
        return InputData(str(path), (_checked_tensor(obj, path),), {}, 0)
    if isinstance(obj, (tuple, list)) and obj and all(isinstance(t, torch.Tensor) for t in obj):
        if _is_inputs_and_labels(obj):
            note = (
                f"note: {path} holds a {type(obj).__name__} of {len(obj)} tensors whose first is floating-point "
                "and the rest integers: the first is the input, the rest are taken for labels and left out."
            )
            return InputData(str(path), (_checked_tensor(obj[0], path),), {}, 0, (note,))
        return InputData(str(path), tuple(_checked_tensor(t, path) for t in obj), {}, 0)
    if (
        isinstance(obj, dict)
        and obj
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        return InputData(str(path), (), {k: _checked_tensor(v, path) for k, v in obj.items()}, 0)
    raise InputError(
        f"{path} holds an object of type {type(obj).__name__}, not tensors",
        "Save a tensor, a tuple/list of tensors (positional inputs) or a dict of tensors (keyword inputs)",
    )


def _is_inputs_and_labels(tensors: Sequence[torch.Tensor]) -> bool:
    """``(images, labels)``, the pair people save most: floating-point inputs, then integer targets."""
    first, rest = tensors[0], tensors[1:]
    if not rest or not first.is_floating_point() or first.dim() < 1:
        return False
    return all(
        not (t.is_floating_point() or t.is_complex()) and t.dim() >= 1 and t.shape[0] == first.shape[0] for t in rest
    )


def _checked_tensor(tensor: torch.Tensor, path: Path) -> torch.Tensor:
    from bn_inspect.data.batch import without_values

    # map_location="cpu" moved every real device's tensors: what stays elsewhere (meta) has no values.
    lacking = without_values(tensor)
    if lacking is not None:
        fix = (
            "Save a dense tensor: torch.save(t.to_dense(), ...)"
            if lacking.is_layout
            else "Save the real tensor with its values: torch.save(t.detach().cpu(), ...)"
        )
        raise InputError(f"{path} holds {lacking.what}", fix)
    if tensor.is_floating_point():
        if tensor.dim() < 2:
            raise InputError(
                f"{path} holds a {tensor.dim()}-D tensor of shape {tuple(tensor.shape)}; the model needs (N, C, ...)",
                "Add the batch dim (e.g. x[None]) or the feature dim",
            )
        _require_values(tuple(tensor.shape), path)
        return tensor
    raise InputError(
        f"{path} holds a tensor of dtype {str(tensor.dtype).removeprefix('torch.')}; normalization layers need floating-point input",
        "Convert it to float first (e.g. x.float() / 255 for images); for a dict of inputs and labels, "
        "pick the inputs with --input-key NAME",
    )


def _require_values(shape: tuple[int, ...], path: Path) -> None:
    """Refuse samples with no values: every statistic over them would be empty, not a finding."""
    if math.prod(shape[1:]) == 0:
        raise InputError(
            f"{path} holds data of shape {shape}: each sample, of shape {shape[1:]}, has no values",
            "Give data with at least one value per sample: every dim after the first must be at least 1",
        )


def _read_table(opened: OpenedInput, drop_columns: Sequence[str]) -> np.ndarray:
    import numpy as np
    import pandas as pd

    path = opened.path
    try:
        with opened.stream() as stream:
            frame = pd.read_csv(stream) if path.suffix.lower() == ".csv" else pd.read_parquet(stream)
    except ImportError as error:
        raise InputError(
            "reading .parquet files needs pyarrow, which is not installed",
            "Install it: pip install 'bn-inspect[parquet]'",
        ) from error
    except pd.errors.EmptyDataError as error:
        raise InputError(f"{path} is empty", "Give a table with a header row and at least one row") from error
    except Exception as error:
        raise InputError(
            f"cannot read {path} as a table ({type(error).__name__}: {error})", "Check the file"
        ) from error
    if frame.shape[0] == 0:
        # Checked first: with no rows every column reads as text, which would be misreported.
        raise InputError(f"{path} has a header but no rows", "Give a table with at least one row of numbers")
    unknown = [c for c in drop_columns if c not in frame.columns]
    if unknown:
        raise InputError(
            f"--drop-column {', '.join(unknown)}: no such column in {path}",
            f"Its columns: {', '.join(map(str, frame.columns[:20]))}",
        )
    frame = frame.drop(columns=list(drop_columns))
    non_numeric = [
        str(c)
        for c in frame.columns
        if not pd.api.types.is_numeric_dtype(frame[c]) or pd.api.types.is_bool_dtype(frame[c])
    ]
    if non_numeric:
        raise InputError(
            f"{path} has non-numeric columns: {', '.join(non_numeric[:10])}",
            "Leave them out with --drop-column NAME (repeatable)",
        )
    if frame.shape[1] == 0:
        raise InputError(f"{path} has no columns left after --drop-column", "Keep at least one feature column")
    return np.ascontiguousarray(frame.to_numpy(dtype=np.float32))
