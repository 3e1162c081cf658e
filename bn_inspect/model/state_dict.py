"""State dicts: find them in checkpoints, refuse unusable tensors, strip wrapper prefixes, load into --arch."""

from __future__ import annotations

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
        problems.append(f"missing keys: {_listed_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listed_names(unexpected)}")
    if misshapen:
        problems.append(f"wrong shapes (file vs model): {_listed_names(misshapen)}")
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


def _listed_names(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
