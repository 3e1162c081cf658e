"""Recalibration's passes over the same batches: train or eval, stopped once the layers a pass needs have run, or resumed at the stage inputs the last pass saved."""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from bn_inspect.analyses.inspection import run_model
from bn_inspect.analyses.passes import Tally, guarded_pass, iter_batches, merged_over_ranks
from bn_inspect.data.batch import Batch
from bn_inspect.engine.capture import (
    CallRecord,
    PlainDispatchMode,
    StatisticsRecorder,
    dispatch_capture,
    hooks_capture,
)
from bn_inspect.engine.moments import Moments
from bn_inspect.engine.preserve import preserved_state
from bn_inspect.errors import (
    ForwardError,
    InputError,
)
from bn_inspect.model.layers import NormLayer, iter_norm_layers
from bn_inspect.model.modules import model_device, model_float_dtype, set_norm_layers_training

Floats = tuple[float, ...]

if TYPE_CHECKING:
    from bn_inspect.distributed.context import DistributedContext


@dataclass
class Target:
    """A layer to recalibrate and its live buffers."""

    layer: NormLayer
    running_mean: torch.Tensor
    running_var: torch.Tensor
    num_batches_tracked: torch.Tensor | None


@dataclass
class Seen:
    """One layer's moments merged over every call and batch of a pass."""

    moments: Moments
    num_calls: int
    calls_per_forward: int


class StopForward(BaseException):
    """Raised from inside a forward once the layers a pass needs have all been seen.

    Not an Exception, so that neither a model's own ``except Exception`` nor ``run_model``'s
    naming of the failing module (a walk over every module, per stopped forward) handles it.
    Inside TorchScript it still arrives as an error, which the stopper's flag recognizes.
    """


class Runner:
    """Runs passes over the same batches, capturing chosen layers' inputs.

    ``ranks`` is the run over several ranks whose moments every pass merges, or None for one process.
    """

    def __init__(
        self, model: nn.Module, batches: Iterable[Any], is_script: bool, ranks: DistributedContext | None
    ) -> None:
        self.model = model
        self.batches = batches
        self.is_script = is_script
        self.ranks = ranks
        self.device = model_device(model)
        self.dtype = model_float_dtype(model)
        self.norm_layers = iter_norm_layers(model)
        self.num_passes = 0
        self.num_batches = 0
        self.num_samples = 0
        self._in_session = False

    @contextmanager
    def eval_session(self) -> Iterator[None]:
        """Eval mode, no grad and the model's state kept for a series of passes that resume at a cut.

        Inside it, ``run`` with a cut sets up only the stages it runs, so a pass costs what it
        runs, not the model's size. On exit every flag and buffer is as it was on entry: the
        running statistics written inside are undone too, so the caller writes them again.
        """
        with guarded_pass(self.model, None):
            set_norm_layers_training(self.model, [])
            self._in_session = True
            try:
                yield
            finally:
                self._in_session = False

    def run(
        self,
        targets: list[Target],
        *,
        training: bool,
        stop_after: Mapping[str, int] | None = None,
        tracer: DependencyTracer | None = None,
        cut: Cut | None = None,
    ) -> dict[str, Seen]:
        """One pass; the targets' inputs merged per layer, in order of first call.

        ``stop_after`` (layer name -> calls per forward) ends each forward once every listed
        layer has been called that often; the model's state (flags, buffers) is restored after.
        Across ranks, the pass covers every rank's batches: the moments are merged exactly.
        ``cut`` (eval passes inside ``eval_session`` only): each batch starts from the stage
        input the cut holds for it, and the cut moves to the first stage of these targets.
        """
        if cut is not None and (training or tracer is not None or not self._in_session):
            cut = None
        recorder = StatisticsRecorder() if tracer is None else TracedRecorder(tracer)
        layers = [t.layer for t in targets]
        # Unfused: the sequential method's dependency tracer follows the batch-norm ops themselves.
        capture = dispatch_capture if self.is_script else functools.partial(hooks_capture, fuse=False)
        stopper = _Stopper(targets, stop_after or {}, self.is_script)
        tally = Tally(self.device)
        # Inside an eval session the model's state is already kept and its SyncBatchNorm local.
        with guarded_pass(self.model, self.ranks, keep_state=cut is None), _maybe(tracer), _maybe(stopper.mode()):
            if cut is None:
                set_norm_layers_training(self.model, self.norm_layers if training else [])
            resumed = nullcontext() if cut is None else cut.pass_over([t.layer.name for t in targets])
            with capture(layers, recorder), stopper.hooks(), resumed:
                held = None if cut is None else cut.holds
                for index, batch in enumerate(iter_batches(self.batches, self.device, self.dtype, tally, held=held)):
                    recorder.start_batch()
                    stopper.start_batch()
                    if tracer is not None:
                        tracer.start_batch()
                    forward = None if cut is None else cut.forward(index)
                    self._forward(batch, recorder, forward, stopper, training)
        records, totals, _ = merged_over_ranks(recorder.records, tally.totals(), self.ranks, layers)
        if totals.num_batches == 0:
            raise InputError("no batch ran", "Give at least one batch of input")
        self.num_passes += 1
        self.num_batches, self.num_samples = totals.num_batches, totals.num_samples
        return _merge_calls(records)

    def _forward(
        self,
        batch: Batch,
        recorder: StatisticsRecorder,
        forward: Callable[..., object] | None,
        stopper: _Stopper,
        training: bool,
    ) -> None:
        """One forward, which may stop early; a train-mode batch of one sample says what to do instead."""
        try:
            run_model(self.model, batch, recorder, forward)
        except StopForward:
            return
        except ForwardError as error:
            if stopper.stopped:
                return
            if training and "value per channel" in error.what:
                raise ForwardError(
                    error.what, "Use batches of at least 2 samples, or the sequential method (eval mode)"
                ) from error
            raise


# The most bytes of stage inputs a Cut holds; batches past it restart from their data.
_CUT_BYTES = 1 << 30


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


class Cut:
    """Where the wave passes over a plain ``nn.Sequential`` resume: each batch's input to one stage.

    Why it is exact: the input of stage j is computed by stages 0..j-1 alone. A pass saves each
    batch's input to the first stage of its wave's layers (a copy, before that stage runs, so an
    in-place stage cannot change it); before the next pass only those layers get new statistics,
    all in stage j or later, so rerunning stages 0..j-1 would give the very same tensor (the
    same operations on the same values and buffers). Should a layer that changed run before the
    cut, or a wave's layer sit before it, the batches start from their data again. A layer run
    from a stage that does not own it (not a registered submodule) would escape this; the check
    pass after the last wave runs every batch from its data, and the layers from the first one
    that disagrees are done again.

    What it costs: memory for one stage input per batch at one cut (the old input of a batch is
    dropped as its new one is saved), at most ``_CUT_BYTES``; batches past that start from their
    data, as without a cut. Each pass copies the saved inputs once. A pass runs the stages from
    the cut to its wave's layers, so for a chain every layer runs a bounded number of times per
    batch in all.

    Skipped stages are not run, so their state is not touched; the stages a pass runs have their
    flags and buffers restored after it, as ``preserved_state`` does for a whole pass.
    """

    def __init__(self, model: nn.Module, stages: list[nn.Module], stage_of: dict[str, int]) -> None:
        self._model = model
        self._stages = stages
        self._stage_of = stage_of
        self._at = 0
        self._held: dict[int, torch.Tensor] = {}
        self._save_at = 0
        self._saved: dict[int, torch.Tensor] = {}
        self._saved_bytes = 0
        self._entered: set[int] = set()
        self._restore: ExitStack | None = None

    @classmethod
    def of(cls, model: nn.Module, targets: Mapping[str, Target]) -> Cut | None:
        """A cut for a plain ``nn.Sequential`` whose stages own every target layer, else None."""
        stages = _plain_stages(model)
        if not stages:
            return None
        first_stage: dict[int, int] = {}
        for index, stage in enumerate(stages):
            for module in stage.modules():
                first_stage.setdefault(id(module), index)
        stage_of = {name: first_stage.get(id(t.layer.module), -1) for name, t in targets.items()}
        if min(stage_of.values()) < 0:
            return None
        return cls(model, stages, stage_of)

    def forget_if_changed_before(self, changed: Iterable[str]) -> None:
        """Drop the held inputs if a layer with new statistics runs before the cut."""
        if any(self._stage_of[name] < self._at for name in changed):
            self._held.clear()

    def holds(self, index: int) -> bool:
        """Whether batch ``index`` resumes from a held stage input (its data is not needed)."""
        return index in self._held

    @contextmanager
    def pass_over(self, names: list[str]) -> Iterator[None]:
        """One pass that measures the layers ``names``: save inputs at their first stage."""
        self._save_at = min(self._stage_of[name] for name in names)
        if self._save_at < self._at:
            self._held.clear()
        self._saved, self._saved_bytes, self._entered = {}, 0, set()
        with ExitStack() as restore:
            self._restore = restore
            try:
                yield
            finally:
                self._restore = None
        self._at, self._held, self._saved = self._save_at, self._saved, {}

    def forward(self, index: int) -> Callable[..., object]:
        """The forward of batch ``index``: from its held input if any, else from its data."""

        def resume(*args: Any, **kwargs: Any) -> object:
            held = self._held.pop(index, None)
            if held is None and (len(args) != 1 or kwargs):
                for stage in range(len(self._stages)):
                    self._enter(stage)
                return self._model(*args, **kwargs)
            start, value = (0, args[0]) if held is None else (self._at, held)
            for stage in range(start, len(self._stages)):
                if stage == self._save_at and isinstance(value, torch.Tensor):
                    self._save(index, value)
                self._enter(stage)
                value = self._stages[stage](value)
            return value

        return resume

    def _save(self, index: int, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if self._saved_bytes + size <= _CUT_BYTES:
            self._saved[index] = value.detach().clone()
            self._saved_bytes += size

    def _enter(self, stage: int) -> None:
        if stage not in self._entered and self._restore is not None:
            self._entered.add(stage)
            self._restore.enter_context(preserved_state(self._stages[stage]))


@contextmanager
def _maybe(mode: TorchDispatchMode | None) -> Iterator[None]:
    if mode is None:
        yield
        return
    with mode:
        yield


def _merge_calls(records: Mapping[tuple[str, int], CallRecord]) -> dict[str, Seen]:
    """Per layer: the moments of all its calls merged, with their batch count and calls per forward."""
    seen: dict[str, Seen] = {}
    for (name, call), record in records.items():
        moments = record.moments
        if moments is None:
            continue
        entry = seen.get(name)
        if entry is None:
            seen[name] = Seen(moments, record.num_batches, call + 1)
        else:
            entry.moments = entry.moments.merge(moments)  # type: ignore[arg-type]
            entry.num_calls += record.num_batches
            entry.calls_per_forward = max(entry.calls_per_forward, call + 1)
    return seen


class _Stopper:
    """Ends a forward by raising once every watched layer has had its calls for this batch."""

    def __init__(self, targets: list[Target], stop_after: Mapping[str, int], is_script: bool) -> None:
        self.remaining_per_forward = dict(stop_after)
        self.is_script = is_script
        self.targets = [t for t in targets if t.layer.name in stop_after]
        self.stopped = False
        self._remaining: dict[str, int] = {}

    def start_batch(self) -> None:
        self.stopped = False
        self._remaining = dict(self.remaining_per_forward)

    def called(self, name: str) -> None:
        left = self._remaining.get(name)
        if left is None:
            return
        if left <= 1:
            del self._remaining[name]
        else:
            self._remaining[name] = left - 1
        if not self._remaining:
            self.stopped = True
            raise StopForward

    @contextmanager
    def hooks(self) -> Iterator[None]:
        """For eager modules: a pre-hook after the capture hook (hooks run in registration order)."""
        if self.is_script or not self.targets:
            yield
            return
        handles = []
        try:
            for target in self.targets:
                name = target.layer.name

                def hook(_module: nn.Module, _args: tuple[Any, ...], name: str = name) -> None:
                    self.called(name)

                handles.append(target.layer.module.register_forward_pre_hook(hook))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def mode(self) -> TorchDispatchMode | None:
        """For TorchScript: a dispatch mode entered outside the capture's, so it sees each kernel after it."""
        if not self.is_script or not self.targets:
            return None
        owners = {}
        for target in self.targets:
            for tensor in (target.running_mean, target.running_var):
                owners[tensor.data_ptr()] = target.layer.name
        return _StopMode(owners, self)


class _StopMode(PlainDispatchMode):
    def __init__(self, owners: dict[int, str], stopper: _Stopper) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._owners = owners
        self._stopper = stopper

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        if "batch_norm" in func.overloadpacket.__name__:
            for arg in args[3:5]:
                if isinstance(arg, torch.Tensor) and arg.data_ptr() in self._owners:
                    self._stopper.called(self._owners[arg.data_ptr()])
                    break
        return func(*args, **(kwargs or {}))


def _storage_key(tensor: torch.Tensor) -> int | None:
    try:
        key = tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    return key or None


class DependencyTracer(PlainDispatchMode):
    """Follows which layers' running statistics each tensor was computed from, op by op.

    Every tensor (by storage) carries the set of target layers whose running buffers went into
    it; an op's outputs (and the tensors it writes in place) get the union of its inputs' sets.
    At each batch-norm kernel, the set of its input (arg 0) is what the owning layer's input
    depends on; the owner is found by the set of its running-statistic arguments (InstanceNorm
    passes repeated copies, which carry the set too). Storage granularity only ever adds
    dependencies, which is safe. A value read back into Python (``.item()``, ``bool(t)``) from a
    tensor that depends on a layer may steer control flow; that is recorded as
    ``has_data_dependent_control_flow``.
    """

    def __init__(self, targets: Mapping[str, Target]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._sources: dict[int, frozenset[str]] = {}
        for name, target in targets.items():
            for tensor in (target.running_mean, target.running_var):
                key = _storage_key(tensor)
                if key is not None:
                    self._sources[key] = frozenset({name})
        self._taint: dict[int, frozenset[str]] = {}
        self.depends: dict[str, set[str]] = defaultdict(set)
        self.has_data_dependent_control_flow = False
        self.is_paused = False

    def start_batch(self) -> None:
        # Storage addresses are reused between forwards; only the buffers carry over.
        self._taint = dict(self._sources)

    def _of(self, value: object) -> frozenset[str]:
        if not isinstance(value, torch.Tensor):
            return frozenset()
        key = _storage_key(value)
        return self._taint.get(key, frozenset()) if key is not None else frozenset()

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if self.is_paused:
            return func(*args, **kwargs)
        taint: frozenset[str] = frozenset().union(*(self._of(v) for v in pytree.tree_leaves((args, kwargs))))
        if "batch_norm" in func.overloadpacket.__name__ and len(args) >= 5:
            x_taint = self._of(args[0])
            for owner in self._of(args[3]) | self._of(args[4]):
                self.depends[owner] |= x_taint - {owner}
        result = func(*args, **kwargs)
        for value in pytree.tree_leaves(result):
            if isinstance(value, torch.Tensor):
                key = _storage_key(value)
                if key is not None:
                    # A fresh output may reuse a freed tensor's address: its set replaces the old one.
                    # A view or in-place result is an input too, so ``taint`` already holds its old set.
                    self._taint[key] = taint
            elif taint and isinstance(value, (bool, int, float, complex)):
                self.has_data_dependent_control_flow = True
        for index, argument in enumerate(func._schema.arguments):
            if argument.alias_info is not None and argument.alias_info.is_write:
                target = args[index] if index < len(args) else kwargs.get(argument.name)
                if isinstance(target, torch.Tensor) and (key := _storage_key(target)) is not None:
                    self._taint[key] = self._taint.get(key, frozenset()) | taint
        return result


class TracedRecorder(StatisticsRecorder):
    """A recorder whose own reductions (and their ``.item()`` checks) the tracer does not follow."""

    def __init__(self, tracer: DependencyTracer) -> None:
        super().__init__()
        self._tracer = tracer

    def observe(self, layer: NormLayer, x: torch.Tensor) -> CallRecord | None:
        self._tracer.is_paused = True
        try:
            return super().observe(layer, x)
        finally:
            self._tracer.is_paused = False
