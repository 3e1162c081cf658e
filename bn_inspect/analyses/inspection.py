"""Run batches through a model under capture and turn what the layers saw into a Report."""

from __future__ import annotations

import math
import platform
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bn_inspect.analyses.passes import Tally, guarded_pass, iter_batches, joined_run, merged_over_ranks
from bn_inspect.data.batch import Batch
from bn_inspect.engine.axes import explain_axes
from bn_inspect.engine.capture import (
    CallRecord,
    StatisticsRecorder,
    dispatch_capture,
    hooks_and_functional_capture,
)
from bn_inspect.engine.moment_records import layer_moments
from bn_inspect.engine.preserve import preserved_state
from bn_inspect.errors import (
    BnInspectError,
    ExportModeError,
    ForwardError,
    InputError,
    NoNormLayersError,
    ShapeMismatchError,
)
from bn_inspect.model.graph import exported_training_mode, lowered_graph_norm_modules
from bn_inspect.model.layers import NormFamily, NormLayer, functional_candidates
from bn_inspect.model.modules import (
    find_layers,
    in_memory_model_info,
    model_device,
    model_float_dtype,
    refuse_lazy_modules,
    set_training,
    unwrap_compiled,
)
from bn_inspect.options import Mode
from bn_inspect.report.layer_moments import SampleSpread
from bn_inspect.report.records import (
    DistributedInfo,
    InputInfo,
    LayerReport,
    ModelInfo,
    Report,
    never_updated,
)
from bn_inspect.text import Untrusted
from bn_inspect.version import __version__

if TYPE_CHECKING:
    from bn_inspect.distributed.context import DistributedContext
    from bn_inspect.report.records import RankShare


def run_model(model: nn.Module, batch: Batch, recorder: StatisticsRecorder) -> None:
    """One forward pass; turns a failure inside the model into a ForwardError naming where it failed."""
    try:
        model(*batch.args, **batch.kwargs)
    except ShapeMismatchError as error:
        # A layer deep inside names itself; when the data does not fit the first layer, that is the news.
        clearer = _shape_error(model, batch, error)
        if clearer is None:
            raise
        raise clearer from error
    except BnInspectError:
        raise
    except Exception as error:
        raise _shape_error(model, batch, error, recorder.last_kernel_error or "") or _forward_error(
            error, recorder.last_layer, _failing_module(model, error), recorder.last_kernel_error
        ) from error


# What torch says when the input's shape does not fit a layer (channels, features, rank).
_SHAPE_MESSAGES = re.compile(
    r"running_mean should contain \d+ elements|to have \d+ channels, but got|mat1 and mat2 shapes cannot be multiplied|"
    r"Expected \d+D \(unbatched\) or \d+D \(batched\) input|expected \d+D or \d+D input"
)


def _shape_error(model: nn.Module, batch: Batch, error: Exception, detail: str = "") -> ShapeMismatchError | None:
    """One line saying what the first layer takes and how to fix the data, when ``error`` is a shape mismatch.

    ``detail``: what the failing kernel said, where ``error`` does not (TorchScript's message ends
    in a bare "RuntimeError:", the kernel's words reach only the recorder).
    """
    from bn_inspect.data.shapes import first_layer_input, shape_fix, spell_shape

    said = f"{error}\n{detail}"
    if not batch.args or not (isinstance(error, ShapeMismatchError) or _SHAPE_MESSAGES.search(said)):
        return None
    takes = first_layer_input(model)
    if takes is None:
        return None
    expected, reason = takes
    shape = tuple(batch.args[0].shape)
    if isinstance(error, ShapeMismatchError) and len(shape) == len(expected):
        return None  # the layer's own channel message says more (a table's label column, say)
    if len(shape) == len(expected) and all(e is None or e == s for e, s in zip(expected, shape, strict=True)):
        return None  # the first layer fits: the mismatch is further in, which the forward error names
    return ShapeMismatchError(
        f"the data has shape {shape}, but {reason}, so the model takes {spell_shape(expected)}",
        shape_fix(shape, expected),
    )


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
    device, dtype = model_device(model), model_float_dtype(model) or torch.float32
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
    cannot be copied before it; their buffers come out as materialized, without the run's
    updates), so a model with unmaterialized lazy modules is refused unless
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
    return run_inspection(
        model,
        batches,
        Mode(mode),
        model_info=model_info,
        input_source=input_source,
        require_norm_layers=require_norm_layers,
        materialize_lazy=materialize_lazy,
        run=joined_run(distributed),
    )


def run_inspection(
    model: nn.Module,
    batches: Iterable[Any],
    mode: Mode,
    *,
    model_info: ModelInfo | None,
    input_source: str,
    require_norm_layers: bool,
    materialize_lazy: bool,
    run: DistributedContext | None,
    sample_means: bool = False,
) -> Report:
    """inspect_model with the run already resolved (None: a single process); check_model shares it.

    ``sample_means``: layer reports also carry their ``sample_spread`` (check's BN205), at the cost
    of one more read of each batch-style input with spatial dims.
    """
    if not materialize_lazy:
        refuse_lazy_modules(
            model,
            ", and inspecting it would materialize them",
            "Run one forward pass first, or pass materialize_lazy=True",
        )
    model = unwrap_compiled(model)
    layers, is_graph = _layers_to_inspect(model, mode, require_norm_layers)
    device = model_device(model)
    recorder = StatisticsRecorder(sample_means=sample_means)
    if is_graph or isinstance(model, torch.jit.ScriptModule):
        capture = dispatch_capture(layers, recorder)
    else:
        capture = hooks_and_functional_capture(model, layers, recorder)
    tally = Tally(device, count_nonfinite=True, fingerprint=True)
    with guarded_pass(model, run), capture:
        set_training(model, mode is Mode.TRAIN)
        for batch in iter_batches(batches, device, model_float_dtype(model), tally):
            recorder.start_batch()
            run_model(model, batch, recorder)
    records, totals, shares = merged_over_ranks(recorder.records, tally.totals(), run, layers)
    distributed_info = None if run is None else _distributed_info(model, run, shares)
    if totals.first_shape is None or totals.first_dtype is None:
        raise InputError("no batch ran", "Give at least one batch of input")
    input_info = InputInfo(
        source=Untrusted(input_source),
        shape=totals.first_shape,
        dtype=Untrusted(totals.first_dtype),
        num_batches=totals.num_batches,
        num_samples=totals.num_samples,
        num_nonfinite_values=totals.num_nonfinite_values,
        first_batch_sha256=None if totals.first_sha256 is None else Untrusted(totals.first_sha256),
    )
    seen = {record.layer.name for record in records.values()}
    return Report(
        model=model_info or in_memory_model_info(model),
        input=input_info,
        mode=Untrusted(mode.value),
        device=Untrusted(str(device)),
        layers=tuple(_layer_report(record, mode) for record in records.values()),
        not_executed=tuple(Untrusted(layer.name) for layer in layers if layer.name not in seen),
        torch_version=Untrusted(str(torch.__version__)),
        distributed=distributed_info,
        bn_inspect_version=Untrusted(__version__),
        python_version=Untrusted(platform.python_version()),
    )


def _layers_to_inspect(model: nn.Module, mode: Mode, require_norm_layers: bool) -> tuple[list[NormLayer], bool]:
    """The layers to watch, and whether they come off an exported graph; refuses models without any."""
    layers, is_graph = find_layers(model)
    if not layers and require_norm_layers and isinstance(model, torch.fx.GraphModule):
        _refuse_lowered_norm_layers(model)
    if not layers and not functional_candidates(model, []) and require_norm_layers:
        raise NoNormLayersError.for_action("inspect")
    if is_graph:
        _check_exported_mode(layers, mode)
    return layers, is_graph


def _distributed_info(model: nn.Module, run: DistributedContext, shares: tuple[RankShare, ...]) -> DistributedInfo:
    from bn_inspect.distributed.divergence import rank_divergence
    from bn_inspect.distributed.syncbn import sync_batch_norm_groups

    return DistributedInfo(
        world_size=run.world_size,
        backend=run.backend,
        shares=shares,
        sync_batch_norm=sync_batch_norm_groups(model),
        divergence=rank_divergence(model, run.group),
    )


def _floats(tensor: torch.Tensor) -> tuple[float, ...]:
    return tuple(float(v) for v in tensor.cpu().tolist())


def _batch_sizes(counts: Counter[int]) -> str:
    """ " (7 of 64 samples and 1 of 2)" when batches differ in size (the per-batch figure above is the first's)."""
    if len(counts) < 2:
        return ""
    if len(counts) > 4:
        return f" of {min(counts):,} to {max(counts):,} samples"
    # Most frequent first; ties keep the order the batches came in.
    ordered = sorted(counts.items(), key=lambda item: -item[1])
    parts = [f"{n} of {size:,}" for size, n in ordered]
    noun = "sample" if ordered[0][0] == 1 else "samples"
    return f" ({parts[0]} {noun}{''.join(f', {p}' for p in parts[1:-1])} and {parts[-1]})"


def run_summary(values_per_channel: int | None, num_batches: int, batch_sizes: Counter[int]) -> str:
    """What a layer call's explanation says after its axes: no values, or how many batches gave how many."""
    summary = ""
    if values_per_channel == 0:
        summary += " No value reached it (empty batches), so its batch statistics are undefined and not reported."
    if num_batches > 1 and values_per_channel is not None:
        summary += (
            f" Over {num_batches} batches{_batch_sizes(batch_sizes)}: {values_per_channel:,} values per channel in all."
        )
    return summary


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
    if moments is not None:
        values_per_channel = moments.values_per_channel
    # Empty batches (N = 0) hold no values: their statistics are undefined, so none are reported.
    if moments is not None and values_per_channel:
        batch_mean, batch_var = _floats(moments.mean), _floats(moments.biased_var())
        batch_var_unbiased = _floats(moments.unbiased_var())
    explanation = axes.sentence + run_summary(values_per_channel, record.num_batches, record.batch_sizes)
    if layer.qat_owner is not None:
        explanation += layer.qat_owner.input_sentence
    num_channels = layer.num_channels
    if num_channels is None and layer.family in (NormFamily.BATCH, NormFamily.INSTANCE, NormFamily.GROUP):
        num_channels = record.input_shape[0 if record.is_unbatched else 1]
    return LayerReport(
        name=Untrusted(layer.name),
        call=record.call,
        type=Untrusted(layer.type_name),
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
        explanation=Untrusted(explanation),
        flags=_flags(layer, batch_mean, batch_var),
        num_groups=layer.num_groups if layer.family is NormFamily.GROUP else None,
        moments=None if moments is None else layer_moments(moments, record.num_batches, record.batch_sizes),
        sample_spread=_sample_spread(record),
    )


def _sample_spread(record: CallRecord) -> SampleSpread | None:
    spread = record.sample_moments
    if spread is None or spread.count == 0:
        return None
    return SampleSpread(spread.count, _floats(spread.biased_var()))


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
    if never_updated(layer.num_batches_tracked, layer.running_mean, layer.running_var):
        flags.append("untrained")
    if layer.family is NormFamily.BATCH and not layer.is_frozen and layer.running_mean is None:
        flags.append("no-running-stats")
    if layer.qat_owner is not None:
        flags.append("qat-frozen" if layer.qat_owner.is_frozen else "qat")
    return tuple(flags)
