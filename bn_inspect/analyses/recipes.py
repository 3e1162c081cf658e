"""A model's own preprocessing: timm's ``pretrained_cfg`` or a torchvision weights enum's ``transforms()``.

Used for image folders when the model came with such a configuration; every flag the user gave
overrides its field.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from bn_inspect.errors import InputError

if TYPE_CHECKING:
    from torch import nn

    from bn_inspect.data.decode import Preprocessing
    from bn_inspect.options import RunOptions

TIMM_ORIGIN = "timm pretrained config"


def model_recipe(module: nn.Module, arch: str | None, arch_kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """The preprocessing fields the model's configuration gives, and where they come from ({} when none)."""
    config = getattr(module, "pretrained_cfg", None)
    if isinstance(config, Mapping) and "input_size" in config:
        return timm_recipe(config), TIMM_ORIGIN
    weights = torchvision_weights(arch, arch_kwargs)
    if weights is not None:
        return torchvision_recipe(weights.transforms()), f"torchvision {weights}"
    return {}, ""


def timm_recipe(config: Mapping[str, Any]) -> dict[str, Any]:
    """timm's eval transform: resize to floor(size / crop_pct), centre crop to size, its mean, std and filter.

    Only the parts timm would apply as a centre crop of a square: other crop modes and
    non-square inputs keep the normalization alone.
    """
    from bn_inspect.data.decode import INTERPOLATIONS

    fields: dict[str, Any] = {}
    mean, std = config.get("mean"), config.get("std")
    if mean is not None and std is not None:
        fields["mean"], fields["std"] = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    channels, height, width = (*config["input_size"], 0, 0, 0)[:3]
    if channels == 1:
        fields["grayscale"] = True
    if height == width and height and config.get("crop_mode", "center") == "center":
        fields["crop"] = int(height)
        fields["resize"] = math.floor(height / float(config.get("crop_pct") or 0.875))
        interpolation = str(config.get("interpolation") or "bilinear")
        if interpolation in INTERPOLATIONS:
            fields["interpolation"] = interpolation
    return fields


def torchvision_recipe(transform: Any) -> dict[str, Any]:
    """The fields of torchvision's ``ImageClassification`` preset (resize_size, crop_size, mean, std)."""
    from bn_inspect.data.decode import INTERPOLATIONS

    fields: dict[str, Any] = {}
    resize, crop = getattr(transform, "resize_size", None), getattr(transform, "crop_size", None)
    if isinstance(resize, (list, tuple)) and len(resize) == 1 and isinstance(crop, (list, tuple)) and len(crop) == 1:
        fields["resize"], fields["crop"] = int(resize[0]), int(crop[0])
        interpolation = getattr(getattr(transform, "interpolation", None), "value", "bilinear")
        if interpolation in INTERPOLATIONS:
            fields["interpolation"] = interpolation
    mean, std = getattr(transform, "mean", None), getattr(transform, "std", None)
    if mean is not None and std is not None:
        fields["mean"], fields["std"] = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    return fields


def torchvision_weights(arch: str | None, arch_kwargs: Mapping[str, Any]) -> Any:
    """The weights enum member of ``--arch torchvision.models:NAME --arch-kwargs '{"weights": "..."}'``."""
    weights = arch_kwargs.get("weights")
    if not arch or not arch.startswith("torchvision.") or not isinstance(weights, str):
        return None
    try:
        from bn_inspect.model.arch import resolve_arch

        # Imported by name: torchvision is optional, and only present where --arch names it.
        models = importlib.import_module("torchvision.models")

        if "." in weights:
            return models.get_weight(weights)
        enum = models.get_model_weights(resolve_arch(arch))
        return enum.DEFAULT if weights == "DEFAULT" else enum[weights]
    except Exception:
        # A builder without a weights enum, or a name it does not know (building the model has
        # said so already): the model then brings no recipe, which is not an error.
        return None


def fitted_preprocessing(
    user: Preprocessing, options: RunOptions, recipe: dict[str, Any], origin: str
) -> Preprocessing:
    """The user's preprocessing, its unset fields taken from the model's recipe (with their origin).

    Raises:
        InputError: the user's --resize is smaller than the recipe's crop, or the other way round.
    """
    given = {
        "resize": options.resize is not None,
        "crop": options.crop is not None,
        "mean": options.normalize is not None,
        "std": options.normalize is not None,
        "grayscale": options.grayscale,
        "interpolation": options.resize is not None,
    }
    taken = {name: value for name, value in recipe.items() if not given.get(name, False)}
    if not taken:
        return user
    named = {"mean": "normalize", "std": "normalize"}
    origins = tuple(dict.fromkeys((named.get(name, name), origin) for name in taken))
    prep = replace(user, **taken, origins=origins)
    if prep.resize is not None and prep.crop is not None and prep.crop > prep.resize:
        raise InputError(
            f"the crop {prep.crop} is larger than the resize {prep.resize} (one from the flags, one from the {origin})",
            "Pass both --resize and --crop",
        )
    return prep
