"""Where the sequential method's wave passes resume: activations held at module boundaries, for any model."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

from bn_inspect.engine.preserve import preserved_state

if TYPE_CHECKING:
    from bn_inspect.analyses.runner import DependencyTracer, Target


def _plain_stages(module: nn.Module) -> list[nn.Module] | None:
    """The modules a plain ``nn.Sequential`` calls one after the other, nested ones flattened.

    None unless the module runs ``nn.Sequential.forward`` itself and has no hooks of its own,
    so calling its stages in turn is exactly what calling it does.
    """
    if type(module).forward is not nn.Sequential.forward or module._forward_hooks or module._forward_pre_hooks:
        return None
    stages: list[nn.Module] = []
    for child in module._modules.values():  # as Sequential.forward iterates: a repeated child runs twice
        if child is None:
            return None
        inner = _plain_stages(child)
        stages.extend([child] if inner is None else inner)
    return stages


def _aliases(output: torch.Tensor, args: tuple[Any, ...]) -> bool:
    """Whether ``output`` may share memory with an argument (an in-place module): a held copy would not write it."""
    try:
        key = output.untyped_storage().data_ptr()
        return any(isinstance(arg, torch.Tensor) and arg.untyped_storage().data_ptr() == key for arg in args)
    except (RuntimeError, NotImplementedError):
        return True  # no plain storage (sparse, nested): not held


@dataclass
class _Seen:
    """What the traced pass saw of one module's calls (or of one stage of a container), over all batches."""

    count: int = 0  # a module: batches in which it ran exactly once; a stage: times it ran
    is_tensor: bool = True
    depends: set[str] = field(default_factory=set)  # target layers its output (a stage: its input) depends on
    inside: set[str] = field(default_factory=set)  # target layers called while it ran
    depends_wave: int = -1  # the last wave of the layers in ``depends`` (``plan``; -1: none)
    inside_wave: int = -1  # the same for ``inside``


class Resumer:
    """Holds activations that no later wave can change, so each wave pass skips what computed them.

    Two kinds of boundary, both found by the traced first pass (``observing``):

    * the output of a module called exactly once per forward: in a later pass, the module's call
      returns a copy of it instead of running (``forward`` is shadowed on the instance for the pass);
    * the input of a stage of a plain ``nn.Sequential`` (nested ones flattened) anywhere in the
      model: the container's call runs its stages from the held one, as ``nn.Sequential`` would.

    Why it is exact: an activation is held only when the dependency trace says it depends on no
    layer of this wave or a later one, and no such layer runs inside what it skips. Every layer it
    depends on already has its final statistics, so running again would give the very same
    tensor. A dependency the trace cannot see is caught by the check pass, as for the waves.

    What it keeps: per batch, at most one stage input per container and the outputs of
    once-called modules; an activation held inside a module, or before a container's held stage,
    is dropped once that module's output or a later stage's input is held. All of it within
    ``budget_bytes``; past it, batches run from further back (``is_over_budget``).

    Modules a pass runs have their own flags and buffers restored after it, as a full pass would.
    """

    def __init__(self, model: nn.Module, targets: Mapping[str, Target], budget_bytes: int) -> None:
        self._model = model
        self._target_of = {id(t.layer.module): name for name, t in targets.items()}
        self.budget_bytes = budget_bytes
        self.is_over_budget = False
        self._containers: dict[int, list[nn.Module]] = {}
        self._stage_ids: set[int] = set()
        flattened: set[int] = set()  # the Sequentials nested in a container, which its forward never calls
        for module in model.modules():
            if id(module) in self._stage_ids or id(module) in flattened:
                continue
            stages = _plain_stages(module)
            if stages:
                self._containers[id(module)] = stages
                self._stage_ids.update(id(stage) for stage in stages)
                inside_stages = {id(inner) for stage in stages for inner in stage.modules()}
                flattened.update(id(inner) for inner in module.modules() if id(inner) not in inside_stages)
        self._modules = {id(module): module for module in model.modules()}
        self._seen: dict[int, _Seen] = defaultdict(_Seen)
        self._stages: dict[int, list[_Seen]] = {key: [_Seen() for _ in s] for key, s in self._containers.items()}
        self._outputs: dict[int, dict[int, torch.Tensor]] = defaultdict(dict)
        self._holds: dict[int, dict[int, tuple[int, torch.Tensor]]] = defaultdict(dict)
        self._held_bytes = 0
        self._num_batches = 0
        self._batch = 0
        self._wave = 0
        self._final_stage: dict[int, int] = {}
        self._calls: dict[int, int] = defaultdict(int)
        self._log: list[str] = []
        self._started: dict[int, int] = {}

    def start_batch(self, index: int) -> None:
        self._batch = index
        self._fold_calls()
        self._num_batches = max(self._num_batches, index + 1)
        self._log, self._started = [], {}

    def holds(self, index: int) -> bool:
        """Whether batch ``index`` resumes inside the model itself, so that its data is not needed."""
        return index in self._holds.get(id(self._model), {})

    def plan(self, waves: Mapping[str, int]) -> None:
        """Note, for what the traced pass saw, the last wave that changes it (a layer not run never changes)."""
        for seen in [*self._seen.values(), *(stage for stages in self._stages.values() for stage in stages)]:
            seen.depends_wave = max((waves.get(name, -1) for name in seen.depends), default=-1)
            seen.inside_wave = max((waves.get(name, -1) for name in seen.inside), default=-1)

    def begin_wave(self, wave: int) -> None:
        """The next pass measures this wave, after every earlier wave's statistics were written."""
        self._wave = wave

    @contextmanager
    def observing(self, tracer: DependencyTracer) -> Iterator[None]:
        """The traced first pass: record what each module's output and each stage's input depend on."""

        def before(module: nn.Module, _args: tuple[Any, ...]) -> None:
            key = id(module)
            if key not in self._modules:
                return  # the hooks are global: a module outside the model (one built inside a forward)
            name = self._target_of.get(key)
            if name is not None:
                self._log.append(name)
            self._calls[key] += 1
            self._started[key] = len(self._log)

        def after(module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
            if id(module) not in self._modules:
                return
            seen = self._seen[id(module)]
            seen.inside.update(self._log[self._started.get(id(module), 0) :])
            seen.is_tensor &= isinstance(output, torch.Tensor)
            seen.depends |= tracer.sources_of(output)

        def stage_seen(key: int, stage: int, value: object, log_start: int) -> None:
            seen = self._stages[key][stage]
            if log_start < 0:
                seen.count += 1
                seen.depends |= tracer.sources_of(value)
                seen.is_tensor &= isinstance(value, torch.Tensor)
            else:
                seen.inside.update(self._log[log_start:])

        with self._hooked(before, after), self._shadowed(list(self._containers), stage_seen):
            yield
        self._fold_calls()

    @contextmanager
    def pass_over(self) -> Iterator[None]:
        """One wave pass: resume each call from what is held, and hold what no later wave changes."""
        kept = ExitStack()
        entered: set[int] = set()

        def before(module: nn.Module, _args: tuple[Any, ...]) -> None:
            if id(module) not in entered and id(module) in self._modules:
                entered.add(id(module))
                kept.enter_context(preserved_state(module, recurse=False))

        def after(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            key = id(module)
            if (
                key in self._modules
                and isinstance(output, torch.Tensor)
                and not _aliases(output, args)
                and self._is_final(module)
                and self._batch not in self._outputs[key]
                and self._hold(output)
            ):
                self._outputs[key][self._batch] = output.detach().clone()
                self._drop_inside(module)

        serving = [*self._containers, *(key for key, held in self._outputs.items() if held)]
        with kept, self._hooked(before, after), self._shadowed(serving, None):
            yield

    @contextmanager
    def _hooked(
        self,
        before: Callable[[nn.Module, tuple[Any, ...]], None],
        after: Callable[[nn.Module, tuple[Any, ...], Any], None],
    ) -> Iterator[None]:
        # Global hooks: one registration per pass, whatever the model's size; they only fire for
        # the modules that run, so a pass costs what it runs.
        handles = [register_module_forward_pre_hook(before), register_module_forward_hook(after)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def _shadowed(self, keys: list[int], stage_seen: Callable[[int, int, object, int], None] | None) -> Iterator[None]:
        """Shadow ``forward`` on these modules' instances for one pass, and put back what was there."""
        missing = object()
        shadowed: list[tuple[nn.Module, object]] = []
        try:
            for key in dict.fromkeys(keys):
                module = self._modules[key]
                shadowed.append((module, module.__dict__.get("forward", missing)))
                module.__dict__["forward"] = self._forward_of(key, module.forward, stage_seen)
            yield
        finally:
            for module, before in shadowed:
                if before is missing:
                    del module.__dict__["forward"]
                else:
                    module.__dict__["forward"] = before

    def _forward_of(
        self, key: int, original: Callable[..., Any], stage_seen: Callable[[int, int, object, int], None] | None
    ) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            held = self._outputs.get(key, {}).get(self._batch)
            if held is not None:
                return held.clone()  # a copy: the caller may write into it in place
            if key not in self._containers or len(args) != 1 or kwargs:
                return original(*args, **kwargs)
            return self._run_stages(key, args[0], stage_seen)

        return forward

    def _run_stages(self, key: int, value: Any, stage_seen: Callable[[int, int, object, int], None] | None) -> Any:
        stages = self._containers[key]
        held = self._holds[key].get(self._batch)
        start = 0
        if held is not None:
            start, value = held[0], held[1].clone()
        save_at = -1 if stage_seen is not None else self._last_final_stage(key)
        for index in range(start, len(stages)):
            if index == save_at and index > start and isinstance(value, torch.Tensor) and self._hold(value):
                self._replace_hold(key, index, value.detach().clone())
            if stage_seen is not None:
                stage_seen(key, index, value, -1)
                log_start = len(self._log)
                value = stages[index](value)
                stage_seen(key, index, value, log_start)
            else:
                value = stages[index](value)
        return value

    def _last_final_stage(self, key: int) -> int:
        """The deepest stage whose input no layer of this wave or later changes, nor runs before it.

        A later wave only moves it on, so the search goes on from the last pass's answer.
        """
        if not self._is_once(key):
            return -1
        found = self._final_stage.get(key, -1)
        stages = self._stages[key]
        for index in range(max(found, 0), len(stages)):
            seen = stages[index]
            if seen.count != self._num_batches or not seen.is_tensor or seen.depends_wave >= self._wave:
                break
            found = index
            if seen.inside_wave >= self._wave:
                break
        self._final_stage[key] = found
        return found

    def _is_once(self, key: int) -> bool:
        seen = self._seen.get(key)
        return seen is not None and seen.count == self._num_batches

    def _is_final(self, module: nn.Module) -> bool:
        """Whether to hold this module's output: once a forward, no hooks of its own, no later wave changes it.

        A stage of a container is held as the next stage's input instead; the model itself is never skipped.
        """
        key = id(module)
        seen = self._seen.get(key)
        return (
            seen is not None
            and key != id(self._model)
            and key not in self._stage_ids
            and not module._forward_hooks
            and not module._forward_pre_hooks
            and self._is_once(key)
            and seen.is_tensor
            and max(seen.depends_wave, seen.inside_wave) < self._wave
        )

    def _hold(self, value: torch.Tensor) -> bool:
        size = value.numel() * value.element_size()
        if self._held_bytes + size > self.budget_bytes:
            self.is_over_budget = True
            return False
        self._held_bytes += size
        return True

    def _replace_hold(self, key: int, stage: int, value: torch.Tensor) -> None:
        old = self._holds[key].get(self._batch)
        first = 0 if old is None else old[0]
        if old is not None:
            self._held_bytes -= old[1].numel() * old[1].element_size()
        self._holds[key][self._batch] = (stage, value)
        for skipped in self._containers[key][first:stage]:
            self._drop_inside(skipped, itself=True)

    def _drop_inside(self, module: nn.Module, *, itself: bool = False) -> None:
        """Drop this batch's activations held inside ``module``: no pass will reach them again."""
        for inner in module.modules():
            if inner is module and not itself:
                continue
            for held in (self._outputs.get(id(inner)), self._holds.get(id(inner))):
                value = None if held is None else held.pop(self._batch, None)
                tensor = value[1] if isinstance(value, tuple) else value
                if tensor is not None:
                    self._held_bytes -= tensor.numel() * tensor.element_size()

    def _fold_calls(self) -> None:
        """Count the modules and stages called exactly once in the batch that ended."""
        if not self._calls:
            return
        for key, count in self._calls.items():
            if count == 1 and key in self._seen:
                self._seen[key].count += 1
        self._calls = defaultdict(int)
