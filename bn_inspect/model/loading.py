"""Model file or --arch spec -> nn.Module, safely: no code from the file runs unless trusted."""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import os
import pickle
import pickletools
import stat
import sys
import tokenize
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from bn_inspect.errors import (
    ArchError,
    ModelFileError,
    StateDictMismatchError,
    UntrustedArchiveError,
    UntrustedPickleError,
)

if TYPE_CHECKING:
    import torch
    from torch import nn


class FileKind(str, Enum):
    """What a model file is, judged by its bytes, never by its extension."""

    TORCH_SAVE = "torch.save"
    TORCHSCRIPT = "torchscript"
    TORCH_EXPORT = "torch.export"
    SAFETENSORS = "safetensors"
    LEGACY_PICKLE = "legacy-pickle"


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to inspect and a description of where it came from.

    ``format`` is one of: state_dict, checkpoint, safetensors, torchscript, pickle, arch.
    """

    module: nn.Module
    source: str
    format: str
    arch: str | None


# Checkpoint dicts keep the weights under one of these keys (PyTorch Lightning, timm, torchvision
# references, and most training scripts).
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "module", "weights", "ema")
_STRIPPED_PREFIXES = ("module.", "_orig_mod.")


def detect_file_kind(path: Path) -> FileKind:
    """Classify ``path`` from its first bytes and, for zip archives, its entry names.

    Raises:
        ModelFileError: the file is missing, unreadable, empty, corrupt or of no known kind.
    """
    _check_regular_file(path)
    try:
        with path.open("rb") as stream:
            head = stream.read(16)
    except OSError as error:
        raise ModelFileError(f"cannot read model file {path}: {error.strerror}", "Check its permissions") from error
    if not head:
        raise ModelFileError(f"model file {path} is empty", "Re-save or re-download it")
    try:
        is_zip = zipfile.is_zipfile(path)
    except Exception as error:
        # A damaged zip64 locator (several disks) makes is_zipfile itself raise.
        raise ModelFileError(
            f"model file {path} is a damaged zip archive ({type(error).__name__})", "Re-save or re-download it"
        ) from error
    if is_zip:
        return _zip_kind(path)
    if head.startswith(b"PK"):
        raise ModelFileError(f"model file {path} is a damaged or truncated zip archive", "Re-save or re-download it")
    if len(head) >= 9 and head[8:9] == b"{":
        header_size = int.from_bytes(head[:8], "little")
        if 0 < header_size <= path.stat().st_size - 8:
            return FileKind.SAFETENSORS
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return FileKind.LEGACY_PICKLE
    raise ModelFileError(
        f"{path} is not a PyTorch model file (no zip archive, pickle or safetensors header)",
        "Give a file written by torch.save, torch.jit.save, torch.export.save or safetensors",
    )


def _zip_kind(path: Path) -> FileKind:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            file_size = path.stat().st_size
            _check_entry_extents(archive, path, file_size)
            # A flipped byte in a tensor payload loads silently; the CRC check catches it.
            broken = _first_failing_crc(archive, path, file_size)
    except ModelFileError:
        raise
    except Exception as error:  # unsupported versions, flags, methods: all damage
        raise ModelFileError(
            f"model file {path} is a damaged zip archive ({error})", "Re-save or re-download it"
        ) from error
    if broken is not None:
        raise ModelFileError(
            f"model file {path} is corrupt: entry {broken} fails its CRC check", "Re-save or re-download it"
        )
    parts = {part for name in names for part in name.split("/")[1:2]}
    # Only the archive's top-level entries count: TorchScript keeps user code under code/, whose
    # module paths (code/__torch__/tests/models/...) may contain any folder name.
    if "archive_format" in parts or "models" in parts:
        return FileKind.TORCH_EXPORT
    if "code" in parts or "constants.pkl" in parts:
        return FileKind.TORCHSCRIPT
    if "data.pkl" in parts:
        return FileKind.TORCH_SAVE
    raise ModelFileError(
        f"{path} is a zip archive but not a PyTorch checkpoint (no data.pkl, code/ or archive_format)",
        "Give a file written by torch.save, torch.jit.save or torch.export.save",
    )


_FILE_TYPES = (
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _check_regular_file(path: Path) -> None:
    """Raise unless ``path`` is a regular file (a symlink to one is fine), judged without opening it:
    opening a named pipe blocks until a writer comes, and a device such as /dev/zero never ends."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ModelFileError(f"model file {path} does not exist", "Check the path") from None
    except OSError as error:
        raise ModelFileError(f"cannot read model file {path}: {error.strerror}", "Check its permissions") from error
    if stat.S_ISDIR(mode):
        raise ModelFileError(f"model path {path} is a directory", "Give the path of a model file")
    if not stat.S_ISREG(mode):
        described = next((name for is_type, name in _FILE_TYPES if is_type(mode)), "not a file")
        raise ModelFileError(
            f"model file {path} is {described}, not a regular file", "Give the path of a saved model file"
        )


# A zip entry's local header is at least this long: its data starts no earlier than 30 bytes after
# the header's offset.
_LOCAL_HEADER_SIZE = 30
# Compressed (deflated, bzip2, lzma) entries may declare at most this many inflated bytes per byte of
# the archive, plus the floor below. torch.save, torch.jit.save and torch.export.save store entries
# uncompressed, so their CRC check costs one read of the file; a re-zipped checkpoint compresses
# tensors a few times at most, and the floor leaves room for all-zero buffers, which compress ~1000x.
_MAX_INFLATION_RATIO = 16
_INFLATION_FLOOR = 64 * 2**20
_CHUNK_SIZE = 2**20


def _check_entry_extents(archive: zipfile.ZipFile, path: Path, file_size: int) -> None:
    """Refuse entries that share bytes, and compressed entries that declare more than the budget.

    With no two entries overlapping, their compressed bytes add up to at most the file's size, so
    together with the per-entry cap on inflated bytes (each entry yields at most its declared size)
    the CRC check inflates at most the budget. A zip bomb whose many central-directory records all
    point at one highly compressed entry is refused here before anything is inflated.
    """
    entries = sorted(archive.infolist(), key=lambda entry: entry.header_offset)
    for before, after in pairwise(entries):
        if before.header_offset + _LOCAL_HEADER_SIZE + before.compress_size > after.header_offset:
            raise ModelFileError(
                f"model file {path} is a malformed zip archive: entries {before.filename} and {after.filename} overlap",
                "Re-save or re-download it",
            )
    if entries and entries[-1].header_offset + _LOCAL_HEADER_SIZE + entries[-1].compress_size > archive.start_dir:
        raise ModelFileError(
            f"model file {path} is a malformed zip archive: entry {entries[-1].filename} overlaps the "
            "central directory",
            "Re-save or re-download it",
        )
    declared = sum(entry.file_size for entry in entries if entry.compress_type != zipfile.ZIP_STORED)
    if declared > _inflation_budget(file_size):
        raise ModelFileError(
            f"model file {path} is a zip archive whose compressed entries declare {declared} bytes "
            f"in a file of {file_size} bytes, more than a checkpoint holds (a zip bomb?)",
            "Give a file written by torch.save, which stores tensors uncompressed",
        )


def _inflation_budget(file_size: int) -> int:
    return _MAX_INFLATION_RATIO * file_size + _INFLATION_FLOOR


def _first_failing_crc(archive: zipfile.ZipFile, path: Path, file_size: int) -> str | None:
    """The first entry whose bytes fail their CRC, or None; like ``ZipFile.testzip``, but bounded.

    zipfile stops each entry at its declared size; the running total is checked as well, so no more
    is read than the stored entries' bytes (at most the file) and the compressed entries' budget.
    """
    budget = file_size + _inflation_budget(file_size)
    inflated = 0
    for entry in archive.infolist():
        try:
            with archive.open(entry) as stream:
                while chunk := stream.read(_CHUNK_SIZE):
                    inflated += len(chunk)
                    if inflated > budget:
                        raise ModelFileError(
                            f"model file {path} is a zip archive that inflates past {budget} bytes",
                            "Give a file written by torch.save, which stores tensors uncompressed",
                        )
        except zipfile.BadZipFile:
            return entry.filename
    return None


def list_pickle_globals(path: Path, kind: FileKind) -> list[str]:
    """Every ``module.name`` global the pickle would import that torch's weights-only loader refuses.

    Found by disassembling the pickle, without running it; names are given as Python 3 imports them
    (a protocol-2 ``__builtin__.exec`` is ``builtins.exec``).
    """
    return _unsafe(_scan_file(path, kind)[0])


def _scan_file(path: Path, kind: FileKind) -> tuple[set[str], bool]:
    if kind is FileKind.TORCH_SAVE:
        try:
            data = _zip_pickle_bytes(path)
        except (StopIteration, zipfile.BadZipFile, OSError, KeyError):
            return set(), False
        # A torch.save archive holds exactly one pickle; tensor payloads live in other entries.
        return _scan_globals(data, max_pickles=1)
    # A legacy torch.save file is five pickles (magic number, protocol, sys info, the object,
    # storage keys) followed by raw tensor bytes, which must not be read as opcodes.
    return _scan_globals(path.read_bytes(), max_pickles=5)


def _zip_pickle_bytes(path: Path) -> bytes:
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
        return archive.read(name)


_SAFE_GLOBAL_PREFIXES = ("torch._utils.", "torch._tensor.", "collections.OrderedDict", "builtins.set")


def _unsafe(found: set[str]) -> list[str]:
    """The globals that torch.load(weights_only=True) would refuse to import."""
    try:
        from torch import _weights_only_unpickler

        unpickler: Any = _weights_only_unpickler  # private and partly untyped
        allowed = set(unpickler._get_allowed_globals()) | set(unpickler._get_user_allowed_globals())
    except (ImportError, AttributeError):  # a torch without the private allowlist: be coarse
        return sorted(g for g in found if not g.startswith(_SAFE_GLOBAL_PREFIXES))
    return sorted(found - allowed)


_STRING_OPCODES = frozenset(
    ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8", "STRING", "BINSTRING", "SHORT_BINSTRING")
)


def _python3_name(module: str, name: str, protocol: int) -> str:
    # Protocol < 3 pickles name Python 2 modules; Python 3's unpickler maps them (fix_imports).
    if protocol < 3:
        import _compat_pickle

        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}"


def _scan_globals(data: bytes, max_pickles: int) -> tuple[set[str], bool]:
    """Globals named by GLOBAL / STACK_GLOBAL opcodes in up to ``max_pickles`` consecutive pickles.

    Returns the globals and whether every pickle read was well formed (ended with STOP).

    STACK_GLOBAL takes its module and name from the stack, where they often arrive from the memo
    (a module named twice is pushed once and fetched again), so string values are tracked through
    PUT / MEMOIZE / GET. This lists globals for the error message only; safety comes from never
    unpickling untrusted files without torch's weights-only unpickler.
    """
    found: set[str] = set()
    offset = 0
    is_well_formed = bool(data)
    for _ in range(max_pickles):
        if offset >= len(data):
            break
        memo: dict[int, str | None] = {}
        pushed: list[str | None] = []
        protocol = 0
        try:
            for opcode, raw_arg, position in pickletools.genops(data[offset:]):
                name, arg = opcode.name, cast(Any, raw_arg)
                if name == "PROTO":
                    protocol = int(arg)
                elif name in _STRING_OPCODES:
                    pushed.append(arg if isinstance(arg, str) else bytes(arg).decode("latin-1"))
                elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[int(arg)] = pushed[-1] if pushed else None
                elif name == "MEMOIZE":
                    memo[len(memo)] = pushed[-1] if pushed else None
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    pushed.append(memo.get(int(arg)))
                elif name in ("GLOBAL", "INST"):
                    module, _, attribute = str(arg).partition(" ")
                    found.add(_python3_name(module, attribute, protocol))
                    pushed.append(None)
                elif name == "STACK_GLOBAL":
                    module_name, attribute_name = (pushed[-2], pushed[-1]) if len(pushed) >= 2 else (None, None)
                    if module_name is not None and attribute_name is not None:
                        found.add(_python3_name(module_name, attribute_name, protocol))
                    pushed.append(None)
                elif name == "STOP":
                    offset += (position or 0) + 1
                    break
                elif name != "FRAME":  # a frame boundary may fall between a module and its name
                    pushed.append(None)
            else:
                is_well_formed = False
                break
        except (ValueError, pickle.UnpicklingError, EOFError, IndexError, UnicodeDecodeError):
            is_well_formed = False
            break
    return found, is_well_formed


def _torch_load(path: Path, map_location: str, trust_pickle: bool, kind: FileKind) -> Any:
    import warnings

    import torch

    try:
        # An open stream, not a path: torch.load hands any path ending in .safetensors to safetensors.
        with path.open("rb") as stream, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the error says enough
            return torch.load(stream, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):
            raise _corrupt(path, error) from error
        found, is_well_formed = _scan_file(path, kind)
        unsafe = _unsafe(found)
        if not trust_pickle and unsafe:
            raise UntrustedPickleError(str(path), unsafe) from None
        if not is_well_formed:
            # torch's restricted unpickler failed on a damaged pickle: never advise unpickling it.
            raise _corrupt(path, error) from error
        if not trust_pickle:
            raise ModelFileError(
                f"model file {path} is a pickle that torch's weights-only loader cannot read "
                f"({_weights_only_reason(error)})",
                "Re-save it with torch.save's default pickle protocol or as safetensors; "
                "if you trust the file, --trust-pickle loads it",
            ) from None
    except Exception as error:
        raise _corrupt(path, error) from error
    with _cwd_importable():
        try:
            with path.open("rb") as stream:
                return torch.load(stream, map_location=map_location, weights_only=False)
        except (ModuleNotFoundError, ImportError) as error:
            module = getattr(error, "name", None) or str(error)
            raise ModelFileError(
                f"{path} needs module {module!r} to unpickle, which cannot be imported",
                "Install the package that defines the model or add its folder to PYTHONPATH",
            ) from error
        except AttributeError as error:
            raise ModelFileError(
                f"{path} needs a class that its module no longer defines ({error})",
                "Use the version of the code the model was saved with",
            ) from error
        except Exception as error:
            raise _corrupt(path, error) from error


def _weights_only_reason(error: BaseException) -> str:
    """torch's own reason, without its advice to retry with weights_only=False."""
    text = str(error).strip()
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
    detail = text.splitlines()[0].strip() if text else ""
    detail = detail.split("(Could this error message be improved?")[0].strip()
    if "weights_only" in detail or len(detail) > 160:
        return ""
    return detail


def _corrupt(path: Path, error: BaseException) -> ModelFileError:
    # torch's own messages often advise weights_only=False; that is wrong advice for a corrupt file.
    detail = _weights_only_reason(error)
    described = f"{type(error).__name__}: {detail}" if detail else type(error).__name__
    return ModelFileError(
        f"model file {path} is corrupt or not a PyTorch checkpoint ({described})",
        "Re-save or re-download it",
    )


@contextmanager
def _cwd_importable() -> Iterator[None]:
    # Let code in the current directory be found, but only for this load, and only after installed
    # packages: a folder named like one (a cloned torchvision/, a PR checkout in CI) must not shadow it.
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def parse_arch_kwargs(text: str | None) -> dict[str, Any]:
    """The --arch-kwargs JSON object as a dict."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ArchError(
            f"--arch-kwargs is not valid JSON ({error.msg} at character {error.pos})",
            """Give a JSON object, e.g. --arch-kwargs '{"num_classes": 10}'""",
        ) from error
    except RecursionError:
        raise ArchError(
            "--arch-kwargs is nested too deeply to read",
            """Give a flat JSON object, e.g. --arch-kwargs '{"num_classes": 10}'""",
        ) from None
    if not isinstance(value, dict):
        raise ArchError(
            f"--arch-kwargs must be a JSON object, not {type(value).__name__}",
            """Give a JSON object, e.g. --arch-kwargs '{"num_classes": 10}'""",
        )
    return value


def resolve_arch(spec: str) -> Callable[..., Any]:
    """The callable named by ``package.module:callable`` or ``path/to/file.py:callable``.

    This imports code the user named, which runs it: that is what --arch is for.
    """
    target, sep, attribute = spec.rpartition(":")
    if not sep or not target or not attribute:
        raise ArchError(
            f"--arch {spec!r} has no ':' between module and callable",
            "Write --arch package.module:callable or --arch path/to/file.py:callable",
        )
    module = _import_arch_module(target, spec)
    obj: Any = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            raise ArchError(
                f"--arch {spec!r}: {target} has no attribute {attribute!r}",
                f"Callables there: {', '.join(public[:12]) or 'none'}",
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ArchError(
            f"--arch {spec!r} names an object of type {type(obj).__name__}, not a callable", "Name a class or function"
        )
    return obj  # type: ignore[no-any-return]


def _import_arch_module(target: str, spec: str) -> Any:
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = Path(target)
        if not path.is_file():
            raise ArchError(f"--arch {spec!r}: file {target} does not exist", "Check the path")
        name = f"bn_inspect_arch_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise ArchError(f"--arch {spec!r}: cannot import {target}", "Name a Python file")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            with _cwd_importable():
                module_spec.loader.exec_module(module)
        except Exception as error:
            sys.modules.pop(name, None)
            raise ArchError(
                f"--arch {spec!r}: importing {target} raised {type(error).__name__}: {error}",
                "Fix the file or name another",
            ) from error
        return module
    try:
        with _cwd_importable():
            return importlib.import_module(target)
    except ModuleNotFoundError as error:
        raise ArchError(
            f"--arch {spec!r}: module {error.name or target!r} cannot be imported",
            "Install it, run from its project folder, or give a file path (path/to/file.py:callable)",
        ) from error
    except Exception as error:
        raise ArchError(
            f"--arch {spec!r}: importing {target} raised {type(error).__name__}: {error}",
            "Fix the module or name another",
        ) from error


def build_arch(spec: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """Call the --arch callable with --arch-kwargs and check that it returns an nn.Module."""
    from torch import nn

    factory = resolve_arch(spec)
    try:
        module = factory(**kwargs)
    except Exception as error:
        raise ArchError(
            f"--arch {spec!r} raised {type(error).__name__} when called: {error}",
            "Check --arch-kwargs against its signature",
        ) from error
    if not isinstance(module, nn.Module):
        raise ArchError(
            f"--arch {spec!r} returned an object of type {type(module).__name__}, not a torch.nn.Module",
            "Name a callable that builds the model",
        )
    return module


def extract_state_dict(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """The tensors of a state_dict or checkpoint dict, prefixes stripped; and whether it was nested."""
    import torch

    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        validate_state_dict(obj, path)
        return strip_prefixes(obj), False
    if isinstance(obj, Mapping):
        for key in _STATE_DICT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                validate_state_dict(inner, path)
                return strip_prefixes(inner), True
        keys = ", ".join(repr(k) for k in list(obj)[:10])
        raise ModelFileError(
            f"{path} is a dict without a state_dict inside (top-level keys: {keys})",
            f"Save model.state_dict(), or a dict with it under one of {', '.join(_STATE_DICT_KEYS)}",
        )
    raise ModelFileError(
        f"{path} holds an object of type {type(obj).__name__}, not a model or state_dict",
        "Save the model, its state_dict, or a checkpoint dict",
    )


def validate_state_dict(state_dict: Mapping[Any, Any], path: Path) -> None:
    """Refuse a state_dict that ``load_state_dict`` or bn-inspect's reading would choke on or misread.

    A file's dict may hold anything torch's weights-only loader builds: keys that are not strings,
    a ``_metadata`` whose versions are not integers (BatchNorm's ``_load_from_state_dict`` compares
    them with ``<``), sparse or meta tensors (``load_state_dict`` fails to copy them), complex
    tensors (it silently drops their imaginary part into a real buffer) and a non-finite
    ``num_batches_tracked`` (it becomes -2**63 in the int64 buffer).

    Raises:
        ModelFileError: naming the file and the first offending key.
    """
    import torch

    fix = "Re-save the model's state_dict() with torch.save or safetensors"
    for key, tensor in state_dict.items():
        if not isinstance(key, str):
            raise ModelFileError(f"{path}: the state_dict has a key {_shown(key)} of type {type(key).__name__}", fix)
        if tensor.layout != torch.strided:
            raise ModelFileError(f"{path}: state_dict entry {key} is a {tensor.layout} tensor, not a dense one", fix)
        if tensor.is_meta:
            raise ModelFileError(f"{path}: state_dict entry {key} is on the meta device and holds no values", fix)
        if tensor.is_complex():
            raise ModelFileError(f"{path}: state_dict entry {key} is complex ({tensor.dtype}), not real", fix)
        if key.rpartition(".")[2] == "num_batches_tracked" and not bool(torch.isfinite(tensor).all()):
            raise ModelFileError(f"{path}: state_dict entry {key} is not a finite count", fix)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is None:
        return
    if not isinstance(metadata, Mapping):
        raise ModelFileError(f"{path}: the state_dict's _metadata is a {type(metadata).__name__}, not a dict", fix)
    for prefix, local in metadata.items():
        if not isinstance(prefix, str) or not isinstance(local, Mapping):
            raise ModelFileError(f"{path}: the state_dict's _metadata entry {_shown(prefix)} is not a dict", fix)
        version = local.get("version")
        if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
            raise ModelFileError(
                f"{path}: the state_dict's _metadata gives module {prefix!r} the version {_shown(version)}, "
                "not an integer",
                fix,
            )


def _shown(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: a key from a hostile file may be any size."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop `module.` (DataParallel/DDP) and `_orig_mod.` (torch.compile) prefixes shared by all keys.

    The ``_metadata`` torch.save keeps on a state_dict (each module's version, which some modules'
    ``_load_from_state_dict`` needs, torchvision's MNASNet among them) is kept, its keys stripped alike.
    """
    stripped: list[str] = []
    keys = list(state_dict)
    changed = True
    while changed and keys:
        changed = False
        for prefix in _STRIPPED_PREFIXES:
            if all(key.startswith(prefix) for key in keys):
                keys = [key[len(prefix) :] for key in keys]
                stripped.append(prefix)
                changed = True
    result: dict[str, torch.Tensor] = OrderedDict(zip(keys, state_dict.values(), strict=True))
    metadata = getattr(state_dict, "_metadata", None)
    if isinstance(metadata, Mapping):
        kept = OrderedDict()
        for name, value in metadata.items():
            for prefix in stripped:
                name = name[len(prefix) :] if name.startswith(prefix) else "" if name == prefix[:-1] else name
            kept[name] = value
        result._metadata = kept  # type: ignore[attr-defined]
    return result


def load_state_into(module: nn.Module, state_dict: dict[str, torch.Tensor], spec: str) -> None:
    """Load strictly, listing missing, unexpected and misshapen keys by name when they do not fit."""
    from bn_inspect.model.layers import is_uninitialized

    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshapen = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and not is_uninitialized(v) and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if misshapen:
        problems.append(f"wrong shapes (file vs model): {_names(misshapen)}")
    if problems:
        raise StateDictMismatchError(
            f"the state_dict does not fit --arch {spec}: {'; '.join(problems)}",
            "Check --arch and --arch-kwargs against the model that was saved",
        )
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise StateDictMismatchError(
            f"the state_dict does not fit --arch {spec}: {str(error).splitlines()[-1].strip()}",
            "Check --arch and --arch-kwargs against the model that was saved",
        ) from error


def _names(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


@dataclass(frozen=True)
class Weights:
    """A file that holds only tensors (a state_dict, checkpoint dict or safetensors), prefixes stripped."""

    state_dict: dict[str, torch.Tensor]
    source: str
    format: str


def read_model_file(path: Path, *, trust_pickle: bool = False, map_location: str = "cpu") -> LoadedModel | Weights:
    """A whole model (TorchScript, torch.export, pickle) or the weights a file holds, loaded safely.

    Raises:
        ModelFileError, UntrustedPickleError.
    """
    kind = detect_file_kind(path)
    if kind is FileKind.TORCHSCRIPT:
        return LoadedModel(_load_torchscript(path, map_location, trust_pickle), str(path), "torchscript", None)
    if kind is FileKind.TORCH_EXPORT:
        return LoadedModel(_load_exported(path, map_location, trust_pickle), str(path), "torch.export", None)
    if kind is FileKind.SAFETENSORS:
        tensors = _load_safetensors(path, map_location)
        validate_state_dict(tensors, path)
        return Weights(tensors, str(path), "safetensors")
    obj = _torch_load(path, map_location, trust_pickle, kind)
    from torch import nn

    if isinstance(obj, nn.Module):
        return LoadedModel(obj, str(path), "pickle", None)
    if isinstance(obj, Mapping):
        for key in _STATE_DICT_KEYS:
            if isinstance(obj.get(key), nn.Module):
                return LoadedModel(obj[key], str(path), "pickle", None)
    state_dict, nested = extract_state_dict(obj, path)
    return Weights(state_dict, str(path), "checkpoint" if nested else "state_dict")


def load_model(
    path: Path | None,
    *,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    map_location: str = "cpu",
) -> LoadedModel:
    """Load a model file (or build --arch alone) without running code from the file by default.

    Args:
        path: the model file, or None to inspect a freshly built --arch.
        arch: ``package.module:callable`` or ``path/to/file.py:callable`` that builds the model.
        arch_kwargs: keyword arguments for the arch callable.
        trust_pickle: allow unpickling arbitrary classes, which runs code from the file.
        map_location: device to load tensors onto.

    Raises:
        ModelFileError, UntrustedPickleError, ArchError, StateDictMismatchError.
    """
    kwargs = dict(arch_kwargs or {})
    if path is None:
        if arch is None:
            raise ArchError("no model given", "Give a MODEL file, or --arch to inspect a fresh architecture")
        return LoadedModel(build_arch(arch, kwargs), "<arch>", "arch", arch)
    content = read_model_file(path, trust_pickle=trust_pickle, map_location=map_location)
    if isinstance(content, LoadedModel):
        return content
    if arch is None:
        raise ArchError(
            f"{path} holds only weights ({content.format}), not the model's code",
            "Pass --arch package.module:callable (or path/to/file.py:callable) that builds the model",
        )
    module = build_arch(arch, kwargs)
    load_state_into(module, content.state_dict, arch)
    return LoadedModel(module, str(path), content.format, arch)


def _load_torchscript(path: Path, map_location: str, trust_pickle: bool) -> nn.Module:
    import warnings

    import torch

    if not trust_pickle:
        _check_torchscript_archive(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module: nn.Module = torch.jit.load(str(path), map_location=map_location)  # type: ignore[no-untyped-call]
        _check_storages(module)
    except Exception as error:
        raise _corrupt(path, error) from error
    return module


def _check_storages(module: nn.Module) -> None:
    """Raise if a tensor's storage is smaller than the tensor: torch.jit.load does not check a
    record's size against its tensors (torch.load does), and reading past it crashes the process."""
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.numel() == 0:
            continue
        storage = tensor.untyped_storage()
        extent = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True))
        needed = (tensor.storage_offset() + extent) * tensor.element_size()
        if storage.nbytes() < needed or storage.data_ptr() == 0:
            raise ValueError(f"a tensor needs {needed} bytes but its data record holds {storage.nbytes()}")


def _load_exported(path: Path, map_location: str, trust_pickle: bool) -> nn.Module:
    """``torch.export.load(path).module()``: a GraphModule whose batch norms are aten calls.

    torch loads a checked copy of the archive (see ``_checked_export_archive``), never the file itself.
    """
    import warnings

    import torch

    archive = _checked_export_archive(path, trust_pickle)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.load(archive)
            module = program.module()
    except Exception as error:
        raise _corrupt(path, error) from error
    if map_location != "cpu":
        try:
            module = module.to(map_location)
        except Exception as error:
            raise ModelFileError(
                f"{path}: the exported program cannot move to {map_location} ({type(error).__name__})",
                "Export it on that device, or use --device cpu",
            ) from error
    return module


def _load_safetensors(path: Path, map_location: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return strip_prefixes(load_file(str(path), device=map_location))
    except Exception as error:
        raise _corrupt(path, error) from error


# Operators that reach files, processes or the network. TorchScript code and exported graphs may call
# any registered operator: over two thousand in torch alone, nearly all pure tensor math, and more with
# each release and each extension imported. An allow-list would have to follow every torch release, so
# these few are denied instead: aten::from_file maps (and with shared=True creates or overwrites) any
# file, aten::save writes one, debugprims::load_tensor reads one, and the distributed namespaces talk
# to other processes over the network.
_DENIED_OPERATORS = frozenset(("aten::from_file", "aten::save", "debugprims::load_tensor"))
_DENIED_NAMESPACES = frozenset(("c10d", "_c10d_functional", "_c10d_functional_autograd", "_dtensor", "symm_mem"))

# What an exported graph node may call: operators, and the Python arithmetic that symbolic shapes use.
# Any other target is a Python function that torch.export.load looks up by name under torch.
_EXPORT_TARGET_PREFIXES = ("torch.ops.", "_operator.", "math.", "torch.sym_", "torch._sym_")

# Constants that torch.export.load restores by unpickling: opaque objects with pickle.loads, custom
# objects with TorchScript classes' __setstate__.
_PICKLED_CONSTANT_PREFIXES = ("opaque_obj_", "custom_obj_")


def _denied_operator(dotted_name: str) -> str | None:
    """The denied operator that ``torch.from_file``, ``ops.c10d.barrier`` or ``torch.classes.x.Y`` names."""
    parts = dotted_name.split(".")
    if "from_file" in parts:
        return "aten::from_file"
    if ".torch.classes." in f".{dotted_name}.":
        return "torch.classes (custom C++ classes)"
    if parts[0] == "torch":
        parts = parts[1:]
        if len(parts) == 1:
            parts = ["ops", "aten", parts[0]]
    if len(parts) >= 3 and parts[0] == "ops":
        operator = f"{parts[1]}::{parts[2]}"
        if operator in _DENIED_OPERATORS or parts[1] in _DENIED_NAMESPACES:
            return operator
    return None


def _dotted_names(source: str) -> Iterator[str]:
    """Every dotted name in Python source, read with its tokenizer so that spaces, line breaks and
    comments between the parts (``torch . from_file``) cannot hide one."""
    parts: list[str] = []
    expects_name = False
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type in (tokenize.NL, tokenize.COMMENT):
            continue
        if token.type == tokenize.NAME and (expects_name or not parts):
            parts.append(token.string)
            expects_name = False
            continue
        if token.type == tokenize.OP and token.string == "." and parts and not expects_name:
            expects_name = True
            continue
        if parts:
            yield ".".join(parts)
        parts = [token.string] if token.type == tokenize.NAME else []
        expects_name = False
    if parts:
        yield ".".join(parts)


def _check_torchscript_archive(path: Path) -> None:
    """Refuse a TorchScript archive whose code calls an operator that reaches files, processes or the
    network (run by ``__setstate__`` on load or by ``forward``), or whose pickles restore custom C++ classes.

    Raises:
        UntrustedArchiveError, ModelFileError.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                member = info.filename.partition("/")[2]
                if member.startswith("code/") and member.endswith(".py"):
                    _check_script_source(path, member, archive.read(info).decode("utf-8", errors="replace"))
                elif member.endswith(".pkl"):
                    custom = sorted(g for g in _scan_globals(archive.read(info), 1)[0] if ".torch.classes." in f".{g}")
                    if custom:
                        raise UntrustedArchiveError(
                            str(path),
                            f"restores {', '.join(custom)} in {member}: custom C++ classes, whose code runs when loaded",
                        )
    except (OSError, zipfile.BadZipFile) as error:
        raise _corrupt(path, error) from error


def _check_script_source(path: Path, member: str, source: str) -> None:
    try:
        names = list(_dotted_names(source))
    except (tokenize.TokenError, SyntaxError) as error:
        raise ModelFileError(
            f"model file {path} is corrupt: its TorchScript code {member} cannot be read ({type(error).__name__})",
            "Re-save or re-download it",
        ) from error
    for name in names:
        operator = _denied_operator(name)
        if operator is not None:
            raise UntrustedArchiveError(
                str(path),
                f"calls {operator} in its TorchScript code {member}, an operator that reaches files, "
                "processes or the network",
            )


def _checked_export_archive(path: Path, trust_pickle: bool) -> io.BytesIO:
    """A copy of the torch.export archive at ``path`` for torch.export.load, its sample inputs emptied.

    torch.export.load unpickles with weights_only=False in several places: the sample inputs (retried
    unsafely when the safe load fails), weights and tensor constants marked ``use_pickle``, opaque and
    custom object constants, and the legacy one-file weights and constants; it also loads AOTInductor
    native libraries. bn-inspect never needs the sample inputs, so torch never sees them. Without
    ``trust_pickle``, every member is checked first, and the archive is refused when a pickle imports a
    global outside torch's weights-only allow-list, when torch would unpickle a member or load native
    code, or when a graph node calls anything but an operator, or an operator that reaches files,
    processes or the network.

    Raises:
        UntrustedPickleError, UntrustedArchiveError, ModelFileError.
    """
    try:
        with zipfile.ZipFile(path) as source:
            entries = [(info, source.read(info)) for info in source.infolist()]
    except (OSError, zipfile.BadZipFile) as error:
        raise _corrupt(path, error) from error
    root = entries[0][0].filename.partition("/")[0]
    for info, _ in entries:
        # torch's reader fails on such an entry and falls back to the pre-2.7 format, whose top-level
        # pickles it retries with weights_only=False.
        if not info.filename.startswith(f"{root}/"):
            raise ModelFileError(
                f"model file {path} is corrupt: entry {info.filename} is outside the archive's folder {root}/",
                "Re-save it with torch.export.save",
            )
    if not trust_pickle:
        # Pickles first: the globals a payload imports say more than which entry torch would unpickle.
        for info, data in entries:
            unsafe = _unsafe(_member_globals(data))
            if unsafe:
                raise UntrustedPickleError(f"{path} (entry {info.filename.partition('/')[2]})", unsafe)
        for info, data in entries:
            _check_export_member(path, info.filename.partition("/")[2], data)
    copy = io.BytesIO()
    with zipfile.ZipFile(copy, "w") as target:
        for info, data in entries:
            # torch reads an empty record as "no sample inputs".
            target.writestr(info, b"" if info.filename.partition("/")[2].startswith("data/sample_inputs/") else data)
    copy.seek(0)
    return copy


def _check_export_member(path: Path, member: str, data: bytes) -> None:
    if member.startswith("data/aotinductor/"):
        raise UntrustedArchiveError(str(path), f"holds AOTInductor native code ({member}), which runs when loaded")
    if member.startswith(("data/weights/", "data/constants/")):
        if member.endswith(".pt"):
            raise UntrustedArchiveError(
                str(path),
                f"stores its weights or constants as one pickle ({member}, torch.export's legacy format), "
                "and loading it would run code from the file; re-save it with a current torch.export.save",
            )
        if member.endswith("_config.json"):
            _check_payload_config(path, member, data)
    elif member.startswith("models/") and member.endswith(".json"):
        _check_graph_targets(path, member, data)


def _member_globals(data: bytes) -> set[str]:
    """The globals named by a pickle member, or by the pickles of a torch.save archive member.

    Only well-formed pickles count, so that raw tensor bytes that happen to start like a pickle are
    not read as one. The scan only names globals for the message: every member torch would unpickle
    is refused or emptied whatever the scan finds.
    """
    if data[:2] == b"PK":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                pickles = [archive.read(name) for name in archive.namelist() if name.endswith(".pkl")]
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError):
            return set()
    else:
        pickles = [data] if data[:1] == b"\x80" else []
    found: set[str] = set()
    for pickled in pickles:
        names, is_well_formed = _scan_globals(pickled, max_pickles=1)
        if is_well_formed:
            found |= names
    return found


def _read_json(path: Path, member: str, data: bytes) -> Any:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise ModelFileError(
            f"model file {path} is corrupt: {member} is not valid JSON", "Re-save or re-download it"
        ) from error


def _check_payload_config(path: Path, member: str, data: bytes) -> None:
    config = _read_json(path, member, data)
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict) or not all(isinstance(meta, dict) for meta in entries.values()):
        raise ModelFileError(
            f"model file {path} is corrupt: {member} is not a torch.export payload config", "Re-save or re-download it"
        )
    for name, meta in entries.items():
        path_name = str(meta.get("path_name", ""))
        if meta.get("use_pickle") or path_name.startswith(_PICKLED_CONSTANT_PREFIXES):
            raise UntrustedArchiveError(
                str(path),
                f"stores {name!r} as a pickle ({path_name}, listed in {member}), "
                "and loading it would run code from the file",
            )


def _node_targets(program: Any) -> Iterator[str]:
    """The target of every node in a serialized exported program, subgraphs included.

    Walked with a stack, not recursion: the JSON's depth is the file's to choose.
    """
    pending = [program]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            target = value.get("target")
            if isinstance(target, str) and "inputs" in value and "outputs" in value:
                yield target
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)


def _check_graph_targets(path: Path, member: str, data: bytes) -> None:
    for target in _node_targets(_read_json(path, member, data)):
        if not target.startswith(_EXPORT_TARGET_PREFIXES):
            raise UntrustedArchiveError(
                str(path), f"has a graph node in {member} that calls {target}, which is not a torch operator"
            )
        operator = _denied_operator(target)
        if operator is not None:
            raise UntrustedArchiveError(
                str(path),
                f"has a graph node in {member} that calls {operator}, an operator that reaches files, "
                "processes or the network",
            )
