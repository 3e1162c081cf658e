"""Recompute the running statistics of batch-style normalization layers from data, and save the result.

What ``recalibrate`` writes
---------------------------
For a batch-style layer (BatchNorm and relatives) that sees, over all batches and calls, the values
x of channel c (n values in all, N x prod(S) per (N, C, *S) input):

* ``running_mean[c] = sum(x) / n``, the population mean;
* ``running_var[c] = sum((x - running_mean[c])**2) / (n - 1)``, the **unbiased** population
  variance, the same correction BatchNorm applies when it folds a batch into ``running_var``;
* ``num_batches_tracked`` = the number of calls seen, so a ``momentum=None`` layer (cumulative
  average over ``num_batches_tracked`` batches) that trains on afterwards weights the old
  statistics like that many batches.

The per-batch counts, means and centred sums of squares are merged exactly in float64 (Chan's
formula, ``ChannelMoments.merge``), so batches of uneven size are weighted by their values, and the
float64 results are rounded once, into the buffers' dtype.

For InstanceNorm with ``track_running_stats=True``, whose training update averages per-instance
statistics, ``running_mean`` is the average over all instances (samples) of the instance means and
``running_var`` the average of the unbiased instance variances (``InstanceMoments``): exactly the
fixed point of its momentum update on these data. Its ``num_batches_tracked`` is left alone, as
PyTorch never increments it.

Why the variance differs from ``torch.optim.swa_utils.update_bn``
------------------------------------------------------------------
``update_bn`` sets ``momentum=None`` and runs the data once with the whole model in training mode
(dropout included), so it stores the plain average over batches of the per-batch statistics. For K batches of equal size m with means
mu_k and biased variances v_k, the means agree (the average of mu_k is the population mean), but

    population biased variance = mean_k(v_k) + mean_k((mu_k - mean(mu))**2)

(within-batch plus between-batch variance), while ``update_bn`` stores
``mean_k(v_k) * m / (m - 1)``: it leaves out the variance of the per-batch means. ``recalibrate``
stores the population variance, times ``n / (n - 1)`` for n = K * m values. With batches of
uneven size the means differ too: ``update_bn`` weights every batch alike.

The two methods
---------------
``precise`` (as fvcore's PreciseBN and ``update_bn``): one pass with the normalization layers in
training mode, so each layer's input was normalized upstream with *batch* statistics, as in
training. One forward per batch; the statistics describe the training-time activations.

``sequential``: the statistics of each layer are taken in *eval* mode with every layer upstream of
it already recalibrated, so they are exactly the statistics the deployed model's layers see on
these data. A layer can only be measured once everything it depends on has its new statistics,
so layers are recalibrated in waves: a first eval pass measures every layer and records, by
following each tensor through the aten operations (a dispatch mode), which recalibrated layers each
layer's input depends on; a layer that depends on none is done after that pass, and wave k holds
the layers whose deepest dependency is in wave k - 1 (parallel branches, such as a ResNet's
downsample path, share a wave). Each later pass stops every forward, by raising from a hook, as
soon as the last layer of its wave has been reached. A final eval pass checks that every layer's
input now has exactly the statistics it was given; should a dependency have escaped the trace (an
extension that writes tensors behind the dispatcher's back), the layers from the first one that
disagrees are done again one per pass, and checked again.

Where a value that depends on a running statistic is read back into Python (data-dependent
control flow), the trace cannot be trusted, so every layer gets its own wave and passes run to
the end. TorchScript may fuse operations into kernels the dispatcher never sees, so a
ScriptModule is not traced: every layer gets its own wave (early stopping still works).

Cost, in forwards per batch: ``precise`` 1 (+1 with ``verify``); ``sequential`` 1 full + one
partial forward per further wave + 1 full check. In a plain ``nn.Sequential`` (nested ones
flattened) each partial forward resumes from the stage inputs the previous one saved (``_Cut``),
so for a chain they add up to about one full forward however deep it is, for at most
``_CUT_BYTES`` of held stage inputs; any other model reruns every wave's upstream layers, which
for a chain of L layers adds up to about L / 2 full forwards. Measured on an H100 (10 batches of 64x3x112x112, TF32):
ResNet-18, 20 layers in 17 waves: precise 4.4x a plain eval pass over the data, sequential 25x;
ResNet-50, 53 layers in 49 waves: precise 3.6x, sequential 52x.

Both methods mutate the model they are given; on an error every buffer they changed is restored.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from bn_inspect.atomic import ProtectedFile, atomic_file, check_target
from bn_inspect.capture import (
    CallRecord,
    PlainDispatchMode,
    StatisticsRecorder,
    dispatch_capture,
    hooks_capture,
    preserved_state,
)
from bn_inspect.distributed import (
    DistributedContext,
    RunTotals,
    fail_together,
    gather_json,
    joined_context,
    local_sync_batch_norm,
    merge_run_across_ranks,
)
from bn_inspect.errors import (
    BnInspectError,
    ForwardError,
    InputError,
    LazyModelError,
    NoNormLayersError,
    OutputError,
)
from bn_inspect.inspection import as_batch, model_device, model_float_dtype, run_model
from bn_inspect.layers import NormFamily, NormLayer, is_uninitialized, iter_norm_layers
from bn_inspect.stats import ChannelMoments, InstanceMoments

Floats = tuple[float, ...]
Moments = ChannelMoments | InstanceMoments


class RecalibrationMethod(str, Enum):
    """Which activations the new running statistics describe."""

    PRECISE = "precise"
    SEQUENTIAL = "sequential"


@dataclass(frozen=True)
class RecalibratedLayer:
    """One layer whose running statistics were rewritten.

    Attributes:
        name: qualified module path.
        type: class name (``BatchNorm2d``, ``InstanceNorm2d``, ...).
        family: "batch" or "instance".
        num_channels: C.
        num_calls: forward calls of the layer over all batches (a module called twice per
            forward counts twice); written to ``num_batches_tracked`` for batch-style layers.
        calls_per_forward: the most calls of the layer in one forward; above 1 the layer's later
            calls depend on its own statistics, which no single recalibration makes exact.
        values_per_channel: n, the values behind each new statistic (for InstanceNorm, instances
            times values per instance).
        wave: for ``sequential``, the pass whose data gave the statistics (0: the first pass);
            0 for ``precise``.
        old_running_mean, old_running_var: the buffers before (float64 copies).
        new_running_mean, new_running_var: the buffers after, as stored (rounded to their dtype).
        old_num_batches_tracked, new_num_batches_tracked: that buffer before and after.
        max_abs_shift_z_before: max over channels of |mean - old_running_mean| /
            sqrt(old_running_var + eps) for the data the new statistics come from.
        worst_var_ratio_before: biased variance of that data / old_running_var, the channel
            farthest from 1 on a log scale.
        max_abs_shift_z_after, worst_var_ratio_after: the same for the layer's inputs in an eval
            forward of the recalibrated model, against the new statistics (None without the
            verification pass). About 0 and (n - 1) / n for ``sequential``.
    """

    name: str
    type: str
    family: str
    num_channels: int
    num_calls: int
    calls_per_forward: int
    values_per_channel: int
    wave: int
    old_running_mean: Floats
    old_running_var: Floats
    new_running_mean: Floats
    new_running_var: Floats
    old_num_batches_tracked: int | None
    new_num_batches_tracked: int | None
    max_abs_shift_z_before: float
    worst_var_ratio_before: float
    max_abs_shift_z_after: float | None
    worst_var_ratio_after: float | None


@dataclass(frozen=True)
class SkippedLayer:
    """A normalization layer left as it was, and why."""

    name: str
    type: str
    reason: str


@dataclass(frozen=True)
class RecalibrationResult:
    """What ``recalibrate`` changed.

    Attributes:
        method: "precise" or "sequential".
        layers: the recalibrated layers, in execution order.
        skipped: layers left unchanged, with the reason.
        num_batches, num_samples: the data, per pass.
        num_passes: passes over the batches, early-stopped ones and the verification included.
        num_waves: ``sequential``: passes that produced statistics (1 for ``precise``).
        notes: caveats that apply to this run (data-dependent control flow, shared modules).
    """

    method: str
    layers: tuple[RecalibratedLayer, ...]
    skipped: tuple[SkippedLayer, ...]
    num_batches: int
    num_samples: int
    num_passes: int
    num_waves: int
    notes: tuple[str, ...] = ()

    def layer(self, name: str) -> RecalibratedLayer:
        """The recalibrated layer of that qualified name (KeyError if none)."""
        for entry in self.layers:
            if entry.name == name:
                return entry
        raise KeyError(name)


@dataclass
class _Target:
    """A layer to recalibrate and its live buffers."""

    layer: NormLayer
    running_mean: torch.Tensor
    running_var: torch.Tensor
    num_batches_tracked: torch.Tensor | None


@dataclass
class _Seen:
    """One layer's moments merged over every call and batch of a pass."""

    moments: Moments
    num_calls: int
    calls_per_forward: int


def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    method: RecalibrationMethod | str = RecalibrationMethod.PRECISE,
    verify: bool = True,
    distributed: DistributedContext | None = None,
) -> RecalibrationResult:
    """Rewrite every batch-style layer's running statistics with exact population statistics.

    **This changes ``model`` in place** (its running buffers and ``num_batches_tracked``; training
    flags are restored). Pass a copy, or a freshly loaded model, if you need the original. If the
    forward pass fails, every buffer is restored before the error is raised.

    See the module docstring for the formulas and the two methods. Non-normalization modules run
    in eval mode in every pass (dropout and stochastic depth off); in the ``precise`` pass only
    the normalization layers train, so a model whose forward branches on its own ``training``
    flag (losses, auxiliary heads) runs its eval branch.

    Args:
        model: an eager ``nn.Module`` or a TorchScript module.
        batches: tensors, dicts of tensors, (inputs, targets) pairs or ``Batch`` objects. Several
            passes iterate it again, so it must give the same data each time (a list, or a
            DataLoader without shuffling or random augmentation); a one-shot iterator is first
            collected into a list.
        method: "precise" (one train-mode pass) or "sequential" (exact for eval).
        verify: for ``precise``, run one more eval pass to measure how well the recalibrated
            model's layer inputs fit the new statistics (``max_abs_shift_z_after``);
            ``sequential`` always runs that pass, as the check of its result.
        distributed: as for ``inspect_model``: each rank passes its own share of the batches
            (None joins an initialized process group). Every pass merges the layers' moments
            across ranks exactly before anything is written, so every rank ends with the same
            buffers: those one process would compute from all ranks' data. Save from one rank.

    Returns:
        The RecalibrationResult.

    Raises:
        NoNormLayersError: no layer has running statistics to recalibrate.
        LazyModelError: lazy modules have not been materialized.
        InputError: no batch was given.
        ForwardError, ShapeMismatchError: the data does not run through the model.
    """
    method = RecalibrationMethod(method)
    if any(is_uninitialized(t) for t in (*model.parameters(), *model.buffers())):
        raise LazyModelError(
            "the model has lazy modules that have not run yet, so they have no running statistics to recalibrate",
            "Run one forward pass first",
        )
    is_script = isinstance(model, torch.jit.ScriptModule)
    layers = iter_norm_layers(model)
    targets, skipped = _select_targets(layers, is_script)
    if not targets:
        raise NoNormLayersError(
            "the model has no normalization layer with running statistics to recalibrate",
            "Nothing to do; check that this is the model you meant",
        )
    data = _reiterable(batches)
    context = joined_context() if distributed is None else distributed
    runner = _Runner(model, data, is_script, context)
    originals = {
        name: (t.running_mean.clone(), t.running_var.clone(), _clone(t.num_batches_tracked))
        for name, t in targets.items()
    }
    notes: list[str] = []
    try:
        if method is RecalibrationMethod.PRECISE:
            seen = runner.run(list(targets.values()), training=True)
            waves = {name: 0 for name in seen}
            num_waves = 1
            after = None
        else:
            # TorchScript may fuse operations into kernels the dispatcher never sees, which would
            # hide dependencies from the trace: there, every layer gets its own wave.
            seen, waves, notes, after = _sequential(runner, targets, trace=not is_script)
            num_waves = 1 + max(waves.values(), default=0)
        unusable = {name: reason for name, entry in seen.items() if (reason := _unusable(entry)) is not None}
        seen = {name: entry for name, entry in seen.items() if name not in unusable}
        for name in seen:
            _write(targets[name], seen[name])
        if after is None:
            after = runner.run([targets[name] for name in seen], training=False) if verify and seen else {}
    except BaseException:
        with torch.no_grad():
            for name, (mean, var, tracked) in originals.items():
                target = targets[name]
                target.running_mean.copy_(mean)
                target.running_var.copy_(var)
                if target.num_batches_tracked is not None and tracked is not None:
                    target.num_batches_tracked.copy_(tracked)
        raise
    for name, reason in unusable.items():
        skipped.append(SkippedLayer(name, targets[name].layer.type_name, reason))
    for name, target in targets.items():
        if name not in seen and name not in unusable:
            skipped.append(SkippedLayer(name, target.layer.type_name, "not executed on these batches"))
    shared = [name for name, entry in seen.items() if entry.calls_per_forward > 1]
    if shared and method is RecalibrationMethod.SEQUENTIAL:
        notes.append(
            f"{', '.join(shared)} ran more than once per forward: later calls depend on the layer's own "
            "statistics, so its new statistics describe its inputs under the old ones"
        )
    recalibrated = tuple(
        _describe(targets[name], entry, waves[name], originals[name], after.get(name)) for name, entry in seen.items()
    )
    return RecalibrationResult(
        method=method.value,
        layers=recalibrated,
        skipped=tuple(skipped),
        num_batches=runner.num_batches,
        num_samples=runner.num_samples,
        num_passes=runner.num_passes,
        num_waves=num_waves,
        notes=tuple(notes),
    )


def _clone(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.clone()


def _select_targets(layers: list[NormLayer], is_script: bool) -> tuple[dict[str, _Target], list[SkippedLayer]]:
    targets: dict[str, _Target] = {}
    skipped: list[SkippedLayer] = []
    for layer in layers:
        buffers = dict(layer.module.named_buffers(recurse=False))
        running_mean, running_var = buffers.get("running_mean"), buffers.get("running_var")
        reason = None
        if layer.family not in (NormFamily.BATCH, NormFamily.INSTANCE):
            reason = f"{layer.type_name} keeps no running statistics"
        elif layer.is_frozen:
            reason = "frozen: its statistics are constants that training never updates"
        elif running_mean is None or running_var is None:
            reason = (
                "no running statistics (track_running_stats=False): it normalizes with batch statistics in eval too"
            )
        elif layer.family is NormFamily.INSTANCE and is_script:
            # TorchScript hands InstanceNorm's kernel repeated copies of the running buffers, so no
            # kernel call can be traced back to the layer; the eager module can be recalibrated.
            reason = "InstanceNorm inside TorchScript cannot be told apart at the kernel level"
        if reason is None and running_mean is not None and running_var is not None:
            tracked = buffers.get("num_batches_tracked") if layer.family is NormFamily.BATCH else None
            targets[layer.name] = _Target(layer, running_mean, running_var, tracked)
        else:
            skipped.append(SkippedLayer(layer.name, layer.type_name, reason or "no running statistics"))
    return targets, skipped


def _reiterable(batches: Iterable[Any]) -> Iterable[Any]:
    # Several passes need the same data again; a generator would be empty the second time.
    if isinstance(batches, Iterator):
        return list(batches)
    return batches


def set_norm_layers_training(model: nn.Module, layers: Iterable[NormLayer]) -> None:
    """Every module in eval mode except the given normalization layers, which train.

    Non-recursive for the layers, so a layer's own submodules (the dropout inside timm's
    BatchNormAct2d) stay in eval.
    """
    model.eval()
    for layer in layers:
        layer.module.training = True


class _StopForward(BaseException):
    """Raised from inside a forward once the layers a pass needs have all been seen.

    Not an Exception, so that neither a model's own ``except Exception`` nor ``run_model``'s
    naming of the failing module (a walk over every module, per stopped forward) handles it.
    Inside TorchScript it still arrives as an error, which the stopper's flag recognizes.
    """


class _Runner:
    """Runs passes over the same batches, capturing chosen layers' inputs."""

    def __init__(self, model: nn.Module, batches: Iterable[Any], is_script: bool, context: DistributedContext) -> None:
        self.model = model
        self.batches = batches
        self.is_script = is_script
        self.context = context
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
        with preserved_state(self.model), torch.no_grad(), local_sync_batch_norm(self.model):
            set_norm_layers_training(self.model, [])
            self._in_session = True
            try:
                yield
            finally:
                self._in_session = False

    def run(
        self,
        targets: list[_Target],
        *,
        training: bool,
        stop_after: Mapping[str, int] | None = None,
        tracer: _DependencyTracer | None = None,
        cut: _Cut | None = None,
    ) -> dict[str, _Seen]:
        """One pass; the targets' inputs merged per layer, in order of first call.

        ``stop_after`` (layer name -> calls per forward) ends each forward once every listed
        layer has been called that often; the model's state (flags, buffers) is restored after.
        Across ranks, the pass covers every rank's batches: the moments are merged exactly.
        ``cut`` (eval passes inside ``eval_session`` only): each batch starts from the stage
        input the cut holds for it, and the cut moves to the first stage of these targets.
        """
        if cut is not None and (training or tracer is not None or not self._in_session):
            cut = None
        recorder = StatisticsRecorder() if tracer is None else _TracedRecorder(tracer)
        layers = [t.layer for t in targets]
        # Unfused: the sequential method's dependency tracer follows the batch-norm ops themselves.
        capture = dispatch_capture if self.is_script else functools.partial(hooks_capture, fuse=False)
        stopper = _Stopper(targets, stop_after or {}, self.is_script)
        num_batches = num_samples = 0
        together = fail_together(self.context.group) if self.context.is_distributed else nullcontext()
        whole_model = cut is None
        with (
            together,
            preserved_state(self.model) if whole_model else nullcontext(),
            torch.no_grad(),
            _maybe(tracer),
            _maybe(stopper.mode()),
        ):
            if whole_model:
                set_norm_layers_training(self.model, self.norm_layers if training else [])
            resumed = nullcontext() if cut is None else cut.pass_over([t.layer.name for t in targets])
            with (
                capture(layers, recorder),
                stopper.hooks(),
                local_sync_batch_norm(self.model) if whole_model else nullcontext(),
                resumed,
            ):
                for index, item in enumerate(self.batches):
                    batch = as_batch(item)
                    if cut is None or not cut.holds(index):
                        batch = batch.to(self.device, self.dtype)
                    num_batches += 1
                    num_samples += batch.num_samples
                    recorder.start_batch()
                    stopper.start_batch()
                    if tracer is not None:
                        tracer.start_batch()
                    try:
                        run_model(self.model, batch, recorder, None if cut is None else cut.forward(index))
                    except _StopForward:
                        continue
                    except ForwardError as error:
                        if stopper.stopped:
                            continue
                        if training and "value per channel" in error.what:
                            raise ForwardError(
                                error.what, "Use batches of at least 2 samples, or the sequential method (eval mode)"
                            ) from error
                        raise
        records: Mapping[tuple[str, int], CallRecord] = recorder.records
        if self.context.is_distributed:
            merged = merge_run_across_ranks(
                records, RunTotals(num_batches, num_samples), self.context.group, layers=layers
            )
            records = merged.records
            num_batches, num_samples = merged.totals.num_batches, merged.totals.num_samples
        if num_batches == 0:
            raise InputError("no batch ran", "Give at least one batch of input")
        self.num_passes += 1
        self.num_batches, self.num_samples = num_batches, num_samples
        return _merge_calls(records)


# The most bytes of stage inputs a _Cut holds; batches past it restart from their data.
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


class _Cut:
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
    def of(cls, model: nn.Module, targets: Mapping[str, _Target]) -> _Cut | None:
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


def _merge_calls(records: Mapping[tuple[str, int], CallRecord]) -> dict[str, _Seen]:
    seen: dict[str, _Seen] = {}
    for (name, call), record in records.items():
        moments = record.moments
        if moments is None:
            continue
        entry = seen.get(name)
        if entry is None:
            seen[name] = _Seen(moments, record.num_batches, call + 1)
        else:
            entry.moments = entry.moments.merge(moments)  # type: ignore[arg-type]
            entry.num_calls += record.num_batches
            entry.calls_per_forward = max(entry.calls_per_forward, call + 1)
    return seen


class _Stopper:
    """Ends a forward by raising once every watched layer has had its calls for this batch."""

    def __init__(self, targets: list[_Target], stop_after: Mapping[str, int], is_script: bool) -> None:
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
            raise _StopForward

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


class _DependencyTracer(PlainDispatchMode):
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

    def __init__(self, targets: Mapping[str, _Target]) -> None:
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


class _TracedRecorder(StatisticsRecorder):
    """A recorder whose own reductions (and their ``.item()`` checks) the tracer does not follow."""

    def __init__(self, tracer: _DependencyTracer) -> None:
        super().__init__()
        self._tracer = tracer

    def observe(self, layer: NormLayer, x: torch.Tensor) -> CallRecord | None:
        self._tracer.is_paused = True
        try:
            return super().observe(layer, x)
        finally:
            self._tracer.is_paused = False


def _sequential(
    runner: _Runner, targets: dict[str, _Target], *, trace: bool
) -> tuple[dict[str, _Seen], dict[str, int], list[str], dict[str, _Seen]]:
    """Measure every layer in eval mode once all layers it depends on hold their new statistics.

    Returns the statistics per layer, each layer's wave, notes, and what a final eval pass of the
    recalibrated model measured (the check that no dependency was missed).
    """
    tracer = _DependencyTracer(targets) if trace else None
    first = runner.run(list(targets.values()), training=False, tracer=tracer)
    order = list(first)  # execution order of first calls
    notes = []
    if tracer is not None and runner.context.is_distributed:
        _share_dependencies(tracer, runner.context)
    is_chain = tracer is None or tracer.has_data_dependent_control_flow
    stoppable = tracer is None or not tracer.has_data_dependent_control_flow
    waves: dict[str, int] = {}
    for position, name in enumerate(order):
        if tracer is None or is_chain:
            waves[name] = position
            continue
        # A layer whose batch-norm kernel was never traced (a custom forward) may depend on any
        # earlier layer; a dependency on a later layer can only come from a module called twice.
        upstream = tracer.depends[name] if name in tracer.depends else set(order[:position])
        waves[name] = 1 + max((waves[u] for u in upstream if u in waves), default=-1)
    if tracer is not None and tracer.has_data_dependent_control_flow:
        notes.append(
            "a value computed from running statistics was read into Python (data-dependent control flow): "
            "one layer per pass, each pass run to the end"
        )
    seen = {name: first[name] for name in order if waves[name] == 0}
    _measure_waves(runner, targets, first, order, waves, seen, stoppable=stoppable, start=1)
    check = _check_pass(runner, targets, order, seen)
    wrong = _first_disagreeing(order, seen, check, targets)
    if wrong is not None:
        # Something the trace could not see (a C++ extension writing its output directly, say)
        # hid a dependency: redo the layers from there on one per pass, which needs no trace.
        last = max(waves.values())
        for offset, name in enumerate(order[order.index(wrong) :]):
            waves[name] = last + 1 + offset
        notes.append(
            f"the dependency trace missed a dependency of {wrong}: it and the layers after it were "
            "recalibrated again, one per pass"
        )
        _measure_waves(runner, targets, first, order, waves, seen, stoppable=stoppable, start=last + 1)
        check = _check_pass(runner, targets, order, seen)
    return {name: seen[name] for name in order if name in seen}, waves, notes, check


def _share_dependencies(tracer: _DependencyTracer, context: DistributedContext) -> None:
    """Give every rank the union of all ranks' traced dependencies, so all plan the same waves.

    A rank sees only the paths its own data took (none at all without batches); the union of
    what all ranks saw is what one process over all the data would have seen.
    """
    local = {
        "depends": {name: sorted(upstream) for name, upstream in tracer.depends.items()},
        "control_flow": tracer.has_data_dependent_control_flow,
    }
    for seen in gather_json(local, context.group, "sharing the traced dependencies"):
        for name, upstream in seen["depends"].items():
            tracer.depends[name] |= set(upstream)
        tracer.has_data_dependent_control_flow |= bool(seen["control_flow"])


def _measure_waves(
    runner: _Runner,
    targets: dict[str, _Target],
    first: dict[str, _Seen],
    order: list[str],
    waves: dict[str, int],
    seen: dict[str, _Seen],
    *,
    stoppable: bool,
    start: int,
) -> None:
    """One eval pass per wave from ``start``, each after writing everything measured so far.

    For a plain ``nn.Sequential`` each pass resumes from a ``_Cut`` (see there): it runs only the
    stages from the previous wave's first stage to this wave's layers, so a chain of L layers
    costs about one forward per batch in all instead of L / 2. Inside the session the written
    statistics are undone on exit; ``_check_pass`` and ``recalibrate`` write them all again.
    """
    last = max(waves.values(), default=0)
    members_of: dict[int, list[str]] = defaultdict(list)
    for name in order:
        members_of[waves[name]].append(name)
    cut = None if runner.is_script else _Cut.of(runner.model, targets)
    with runner.eval_session() if cut is not None else nullcontext():
        changed = [name for name in order if name in seen]
        for wave in range(start, 1 + last):
            # Buffers written earlier stay written (each pass restores what it found), so only the
            # statistics measured by the previous pass need writing.
            for name in changed:
                _write(targets[name], seen[name])
            if cut is not None:
                cut.forget_if_changed_before(changed)
            members = members_of[wave]
            stop_after = {n: first[n].calls_per_forward for n in members} if stoppable else None
            measured = runner.run([targets[n] for n in members], training=False, stop_after=stop_after, cut=cut)
            changed = [name for name in members if name in measured]
            seen.update({name: measured[name] for name in changed})


def _check_pass(
    runner: _Runner, targets: dict[str, _Target], order: list[str], seen: dict[str, _Seen]
) -> dict[str, _Seen]:
    for name in order:
        if name in seen:
            _write(targets[name], seen[name])
    return runner.run([targets[name] for name in order if name in seen], training=False)


# How far an eval pass of the recalibrated model may sit from the statistics it was given, in
# running standard deviations (mean) and relative variance: rounding of the buffers and of
# reductions in another order is ~1e-7; a layer measured before an upstream change is far off.
_AGREEMENT = 1e-3


def _first_disagreeing(
    order: list[str], seen: dict[str, _Seen], check: dict[str, _Seen], targets: dict[str, _Target]
) -> str | None:
    """The first layer whose eval input does not have the statistics it was recalibrated to."""
    for name in order:
        written, measured = seen.get(name), check.get(name)
        if written is None or measured is None or written.calls_per_forward > 1 or _unusable(written):
            continue  # a module called twice cannot agree exactly (see the result's notes)
        mean, biased = _mean_and_biased_var(written.moments)
        measured_mean, measured_biased = _mean_and_biased_var(measured.moments)
        scale = biased + (targets[name].layer.eps or 0.0)
        z = (measured_mean - mean).abs() / scale.sqrt()
        ratio = (measured_biased - biased).abs() / scale
        if not bool((z <= _AGREEMENT).all() & (ratio <= _AGREEMENT).all()):
            return name
    return None


def _mean_and_biased_var(moments: Moments) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(moments, ChannelMoments):
        return moments.mean, moments.biased_var()
    return moments.mean(), moments.biased_var()


def _new_statistics(moments: Moments) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(moments, ChannelMoments):
        return moments.mean, moments.unbiased_var()
    return moments.mean(), moments.unbiased_var()


def _unusable(seen: _Seen) -> str | None:
    """Why these statistics must not be written, or None."""
    moments = seen.moments
    per_statistic = moments.count if isinstance(moments, ChannelMoments) else moments.values_per_instance
    if per_statistic < 2 or _values_per_channel(moments) < 2:
        return "fewer than 2 values per channel on these batches: no unbiased variance"
    mean, var = _new_statistics(moments)
    if not bool(torch.isfinite(mean).all() & torch.isfinite(var).all()):
        return "its input held NaN or Inf on these batches"
    return None


def _write(target: _Target, seen: _Seen) -> None:
    if _unusable(seen) is not None:
        return  # left as it was; recalibrate lists it as skipped
    mean, var = _new_statistics(seen.moments)
    with torch.no_grad():
        target.running_mean.copy_(mean.to(target.running_mean.dtype))
        target.running_var.copy_(var.to(target.running_var.dtype))
        if target.num_batches_tracked is not None:
            target.num_batches_tracked.fill_(seen.num_calls)


def _summary(
    moments: Moments, running_mean: torch.Tensor, running_var: torch.Tensor, eps: float
) -> tuple[float, float]:
    """(max |mean shift z|, worst var ratio) of the data in ``moments`` against running statistics."""
    mean, biased = _mean_and_biased_var(moments)
    running_mean, running_var = running_mean.double(), running_var.double()
    z = (mean - running_mean) / (running_var + eps).sqrt()
    ratio = biased / running_var
    max_z = math.nan if bool(z.isnan().any()) else float(z.abs().max()) if z.numel() else math.nan
    if not ratio.numel() or bool(ratio.isnan().any()):
        return max_z, math.nan
    distance = ratio.log().abs().nan_to_num(math.inf)
    return max_z, float(ratio[distance.argmax()])


def _floats(tensor: torch.Tensor) -> Floats:
    return tuple(float(v) for v in tensor.detach().to("cpu", torch.float64).tolist())


def _values_per_channel(moments: Moments) -> int:
    if isinstance(moments, ChannelMoments):
        return moments.count
    return moments.num_instances * moments.values_per_instance


def _describe(
    target: _Target,
    seen: _Seen,
    wave: int,
    original: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    after: _Seen | None,
) -> RecalibratedLayer:
    layer = target.layer
    eps = layer.eps or 0.0
    old_mean, old_var, old_tracked = original
    z_before, ratio_before = _summary(seen.moments, old_mean, old_var, eps)
    z_after = ratio_after = None
    if after is not None:
        z_after, ratio_after = _summary(after.moments, target.running_mean, target.running_var, eps)
    tracked = target.num_batches_tracked
    return RecalibratedLayer(
        name=layer.name,
        type=layer.type_name,
        family=layer.family.value,
        num_channels=int(target.running_mean.numel()),
        num_calls=seen.num_calls,
        calls_per_forward=seen.calls_per_forward,
        values_per_channel=_values_per_channel(seen.moments),
        wave=wave,
        old_running_mean=_floats(old_mean),
        old_running_var=_floats(old_var),
        new_running_mean=_floats(target.running_mean),
        new_running_var=_floats(target.running_var),
        old_num_batches_tracked=int(old_tracked.item()) if old_tracked is not None and old_tracked.numel() else None,
        new_num_batches_tracked=int(tracked.item()) if tracked is not None and tracked.numel() else None,
        max_abs_shift_z_before=z_before,
        worst_var_ratio_before=ratio_before,
        max_abs_shift_z_after=z_after,
        worst_var_ratio_after=ratio_after,
    )


class SaveFormat(str, Enum):
    """How a model file was stored (``LoadedModel.format``); ``save_like`` writes the same."""

    STATE_DICT = "state_dict"
    CHECKPOINT = "checkpoint"
    SAFETENSORS = "safetensors"
    TORCHSCRIPT = "torchscript"
    PICKLE = "pickle"


def save_like(
    original_path: Path | str,
    loaded_format: SaveFormat | str,
    model: nn.Module,
    output_path: Path | str,
    *,
    force: bool = False,
    original: object = None,
) -> Path:
    """Write ``model`` to ``output_path`` in the format its input file had.

    * state_dict: ``torch.save`` of a dict with the input's keys (``module.`` / ``_orig_mod.``
      prefixes kept) and dtypes, values taken from ``model.state_dict()``.
    * checkpoint: the input's checkpoint dict (epoch, optimizer state, ...) with its state_dict
      entry replaced the same way; other weight entries (an EMA copy) are left as they were.
    * safetensors: ``safetensors.torch.save`` with the input's keys, dtypes and metadata.
    * torchscript: ``torch.jit.save`` of ``model`` (a ScriptModule).
    * pickle: ``torch.save(model)``, or, when ``original`` is a dict holding the model, that
      dict with the model in place.

    The input file is never written: an output that is the input (by any spelling, symlink or
    hard link) is refused, and so is an output that is not a regular file (a pipe, a device).
    The file is written through ``bn_inspect.atomic.atomic_file``: a temporary file in the
    output's folder, flushed to disk and renamed over the output, so a reader never sees a partial
    file, removed on any interruption; a new file's mode follows the umask. An existing output is
    refused unless ``force``.

    Args:
        original_path: the model file the model was loaded from.
        loaded_format: ``LoadedModel.format`` of that load.
        model: the (recalibrated) model.
        output_path: where to write.
        force: replace an existing output file.
        original: what ``torch.load(original_path, weights_only=True)`` returned, if the caller
            still has it; for state_dict and checkpoint files it is loaded again (weights only,
            on the CPU) when omitted. Needed for a pickle whose model sits inside a dict.

    Returns:
        The output path.

    Raises:
        OutputError: the output is the input, exists without ``force``, is a directory, pipe or
            device, its folder is missing, or the format cannot hold this model.
    """
    source, output = Path(original_path), Path(output_path)
    file_format = _save_format(loaded_format)
    check_target(output, [ProtectedFile("the input model file", source)], option="output")
    if output.exists() and not force:
        raise OutputError(f"output {output} already exists", "Pass --force to replace it, or choose another path")
    if file_format is SaveFormat.TORCHSCRIPT:
        if not isinstance(model, torch.jit.ScriptModule):
            raise OutputError(
                f"{source} is TorchScript but the model to save is an eager {type(model).__name__}",
                "Save it as a state_dict instead",
            )

        def write(stream: IO[bytes]) -> None:
            torch.jit.save(model, stream)  # type: ignore[no-untyped-call]

    elif file_format is SaveFormat.SAFETENSORS:
        payload = _safetensors_bytes(source, model)

        def write(stream: IO[bytes]) -> None:
            stream.write(payload)

    elif file_format is SaveFormat.PICKLE:
        # The model was changed in place, so a dict that holds it holds the recalibrated model.
        holds_model = isinstance(original, dict) and any(value is model for value in original.values())
        document = original if holds_model else model

        def write(stream: IO[bytes]) -> None:
            torch.save(document, stream)

    else:
        state_document = _state_dict_document(source, file_format, model, original)

        def write(stream: IO[bytes]) -> None:
            torch.save(state_document, stream)

    with atomic_file(output, overwrite=force, option="output") as stream:
        write(stream)
    return output


def _save_format(loaded_format: SaveFormat | str) -> SaveFormat:
    try:
        return SaveFormat(loaded_format)
    except ValueError:
        raise OutputError(
            f"cannot save a model loaded as {loaded_format!r} in the same format",
            f"Formats that can be written: {', '.join(f.value for f in SaveFormat)}",
        ) from None


def _load_weights_only(source: Path) -> object:
    try:
        with source.open("rb") as stream:
            return torch.load(stream, map_location="cpu", weights_only=True)
    except Exception as error:
        raise OutputError(
            f"cannot read {source} again to keep its layout ({type(error).__name__})",
            "Check that the input file is still there, or pass original=",
        ) from error


def _replaced(saved: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """``saved`` with every tensor taken from the model's state_dict, keys and dtypes kept."""
    from collections import OrderedDict

    from bn_inspect.loading import strip_prefixes

    current = model.state_dict()
    # strip_prefixes keeps the order, so zipping pairs each saved key with its stripped form.
    stripped = list(strip_prefixes(dict(saved)))
    replaced: dict[str, Any] = OrderedDict()
    metadata = getattr(saved, "_metadata", None)
    if metadata is not None:
        # Module versions that load_state_dict uses to upgrade old layouts (BatchNorm's is one).
        replaced._metadata = metadata  # type: ignore[attr-defined]
    for key, short in zip(saved, stripped, strict=True):
        value = saved[key]
        new = current.get(short)
        if isinstance(value, torch.Tensor) and isinstance(new, torch.Tensor) and new.shape == value.shape:
            value = new.detach().to(device="cpu", dtype=value.dtype).clone()
        replaced[key] = value
    return replaced


def _state_dict_document(source: Path, file_format: SaveFormat, model: nn.Module, original: object) -> object:
    document = _load_weights_only(source) if original is None else original
    if not isinstance(document, Mapping):
        raise OutputError(f"{source} does not hold a dict any more", "Save the model as a state_dict elsewhere")
    if file_format is SaveFormat.STATE_DICT:
        return _replaced(document, model)
    from bn_inspect.loading import extract_state_dict

    try:
        weights, _ = extract_state_dict(document, source)
    except BnInspectError as error:
        raise OutputError(error.what, "Save the model as a state_dict elsewhere") from None
    # extract_state_dict returns the very tensors of the entry it chose: find that entry by identity.
    chosen = [id(t) for t in weights.values()]
    for key, value in document.items():
        if isinstance(value, Mapping) and [id(t) for t in value.values()] == chosen:
            return {**document, key: _replaced(value, model)}
    return _replaced(document, model)


def _safetensors_bytes(source: Path, model: nn.Module) -> bytes:
    from safetensors import safe_open
    from safetensors.torch import save

    try:
        with safe_open(str(source), framework="pt", device="cpu") as handle:
            metadata = handle.metadata()
            saved = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except Exception as error:
        raise OutputError(
            f"cannot read {source} again to keep its layout ({type(error).__name__})",
            "Check that the input file is still there",
        ) from error
    return bytes(save(_replaced(saved, model), metadata=metadata))
