"""--shape and shape guessing: parse a shape, guess one from the model's first layer, seeded random batches."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bn_inspect.data.memory import check_fits_memory
from bn_inspect.errors import InputError

if TYPE_CHECKING:
    from torch import nn

    from bn_inspect.data.batch import Batch

INPUT_SUFFIXES = (".pt", ".pth", ".npy", ".npz", ".csv", ".parquet")
DEFAULT_BATCH_SIZE = 64


# Spatial sizes tried, in order, when only the channel count can be read off the first layer.
CANDIDATE_SIDES = (32, 224, 64, 28, 16, 8)


def parse_shape(text: str) -> tuple[int, ...]:
    """'16,3,32,32' -> (16, 3, 32, 32); at least (N, C), every size positive."""
    parts = [p.strip() for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise InputError(
            f"--shape {text!r} is not a comma-separated list of integers", "Write e.g. --shape 16,3,32,32"
        ) from None
    if len(shape) < 2:
        raise InputError(
            f"--shape {text!r} has {len(shape)} dim{'' if len(shape) == 1 else 's'}; the model needs at least (N, C)",
            "Write e.g. --shape 16,3,32,32",
        )
    if any(s <= 0 for s in shape):
        raise InputError(f"--shape {text!r} has a size that is not positive", "Every size must be at least 1")
    check_fits_memory(shape, 4)
    return shape


@dataclass(frozen=True)
class ShapeGuess:
    """Input shapes worth trying when none was given, and why."""

    shapes: tuple[tuple[int, ...], ...]
    reason: str


def guess_input_shapes(model: nn.Module, batch_size: int) -> ShapeGuess | None:
    """Candidate input shapes read off the first Conv or Linear layer, or None when unsound.

    A Linear's in_features fixes the whole shape; a Conv's in_channels fixes only C, so several
    spatial sizes are offered, to be tried in order.
    """
    from torch import nn

    for name, module in model.named_modules():
        kind = module.original_name if hasattr(module, "original_name") else type(module).__name__
        if kind in ("Conv1d", "Conv2d", "Conv3d") or isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            channels = getattr(module, "in_channels", None)
            if not isinstance(channels, int):
                return None
            rank = int(kind[4])
            shapes = tuple((batch_size, channels, *([side] * rank)) for side in CANDIDATE_SIDES)
            return ShapeGuess(shapes, f"the first Conv or Linear layer, {name}, is {kind} with in_channels={channels}")
        if kind == "Linear" or isinstance(module, nn.Linear):
            features = getattr(module, "in_features", None)
            if not isinstance(features, int) or features <= 0:
                return None
            return ShapeGuess(
                ((batch_size, features),),
                f"the first Conv or Linear layer, {name}, is Linear with in_features={features}",
            )
        if kind in ("Embedding", "LSTM", "GRU", "RNN", "MultiheadAttention") or isinstance(module, nn.Embedding):
            return None
    return None


def spell_shape(shape: tuple[int | None, ...]) -> str:
    """(2, 1, 8, 8), with N for a free batch size and * for any other free size."""
    sizes = [("N" if i == 0 else "*") if s is None else str(s) for i, s in enumerate(shape)]
    return f"({', '.join(sizes)})"


def first_layer_input(model: nn.Module) -> tuple[tuple[int | None, ...], str] | None:
    """The input shape the first Conv or Linear layer takes (None: any size), and why; None if unknown."""
    guess = guess_input_shapes(model, 1)
    if guess is None:
        return None
    shape = guess.shapes[0]
    return (None, shape[1], *([None] * (len(shape) - 2))), guess.reason


def shape_fix(shape: tuple[int, ...], expected: tuple[int | None, ...]) -> str:
    """How to turn data of ``shape`` into ``expected`` (None: any size): the fix of a shape error."""
    channels = expected[1] if len(expected) > 1 else None
    if len(shape) == len(expected) >= 3 and channels is not None and shape[-1] == channels != shape[1]:
        order = ", ".join(map(str, (0, len(shape) - 1, *range(1, len(shape) - 1))))
        return f"The data looks channels-last: transpose it to (N, C, ...), e.g. x.permute({order})"
    if len(shape) == len(expected) >= 3 and (shape[1], channels) in ((3, 1), (1, 3)):
        # Most often images: an image folder decodes RGB unless told otherwise.
        if channels == 1:
            return "Give one-channel data: --grayscale for an image folder, x.mean(1, keepdim=True) for tensors, or --shape N,1,..."
        return "Give three-channel data: no --grayscale for an image folder, x.expand(-1, 3, ...) for tensors, or --shape N,3,..."
    if len(shape) + 1 == len(expected) and channels == 1:
        return "Add the channel dim of size 1, e.g. x.unsqueeze(1) (or --shape N,1,...)"
    return f"Give data of shape {spell_shape(expected)} (--shape, --input)"


def random_batches(shape: tuple[int, ...], num_batches: int, seed: int) -> Iterator[Batch]:
    """``num_batches`` seeded standard-normal batches of ``shape`` (same numbers on every device)."""
    import torch

    from bn_inspect.data.batch import Batch

    generator = torch.Generator().manual_seed(seed)
    for _ in range(num_batches):
        yield Batch((torch.randn(shape, generator=generator),))
