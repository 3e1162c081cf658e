"""Run batches through a model under capture and turn what the layers saw into a Report."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bn_inspect.axes import explain_axes
from bn_inspect.capture import (
    CallRecord,
    StatisticsRecorder,
    dispatch_capture,
    hooks_and_functional_capture,
    preserved_state,
)
from bn_inspect.distributed import (
    DistributedContext,
    RunTotals,
    divergence_findings,
    fail_together,
    joined_context,
    local_sync_batch_norm,
    merge_run_across_ranks,
    rank_divergence,
    sync_batch_norm_groups,
)
from bn_inspect.errors import (
    BnInspectError,
    ExportModeError,
    ForwardError,
    InputError,
    LazyModelError,
    NoNormLayersError,
)
from bn_inspect.layers import (
    NormFamily,
    NormLayer,
    exported_training_mode,
    functional_candidates,
    is_uninitialized,
    iter_graph_norm_layers,
    iter_norm_layers,
    lowered_graph_norm_modules,
)
from bn_inspect.options import FailOn, Mode
from bn_inspect.report import DistributedInfo, InputInfo, LayerReport, ModelInfo, Report
from bn_inspect.rules import (
    CheckReport,
    Thresholds,
    filter_ignored,
    report_findings,
    state_findings,
)
from bn_inspect.stats import ChannelMoments, InstanceMoments


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

    def to(self, device: torch.device, dtype: torch.dtype) -> Batch:
        """The batch on ``device``, its floating-point tensors cast to ``dtype`` (the model's)."""
        # A copy to the GPU may overlap the work queued before it; one to the host must be
        # complete before the CPU reads it, which only a blocking copy guarantees. From pinned
        # memory the GPU copy is asynchronous, so a caller who refills one pinned buffer in place
        # must not do so before the forward has run (a DataLoader pins a new buffer per batch).
        non_blocking = device.type != "cpu"

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype, non_blocking=non_blocking)

        return Batch(tuple(move(t) for t in self.args), {k: move(v) for k, v in self.kwargs.items()})


def as_batch(item: Any) -> Batch:
    """A Batch from a tensor, a dict of tensors, or an (inputs, targets) pair from a DataLoader."""
    if isinstance(item, Batch):
        return item
    if isinstance(item, torch.Tensor):
        return Batch((item,))
    if isinstance(item, dict) and all(isinstance(v, torch.Tensor) for v in item.values()):
        return Batch((), dict(item))
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        return Batch((item[0],))
    raise InputError(
        f"cannot use a batch of type {type(item).__name__}",
        "Pass tensors, dicts of tensors, (inputs, targets) pairs or bn_inspect.Batch objects",
    )


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def model_float_dtype(model: nn.Module) -> torch.dtype:
    """What floating-point inputs are cast to: the dtype of the model's first initialized float tensor, else float32."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point() and not is_uninitialized(tensor):
            return tensor.dtype
    return torch.float32


def _has_lazy_modules(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params() for m in model.modules())


def run_model(
    model: nn.Module, batch: Batch, recorder: StatisticsRecorder, forward: Callable[..., object] | None = None
) -> None:
    """One forward pass; turns a failure inside the model into a ForwardError naming where it failed.

    ``forward``, if given, runs instead of ``model`` (a part of it); failures are named within ``model``.
    """
    try:
        (model if forward is None else forward)(*batch.args, **batch.kwargs)
    except BnInspectError:
        raise
    except Exception as error:
        raise _forward_error(
            error, recorder.last_layer, _failing_module(model, error), recorder.last_kernel_error
        ) from error


def _failing_module(model: nn.Module, error: Exception) -> str | None:
    """'name (Type)' of the innermost submodule whose forward was running when ``error`` was raised.

    Read off the traceback's frames (each forward's ``self``), so finding it costs nothing until
    something fails.
    """
    names = {id(module): name for name, module in model.named_modules() if name}
    found = None
    traceback = error.__traceback__
    while traceback is not None:
        candidate = traceback.tb_frame.f_locals.get("self")
        if isinstance(candidate, nn.Module) and id(candidate) in names:
            found = f"{names[id(candidate)]} ({type(candidate).__name__})"
        traceback = traceback.tb_next
    return found


def _forward_error(
    error: Exception, last_layer: str | None, failing_module: str | None = None, kernel_error: str | None = None
) -> BnInspectError:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    # TorchScript opens every failure with a fixed header; the cause is its last line.
    if lines and lines[0].startswith("The following operation failed in the TorchScript interpreter"):
        causes = [i for i, line in enumerate(lines) if re.match(r"^\w+(Error|Exception):", line)]
        lines = [" ".join(lines[causes[-1] :])] if causes else lines[-1:]
        if kernel_error and lines[0].rstrip(":") in ("RuntimeError", type(error).__name__):
            lines = [kernel_error]
    message = lines[0] if lines else type(error).__name__
    if isinstance(error, ValueError) and "Expected more than 1 value per channel" in message:
        return ForwardError(
            f"layer {last_layer or '?'} got 1 value per channel in train mode ({message}); "
            "a batch variance needs at least 2 values per channel",
            "Use a batch of at least 2 samples (--batch-size) or --mode eval",
        )
    where = f"after layer {last_layer} ran" if last_layer else "before any normalization layer ran"
    inside = f" in {failing_module}" if failing_module else ""
    return ForwardError(
        f"the model's forward raised {type(error).__name__}{inside} {where}: {message[:300]}",
        "Check that the input fits the model (--shape, --input)",
    )


def _no_norm_layers(verb: str) -> NoNormLayersError:
    return NoNormLayersError(
        "the model has no normalization layer (BatchNorm, InstanceNorm, GroupNorm, LayerNorm, "
        "RMSNorm or FrozenBatchNorm2d)",
        f"Nothing to {verb}; check that this is the model you meant",
    )


def _refuse_lowered_norm_layers(model: torch.fx.GraphModule) -> None:
    """Raise, naming them, when an exported graph's normalization modules are none bn-inspect can watch there."""
    lowered = lowered_graph_norm_modules(model, ())
    others = lowered_graph_norm_modules(model, (), kind="Norm")
    if not others:
        return
    shown = lowered or others
    names = ", ".join(f"{path} ({type_name})" for path, type_name in shown[:5])
    more = f" and {len(shown) - 5} more" if len(shown) > 5 else ""
    what = (
        "only as plain arithmetic (no batch-norm kernel), so their inputs cannot be told apart from other tensors"
        if lowered
        else "and no batch norm: inside torch.export programs bn-inspect reports batch norms only (other "
        "families' kernels cannot be tied back to a module)"
    )
    raise NoNormLayersError(
        f"this torch.export archive keeps {names}{more} {what}",
        "Inspect the state_dict with --arch instead, where these modules are hooked directly",
    )


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The eager module inside a ``torch.compile`` wrapper: hooks added to a compiled model after
    its first call never fire, and its graphs are shared between instances."""
    inner = getattr(model, "_orig_mod", None)
    return inner if type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module) else model


def find_layers(model: nn.Module) -> tuple[list[NormLayer], bool]:
    """The model's normalization layers, and whether they were read off an exported graph."""
    layers = iter_norm_layers(model)
    if layers or not isinstance(model, torch.fx.GraphModule):
        return layers, False
    graph_layers = iter_graph_norm_layers(model)
    return graph_layers, bool(graph_layers)


def set_training(model: nn.Module, training: bool) -> None:
    """model.train(training), except for exported programs, whose mode was fixed at export."""
    try:
        model.train(training)
    except NotImplementedError:
        return


def _check_exported_mode(layers: list[NormLayer], mode: Mode) -> None:
    exported = exported_training_mode(layers)
    if exported is None or exported == (mode is Mode.TRAIN):
        return
    frozen = "train" if exported else "eval"
    raise ExportModeError(
        f"this torch.export archive was exported in {frozen} mode, which is fixed in its graph, so it "
        f"cannot run in --mode {mode.value}",
        f"Use --mode {frozen}, or export the model again after model.{'train' if mode is Mode.TRAIN else 'eval'}()",
    )


def find_working_shape(model: nn.Module, shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...] | None:
    """The first shape whose two-sample batch the model runs in eval mode, or None.

    Each trial runs under the same state protection as an inspection, so it changes nothing
    except that lazy modules materialize, as they do on any first forward.
    """
    device, dtype = model_device(model), model_float_dtype(model)
    for shape in shapes:
        trial = torch.zeros((min(shape[0], 2), *shape[1:]), device=device, dtype=dtype)
        try:
            with preserved_state(model), torch.no_grad():
                set_training(model, False)
                model(trial)
        except Exception:
            continue
        return shape
    return None


def inspect_model(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    mode: Mode | str = Mode.EVAL,
    model_info: ModelInfo | None = None,
    input_source: str = "<batches>",
    require_norm_layers: bool = True,
    materialize_lazy: bool = False,
    distributed: DistributedContext | None = None,
) -> Report:
    """Run ``batches`` through ``model`` and report what every normalization layer saw.

    The model is left exactly as it was: its training flags and all buffers are restored and
    every hook removed, even when the forward pass raises. The one change inspection cannot undo
    is materializing lazy modules (their first forward turns them into ordinary ones, and they
    cannot be copied before it), so a model with unmaterialized lazy modules is refused unless
    ``materialize_lazy`` allows it.

    Args:
        model: an ``nn.Module`` (eager or TorchScript).
        batches: tensors, dicts of tensors, (inputs, targets) pairs, or ``Batch`` objects.
        mode: "eval" (as deployed) or "train" (batch statistics, as in training).
        model_info: where the model came from, for the report.
        input_source: where the batches came from, for the report.
        require_norm_layers: raise NoNormLayersError when the model has none.
        materialize_lazy: let the forward pass materialize lazy modules.
        distributed: this process's place in a torch.distributed run: each rank passes its own
            share of the batches, and the returned report holds the exact statistics of all
            ranks' data, merged in float64 (identical on every rank), next to this rank's own
            running statistics (identical too, unless BN111 says otherwise), with a ``distributed``
            section (each rank's share, SyncBatchNorm groups, running buffers compared across
            ranks). None joins the process group this process already belongs to, if any (the
            end of a DDP job: call it on every rank); ``DistributedContext()`` inspects this
            rank's batches alone.

    Returns:
        The Report, with layer calls in execution order.

    Raises:
        NoNormLayersError, ShapeMismatchError, ForwardError, InputError, LazyModelError.
    """
    mode = Mode(mode)
    if _has_lazy_modules(model) and not materialize_lazy:
        raise LazyModelError(
            "the model has lazy modules that have not run yet, and inspecting it would materialize them",
            "Run one forward pass first, or pass materialize_lazy=True",
        )
    model = unwrap_compiled(model)
    layers, is_graph = find_layers(model)
    if not layers and require_norm_layers and isinstance(model, torch.fx.GraphModule):
        _refuse_lowered_norm_layers(model)
    if not layers and not functional_candidates(model, []) and require_norm_layers:
        raise _no_norm_layers("inspect")
    if is_graph:
        _check_exported_mode(layers, mode)
    device = model_device(model)
    dtype = model_float_dtype(model)
    recorder = StatisticsRecorder()
    if is_graph or isinstance(model, torch.jit.ScriptModule):
        capture = dispatch_capture(layers, recorder)
    else:
        capture = hooks_and_functional_capture(model, layers, recorder)
    first: Batch | None = None
    num_batches = num_samples = 0
    nonfinite = torch.zeros((), dtype=torch.int64, device=device)
    context = joined_context() if distributed is None else distributed
    group = context.group
    # Every rank finishes its local share, or all of them fail together: none waits on a dead one.
    together = fail_together(group) if context.is_distributed else nullcontext()
    # SyncBatchNorm runs locally (see local_sync_batch_norm); the merge below makes it global.
    with together, preserved_state(model), capture, local_sync_batch_norm(model), torch.no_grad():
        set_training(model, mode is Mode.TRAIN)
        for item in batches:
            batch = as_batch(item).to(device, dtype)
            first = first or batch
            num_batches += 1
            num_samples += batch.num_samples
            # Counted on the device and read once at the end: no host synchronisation per batch.
            for tensor in batch.tensors():
                if tensor.is_floating_point():
                    nonfinite += (~torch.isfinite(tensor)).sum()
            recorder.start_batch()
            run_model(model, batch, recorder)
    shape_source = None if first is None else first.args[0] if first.args else next(iter(first.kwargs.values()))
    totals = RunTotals(
        num_batches=num_batches,
        num_samples=num_samples,
        num_nonfinite_values=int(nonfinite.item()),
        first_shape=None if shape_source is None else tuple(shape_source.shape),
        first_dtype=None if shape_source is None else str(shape_source.dtype).removeprefix("torch."),
    )
    records = recorder.records
    distributed_info = None
    if context.is_distributed:
        merged = merge_run_across_ranks(records, totals, group, layers=layers)
        records, totals = merged.records, merged.totals
        distributed_info = DistributedInfo(
            world_size=context.world_size,
            backend=context.backend,
            shares=merged.shares,
            sync_batch_norm=sync_batch_norm_groups(model),
            divergence=rank_divergence(model, group),
        )
    if totals.first_shape is None or totals.first_dtype is None:
        raise InputError("no batch ran", "Give at least one batch of input")
    input_info = InputInfo(
        source=input_source,
        shape=totals.first_shape,
        dtype=totals.first_dtype,
        num_batches=totals.num_batches,
        num_samples=totals.num_samples,
        num_nonfinite_values=totals.num_nonfinite_values,
    )
    seen = {record.layer.name for record in records.values()}
    return Report(
        model=model_info or ModelInfo("<module>", "module"),
        input=input_info,
        mode=mode.value,
        device=str(device),
        layers=tuple(_layer_report(record, mode) for record in records.values()),
        not_executed=tuple(layer.name for layer in layers if layer.name not in seen),
        torch_version=torch.__version__,
        distributed=distributed_info,
    )


def _floats(tensor: torch.Tensor) -> tuple[float, ...]:
    return tuple(float(v) for v in tensor.cpu().tolist())


def _layer_report(record: CallRecord, mode: Mode) -> LayerReport:
    layer = record.layer
    normalized_ndim = len(layer.normalized_shape) if layer.normalized_shape else 1
    axes = explain_axes(
        layer.family,
        f"{layer.name if record.call == 0 else f'{layer.name}#{record.call}'} ({layer.type_name})",
        record.input_shape,
        is_unbatched=record.is_unbatched,
        num_groups=layer.num_groups,
        normalized_ndim=normalized_ndim,
        reduced_axes=record.reduced_dims,
    )
    batch_mean = batch_var = batch_var_unbiased = None
    values_per_channel: int | None = None
    moments = record.moments
    if isinstance(moments, ChannelMoments):
        batch_mean, batch_var = _floats(moments.mean), _floats(moments.biased_var())
        batch_var_unbiased = _floats(moments.unbiased_var())
        values_per_channel = moments.count
    elif isinstance(moments, InstanceMoments):
        batch_mean, batch_var = _floats(moments.mean()), _floats(moments.biased_var())
        batch_var_unbiased = _floats(moments.unbiased_var())
        values_per_channel = moments.num_instances * moments.values_per_instance
    explanation = axes.sentence
    if record.num_batches > 1 and values_per_channel is not None:
        explanation += f" Over {record.num_batches} batches: {values_per_channel:,} values per channel in all."
    num_channels = layer.num_channels
    if num_channels is None and layer.family in (NormFamily.BATCH, NormFamily.INSTANCE, NormFamily.GROUP):
        num_channels = record.input_shape[0 if record.is_unbatched else 1]
    return LayerReport(
        name=layer.name,
        call=record.call,
        type=layer.type_name,
        family=layer.family.value,
        num_channels=num_channels,
        input_shape=record.input_shape,
        axis_names=axes.axis_names,
        reduced_axes=axes.reduced_axes,
        values_per_channel=values_per_channel,
        eps=layer.eps,
        momentum=layer.momentum,
        affine=layer.affine,
        track_running_stats=layer.track_running_stats,
        num_batches_tracked=layer.num_batches_tracked,
        normalizes_with=layer.normalizes_with(mode is Mode.TRAIN),
        batch_mean=batch_mean,
        batch_var=batch_var,
        batch_var_unbiased=batch_var_unbiased,
        running_mean=layer.running_mean,
        running_var=layer.running_var,
        weight=layer.weight,
        bias=layer.bias,
        explanation=explanation,
        flags=_flags(layer, batch_mean, batch_var),
    )


def _flags(layer: NormLayer, batch_mean: Sequence[float] | None, batch_var: Sequence[float] | None) -> tuple[str, ...]:
    flags = []
    if layer.is_lazy:
        flags.append("lazy")
    if layer.is_frozen:
        flags.append("frozen")
    stats = [*(batch_mean or ()), *(batch_var or ())]
    if any(not math.isfinite(v) for v in stats):
        flags.append("nonfinite-input")
    running = [*(layer.running_mean or ()), *(layer.running_var or ())]
    if any(not math.isfinite(v) for v in running):
        flags.append("nonfinite-running")
    if (
        layer.num_batches_tracked == 0
        and layer.running_mean is not None
        and layer.running_var is not None
        and all(v == 0 for v in layer.running_mean)
        and all(v == 1 for v in layer.running_var)
    ):
        flags.append("untrained")
    if layer.family is NormFamily.BATCH and not layer.is_frozen and layer.running_mean is None:
        flags.append("no-running-stats")
    return tuple(flags)


def check_model(
    model: nn.Module,
    batches: Iterable[Any] | None = None,
    *,
    mode: Mode | str = Mode.EVAL,
    thresholds: Thresholds | None = None,
    fail_on: FailOn | str = FailOn.ERROR,
    ignore: Sequence[str] = (),
    model_info: ModelInfo | None = None,
    input_source: str = "<batches>",
    flags_from_file: bool = True,
    data_is_real: bool = True,
    materialize_lazy: bool = False,
    distributed: DistributedContext | None = None,
) -> CheckReport:
    """Run the BatchNorm health rules on ``model`` (and on ``batches``, when given).

    Args:
        model: the model to check; left unchanged, as by inspect_model.
        batches: data for the rules that need a forward pass; None runs only the rules on
            stored state (buffers, flags).
        mode: mode of the forward pass.
        thresholds: limits for the data rules.
        fail_on: the lowest severity that makes the check fail.
        ignore: rule codes (BN201) or names (shifted) to leave out.
        model_info: where the model came from, for the report.
        input_source: where the batches came from, for the report.
        flags_from_file: the model's training flags were saved with it (False for a state_dict
            loaded into a fresh --arch, whose flags say nothing about the checkpoint).
        data_is_real: the batches are real data; random input makes every layer look shifted, so
            the shift and dead-channel rules only run on real data.
        materialize_lazy: as for inspect_model.
        distributed: as for inspect_model; across several ranks the data rules see the
            statistics of all ranks' data, and the running buffers are compared across ranks
            (BN111). Every rank judges the global statistics against its own running ones, so
            ranks agree unless their buffers diverge; report rank 0's verdict.

    Returns:
        The CheckReport; ``passed`` is False when a finding reaches ``fail_on``.
    """
    thresholds = thresholds or Thresholds()
    context = joined_context() if distributed is None else distributed
    model = unwrap_compiled(model)
    layers, _ = find_layers(model)
    if not layers and not functional_candidates(model, []):
        raise _no_norm_layers("check")
    findings = state_findings(
        [layer.state() for layer in layers],
        thresholds,
        flags_from_file=flags_from_file,
        model_is_training=bool(model.training),
    )
    notes: list[str] = []
    report: Report | None = None
    if batches is None:
        notes.append("no data: only the rules on stored state (BN1xx) ran")
    else:
        report = inspect_model(
            model,
            batches,
            mode=mode,
            model_info=model_info,
            input_source=input_source,
            materialize_lazy=materialize_lazy,
            distributed=context,
        )
        data_findings = report_findings(report, thresholds)
        if not data_is_real:
            notes.append(
                "random input: the shift (BN201) and dead-channel (BN202) rules need real data (--input) and did not run"
            )
            data_findings = [f for f in data_findings if f.code not in ("BN201", "BN202")]
        findings += data_findings
    if context.is_distributed:
        divergence = report.distributed.divergence if report and report.distributed else None
        divergence = divergence or rank_divergence(model, context.group)
        findings += divergence_findings(divergence)
        notes.append(
            f"{context.world_size} ranks: the data rules saw the statistics of all ranks' data; "
            + (
                "running buffers identical on all ranks"
                if not divergence.divergent
                else f"running buffers differ between ranks in {len(divergence.divergent)} layer(s) (BN111)"
            )
        )
    first = report.first_divergent(thresholds.max_shift) if report is not None and data_is_real else None
    kept = filter_ignored(findings, ignore)
    return CheckReport(
        model=model_info or ModelInfo("<module>", "module"),
        input=report.input if report else None,
        mode=Mode(mode).value,
        thresholds=thresholds,
        fail_on=FailOn(fail_on),
        findings=tuple(kept),
        layers=tuple(layer.label for layer in report.layers) if report else tuple(layer.name for layer in layers),
        notes=tuple(notes),
        ignored=tuple(ignore),
        first_divergent=first.label if first else None,
    )
