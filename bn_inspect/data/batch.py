"""The Batch: one forward pass worth of input tensors, and what user code may hand in as one."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from bn_inspect.errors import InputError


@dataclass(frozen=True)
class Batch:
    """One forward pass worth of inputs: positional and keyword tensors."""

    args: tuple[torch.Tensor, ...]
    kwargs: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        """Size of dim 0 of the first tensor."""
        first = self.args[0] if self.args else next(iter(self.kwargs.values()))
        return int(first.shape[0]) if first.dim() else 1

    def tensors(self) -> list[torch.Tensor]:
        """All tensors of the batch, positional first."""
        return [*self.args, *self.kwargs.values()]

    def to(self, device: torch.device, dtype: torch.dtype | None) -> Batch:
        """The batch on ``device``, its floating-point tensors cast to ``dtype`` (the model's).

        ``dtype`` None (a model without float tensors) keeps float32 and float64 tensors as they
        are and upcasts narrower floats to float32, as a model's float32 parameters would.
        """
        # A copy to the GPU may overlap the work queued before it; one to the host must be
        # complete before the CPU reads it, which only a blocking copy guarantees. From pinned
        # memory the GPU copy is asynchronous, so a caller who refills one pinned buffer in place
        # must not do so before the forward has run (a DataLoader pins a new buffer per batch).
        non_blocking = device.type != "cpu"

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=_float_dtype(t, dtype), non_blocking=non_blocking)

        return Batch(tuple(move(t) for t in self.args), {k: move(v) for k, v in self.kwargs.items()})

    def sha256(self) -> str:
        """The hex SHA-256 of the batch's tensors (positional, then keyword by name): each one's
        name, dtype, shape and bytes, read on the host."""
        import hashlib

        digest = hashlib.sha256()
        named = [*((str(i), t) for i, t in enumerate(self.args)), *sorted(self.kwargs.items())]
        for name, tensor in named:
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            # uint8 view: bytes of any dtype (bfloat16 has no numpy type).
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def samples(self, start: int, stop: int) -> Batch:
        """Samples ``start`` to ``stop`` of every tensor (along dim 0)."""
        return Batch(tuple(t[start:stop] for t in self.args), {k: v[start:stop] for k, v in self.kwargs.items()})


def _joined(batches: list[Batch]) -> Batch:
    """The batches' samples, one after the other, as one batch."""
    if len(batches) == 1:
        return batches[0]
    first = batches[0]
    return Batch(
        tuple(torch.cat([b.args[i] for b in batches]) for i in range(len(first.args))),
        {k: torch.cat([b.kwargs[k] for b in batches]) for k in first.kwargs},
    )


def regroup_batches(batches: Iterable[Batch], size: int, left_out: Callable[[int], None]) -> Iterator[Batch]:
    """The samples of ``batches``, in order, in batches of exactly ``size``.

    For a program that takes only one batch size (a static torch.export archive). Samples that
    do not fill a last batch cannot run; their number goes to ``left_out`` at the end (0: none).
    """
    pending: list[Batch] = []
    count = 0
    for batch in batches:
        pending.append(batch)
        count += batch.num_samples
        if count < size:
            continue
        joined = _joined(pending)
        whole = count - count % size
        for start in range(0, whole, size):
            yield joined.samples(start, start + size)
        pending = [joined.samples(whole, count)] if count > whole else []
        count -= whole
    left_out(count)


def as_batch(item: Any, source: str = "a batch") -> Batch:
    """A Batch from a tensor, a dict of tensors, or an (inputs, targets) pair from a DataLoader.

    Raises:
        InputError: anything else, or a tensor without values (see ``without_values``), naming ``source``.
    """
    if isinstance(item, Batch):
        batch = item
    elif isinstance(item, torch.Tensor):
        batch = Batch((item,))
    elif isinstance(item, dict) and all(isinstance(v, torch.Tensor) for v in item.values()):
        batch = Batch((), dict(item))
    elif isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        batch = Batch((item[0],))
    else:
        raise InputError(
            f"cannot use a batch of type {type(item).__name__}",
            "Pass tensors, dicts of tensors, (inputs, targets) pairs or bn_inspect.Batch objects",
        )
    for tensor in batch.tensors():
        lacking = without_values(tensor)
        if lacking is not None:
            fix = "Give dense tensors (t.to_dense())" if lacking.is_layout else "Give tensors that hold their values"
            raise InputError(f"{source} holds {lacking.what}", fix)
    return batch


@dataclass(frozen=True)
class NoValues:
    """Why a tensor cannot be a model's input: ``what`` in words; ``is_layout``: sparse or nested, not meta."""

    what: str
    is_layout: bool


def without_values(tensor: torch.Tensor) -> NoValues | None:
    """Why ``tensor`` has no dense values a model could take (sparse, nested, on the meta device), or None.

    The one check of every source of tensors (input files, --data, the Python API): such a tensor
    fails deep inside torch with a traceback, or (meta) runs the model on nothing.
    """
    if tensor.layout != torch.strided or tensor.is_nested:
        layout = "nested" if tensor.is_nested else str(tensor.layout).removeprefix("torch.")
        return NoValues(f"a {layout} tensor of shape {_shape_of(tensor)}; bn-inspect reads dense tensors", True)
    if tensor.is_meta:
        return NoValues(f"a tensor of shape {tuple(tensor.shape)} on device meta, which has no values", False)
    return None


def _shape_of(tensor: torch.Tensor) -> tuple[int, ...] | str:
    try:
        return tuple(tensor.shape)
    except RuntimeError:
        return "(ragged)"  # a nested tensor of differently sized parts has no one shape


@dataclass(frozen=True)
class RunTotals:
    """What one rank's run (or the merged run) saw besides the layer moments.

    Attributes:
        num_batches: forward passes run.
        num_samples: samples in them.
        num_nonfinite_values: NaN or infinite input values.
        first_shape: shape of the first input tensor of the first batch (None: no batch ran).
        first_dtype: its dtype, e.g. "float32".
        first_sha256: Batch.sha256 of the first batch (None: no batch ran, or not asked for).
    """

    num_batches: int = 0
    num_samples: int = 0
    num_nonfinite_values: int = 0
    first_shape: tuple[int, ...] | None = None
    first_dtype: str | None = None
    first_sha256: str | None = None


def _float_dtype(tensor: torch.Tensor, model_dtype: torch.dtype | None) -> torch.dtype:
    if not tensor.is_floating_point():
        return tensor.dtype
    if model_dtype is not None:
        return model_dtype
    return tensor.dtype if tensor.dtype in (torch.float32, torch.float64) else torch.float32
