"""Model file or --arch spec -> nn.Module, safely: no code from the file runs unless trusted."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bn_inspect.boundary.reading import OpenedInput
from bn_inspect.errors import ArchError
from bn_inspect.model.arch import build_arch, declare_source
from bn_inspect.model.archives import load_exported, load_safetensors, load_torchscript
from bn_inspect.model.files import FileKind, file_kind, file_sha256, open_model_file
from bn_inspect.model.hub import is_model_folder
from bn_inspect.model.hub_models import load_model_folder
from bn_inspect.model.pickles import torch_load
from bn_inspect.model.state_dict import (
    STATE_DICT_KEYS,
    extract_state_dict,
    load_state_into,
    owner_prefix,
    under_prefix,
    validate_state_dict,
)

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to inspect and a description of where it came from.

    ``format`` is one of: state_dict, checkpoint, safetensors, torchscript, torch.export, pickle,
    onnx, arch, huggingface, timm. ``sha256`` is the hex SHA-256 of the model file's bytes (of the weights
    file for a model folder; None for a fresh --arch). ``notes`` are what a user should know about
    how it was loaded (a prefix stripped from the file's keys). ``sample_shape`` is the input one
    sample takes where the file says so (a model folder's config), else None.
    """

    module: nn.Module
    source: str
    format: str
    arch: str | None
    sha256: str | None = None
    notes: tuple[str, ...] = ()
    sample_shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Weights:
    """A file that holds only tensors (a state_dict, checkpoint dict or safetensors), prefixes stripped."""

    state_dict: dict[str, torch.Tensor]
    source: str
    format: str
    sha256: str | None = None


def read_model_file(
    path: Path, *, trust_pickle: bool = False, map_location: str = "cpu", trust_remote_code: bool = False
) -> LoadedModel | Weights:
    """A whole model (TorchScript, torch.export, pickle, a model folder) or the weights a file holds, loaded safely.

    A folder is a Hugging Face or timm model folder (config.json and its weights, docs/formats.md):
    built with transformers or timm, its own code (``auto_map``) run only with ``trust_remote_code``.

    Raises:
        ModelFileError, UntrustedPickleError, RemoteCodeError, StateDictMismatchError.
    """
    if is_model_folder(path):
        folder = load_model_folder(Path(path), trust_remote_code=trust_remote_code, map_location=map_location)
        return LoadedModel(
            folder.module, str(path), folder.format, None, folder.sha256, folder.notes, folder.sample_shape
        )
    # One open for every step: what is detected, hashed and loaded is the one checked file.
    with open_model_file(path) as opened:
        return _read_opened(opened, trust_pickle, map_location)


def _read_opened(opened: OpenedInput, trust_pickle: bool, map_location: str) -> LoadedModel | Weights:
    path = opened.path
    kind = file_kind(opened)
    # Hashed before loading: a report names the bytes it judged, for comparing reports later.
    digest = file_sha256(opened)
    if kind is FileKind.TORCHSCRIPT:
        return LoadedModel(load_torchscript(opened, map_location, trust_pickle), str(path), "torchscript", None, digest)
    if kind is FileKind.TORCH_EXPORT:
        return LoadedModel(load_exported(opened, map_location, trust_pickle), str(path), "torch.export", None, digest)
    if kind is FileKind.ONNX:
        # Imported here only: onnx and onnxruntime are an optional extra, needed for ONNX files alone.
        from bn_inspect.model.onnx_module import load_onnx

        return LoadedModel(load_onnx(opened), str(path), "onnx", None, digest)
    if kind is FileKind.SAFETENSORS:
        tensors = load_safetensors(opened, map_location)
        validate_state_dict(tensors, path)
        return Weights(tensors, str(path), "safetensors", digest)
    obj = torch_load(opened, map_location, trust_pickle, kind)
    from torch import nn

    if isinstance(obj, nn.Module):
        return LoadedModel(obj, str(path), "pickle", None, digest)
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            if isinstance(obj.get(key), nn.Module):
                return LoadedModel(obj[key], str(path), "pickle", None, digest)
    state_dict, nested = extract_state_dict(obj, path)
    return Weights(state_dict, str(path), "checkpoint" if nested else "state_dict", digest)


def load_model(
    path: Path | None,
    *,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    map_location: str = "cpu",
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a model file (or build --arch alone) without running code from the file by default.

    Args:
        path: the model file, or None to inspect a freshly built --arch.
        arch: ``package.module:callable`` or ``path/to/file.py:callable`` that builds the model.
        arch_kwargs: keyword arguments for the arch callable.
        trust_pickle: allow unpickling arbitrary classes, which runs code from the file.
        map_location: device to load tensors onto.
        trust_remote_code: for a model folder whose config names its own code (``auto_map``),
            import and run that code.

    Raises:
        ModelFileError, UntrustedPickleError, RemoteCodeError, ArchError, StateDictMismatchError.
    """
    kwargs = dict(arch_kwargs or {})
    if arch is not None:
        declare_source(arch, "--arch")
    if path is None:
        if arch is None:
            raise ArchError("no model given", "Give a MODEL file, or --arch to inspect a fresh architecture")
        return LoadedModel(build_arch(arch, kwargs), "<arch>", "arch", arch)
    content = read_model_file(
        path, trust_pickle=trust_pickle, map_location=map_location, trust_remote_code=trust_remote_code
    )
    if isinstance(content, LoadedModel):
        return content
    if arch is None:
        raise ArchError(
            f"{path} holds only weights ({content.format}), not the model's code",
            "Pass --arch package.module:callable (or path/to/file.py:callable) that builds the model; "
            "`bn-inspect check FILE --no-data` checks its stored statistics without one",
        )
    module = build_arch(arch, kwargs)
    notes = load_weights_into(module, content, arch)
    return LoadedModel(module, str(path), content.format, arch, content.sha256, notes)


def load_weights_into(module: nn.Module, weights: Weights, arch: str) -> tuple[str, ...]:
    """Load a file's weights into the --arch module, the owner's prefix stripped where that makes them fit.

    Returns:
        The notes for the user: which prefix was stripped, if one was.

    Raises:
        StateDictMismatchError: the weights do not fit, with or without a prefix.
    """
    state_dict = weights.state_dict
    prefix = owner_prefix(list(state_dict), list(module.state_dict()))
    if prefix is None:
        load_state_into(module, state_dict, arch)
        return ()
    kept = under_prefix(state_dict, prefix)
    load_state_into(module, kept, arch)
    left_out = len(state_dict) - len(kept)
    others = f"; {left_out} entries outside it are left out" if left_out else ""
    return (
        f"note: the weights that fit --arch {arch} are under the prefix {prefix!r} in {weights.source} "
        f"(a LightningModule keeps its network under the attribute that holds it), which was stripped{others}.",
    )
