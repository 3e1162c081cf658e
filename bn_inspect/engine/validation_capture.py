"""The train/eval gap at a validation run: every BatchNorm layer's eval-mode input, merged over the run's batches.

During validation a BatchNorm layer in eval mode normalizes with its running statistics; how far
the validation data's own statistics sit from them (the departure score, report/departure.py) is
the train/eval gap. A forward pre-hook on each layer folds its input's per-channel moments
(engine/moments.py, float64, on the device) into the layer call's record; nothing is read back to
the host until ``calls()`` is asked for, once, at the end of the run. The hooks read the input
under ``torch.no_grad()`` and change nothing: the model's outputs, buffers and parameters are
those of a validation run without them. Hooks are removed when the block ends, error or not.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
from torch import nn

from bn_inspect.engine.moments import ChannelMoments, channel_moments
from bn_inspect.report.departure import Thresholds, measure


@dataclass(frozen=True)
class EvalCall:
    """One layer call over a validation run: its data's statistics and the running statistics it met.

    Attributes:
        layer: the layer's qualified module name.
        call: 0 for its first call in a forward, 1 for its second, ...
        samples: the samples behind each statistic (the batch sizes summed: a sample's pixels move together).
        values_per_channel: the values behind each channel's statistics.
        batch_mean: the per-channel mean of every value the call saw.
        batch_var: the per-channel biased variance of every value the call saw.
        running_mean: the layer's running mean at the end of the run (eval mode leaves it as it was).
        running_var: its running variance.
        eps: the layer's eps.
        nonfinite: how many NaN or infinite values its input held.
        training: whether the layer was in training mode (it then normalized with the batch's statistics).
        params_requires_grad: whether its affine parameters require gradients.
        has_running: whether it tracks running statistics.
        has_affine: whether it has weight and bias.
    """

    layer: str
    call: int
    samples: int
    values_per_channel: int
    batch_mean: tuple[float, ...]
    batch_var: tuple[float, ...]
    running_mean: tuple[float, ...]
    running_var: tuple[float, ...]
    eps: float
    nonfinite: int
    training: bool
    params_requires_grad: bool
    has_running: bool
    has_affine: bool

    def departure(self, thresholds: Thresholds | None = None) -> float | None:
        """The departure score of the run's data from the running statistics; None where it has none or is not finite."""
        if not (self.has_running and self.samples and self.batch_mean):
            return None
        found = measure(
            self.batch_mean, self.batch_var, self.running_mean, self.running_var, self.eps, self.samples, thresholds
        )
        return found.score if math.isfinite(found.score) else None


@dataclass
class _Accumulated:
    module: nn.modules.batchnorm._BatchNorm
    moments: ChannelMoments
    samples: int
    nonfinite: torch.Tensor
    training: bool


@dataclass
class ValidationCapture:
    """Forward pre-hooks on every BatchNorm layer of ``model`` for the duration of a ``with`` block.

    Call ``start_batch()`` before each validation batch (call indices restart with every forward);
    after the block, ``calls()`` gives each layer call's statistics over every batch.
    """

    model: nn.Module
    _records: dict[tuple[str, int], _Accumulated] = field(default_factory=dict)
    _calls_in_batch: Counter[str] = field(default_factory=Counter)
    _handles: list[Any] = field(default_factory=list)

    def __enter__(self) -> ValidationCapture:
        try:
            for name, module in self.model.named_modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    self._handles.append(module.register_forward_pre_hook(self._hook(name or type(module).__name__)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def start_batch(self) -> None:
        """Restart the call indices: the next call of each layer is its call 0 again."""
        self._calls_in_batch.clear()

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if x is None or x.dim() < 2 or not isinstance(module, nn.modules.batchnorm._BatchNorm):
                return
            call = self._calls_in_batch[name]
            self._calls_in_batch[name] += 1
            with torch.no_grad():
                x = x.detach()
                moments = channel_moments(x)
                nonfinite = (~torch.isfinite(x)).sum()
            record = self._records.get((name, call))
            if record is None:
                self._records[name, call] = _Accumulated(module, moments, x.shape[0], nonfinite, module.training)
                return
            record.moments = record.moments.merge(moments)
            record.samples += x.shape[0]
            record.nonfinite = record.nonfinite + nonfinite
            record.training = record.training or module.training

        return hook

    def calls(self) -> list[EvalCall]:
        """Each layer call's statistics over the run, in the order the calls first came."""
        return [_host(name, call, record) for (name, call), record in self._records.items()]


def _floats(tensor: torch.Tensor | None) -> tuple[float, ...]:
    if tensor is None:
        return ()
    return tuple(float(v) for v in tensor.detach().double().cpu().tolist())


def _host(name: str, call: int, record: _Accumulated) -> EvalCall:
    module = record.module
    moments = record.moments
    has_running = module.running_mean is not None and module.running_var is not None
    parameters = [p for p in (module.weight, module.bias) if p is not None]
    return EvalCall(
        layer=name,
        call=call,
        samples=record.samples,
        values_per_channel=moments.values_per_channel,
        batch_mean=_floats(moments.mean) if moments.count else (),
        batch_var=_floats(moments.biased_var()) if moments.count else (),
        running_mean=_floats(module.running_mean) if has_running else (),
        running_var=_floats(module.running_var) if has_running else (),
        eps=float(module.eps),
        nonfinite=int(record.nonfinite),
        training=record.training,
        params_requires_grad=any(p.requires_grad for p in parameters),
        has_running=has_running,
        has_affine=bool(parameters),
    )
