"""Hooks that watch BatchNorm layers while a model trains: a cheap non-finite check every step, statistics at samples.

Between samples nothing leaves the device: each training forward folds one fused check of every
running buffer and affine parameter (``torch._foreach_norm`` with ord inf, the largest |value|:
NaN or infinite exactly when an element is, and no sum of squares to overflow) into a per-tensor "first non-finite step" kept on the device; the input of a layer
whose running statistics do not follow its input (eval mode, momentum 0, no running buffers) is
checked with ``isfinite(x).all()``. That vector is read once per step on the CPU, where a read
costs nothing, and once per sample elsewhere, so the step and layer where a NaN first appeared
are exact either way. At a sample step each call's batch statistics (in training mode read back
from BatchNorm's own update of its running buffers, which a pre-hook clones; otherwise a float32
``var_mean`` of the input: engine/watch_statistics.py) and running statistics after its update
are kept on the device, and all of them cross to the host in one transfer after the forward.
Everything runs under ``torch.no_grad()`` on detached tensors with autocast off, draws no random
numbers and writes nothing the model holds, so training is bitwise the same with or without the watch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from bn_inspect.engine.watch_compiling import refuse_compiling
from bn_inspect.engine.watch_statistics import RunningBefore, input_statistics, read_back_statistics, running_before
from bn_inspect.errors import WatchError
from bn_inspect.report.watch_records import CallStatistics

_STATE = ("running_mean", "running_var", "weight", "bias")


@dataclass(frozen=True)
class WatchedModule:
    """A BatchNorm module the watch hooks, by its qualified name and its index in model order."""

    index: int
    name: str
    module: nn.Module
    channels: int

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Its running buffers and affine parameters that exist, by name."""
        # Read from the module's own tables: nn.Module.__getattr__ is the slow path, paid every step.
        module = self.module
        found = [(name, module._buffers.get(name, module._parameters.get(name))) for name in _STATE]
        return [(name, t) for name, t in found if t is not None and t.numel()]

    @property
    def has_running(self) -> bool:
        return self.module._buffers.get("running_mean") is not None

    @property
    def has_affine(self) -> bool:
        return self.module._parameters.get("weight") is not None

    def requires_grad(self) -> bool:
        weight, bias = getattr(self.module, "weight", None), getattr(self.module, "bias", None)
        return any(isinstance(p, nn.Parameter) and p.requires_grad for p in (weight, bias))

    def follows_input(self) -> bool:
        """True when this call's update carries the input into the running buffers (so checking them checks it)."""
        momentum = getattr(self.module, "momentum", None)
        return (
            self.module.training
            and bool(getattr(self.module, "track_running_stats", False))
            and self.has_running
            and (momentum is None or momentum > 0)
        )


@dataclass(frozen=True)
class FirstNonfinite:
    """The first step at which a layer held a NaN or infinity, and in which of its tensors (or ``input``)."""

    step: int
    layer: str
    tensors: tuple[str, ...]


@dataclass(frozen=True)
class StepObservation:
    """What one training forward showed: its calls' statistics at a sample, small batches, the first NaN."""

    step: int
    is_sample: bool
    calls: tuple[CallStatistics, ...]
    few_values: tuple[tuple[str, int], ...]
    nonfinite: FirstNonfinite | None


@dataclass
class _Pending:
    watched: WatchedModule
    call: int
    values_per_channel: int
    samples: int
    training: bool
    statistics: torch.Tensor  # batch_mean, batch_var, running_mean, running_var, nonfinite count (float64)


@dataclass
class _StepState:
    step: int
    is_sample: bool
    calls: dict[int, int] = field(default_factory=dict)
    pending: list[_Pending] = field(default_factory=list)
    input_flags: dict[int, torch.Tensor] = field(default_factory=dict)
    few_values: list[tuple[str, int]] = field(default_factory=list)


class TrainingHooks:
    """Forward hooks on the root (a step is one training-mode forward) and on every watched layer.

    Args:
        root: the module whose training forwards are steps.
        layers: the BatchNorm modules to watch.
        every: sample every ``every`` steps.
        min_values: report calls with fewer values per channel (BN505), once per layer.
        on_step: told every training forward's observation, after the forward.
        on_sample_begin: told a sample step before its forward runs (the buffers as the step found
            them: under DDP, after its broadcast and before this rank's update).
    """

    def __init__(
        self,
        root: nn.Module,
        layers: Sequence[WatchedModule],
        *,
        every: int,
        min_values: int,
        on_step: Callable[[StepObservation], None],
        on_sample_begin: Callable[[int], None] | None = None,
    ) -> None:
        self.root = root
        self.layers = list(layers)
        self.every = every
        self.min_values = min_values
        self.on_step = on_step
        self.on_sample_begin = on_sample_begin
        self.count = 0  # training forwards so far
        self.explicit_step: int | None = None
        self.order: list[int] = []  # layer indices in the order of their first call
        self._ordered: set[int] = set()
        self._handles: list[RemovableHandle] = []
        self._current: _StepState | None = None
        self._last_sample: int | None = None
        self._few_reported: set[int] = set()
        self._first_bad: torch.Tensor | None = None
        self._layout: list[tuple[int, str]] = []
        self._nonfinite_done = False
        self._snapshots: dict[int, list[torch.Tensor]] = {}
        # Per layer at a sample step, between its call's pre-hook and its hook: its buffers before the update.
        self._before: dict[int, RunningBefore] = {}
        # Found under a layout of tensors since replaced, and not read yet.
        self._pending_nonfinite: FirstNonfinite | None = None
        # Set while a validation runs: its eval forwards are pooled, not counted as steps.
        self.validation: ValidationMoments | None = None

    @property
    def step(self) -> int:
        """The step the next (or current) training forward is."""
        return self.explicit_step if self.explicit_step is not None else self.count

    def install(self) -> None:
        """Add the hooks and take the state the first sample's 'changed' flags compare against."""
        for watched in self.layers:
            self._snapshots[watched.index] = self._snapshot(watched)
        self._handles.append(self.root.register_forward_pre_hook(self._begin))
        self._handles.append(self.root.register_forward_hook(self._end))
        for watched in self.layers:
            self._handles.append(watched.module.register_forward_pre_hook(self._make_layer_pre_hook(watched)))
            self._handles.append(watched.module.register_forward_hook(self._make_layer_hook(watched)))

    def remove(self) -> None:
        """Remove every hook; safe to call twice."""
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()
        self._current = None

    def _begin(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not module.training:
            if self.validation is not None:
                self.validation.calls.clear()
            return
        if torch.compiler.is_compiling():
            refuse_compiling()
        step = self.step
        is_sample = step % self.every == 0 and step != self._last_sample
        if is_sample and self.on_sample_begin is not None:
            self.on_sample_begin(step)
        self._before.clear()
        self._current = _StepState(step, is_sample)

    def _make_layer_pre_hook(self, watched: WatchedModule) -> Callable[..., None]:
        def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if torch.compiler.is_compiling():  # a compiled part of the model (the root's hook ran eagerly)
                refuse_compiling()
            state = self._current
            if state is None or not state.is_sample:
                return
            with torch.no_grad():
                before = running_before(module)
            if before is None:
                self._before.pop(watched.index, None)
            else:
                self._before[watched.index] = before

        return pre_hook

    def _make_layer_hook(self, watched: WatchedModule) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], _output: Any) -> None:
            state = self._current
            if not args or not isinstance(args[0], torch.Tensor):
                return
            if state is None:
                if self.validation is not None:
                    with torch.no_grad(), _no_autocast(args[0]):
                        self.validation.add(watched, args[0].detach())
                return
            with torch.no_grad():
                self._observe(state, watched, args[0].detach())

        return hook

    def _observe(self, state: _StepState, watched: WatchedModule, x: torch.Tensor) -> None:
        call = state.calls.get(watched.index, 0)
        state.calls[watched.index] = call + 1
        if watched.index not in self._ordered:
            self._ordered.add(watched.index)
            self.order.append(watched.index)
        values = x.numel() // watched.channels if watched.channels else 0
        training = watched.module.training
        if training and values < self.min_values and watched.index not in self._few_reported:
            self._few_reported.add(watched.index)
            state.few_values.append((watched.name, values))
        if not self._nonfinite_done and not watched.follows_input():
            finite = torch.isfinite(x).all()
            previous = state.input_flags.get(watched.index)
            state.input_flags[watched.index] = finite if previous is None else previous & finite
        if state.is_sample:
            samples = int(x.shape[0]) if x.dim() > 1 else 1
            before = self._before.pop(watched.index, None)
            with _no_autocast(x):
                statistics = (
                    input_statistics(watched.module, x)
                    if before is None
                    else read_back_statistics(watched.module, before, x)
                )
            state.pending.append(_Pending(watched, call, values, samples, training, statistics))

    def _end(self, module: nn.Module, _args: tuple[Any, ...], _output: Any) -> None:
        state, self._current = self._current, None
        if state is None:
            return
        if not state.calls and self.count == 0:
            raise WatchError(
                "the watched model ran a training forward, but none of its BatchNorm layers was called through "
                "its hooks (a compiled or scripted model, or layers outside the model given)",
                "Watch the uncompiled model whose BatchNorm layers the forward runs",
            )
        with torch.no_grad():
            self._fold_nonfinite(state)
            calls = self._collect(state) if state.is_sample else ()
            nonfinite = self._read_nonfinite() if (state.is_sample or _on_cpu(self._first_bad)) else None
        if state.is_sample:
            self._last_sample = state.step
        self.count += 1
        self.on_step(StepObservation(state.step, state.is_sample, calls, tuple(state.few_values), nonfinite))

    def flush_nonfinite(self) -> FirstNonfinite | None:
        """Read what the device holds of a non-finite value not yet reported (at the watch's end)."""
        with torch.no_grad():
            return self._read_nonfinite()

    def _fold_nonfinite(self, state: _StepState) -> None:
        if self._nonfinite_done:
            return
        layout: list[tuple[int, str]] = []
        tensors: list[torch.Tensor] = []
        for watched in self.layers:
            for name, tensor in watched.tensors():
                layout.append((watched.index, name))
                tensors.append(tensor.detach())
        norms = [n.float() for n in torch._foreach_norm(tensors, ord=float("inf"))] if tensors else []
        for index, finite in state.input_flags.items():
            layout.append((index, "input"))
            norms.append(torch.where(finite, 0.0, torch.inf).float().to(finite.device))
        if not norms:
            return
        if layout != self._layout:
            # A new set of tensors (a layer's input checked for the first time, a buffer replaced):
            # what the old vector holds is read first, so nothing found is lost.
            self._remember_old_layout()
            self._layout = layout
            self._first_bad = torch.full((len(layout),), -1, dtype=torch.int64, device=norms[0].device)
        first_bad = self._first_bad
        if first_bad is None:
            return
        bad = ~torch.isfinite(torch.stack([n.to(first_bad.device) for n in norms]))
        self._first_bad = torch.where(bad & (first_bad < 0), state.step, first_bad)

    def _remember_old_layout(self) -> None:
        if self._first_bad is not None and self._pending_nonfinite is None:
            self._pending_nonfinite = self._decode(self._first_bad.cpu().tolist())

    def _read_nonfinite(self) -> FirstNonfinite | None:
        if self._nonfinite_done:
            return None
        found = self._pending_nonfinite
        if found is None and self._first_bad is not None:
            first = self._first_bad.cpu().tolist()
            found = self._decode(first)
        if found is not None:
            self._nonfinite_done = True
        return found

    def _decode(self, first: list[int]) -> FirstNonfinite | None:
        steps = [s for s in first if s >= 0]
        if not steps:
            return None
        earliest = min(steps)
        slots = [slot for slot, s in zip(self._layout, first, strict=True) if s == earliest]
        position = {index: n for n, index in enumerate(self.order)}
        index = min({i for i, _ in slots}, key=lambda i: position.get(i, len(position) + i))
        names = tuple(name for i, name in slots if i == index)
        return FirstNonfinite(earliest, self.layers[index].name, names)

    def _collect(self, state: _StepState) -> tuple[CallStatistics, ...]:
        flags = []
        for watched in self.layers:
            current = self._snapshot(watched)
            before = self._snapshots[watched.index]
            flags.append(_changed(current[:2], before[:2]))
            flags.append(_changed(current[2:], before[2:]))
            self._snapshots[watched.index] = current
        parts = [p.statistics for p in state.pending]
        host = torch.cat([*parts, torch.stack(flags).double().to(parts[0].device if parts else "cpu")]).cpu()
        return tuple(_decode_calls(state.pending, host, self.layers))

    @staticmethod
    def _snapshot(watched: WatchedModule) -> list[torch.Tensor]:
        module = watched.module
        found = [getattr(module, name, None) for name in _STATE]
        return [t.detach().clone() if isinstance(t, torch.Tensor) else torch.zeros(0) for t in found]


class ValidationMoments:
    """The pooled statistics of every layer call over a validation's eval forwards (float64 sums on the device)."""

    def __init__(self) -> None:
        self.calls: dict[int, int] = {}
        self._pooled: dict[tuple[int, int], tuple[WatchedModule, int, int, torch.Tensor]] = {}

    def add(self, watched: WatchedModule, x: torch.Tensor) -> None:
        """Pool one call's input: its values per channel, samples, and per-channel sum and sum of squares."""
        call = self.calls.get(watched.index, 0)
        self.calls[watched.index] = call + 1
        values = x.double()
        dims = [0, *range(2, x.dim())]
        sums = torch.cat([values.sum(dims), (values * values).sum(dims)])
        count = x.numel() // watched.channels if watched.channels else 0
        samples = int(x.shape[0]) if x.dim() > 1 else 1
        key = (watched.index, call)
        if key in self._pooled:
            _, old_count, old_samples, old_sums = self._pooled[key]
            count, samples, sums = count + old_count, samples + old_samples, sums + old_sums
        self._pooled[key] = (watched, count, samples, sums)

    def results(self) -> list[CallStatistics]:
        """Each pooled call's batch statistics against the layer's running ones, after one transfer to the host."""
        if not self._pooled:
            return []
        entries = list(self._pooled.items())
        host = torch.cat([sums.cpu() for _, (_, _, _, sums) in entries]).tolist()
        out, offset = [], 0
        for (_, call), (watched, count, samples, _) in entries:
            c = watched.channels
            sums, squares = host[offset : offset + c], host[offset + c : offset + 2 * c]
            offset += 2 * c
            mean = [s / count for s in sums]
            module = watched.module
            running = [
                t for t in (module._buffers.get("running_mean"), module._buffers.get("running_var")) if t is not None
            ]
            running_mean, running_var = (
                (tuple(running[0].double().tolist()), tuple(running[1].double().tolist()))
                if len(running) == 2
                else ((), ())
            )
            out.append(
                CallStatistics(
                    layer=watched.name,
                    call=call,
                    values_per_channel=count,
                    samples=samples,
                    batch_mean=tuple(mean),
                    batch_var=tuple(max(q / count - m * m, 0.0) for q, m in zip(squares, mean, strict=True)),
                    running_mean=running_mean,
                    running_var=running_var,
                    eps=float(getattr(module, "eps", 0.0)),
                    nonfinite=0,
                    buffers_changed=False,
                    params_changed=False,
                    params_requires_grad=watched.requires_grad(),
                    training=False,
                    has_running=watched.has_running,
                    has_affine=watched.has_affine,
                )
            )
        return out


def _changed(now: list[torch.Tensor], before: list[torch.Tensor]) -> torch.Tensor:
    flags = [
        (a != b.to(a.device)).any() if a.shape == b.shape else torch.ones((), dtype=torch.bool)
        for a, b in zip(now, before, strict=True)
    ]
    return torch.stack([f.to(flags[0].device) for f in flags]).any()


def _decode_calls(pending: list[_Pending], host: torch.Tensor, layers: list[WatchedModule]) -> Iterator[CallStatistics]:
    values = host.tolist()
    changes = values[len(values) - 2 * len(layers) :]
    offset = 0
    for item in pending:
        c = item.watched.channels
        has_running = item.watched.has_running
        size = 4 * c + 1 if has_running else 2 * c + 1
        block = values[offset : offset + size]
        offset += size
        running_mean, running_var = (block[2 * c : 3 * c], block[3 * c : 4 * c]) if has_running else ([], [])
        index = item.watched.index
        yield CallStatistics(
            layer=item.watched.name,
            call=item.call,
            values_per_channel=item.values_per_channel,
            samples=item.samples,
            batch_mean=tuple(block[:c]),
            batch_var=tuple(block[c : 2 * c]),
            running_mean=tuple(running_mean),
            running_var=tuple(running_var),
            eps=float(getattr(item.watched.module, "eps", 0.0)),
            nonfinite=int(block[-1]),
            buffers_changed=bool(changes[2 * index]),
            params_changed=bool(changes[2 * index + 1]),
            params_requires_grad=item.watched.requires_grad(),
            training=item.training,
            has_running=has_running,
            has_affine=item.watched.has_affine,
        )


def _on_cpu(tensor: torch.Tensor | None) -> bool:
    return tensor is None or tensor.device.type == "cpu"


@contextmanager
def _no_autocast(x: torch.Tensor) -> Iterator[None]:
    # The statistics are reduced in float32 whatever autocast would pick for the forward.
    with torch.autocast(device_type=x.device.type, enabled=False):
        yield
