"""A model's own preprocessing: timm's ``pretrained_cfg`` or a torchvision weights enum's ``transforms()``.

Used for image folders when the model came with such a configuration; every flag the user gave
overrides its field. A ``pretrained_cfg`` is the model file's content, read without trusting it,
so every field used is validated as the flags are (types, ranges, std > 0, sides of at most
``MAX_SIDE`` pixels) before anything is sized by it.
"""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, NoReturn

from bn_inspect.errors import InputError

if TYPE_CHECKING:
    from torch import nn

    from bn_inspect.data.decode import Preprocessing
    from bn_inspect.options import RunOptions

TIMM_ORIGIN = "timm pretrained config"


def model_recipe(module: nn.Module, options: RunOptions, arch_kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """The preprocessing fields the model's configuration gives, and where they come from ({} when none).

    Raises:
        InputError: a field of the configuration of the wrong type, out of range or too large.
    """
    config = getattr(module, "pretrained_cfg", None)
    if isinstance(config, Mapping) and "input_size" in config:
        where = f"--arch {options.arch}" if options.arch else f"model file {options.model}"
        return timm_recipe(config, where), TIMM_ORIGIN
    weights = torchvision_weights(options.arch, arch_kwargs)
    if weights is not None:
        return torchvision_recipe(weights.transforms(), f"torchvision's {weights}"), f"torchvision {weights}"
    return {}, ""


def timm_recipe(config: Mapping[str, Any], where: str = "the model") -> dict[str, Any]:
    """timm's eval transform: resize to floor(size / crop_pct), centre crop to size, its mean, std and filter.

    Only the parts timm would apply as a centre crop of a square: other crop modes and
    non-square inputs keep the normalization alone.

    Args:
        config: the model's ``pretrained_cfg``.
        where: how messages name the model, e.g. ``model file net.pt``.

    Raises:
        InputError: a field used here of the wrong type, out of range or too large.
    """
    from bn_inspect.data.decode import INTERPOLATIONS

    fields = _Fields(f"the pretrained_cfg of {where}")
    channels, height, width = fields.input_size(config["input_size"])
    fields.normalization(config.get("mean"), config.get("std"), channels)
    if channels == 1:
        fields.taken["grayscale"] = True
    if height == width and config.get("crop_mode", "center") == "center":
        crop_pct = fields.fraction("crop_pct", config.get("crop_pct"), default=0.875)
        fields.sizes(height / crop_pct, height, "crop_pct", config.get("crop_pct"))
        interpolation = str(config.get("interpolation") or "bilinear")
        if interpolation in INTERPOLATIONS:
            fields.taken["interpolation"] = interpolation
    return fields.taken


def torchvision_recipe(transform: Any, where: str = "the weights") -> dict[str, Any]:
    """The fields of torchvision's ``ImageClassification`` preset (resize_size, crop_size, mean, std).

    Raises:
        InputError: a field of the wrong type, out of range or too large.
    """
    from bn_inspect.data.decode import INTERPOLATIONS

    fields = _Fields(f"the transforms of {where}")
    resize, crop = getattr(transform, "resize_size", None), getattr(transform, "crop_size", None)
    if isinstance(resize, (list, tuple)) and len(resize) == 1 and isinstance(crop, (list, tuple)) and len(crop) == 1:
        pixels = fields.side("resize_size", resize[0])
        fields.sizes(pixels, fields.side("crop_size", crop[0]), "resize_size", pixels)
        interpolation = getattr(getattr(transform, "interpolation", None), "value", "bilinear")
        if interpolation in INTERPOLATIONS:
            fields.taken["interpolation"] = interpolation
    fields.normalization(getattr(transform, "mean", None), getattr(transform, "std", None), 3)
    return fields.taken


class _Fields:
    """The fields taken from one configuration, each validated as its flag is; a bad one is one line."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.taken: dict[str, Any] = {}

    def refuse(self, name: str, value: Any, why: str) -> NoReturn:
        try:
            shown = repr(value)
        except ValueError:
            shown = f"(a {type(value).__name__} too long to show)"  # an int of over 4,300 digits
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise InputError(f"{self.where} gives {name} {shown}, {why}", "Correct that field of the model's configuration")

    def number(self, name: str, value: Any, shown: Any = None) -> float:
        """A finite real number (a bool, a string or a list is not one); ``shown``: the field's whole value."""
        number = _finite(value)
        if number is None:
            if shown is None:
                self.refuse(name, value, "which is not a finite number")
            self.refuse(name, shown, "which has a value that is not a finite number")
        return number

    def side(self, name: str, value: Any, shown: Any = None) -> int:
        """A whole number of pixels from 1 to MAX_SIDE (``shown``: the field's whole value, for the message)."""
        from bn_inspect.data.decode import MAX_SIDE

        pixels = _finite(value)
        if pixels is None or not (1 <= pixels <= MAX_SIDE and pixels.is_integer()):
            if shown is None:
                self.refuse(name, value, f"which is not a whole number of pixels from 1 to {MAX_SIDE:,}")
            self.refuse(name, shown, f"whose sizes are not all whole numbers from 1 to {MAX_SIDE:,}")
        return int(pixels)

    def fraction(self, name: str, value: Any, *, default: float) -> float:
        """A number in (0, 1], or ``default`` for None."""
        if value is None:
            return default
        share = self.number(name, value)
        if not 0 < share <= 1:
            self.refuse(name, value, "which is not in (0, 1]")
        return share

    def input_size(self, value: Any) -> tuple[int, int, int]:
        """(channels, height, width), each a whole positive number, the sides at most MAX_SIDE."""
        if not isinstance(value, (list, tuple)) or len(value) != 3:
            self.refuse("input_size", value, "which is not [channels, height, width]")
        channels, height, width = (self.side("input_size", size, shown=value) for size in value)
        return channels, height, width

    def sizes(self, resize: float, crop: int, name: str, value: Any) -> None:
        """Take ``resize`` (rounded down) and ``crop``, both at most MAX_SIDE; ``name`` and ``value``: the field that sets the resize."""
        from bn_inspect.data.decode import MAX_SIDE

        if not resize <= MAX_SIDE:
            self.refuse(name, value, f"which makes a resize of {resize:,.0f} pixels, over {MAX_SIDE:,}")
        self.taken["resize"], self.taken["crop"] = math.floor(resize), crop

    def normalization(self, mean: Any, std: Any, channels: int) -> None:
        """Take ``mean`` and ``std`` when both are given: equal counts of 1 or ``channels`` finite numbers, std > 0."""
        if mean is None or std is None:
            return
        for name, values in (("mean", mean), ("std", std)):
            if not isinstance(values, (list, tuple)) or len(values) not in (1, channels):
                self.refuse(name, values, f"which is not a list of {channels} numbers (one per channel) or of one")
        if len(std) != len(mean):
            self.refuse("std", std, f"which has {len(std)} values and the mean {len(mean)}")
        means = tuple(self.number("mean", value, shown=mean) for value in mean)
        stds = tuple(self.number("std", value, shown=std) for value in std)
        if any(value <= 0 for value in stds):
            self.refuse("std", std, "which has a value that is not positive")
        self.taken["mean"], self.taken["std"] = means, stds


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


def _finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite real number (not a bool, a string, a list, or an int past float's range)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None
