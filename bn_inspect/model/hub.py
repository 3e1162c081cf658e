"""Model folders as the Hugging Face hub keeps them (config.json beside the weights), built with transformers or timm.

A folder written by ``save_pretrained`` (transformers) or ``timm``'s ``push_to_hub`` holds a
``config.json`` and the weights (``model.safetensors``, or ``pytorch_model.bin``). The
architecture is built from the config with the library that wrote it, never from code in the
folder unless ``trust_remote_code`` says so (``auto_map``); the weights are read through the
boundary's opener and loaded into it like any state_dict. No hub function is called: nothing is
downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bn_inspect.boundary.reading import OpenedInput, Source, open_checked
from bn_inspect.errors import ModelFileError, RemoteCodeError
from bn_inspect.model.archives import load_safetensors_bytes
from bn_inspect.model.files import FileKind, file_kind, file_sha256
from bn_inspect.model.pickles import torch_load
from bn_inspect.model.state_dict import extract_state_dict

if TYPE_CHECKING:
    import torch

CONFIG_NAME = "config.json"
WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
# What save_pretrained writes beside model-0000K-of-0000N.safetensors when the weights exceed max_shard_size.
INDEX_NAME = "model.safetensors.index.json"
# A config is a few kilobytes; ImageNet-21k label maps reach about a megabyte.
CONFIG_BUDGET = 16 * 2**20
_DEFAULT_IMAGE_SIZE = 224


def is_model_folder(path: Path | str) -> bool:
    """True when ``path`` names a directory (the folder's files are then judged one by one)."""
    return os.path.isdir(path)


def _inside(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


def _allowed_roots(folder: Path) -> tuple[str, ...]:
    """The folder itself, and for a hub cache snapshot (``<repo>/snapshots/<rev>``) its ``<repo>/blobs``,
    where the snapshot's symlinks point."""
    real = os.path.realpath(folder)
    parent = os.path.dirname(real)
    if os.path.basename(parent) == "snapshots":
        return real, os.path.join(os.path.dirname(parent), "blobs")
    return (real,)


@contextmanager
def open_in_folder(folder: Path, name: str, source: Source, *, max_bytes: int | None = None) -> Iterator[OpenedInput]:
    """Open ``folder/name`` through the boundary's opener, refusing a file that lies outside the folder.

    The check is on the opened descriptor (its /proc/self/fd link), so a symlink swapped after a
    path check cannot redirect it.

    Raises:
        ModelFileError: the file is missing, not a regular file, over ``max_bytes``, or outside the folder.
    """
    path = folder / name
    roots = _allowed_roots(folder)
    with open_checked(
        path,
        source,
        noun="file",
        error=ModelFileError,
        max_bytes=max_bytes,
        fix="Give a folder written by save_pretrained",
    ) as opened:
        link = f"/proc/self/fd/{opened.descriptor}"
        target = os.readlink(link) if os.path.islink(link) else os.path.realpath(path)
        if not _inside(target, roots):
            raise ModelFileError(
                f"model folder {folder}: {name} leads to {target}, outside the folder",
                "Copy the file into the folder instead of linking to it",
            )
        yield opened


def read_config(folder: Path) -> dict[str, Any]:
    """The folder's config.json as a dict, read within its budget.

    Raises:
        ModelFileError: it is missing, over the budget, not JSON, or not a JSON object.
    """
    if not os.path.lexists(folder / CONFIG_NAME):
        raise ModelFileError(
            f"model file {folder} is a directory without a {CONFIG_NAME}",
            "Give the path of a saved model file, or a folder written by save_pretrained "
            "(config.json and model.safetensors)",
        )
    with open_in_folder(folder, CONFIG_NAME, Source.MODEL_CONFIG, max_bytes=CONFIG_BUDGET) as opened:
        raw = opened.read_bytes()
    try:
        config = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        reason = f"line {error.lineno}" if isinstance(error, json.JSONDecodeError) else type(error).__name__
        raise ModelFileError(
            f"model folder {folder}: {CONFIG_NAME} is not valid JSON ({reason})",
            "Re-save the model with save_pretrained",
        ) from None
    if not isinstance(config, dict):
        raise ModelFileError(
            f"model folder {folder}: {CONFIG_NAME} holds a JSON {type(config).__name__}, not an object",
            "Re-save the model with save_pretrained",
        )
    return config


def read_folder_weights(folder: Path, map_location: str) -> tuple[dict[str, torch.Tensor], str]:
    """The weights of a model folder, read through the opener, and the hex SHA-256 of their file.

    Raises:
        ModelFileError, UntrustedPickleError.
    """
    present = [name for name in WEIGHT_NAMES if os.path.lexists(folder / name)]
    if not present and os.path.lexists(folder / INDEX_NAME):
        return read_sharded_weights(folder, map_location)
    if not present:
        raise ModelFileError(
            f"model folder {folder} has no {' or '.join(WEIGHT_NAMES)} and no {INDEX_NAME}",
            "Give a folder written by save_pretrained",
        )
    name = present[0]
    with open_in_folder(folder, name, Source.MODEL) as opened:
        digest = file_sha256(opened)
        if name.endswith(".safetensors"):
            return load_safetensors_bytes(opened, map_location), digest
        loaded = torch_load(opened, map_location, False, _pickle_kind(opened))
        return extract_state_dict(loaded, opened.path)[0], digest


def read_sharded_weights(folder: Path, map_location: str) -> tuple[dict[str, torch.Tensor], str]:
    """The weights of a sharded folder: every shard its index names, each read through the opener,
    and one SHA-256 over the index and the shards' own digests.

    Raises:
        ModelFileError: the index is malformed or lists a tensor twice, names a shard outside the folder
            or missing, or a shard holds a tensor the index does not place there or lacks one it does.
    """
    with open_in_folder(folder, INDEX_NAME, Source.MODEL_INDEX, max_bytes=CONFIG_BUDGET) as opened:
        raw = opened.read_bytes()
    weight_map = _weight_map(folder, raw)
    digest = hashlib.sha256(raw)
    tensors: dict[str, torch.Tensor] = {}
    for shard in dict.fromkeys(weight_map.values()):
        with open_in_folder(folder, shard, Source.MODEL) as opened:
            digest.update(f"{shard}:{file_sha256(opened)}\n".encode())
            loaded = load_safetensors_bytes(opened, map_location)
        for key, tensor in loaded.items():
            if weight_map.get(key) != shard or key in tensors:
                where = (
                    f"the index places it in {_shown(weight_map[key])}"
                    if key in weight_map
                    else "the index does not list it"
                )
                raise ModelFileError(
                    f"model folder {folder}: shard {_shown(shard)} holds tensor {_shown(key)}, but {where}",
                    _SHARD_FIX,
                )
            tensors[key] = tensor
    absent = next((key for key in weight_map if key not in tensors), None)
    if absent is not None:
        raise ModelFileError(
            f"model folder {folder}: {INDEX_NAME} places tensor {_shown(absent)} in shard "
            f"{_shown(weight_map[absent])}, which does not hold it",
            _SHARD_FIX,
        )
    return tensors, digest.hexdigest()


_SHARD_FIX = "Re-save the model with save_pretrained, or re-download the folder"


def _shown(text: str) -> str:
    from bn_inspect.text import inert

    return repr(inert(text[:200]))


def _weight_map(folder: Path, raw: bytes) -> dict[str, str]:
    """The index's ``weight_map`` (tensor -> shard file), every shard a plain file name of the folder that exists."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in pairs]
        if len(set(keys)) != len(keys):
            twice = next(key for key in keys if keys.count(key) > 1)
            raise ModelFileError(f"model folder {folder}: {INDEX_NAME} lists {_shown(twice)} twice", _SHARD_FIX)
        return dict(pairs)

    try:
        index = json.loads(raw, object_pairs_hook=unique)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        reason = f"line {error.lineno}" if isinstance(error, json.JSONDecodeError) else type(error).__name__
        raise ModelFileError(f"model folder {folder}: {INDEX_NAME} is not valid JSON ({reason})", _SHARD_FIX) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if (
        not isinstance(weight_map, dict)
        or not weight_map
        or not all(isinstance(key, str) and isinstance(value, str) for key, value in weight_map.items())
    ):
        raise ModelFileError(
            f"model folder {folder}: {INDEX_NAME} has no weight_map of tensor names to shard files", _SHARD_FIX
        )
    for shard in dict.fromkeys(weight_map.values()):
        if shard in ("", ".", "..") or os.path.basename(shard) != shard or "\\" in shard or "\0" in shard:
            raise ModelFileError(
                f"model folder {folder}: {INDEX_NAME} names the shard {_shown(shard)}, which is not a file of the folder",
                "Keep every shard beside the index, named by its file name alone",
            )
        if not os.path.lexists(folder / shard):
            raise ModelFileError(
                f"model folder {folder}: {INDEX_NAME} names the shard {_shown(shard)}, which is missing", _SHARD_FIX
            )
    return weight_map


def _pickle_kind(opened: OpenedInput) -> FileKind:
    kind = file_kind(opened)
    if kind not in (FileKind.TORCH_SAVE, FileKind.LEGACY_PICKLE):
        raise ModelFileError(
            f"{opened.path} is a {kind.value} file, not the state_dict torch.save writes",
            "Re-save it with save_pretrained",
        )
    return kind


def remote_code(config: Mapping[str, Any]) -> list[str]:
    """The classes a config's ``auto_map`` names in the folder's own code ([] when it names none)."""
    auto_map = config.get("auto_map")
    if auto_map is None:
        return []
    if isinstance(auto_map, dict):
        return [str(value)[:80] for value in list(auto_map.values())[:4]] or ["auto_map"]
    return ["auto_map"]


def check_remote_code(folder: Path, config: Mapping[str, Any], trust_remote_code: bool) -> None:
    """Refuse a config that names code in the folder (``auto_map``) unless ``trust_remote_code``.

    Raises:
        RemoteCodeError.
    """
    named = remote_code(config)
    if named and not trust_remote_code:
        raise RemoteCodeError(str(folder), named)


def sample_shape(config: Mapping[str, Any]) -> tuple[int, ...]:
    """The input one sample takes, from the config: (num_channels, height, width); 3 and 224 where it says nothing.

    timm folders give ``pretrained_cfg.input_size``; transformers configs ``num_channels`` and
    ``image_size`` (an int or a pair).
    """
    pretrained = config.get("pretrained_cfg")
    if isinstance(pretrained, dict):
        size = pretrained.get("input_size")
        if isinstance(size, list) and _is_sizes(size, 3):
            return tuple(size)
    channels = config.get("num_channels", 3)
    image_size = config.get("image_size", _DEFAULT_IMAGE_SIZE)
    if _is_sizes([image_size], 1):
        image_size = [image_size, image_size]
    if not _is_sizes([channels], 1) or not _is_sizes(image_size, 2):
        return (3, _DEFAULT_IMAGE_SIZE, _DEFAULT_IMAGE_SIZE)
    return (channels, *image_size)


def _is_sizes(value: object, count: int) -> bool:
    """True for a list of ``count`` positive ints of a plausible size (an image side, a channel count)."""
    return (
        isinstance(value, (list, tuple))
        and len(value) == count
        and all(isinstance(item, int) and not isinstance(item, bool) and 0 < item <= 2**16 for item in value)
    )
