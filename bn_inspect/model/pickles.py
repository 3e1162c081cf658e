"""Pickles: list the globals a pickle would import without running it, and load under torch's weights-only unpickler."""

from __future__ import annotations

import pickle
import pickletools
import zipfile
from contextlib import AbstractContextManager
from typing import Any, cast

from bn_inspect.boundary.reading import OpenedInput
from bn_inspect.errors import (
    ModelFileError,
    UntrustedPickleError,
)
from bn_inspect.model.arch import cwd_importable
from bn_inspect.model.files import FileKind, corrupt_file_error, weights_only_reason


def _scan_file(opened: OpenedInput, kind: FileKind) -> tuple[set[str], bool]:
    if kind is FileKind.TORCH_SAVE:
        try:
            data = _zip_pickle_bytes(opened)
        except (StopIteration, zipfile.BadZipFile, OSError, KeyError):
            return set(), False
        # A torch.save archive holds exactly one pickle; tensor payloads live in other entries.
        return scan_globals(data, max_pickles=1)
    # A legacy torch.save file is five pickles (magic number, protocol, sys info, the object,
    # storage keys) followed by raw tensor bytes, which must not be read as opcodes.
    return scan_globals(opened.read_bytes(), max_pickles=5)


def _zip_pickle_bytes(opened: OpenedInput) -> bytes:
    with opened.stream() as stream, zipfile.ZipFile(stream) as archive:
        name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
        return archive.read(name)


_SAFE_GLOBAL_PREFIXES = ("torch._utils.", "torch._tensor.", "collections.OrderedDict", "builtins.set")


def unsafe_globals(found: set[str]) -> list[str]:
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


def scan_globals(data: bytes, max_pickles: int) -> tuple[set[str], bool]:
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


def plain_data_globals() -> AbstractContextManager[None]:
    """torch's weights-only unpickler, with the plain data types that checkpoints keep beside their weights allowed.

    A Lightning checkpoint's ``hyper_parameters`` hold what the training script was given, paths
    among them: a pathlib path rebuilds from its string parts and reads nothing. Nothing that runs
    code or reaches a file joins this list.
    """
    import pathlib

    import torch

    return cast(
        AbstractContextManager[None],
        torch.serialization.safe_globals([pathlib.PosixPath, pathlib.PurePosixPath, pathlib.PureWindowsPath]),
    )


def torch_load(opened: OpenedInput, map_location: str, trust_pickle: bool, kind: FileKind) -> Any:
    """``torch.load`` with the weights-only unpickler; a full unpickle only when ``trust_pickle``.

    Raises:
        UntrustedPickleError: the pickle names globals the weights-only unpickler refuses.
        ModelFileError: the file is damaged, or needs code that cannot be imported.
    """
    import warnings

    import torch

    path = opened.path
    try:
        # An open stream, not a path: torch.load hands any path ending in .safetensors to safetensors.
        with opened.stream() as stream, warnings.catch_warnings(), plain_data_globals():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the error says enough
            return torch.load(stream, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):
            raise corrupt_file_error(path, error) from error
        found, is_well_formed = _scan_file(opened, kind)
        with plain_data_globals():
            unsafe = unsafe_globals(found)
        if not trust_pickle and unsafe:
            raise UntrustedPickleError(str(path), unsafe) from None
        if not is_well_formed:
            # torch's restricted unpickler failed on a damaged pickle: never advise unpickling it.
            raise corrupt_file_error(path, error) from error
        if not trust_pickle:
            raise ModelFileError(
                f"model file {path} is a pickle that torch's weights-only loader cannot read "
                f"({weights_only_reason(error)})",
                "Re-save it with torch.save's default pickle protocol or as safetensors; "
                "if you trust the file, --trust-pickle loads it",
            ) from None
    except Exception as error:
        raise corrupt_file_error(path, error) from error
    with cwd_importable():
        try:
            with opened.stream() as stream:
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
            raise corrupt_file_error(path, error) from error
