"""State dicts: find them in checkpoints, refuse unusable tensors, strip wrapper prefixes, load into --arch."""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bn_inspect.errors import (
    ModelFileError,
    StateDictMismatchError,
)

if TYPE_CHECKING:
    import torch
    from torch import nn


# Checkpoint dicts keep the weights under one of these keys (PyTorch Lightning, timm, torchvision
# references, and most training scripts).
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "module", "weights", "ema")


_STRIPPED_PREFIXES = ("module.", "_orig_mod.")


def extract_state_dict(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """The tensors of a state_dict or checkpoint dict, prefixes stripped; and whether it was nested."""
    import torch

    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        validate_state_dict(obj, path)
        return strip_prefixes(obj), False
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                validate_state_dict(inner, path)
                return strip_prefixes(inner), True
        keys = ", ".join(repr(k) for k in list(obj)[:10])
        raise ModelFileError(
            f"{path} is a dict without a state_dict inside (top-level keys: {keys})",
            f"Save model.state_dict(), or a dict with it under one of {', '.join(STATE_DICT_KEYS)}",
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


def owner_prefix(file_keys: list[str], module_keys: list[str]) -> str | None:
    """The prefix that, stripped from the file's keys, makes them cover the module's; None if none is needed.

    A LightningModule saves its network under the attribute that holds it (``model.conv.weight``
    for ``self.model``), next to the state of other attributes (a loss's weights, metrics). The
    shortest dotted prefix whose stripped keys include every key of the --arch module is the one;
    keys outside it belong to other attributes. None when the keys fit as they are, or no prefix
    makes them fit.
    """
    wanted = set(module_keys)
    if not wanted or wanted <= set(file_keys):
        return None
    # Only a prefix that some file key carries in front of the module's first key can work.
    first = module_keys[0]
    candidates = sorted({key[: -len(first)] for key in file_keys if key.endswith("." + first)}, key=len)
    for prefix in candidates:
        if wanted <= {key[len(prefix) :] for key in file_keys if key.startswith(prefix)}:
            return prefix
    return None


def under_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix``, the prefix stripped (``_metadata`` kept alike)."""
    result: dict[str, torch.Tensor] = OrderedDict(
        (key[len(prefix) :], value) for key, value in state_dict.items() if key.startswith(prefix)
    )
    metadata = getattr(state_dict, "_metadata", None)
    if isinstance(metadata, Mapping):
        owner = prefix[:-1]
        result._metadata = OrderedDict(  # type: ignore[attr-defined]
            ("" if name == owner else name[len(prefix) :], value)
            for name, value in metadata.items()
            if name == owner or name.startswith(prefix)
        )
    return result


def load_state_into(
    module: nn.Module,
    state_dict: dict[str, torch.Tensor],
    spec: str,
    *,
    target: str | None = None,
    fix: str = "Check --arch and --arch-kwargs against the model that was saved",
) -> None:
    """Load as ``module.load_state_dict`` does, refusing what PyTorch reports as not fitting.

    Every module's own ``_load_from_state_dict`` and load hooks decide what fits, as in PyTorch:
    torchvision's FrozenBatchNorm2d drops ``num_batches_tracked``, lazy modules take their shapes
    from the file. The missing and unexpected keys are the ones ``load_state_dict`` reports (after
    its post-hooks), the wrong shapes its size mismatches; the module is left partly loaded on
    failure, which is harmless because --arch has just built it.

    The module's floating tensors first take the dtypes the file saved (keep_saved_dtypes), so a
    checkpoint saved after ``model.half()`` is inspected in float16, as the same model pickled is.

    ``target`` names the model in the error (``--arch spec`` unless given), ``fix`` says what to check.

    Raises:
        StateDictMismatchError: listing the missing, unexpected and misshapen keys by name.
    """
    reported: list[tuple[list[str], list[str]]] = []

    def keep_reported(_module: nn.Module, incompatible: Any) -> None:
        # The root's post-hooks run last, after every module's hooks have amended the lists.
        reported.append((list(incompatible.missing_keys), list(incompatible.unexpected_keys)))

    keep_saved_dtypes(module, state_dict)
    handle = module.register_load_state_dict_post_hook(keep_reported)  # type: ignore[no-untyped-call]
    load_errors: list[str] = []
    try:
        module.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        # load_state_dict's own error is a heading over one line per problem; any other is kept whole.
        load_errors = lines[1:] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines[-1:]
    finally:
        handle.remove()
    missing, unexpected = reported[-1] if reported else ([], [])
    problems = []
    if missing:
        problems.append(f"missing keys: {_listed_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listed_names(unexpected)}")
    misshapen = [shown for message in load_errors if (shown := _size_mismatch(message)) is not None]
    if misshapen:
        problems.append(f"wrong shapes (file vs model): {_listed_names(misshapen)}")
    problems += [message for message in load_errors if _size_mismatch(message) is None][:1]
    if problems:
        raise StateDictMismatchError(
            f"the state_dict does not fit {target or f'--arch {spec}'}: {'; '.join(problems)}", fix
        )


def keep_saved_dtypes(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Give each floating parameter and buffer of ``module`` the dtype of its entry in ``state_dict``.

    ``load_state_dict`` copies into the module's own tensors, so a float16 file loaded into a
    float32 --arch would be upcast, and BN109 and the precision rules would never see float16.
    Uninitialized (lazy) tensors are left for their module's load hook, which takes the file's
    tensor as it is; integer tensors (num_batches_tracked) are left alone.
    """
    for prefix, owner in module.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for name, parameter in owner.named_parameters(recurse=False):
            dtype = _saved_dtype(parameter, state_dict.get(dot + name))
            if dtype is not None:
                parameter.data = parameter.data.to(dtype)
        for name, buffer in owner.named_buffers(recurse=False):
            dtype = _saved_dtype(buffer, state_dict.get(dot + name))
            if dtype is not None:
                setattr(owner, name, buffer.to(dtype))


def _saved_dtype(tensor: torch.Tensor, saved: torch.Tensor | None) -> torch.dtype | None:
    """The saved tensor's dtype where both are floating point and the dtypes differ, else None."""
    from bn_inspect.model.layers import is_uninitialized

    if saved is None or is_uninitialized(tensor) or not (tensor.is_floating_point() and saved.is_floating_point()):
        return None
    return saved.dtype if saved.dtype != tensor.dtype else None


# How Module._load_from_state_dict words a tensor whose shape differs from the module's.
_SIZE_MISMATCH = re.compile(
    r"size mismatch for (?P<key>.+?): copying a param with shape torch\.Size\(\[(?P<file>[^\]]*)\]\) "
    r"from checkpoint, the shape in current model is torch\.Size\(\[(?P<model>[^\]]*)\]\)"
)


def _size_mismatch(message: str) -> str | None:
    """``key (file shape) vs (model shape)`` for one of PyTorch's size-mismatch messages, else None."""
    match = _SIZE_MISMATCH.match(message)
    if match is None:
        return None

    def shape(sizes: str) -> str:
        return str(tuple(int(size) for size in sizes.split(",") if size.strip()))

    return f"{match['key']} {shape(match['file'])} vs {shape(match['model'])}"


def _listed_names(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
