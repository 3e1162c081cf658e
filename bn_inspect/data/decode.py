"""One image file -> one float tensor: decoded with Pillow, then resized, cropped and normalized.

The steps and their arithmetic are those of torchvision's ``ImageFolder`` loader followed by
``Resize(N)``, ``CenterCrop(N)``, ``ToTensor()`` and ``Normalize(mean, std)`` on a PIL image, so
the tensors equal what a torchvision training recipe made of the same files.

The decoder has budgets: only the five documented formats (whatever the file's name says; Pillow
would otherwise hand a PostScript file to Ghostscript), and at most ``MAX_PIXELS`` pixels per
image, both as its header declares them and after ``--resize``, checked before anything is
decoded or allocated.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from bn_inspect.boundary.reading import OpenedInput, Source, open_checked
from bn_inspect.errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# The only Pillow decoders bn-inspect runs, by Pillow's names: the formats docs/images promise.
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF")
# Pixels one image may have, declared and after --resize: 8192×8192, a 768 MiB float32 RGB tensor;
# a photo of 50 megapixels fits, a header that asks for gigabytes does not.
MAX_PIXELS = 8192 * 8192
# The longest side --resize or --crop (or a model's configuration) may ask for: the side of MAX_PIXELS's square.
MAX_SIDE = 8192
# Pillow's resampling filters, by the names timm and torchvision give them.
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Pillow's modes for one channel of more than 8 bits; their values span 0..65535 (16-bit PNG, TIFF).
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_WIDE_MAX = 65535.0


@dataclass(frozen=True)
class Preprocessing:
    """How each image becomes a tensor, in this order.

    1. EXIF orientation applied (as the camera meant the picture to be seen);
    2. converted to RGB, or to one channel (L) with ``grayscale``; an alpha channel is dropped
       and the colour under it kept, as torchvision's and timm's loaders do (``convert("RGB")``);
       16-bit images keep their depth, scaled so that 65535 is 1.0;
    3. ``resize``: the shorter side to that many pixels, the other in proportion, with Pillow's
       ``interpolation`` filter (bilinear unless a model's configuration says otherwise; Pillow's
       filters average over the whole footprint when shrinking: torchvision's ``Resize`` calls
       exactly this on a PIL image);
    4. ``crop``: the centre square of that size;
    5. to float32 in [0, 1] (values / 255), channels first;
    6. ``mean`` / ``std``: (x - mean) / std per channel (one value: every channel).

    Attributes:
        origins: where each field came from when not from the user, e.g. ("resize", "timm pretrained config").
    """

    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    grayscale: bool = False
    channels_last: bool = False
    interpolation: str = "bilinear"
    origins: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for name, side in (("--resize", self.resize), ("--crop", self.crop)):
            if side is not None and side > MAX_SIDE:
                raise InputError(
                    f"{name} {side} is over {MAX_SIDE:,}, the longest side bn-inspect decodes images to "
                    f"({MAX_PIXELS:,} pixels per image)",
                    f"Pass {name} {MAX_SIDE} or less",
                )

    @property
    def num_channels(self) -> int:
        """Channels of every decoded image: 1 with grayscale, else 3."""
        return 1 if self.grayscale else 3

    def describe(self) -> str:
        """The steps in words for the report header, e.g. ``resize 256, crop 224, normalize imagenet``."""
        origin = dict(self.origins)
        filter_name = "" if self.interpolation == "bilinear" else f" {self.interpolation}"
        parts = [("resize", f"resize {self.resize}{filter_name}" if self.resize else None)]
        parts.append(("crop", f"crop {self.crop}" if self.crop else None))
        parts.append(("normalize", f"normalize {_spell_normalize(self.mean, self.std)}"))
        words = []
        for group in dict.fromkeys(origin.get(name, "") for name, _ in parts):
            said = ", ".join(text for name, text in parts if text and origin.get(name, "") == group)
            if said:
                words.append(f"{said} (from {group})" if group else said)
        words.extend(
            word for word, wanted in (("grayscale", self.grayscale), ("channels-last", self.channels_last)) if wanted
        )
        return ", ".join(words)


def _spell_normalize(mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> str:
    if mean is None or std is None:
        return "none"
    if (mean, std) == (IMAGENET_MEAN, IMAGENET_STD):
        return "imagenet"
    return f"mean {','.join(f'{m:g}' for m in mean)} std {','.join(f'{s:g}' for s in std)}"


def parse_normalize(text: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """--normalize: ``imagenet``, ``none`` (None), ``MEAN,STD`` for every channel, or C means then C stds.

    Raises:
        InputError: anything else, or a std that is not positive.
    """
    spelled = text.strip().lower()
    if spelled == "none":
        return None
    if spelled == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    fix = "Write --normalize imagenet, none, MEAN,STD (e.g. 0.5,0.25) or C means then C stds (e.g. 0.5,0.4,0.3,0.2,0.2,0.2)"
    try:
        values = tuple(float(part) for part in spelled.split(","))
    except ValueError:
        raise InputError(f"--normalize {text!r} is not imagenet, none or a list of numbers", fix) from None
    if len(values) % 2 or not values or not all(np.isfinite(values)):
        raise InputError(f"--normalize {text!r} does not give as many finite means as stds", fix)
    half = len(values) // 2
    if any(std <= 0 for std in values[half:]):
        raise InputError(f"--normalize {text!r} has a std that is not positive", fix)
    return values[:half], values[half:]


class UndecodableImage(Exception):
    """An image file Pillow cannot or may not decode; ``is_fatal`` when the run must stop rather than skip it.

    Attributes:
        reason: what is wrong, after the words ``image PATH`` (e.g. ``cannot be decoded (...)``).
        refusal: the whole message (what, fix) of a file the opener refused (missing, unreadable,
            a named pipe): always fatal.
    """

    def __init__(self, reason: str, *, is_fatal: bool = False, refusal: tuple[str, str] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.is_fatal = is_fatal or refusal is not None
        self.refusal = refusal


def decode_image(path: Path | str, prep: Preprocessing) -> torch.Tensor:
    """The image at ``path`` as a float32 tensor (C, H, W), preprocessed by ``prep``.

    The file is opened once, by the boundary's opener (a named pipe or device put in its place
    after the folder scan is refused, not waited on), and Pillow reads that opened file.

    Raises:
        UndecodableImage: a corrupt or truncated file, a file of another format, or one over the
            pixel budget (skip it); one that cannot be opened or is smaller than the crop
            (``is_fatal``: the run stops).
    """
    try:
        with open_checked(
            Path(path), Source.IMAGE, noun="image", error=InputError, fix="Replace it with a regular image file"
        ) as opened:
            planes = _decoded_planes(opened, prep)
    except InputError as refused:
        raise UndecodableImage(refused.what, refusal=(refused.what, refused.fix)) from None
    planes = [_resized(plane, prep.resize, prep.interpolation) for plane in planes]
    width, height = planes[0].size
    if prep.crop is not None:
        if width < prep.crop or height < prep.crop:
            raise UndecodableImage(
                f"is {height}×{width}, smaller than --crop {prep.crop}; pass --resize N with N ≥ {prep.crop}",
                is_fatal=True,
            )
        top, left = round((height - prep.crop) / 2.0), round((width - prep.crop) / 2.0)
        planes = [plane.crop((left, top, left + prep.crop, top + prep.crop)) for plane in planes]
    return _normalized(_to_tensor(planes), prep)


def _decoded_planes(opened: OpenedInput, prep: Preprocessing) -> list[Image.Image]:
    """The opened file decoded (after its declared size passed the budget), as ``_planes``."""
    try:
        with warnings.catch_warnings():
            # Pillow warns about palette transparency: said once per file on stderr from worker
            # processes, it would bury the report. Its decompression-bomb warning is an error.
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with opened.stream() as stream, Image.open(stream, formats=IMAGE_FORMATS) as image:
                _check_budget(image.size, prep.resize)
                image.load()
                return _planes(ImageOps.exif_transpose(image), prep.grayscale)
    except UndecodableImage:
        raise
    except UnidentifiedImageError:
        raise UndecodableImage("is not a JPEG, PNG, BMP, WebP or TIFF image") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as bomb:
        declared = re.search(r"\((\d+) pixels\)", str(bomb))
        count = f"{int(declared.group(1)):,}" if declared else f"more than {Image.MAX_IMAGE_PIXELS:,}"
        raise UndecodableImage(f"declares {count} pixels, over the budget of {MAX_PIXELS:,} pixels per image") from None
    except Exception as error:
        # Pillow raises many kinds of exception for damaged files; all of them mean "not decodable".
        raise UndecodableImage(f"cannot be decoded ({type(error).__name__}: {error})") from None


def planned_shape(path: Path | str, prep: Preprocessing) -> tuple[int, int, int] | None:
    """The shape (C, H, W) ``decode_image`` would give, from the header alone; None when it would fail.

    For sizing a batch before any image is decoded (EXIF may swap H and W; their product holds).
    """
    if prep.crop is not None:
        return (prep.num_channels, prep.crop, prep.crop)
    try:
        with (
            open_checked(Path(path), Source.IMAGE, noun="image", error=InputError) as opened,
            warnings.catch_warnings(),
            opened.stream() as stream,
        ):
            warnings.simplefilter("ignore")
            with Image.open(stream, formats=IMAGE_FORMATS) as image:
                declared_width, declared_height = image.size
    except Exception:
        return None  # decoding the file will say what is wrong with it, or skip it
    width, height = resized_size(declared_width, declared_height, prep.resize)
    return (prep.num_channels, height, width)


def _check_budget(size: tuple[int, int], resize: int | None) -> None:
    """Refuse, before decoding, an image whose declared size, or size after ``resize``, is over MAX_PIXELS."""
    width, height = size
    if width * height > MAX_PIXELS:
        raise UndecodableImage(
            f"declares {width}×{height} = {width * height:,} pixels, over the budget of {MAX_PIXELS:,} pixels per image"
        )
    new_width, new_height = resized_size(width, height, resize)
    if new_width * new_height > MAX_PIXELS:
        raise UndecodableImage(
            f"is {width}×{height}: resized to {resize} on its shorter side it would be {new_width:,}×{new_height:,} "
            f"= {new_width * new_height:,} pixels, over the budget of {MAX_PIXELS:,} pixels per image"
        )


def resized_size(width: int, height: int, size: int | None) -> tuple[int, int]:
    """(width, height) after the shorter side goes to ``size``, as torchvision's ``Resize(size)`` computes it."""
    if size is None or not width or not height:
        return width, height
    short, long = min(width, height), max(width, height)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def _planes(image: Image.Image, grayscale: bool) -> list[Image.Image]:
    """One 8-bit image (L or RGB), or float planes (mode F, 0..65535) for a 16-bit image."""
    if image.mode in _WIDE_MODES:
        wide = Image.fromarray(np.asarray(image, dtype=np.float32))
        return [wide] if grayscale else [wide, wide, wide]
    if image.mode == "F":
        # A float TIFF: already in its own units, scaled like 16-bit data would be.
        wide = image.point(lambda value: value * _WIDE_MAX)
        return [wide] if grayscale else [wide, wide, wide]
    if grayscale:
        return [image if image.mode == "L" else image.convert("RGB").convert("L")]
    return [image if image.mode == "RGB" else image.convert("RGB")]


def _resized(image: Image.Image, size: int | None, interpolation: str) -> Image.Image:
    """Shorter side to ``size``, as torchvision's ``Resize(size)`` computes the other side."""
    new_size = resized_size(*image.size, size)
    if size is None or new_size == image.size:
        return image
    return image.resize(new_size, Image.Resampling[interpolation.upper()])


def _to_tensor(planes: list[Image.Image]) -> torch.Tensor:
    """Channels first, float32 in [0, 1]: ToTensor's arithmetic (uint8 / 255; 16-bit / 65535)."""
    if planes[0].mode == "F":
        stacked = np.stack([np.asarray(plane, dtype=np.float32) for plane in planes])
        return torch.from_numpy(stacked).div(_WIDE_MAX)
    pixels = np.array(planes[0], dtype=np.uint8, copy=True)
    tensor = torch.from_numpy(pixels)
    tensor = tensor.view(pixels.shape[0], pixels.shape[1], -1).permute(2, 0, 1).contiguous()
    return tensor.to(dtype=torch.float32).div(255)


def _normalized(tensor: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    if prep.mean is None or prep.std is None:
        return tensor
    mean = torch.as_tensor(prep.mean, dtype=tensor.dtype).view(-1, 1, 1)
    std = torch.as_tensor(prep.std, dtype=tensor.dtype).view(-1, 1, 1)
    return tensor.sub_(mean).div_(std)
