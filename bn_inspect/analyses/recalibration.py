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

The two methods, and why ``sequential`` is the default
-----------------------------------------------------
An eval-mode layer normalizes with its running statistics, and ``check`` measures each layer's
eval-mode input against them, so the statistics to write are those of the eval-mode inputs.

``precise`` (as fvcore's PreciseBN and ``update_bn``): one pass with the normalization layers in
training mode, so each layer's input was normalized upstream with *batch* statistics, as in
training. One forward per batch; the statistics describe the training-time activations, which in
eval mode (upstream layers normalizing with population statistics instead) are not what a deep
layer sees: the gap grows with depth and as batches shrink (benchmarks/bench_recalibration_methods.py,
docs/benchmarks.md), until ``check`` on the very data it was recalibrated with fails the model.

``sequential`` (the default): the statistics of each layer are taken in *eval* mode with every
layer upstream of it already recalibrated, so they are exactly the statistics the deployed model's
layers see on these data. A layer can only be measured once everything it depends on has its new statistics,
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
partial forward per further wave + 1 full check. Each partial forward resumes from activations
the earlier ones held (``Resumer``, analyses/resuming.py): the input of a stage of any plain
``nn.Sequential`` in the model, and the output of any module called once per forward, whenever
the trace says no later wave changes it. So the partial forwards of a chain add up to about one
full forward however deep it is, and a ResNet's to a few, whatever its forward looks like; the
activations are held within half the memory available, past which batches run from further
back (a note says so). TorchScript, exported programs and data-dependent control flow are not
resumed: there each partial forward reruns every wave's upstream layers, which for a chain of L
layers adds up to about L / 2 full forwards (docs/benchmarks.md has measured costs).

A torch.export program (``ep.module()``) has no modules, only batch-norm calls whose running
statistics are program buffers, and its mode is fixed at export. An eval-mode program normalizes
with those buffers, so ``sequential`` measures it at the dispatcher and writes them (``save_like``
then writes the program back); ``precise`` would need train mode, which such a program cannot run,
and a train-mode program rewrites its buffers with momentum at every call: both are refused.

Both methods mutate the model they are given; on an error every buffer they changed is restored.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from enum import Enum
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bn_inspect.analyses.passes import joined_run
from bn_inspect.analyses.runner import Runner, Seen, Target
from bn_inspect.analyses.waves import Measurement, run_sequential, unusable_reason, write_statistics
from bn_inspect.engine.moments import Moments
from bn_inspect.errors import ExportModeError, NoNormLayersError
from bn_inspect.model.graph import exported_training_mode, iter_graph_norm_layers
from bn_inspect.model.layers import NormFamily, NormLayer, iter_norm_layers
from bn_inspect.model.modules import refuse_lazy_modules, unwrap_compiled
from bn_inspect.report import departure, shift
from bn_inspect.report.comparisons import RecalibratedLayer, RecalibrationResult, SkippedLayer
from bn_inspect.text import Untrusted

Floats = tuple[float, ...]

if TYPE_CHECKING:
    from bn_inspect.distributed.context import DistributedContext


# A layer's buffers as they were before recalibration: running mean, running var, num_batches_tracked.
Original = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


class RecalibrationMethod(str, Enum):
    """Which activations the new running statistics describe."""

    SEQUENTIAL = "sequential"
    PRECISE = "precise"


def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    method: RecalibrationMethod | str = RecalibrationMethod.SEQUENTIAL,
    verify: bool = True,
    distributed: DistributedContext | None = None,
    memory_budget_bytes: int | None = None,
) -> RecalibrationResult:
    """Rewrite every batch-style layer's running statistics with exact population statistics.

    **This changes ``model`` in place** (its running buffers and ``num_batches_tracked``; training flags
    are restored): pass a copy if you need the original. If a forward fails, every buffer is restored.

    See the module docstring for the formulas and the two methods. Other modules run in eval mode
    in every pass (dropout off); in the ``precise`` pass only the normalization layers train, so a
    model whose forward branches on its own ``training`` flag runs its eval branch.

    Args:
        model: an eager ``nn.Module``, a TorchScript module or an eval-mode torch.export program's module.
        batches: tensors, dicts of tensors, (inputs, targets) pairs or ``Batch`` objects, the same
            data on every iteration (a list, or a DataLoader without shuffling or random
            augmentation): several passes iterate it; a one-shot iterator is collected into a list.
        method: "sequential" (the default: exact for eval, what ``check`` measures) or "precise"
            (one train-mode pass, as PreciseBN).
        verify: for ``precise``, one more eval pass to measure how well the layer inputs fit the new
            statistics (``max_abs_shift_z_after``); ``sequential`` always runs it, as its check.
        distributed: as for ``inspect_model``: each rank passes its own share of the batches
            (None joins an initialized process group). Every pass merges the layers' moments
            across ranks exactly before anything is written, so every rank ends with the same
            buffers: those one process would compute from all ranks' data. Save from one rank.
        memory_budget_bytes: for ``sequential``, the most bytes of activations held for its passes
            to resume from (default: half the memory available); past it, batches run from further back.

    Returns:
        The RecalibrationResult.

    Raises:
        NoNormLayersError: no layer has running statistics to recalibrate.
        ExportModeError: a torch.export program in train mode, or ``precise`` on one in eval mode.
        LazyModelError: lazy modules have not been materialized.
        InputError: no batch was given.
        ForwardError, ShapeMismatchError: the data does not run through the model.
    """
    method = RecalibrationMethod(method)
    model = unwrap_compiled(model)
    refuse_lazy_modules(model, ", so they have no running statistics to recalibrate", "Run one forward pass first")
    is_script = isinstance(model, torch.jit.ScriptModule)
    targets, skipped, is_exported = _targets(model, method, is_script)
    runner = Runner(model, _reiterable(batches), is_script or is_exported, joined_run(distributed))
    originals = {
        name: (t.running_mean.clone(), t.running_var.clone(), _clone(t.num_batches_tracked))
        for name, t in targets.items()
    }
    try:
        measured = _measure(runner, targets, method, is_script, memory_budget_bytes)
        seen, after = measured.seen, measured.check
        unusable = {name: reason for name, entry in seen.items() if (reason := unusable_reason(entry)) is not None}
        seen = {name: entry for name, entry in seen.items() if name not in unusable}
        for name in seen:
            write_statistics(targets[name], seen[name])
        if after is None:
            after = runner.run([targets[name] for name in seen], training=False) if verify and seen else {}
    except BaseException:
        _restore(targets, originals)
        raise
    skipped += _skipped(targets, seen, unusable)
    notes = measured.notes + (_shared_layers_note(seen) if method is RecalibrationMethod.SEQUENTIAL else [])
    return RecalibrationResult(
        method=method.value,
        layers=tuple(
            _describe(targets[name], measured, originals[name], after.get(name), runner.num_samples) for name in seen
        ),
        skipped=tuple(skipped),
        num_batches=runner.num_batches,
        num_samples=runner.num_samples,
        num_passes=runner.num_passes,
        num_waves=1 + max(measured.waves.values(), default=0),
        notes=tuple(notes),
    )


# Below this many samples per batch, precise's train-mode pass leaves a visible share of the
# between-sample spread out of the deeper layers' variances (check's BN205 reads it).
PRECISE_MIN_BATCH = 16


def _small_batches_note(runner: Runner, seen: dict[str, Any]) -> list[str]:
    # One layer alone sees the data as it is: what it merges over batches is exact.
    per_batch = runner.num_samples / max(1, runner.num_batches)
    if per_batch >= PRECISE_MIN_BATCH or len(seen) < 2:
        return []
    return [
        f"--method precise normalized each batch of about {per_batch:.3g} samples with its own statistics, so the "
        f"layers after the first can lack up to about 1/{per_batch:.3g} of the spread between samples in their new variances "
        f"(check's BN205 reads it). Use batches of {PRECISE_MIN_BATCH} or more, or --method sequential"
    ]


def _measure(
    runner: Runner, targets: dict[str, Target], method: RecalibrationMethod, is_script: bool, budget: int | None
) -> Measurement:
    """Each layer's new statistics, its inputs in the model as given, its wave, notes, and the check pass."""
    if method is RecalibrationMethod.PRECISE:
        seen = runner.run(list(targets.values()), training=True)
        return Measurement(seen, seen, {name: 0 for name in seen}, _small_batches_note(runner, seen), None)
    # TorchScript may fuse operations into kernels the dispatcher never sees, which would hide
    # dependencies from the trace: there, every layer gets its own wave.
    return run_sequential(runner, targets, trace=not is_script, memory_budget_bytes=budget)


def _shared_layers_note(seen: dict[str, Seen]) -> list[str]:
    shared = [name for name, entry in seen.items() if entry.calls_per_forward > 1]
    if not shared:
        return []
    return [
        f"{', '.join(shared)} ran more than once per forward: later calls depend on the layer's own "
        "statistics, so its new statistics describe its inputs under the old ones"
    ]


def _restore(targets: dict[str, Target], originals: dict[str, Original]) -> None:
    """Put back every buffer recalibration may have changed (after an error)."""
    with torch.no_grad():
        for name, (mean, var, tracked) in originals.items():
            target = targets[name]
            target.running_mean.copy_(mean)
            target.running_var.copy_(var)
            if target.num_batches_tracked is not None and tracked is not None:
                target.num_batches_tracked.copy_(tracked)


def _skipped(targets: dict[str, Target], seen: dict[str, Seen], unusable: dict[str, str]) -> list[SkippedLayer]:
    """The layers left as they were, and why."""
    skipped = [_skipped_layer(targets[name].layer, reason) for name, reason in unusable.items()]
    for name, target in targets.items():
        if name not in seen and name not in unusable:
            skipped.append(_skipped_layer(target.layer, "not executed on these batches"))
    return skipped


def _skipped_layer(layer: NormLayer, reason: str) -> SkippedLayer:
    return SkippedLayer(Untrusted(layer.name), Untrusted(layer.type_name), reason)


def _clone(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.clone()


def _select_targets(layers: list[NormLayer], is_script: bool) -> tuple[dict[str, Target], list[SkippedLayer]]:
    targets: dict[str, Target] = {}
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
            targets[layer.name] = Target(layer, running_mean, running_var, tracked)
        else:
            skipped.append(_skipped_layer(layer, reason or "no running statistics"))
    if not targets:
        raise NoNormLayersError(
            "the model has no normalization layer with running statistics to recalibrate",
            "Nothing to do; check that this is the model you meant",
        )
    return targets, skipped


def _targets(
    model: nn.Module, method: RecalibrationMethod, is_script: bool
) -> tuple[dict[str, Target], list[SkippedLayer], bool]:
    """The layers to recalibrate, those left out and why, and whether they were read off an exported graph.

    An exported graph has no modules to hook: its batch norms are watched at the dispatcher, as TorchScript's.
    """
    graph_layers = iter_graph_norm_layers(model) if isinstance(model, torch.fx.GraphModule) else []
    if graph_layers:
        return (*_exported_targets(model, graph_layers, method), True)
    return (*_select_targets(iter_norm_layers(model), is_script), False)


def _exported_targets(
    model: nn.Module, layers: list[NormLayer], method: RecalibrationMethod
) -> tuple[dict[str, Target], list[SkippedLayer]]:
    """The batch norms of a torch.export program, whose running statistics are the program's buffers.

    The mode is fixed in the graph: an eval-mode program normalizes with these buffers, so their
    eval statistics (``sequential``) can be measured and written; a train-mode one rewrites them itself
    at every call, and no program can run the other mode.
    """
    if exported_training_mode(layers):
        raise ExportModeError(
            "this torch.export archive was exported in train mode, so every call updates its running "
            "statistics with momentum and no eval pass can measure them",
            "Export the model again after model.eval(), or recalibrate its state_dict with --arch and export after",
        )
    if method is RecalibrationMethod.PRECISE:
        raise ExportModeError(
            "--method precise runs the normalization layers in train mode, but this torch.export archive "
            "was exported in eval mode, which its graph fixes",
            "Use --method sequential, which measures the eval-mode statistics this program normalizes with",
        )
    targets = {
        layer.name: Target(
            layer,
            model.get_buffer(f"{layer.name}.running_mean"),
            model.get_buffer(f"{layer.name}.running_var"),
            _graph_buffer(model, f"{layer.name}.num_batches_tracked"),
        )
        for layer in layers
    }
    return targets, []


def _graph_buffer(model: nn.Module, name: str) -> torch.Tensor | None:
    try:
        return model.get_buffer(name)
    except AttributeError:
        return None


def _reiterable(batches: Iterable[Any]) -> Iterable[Any]:
    # Several passes need the same data again; a generator would be empty the second time.
    if isinstance(batches, Iterator):
        return list(batches)
    return batches


def _summary(
    moments: Moments, running_mean: torch.Tensor, running_var: torch.Tensor, eps: float
) -> tuple[float, float]:
    """(max |mean shift z|, worst var ratio) of the data in ``moments`` against running statistics."""
    old_var = _floats(running_var)
    z = shift.mean_shift_z(_floats(moments.mean), _floats(running_mean), old_var, eps)
    ratio = shift.var_ratio(_floats(moments.biased_var()), old_var)
    max_z, worst = shift.max_abs(z), shift.worst_ratio(ratio)
    return (math.nan if max_z is None else max_z), (math.nan if worst is None else worst)


def _score(moments: Moments, running_mean: torch.Tensor, running_var: torch.Tensor, eps: float, samples: int) -> float:
    """The departure score (report/departure.py) of the data in ``moments`` against running statistics."""
    return departure.measure(
        _floats(moments.mean), _floats(moments.biased_var()), _floats(running_mean), _floats(running_var), eps, samples
    ).score


def _floats(tensor: torch.Tensor) -> Floats:
    return tuple(float(v) for v in tensor.detach().to("cpu", torch.float64).tolist())


def _describe(
    target: Target, measured: Measurement, original: Original, after: Seen | None, num_samples: int
) -> RecalibratedLayer:
    layer = target.layer
    seen = measured.seen[layer.name]
    eps = layer.eps or 0.0
    old_mean, old_var, old_tracked = original
    # "Before" is the model as given: for sequential, ``seen`` was measured after the layers
    # upstream had already been rewritten, which tells nothing about the given model.
    samples = max(1, num_samples * seen.calls_per_forward)
    given = measured.given[layer.name].moments
    z_before, ratio_before = _summary(given, old_mean, old_var, eps)
    departure_before = _score(given, old_mean, old_var, eps, samples)
    z_after = ratio_after = departure_after = None
    if after is not None:
        z_after, ratio_after = _summary(after.moments, target.running_mean, target.running_var, eps)
        departure_after = _score(after.moments, target.running_mean, target.running_var, eps, samples)
    tracked = target.num_batches_tracked
    return RecalibratedLayer(
        name=Untrusted(layer.name),
        type=Untrusted(layer.type_name),
        family=layer.family.value,
        num_channels=int(target.running_mean.numel()),
        num_calls=seen.num_calls,
        calls_per_forward=seen.calls_per_forward,
        values_per_channel=seen.moments.values_per_channel,
        wave=measured.waves[layer.name],
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
        departure_after=departure_after,
        departure_before=departure_before,
    )
