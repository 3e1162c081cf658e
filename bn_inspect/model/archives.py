"""TorchScript, torch.export and safetensors files: checked for code that reaches files or unpickles, then loaded."""

from __future__ import annotations

import io
import json
import tokenize
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bn_inspect.boundary.reading import OpenedInput
from bn_inspect.errors import (
    ModelFileError,
    UntrustedArchiveError,
    UntrustedPickleError,
)
from bn_inspect.model.files import corrupt_file_error, open_model_file
from bn_inspect.model.pickles import scan_globals, unsafe_globals
from bn_inspect.model.state_dict import strip_prefixes

if TYPE_CHECKING:
    import torch
    from torch import nn


def load_torchscript(opened: OpenedInput, map_location: str, trust_pickle: bool) -> nn.Module:
    """``torch.jit.load`` after the archive's code was checked for operators that reach files (unless trusted)."""
    import warnings

    import torch

    path = opened.path
    if not trust_pickle:
        _check_torchscript_archive(opened)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The checked descriptor's own path: the archive torch reads is the one checked above.
            module: nn.Module = torch.jit.load(opened.library_path(), map_location=map_location)  # type: ignore[no-untyped-call]
        _check_storages(module)
    except Exception as error:
        raise corrupt_file_error(path, error) from error
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


def load_exported(opened: OpenedInput, map_location: str, trust_pickle: bool) -> nn.Module:
    """``torch.export.load(path).module()``: a GraphModule whose batch norms are aten calls.

    torch loads a checked copy of the archive (see ``_checked_export_archive``), never the file itself.
    """
    path = opened.path
    program = exported_program(opened, trust_pickle)
    try:
        module = program.module()
    except Exception as error:
        raise corrupt_file_error(path, error) from error
    if map_location != "cpu":
        try:
            module = module.to(map_location)
        except Exception as error:
            raise ModelFileError(
                f"{path}: the exported program cannot move to {map_location} ({type(error).__name__})",
                "Export it on that device, or use --device cpu",
            ) from error
    return module


def load_exported_program(path: Path, trust_pickle: bool) -> torch.export.ExportedProgram:
    """``exported_program`` of the archive at ``path``, opened through the model file's opener.

    Raises:
        UntrustedPickleError, UntrustedArchiveError, ModelFileError.
    """
    with open_model_file(path) as opened:
        return exported_program(opened, trust_pickle)


def exported_program(opened: OpenedInput, trust_pickle: bool) -> torch.export.ExportedProgram:
    """``torch.export.load`` of a checked copy of the opened archive (see ``_checked_export_archive``).

    Raises:
        UntrustedPickleError, UntrustedArchiveError, ModelFileError.
    """
    import warnings

    import torch

    archive = _checked_export_archive(opened, trust_pickle)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.load(archive)
    except Exception as error:
        raise corrupt_file_error(opened.path, error) from error


def load_safetensors(opened: OpenedInput, map_location: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, prefixes stripped."""
    from safetensors.torch import load_file

    try:
        return strip_prefixes(load_file(opened.library_path(), device=map_location))
    except Exception as error:
        raise corrupt_file_error(opened.path, error) from error


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


def _check_torchscript_archive(opened: OpenedInput) -> None:
    """Refuse a TorchScript archive whose code calls an operator that reaches files, processes or the
    network (run by ``__setstate__`` on load or by ``forward``), or whose pickles restore custom C++ classes.

    Raises:
        UntrustedArchiveError, ModelFileError.
    """
    path = opened.path
    try:
        with opened.stream() as stream, zipfile.ZipFile(stream) as archive:
            for info in archive.infolist():
                member = info.filename.partition("/")[2]
                if member.startswith("code/") and member.endswith(".py"):
                    _check_script_source(path, member, archive.read(info).decode("utf-8", errors="replace"))
                elif member.endswith(".pkl"):
                    custom = sorted(g for g in scan_globals(archive.read(info), 1)[0] if ".torch.classes." in f".{g}")
                    if custom:
                        raise UntrustedArchiveError(
                            str(path),
                            f"restores {', '.join(custom)} in {member}: custom C++ classes, whose code runs when loaded",
                        )
    except (OSError, zipfile.BadZipFile) as error:
        raise corrupt_file_error(path, error) from error


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


def _checked_export_archive(opened: OpenedInput, trust_pickle: bool) -> io.BytesIO:
    """A copy of the opened torch.export archive for torch.export.load, its sample inputs emptied.

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
    path = opened.path
    try:
        with opened.stream() as stream, zipfile.ZipFile(stream) as source:
            entries = [(info, source.read(info)) for info in source.infolist()]
    except (OSError, zipfile.BadZipFile) as error:
        raise corrupt_file_error(path, error) from error
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
            unsafe = unsafe_globals(_member_globals(data))
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
        names, is_well_formed = scan_globals(pickled, max_pickles=1)
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


def load_safetensors_bytes(opened: OpenedInput, map_location: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file read from its bytes (safetensors checks every header offset against them)."""
    from safetensors.torch import load

    try:
        tensors = load(opened.read_bytes())
        return {key: tensor.to(map_location) for key, tensor in tensors.items()}
    except Exception as error:
        raise corrupt_file_error(opened.path, error) from error
