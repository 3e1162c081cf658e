"""Recalibration's passes over the same batches: train or eval, stopped once the layers a pass needs have run, or resumed from held activations."""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode, _pop_mode_temporarily

from bn_inspect.analyses.inspection import run_model
from bn_inspect.analyses.passes import Tally, guarded_pass, iter_batches, merged_over_ranks
from bn_inspect.analyses.resuming import Resumer
from bn_inspect.data.batch import Batch
from bn_inspect.engine.capture import (
    CallRecord,
    PlainDispatchMode,
    StatisticsRecorder,
    dispatch_capture,
    hooks_capture,
)
from bn_inspect.engine.moments import Moments
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
        """Eval mode, no grad and the model's state kept for a series of passes that resume.

        Inside it, ``run`` with a resumer sets up only the modules it runs, so a pass costs what it
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
        resumer: Resumer | None = None,
    ) -> dict[str, Seen]:
        """One pass; the targets' inputs merged per layer, in order of first call.

        ``stop_after`` (layer name -> calls per forward) ends each forward once every listed
        layer has been called that often; the model's state (flags, buffers) is restored after.
        Across ranks, the pass covers every rank's batches: the moments are merged exactly.
        ``resumer`` (eval passes only): with ``tracer``, it observes what later passes may hold;
        without (inside ``eval_session``), each batch resumes from the activations it holds.
        """
        if resumer is not None and (training or (tracer is None and not self._in_session)):
            resumer = None
        recorder = StatisticsRecorder() if tracer is None else TracedRecorder(tracer)
        layers = [t.layer for t in targets]
        # Unfused: the sequential method's dependency tracer follows the batch-norm ops themselves.
        capture = dispatch_capture if self.is_script else functools.partial(hooks_capture, fuse=False)
        stopper = _Stopper(targets, stop_after or {}, self.is_script)
        tally = Tally(self.device)
        # Inside an eval session the model's state is already kept and its SyncBatchNorm local.
        with (
            guarded_pass(self.model, self.ranks, keep_state=not self._in_session),
            _maybe(tracer),
            _maybe(stopper.mode()),
        ):
            if not self._in_session:
                set_norm_layers_training(self.model, self.norm_layers if training else [])
            resumed: AbstractContextManager[None] = nullcontext()
            if resumer is not None:
                resumed = resumer.observing(tracer) if tracer is not None else resumer.pass_over()
            with capture(layers, recorder), stopper.hooks(), resumed:
                held = None if resumer is None or tracer is not None else resumer.holds
                for index, batch in enumerate(iter_batches(self.batches, self.device, self.dtype, tally, held=held)):
                    recorder.start_batch()
                    stopper.start_batch()
                    if tracer is not None:
                        tracer.start_batch()
                    if resumer is not None:
                        resumer.start_batch(index)
                    self._forward(batch, recorder, stopper, training)
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
        stopper: _Stopper,
        training: bool,
    ) -> None:
        """One forward, which may stop early; a train-mode batch of one sample says what to do instead."""
        try:
            run_model(self.model, batch, recorder)
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

    def sources_of(self, value: object) -> frozenset[str]:
        """The target layers whose running statistics ``value`` (a tensor) was computed from."""
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
        taint: frozenset[str] = frozenset().union(*(self.sources_of(v) for v in pytree.tree_leaves((args, kwargs))))
        if "batch_norm" in func.overloadpacket.__name__ and len(args) >= 5:
            x_taint = self.sources_of(args[0])
            for owner in self.sources_of(args[3]) | self.sources_of(args[4]):
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
        if _get_current_dispatch_mode() is self._tracer:
            # Off the mode stack, the reductions skip Python dispatch altogether: paused, each of
            # their ops would still pass through the tracer, which triples a traced call's cost.
            with _pop_mode_temporarily():
                return super().observe(layer, x)
        self._tracer.is_paused = True
        try:
            return super().observe(layer, x)
        finally:
            self._tracer.is_paused = False
