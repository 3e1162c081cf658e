"""Hooks (or dispatch capture) that reduce each normalization layer's input on the fly.

Eager modules are observed with forward pre-hooks. TorchScript modules reject Python hooks, so
for them a ``TorchDispatchMode`` watches the normalization kernels and names each call by the
parameters or running buffers it was handed. Either way only (C,)-sized moments outlive the
forward: the activation is reduced inside the hook and never referenced afterwards.

A LayerNorm or RMSNorm module may rearrange its input before normalizing (ConvNeXt's
LayerNorm2d permutes NCHW to NHWC), so during its first call a ``TorchFunctionMode`` watches the
layer-norm call inside its forward to learn which dims of the module's input are reduced.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from bn_inspect.engine.axes import TensorLayout, kernel_reduced_dims
from bn_inspect.engine.fused.cpu import STOCK_FORWARD
from bn_inspect.engine.fused.dispatch import batch_norm_eval_with_moments, fused_applies, fused_may_run
from bn_inspect.engine.moments import ChannelMoments, Moments, channel_moments, instance_moments, sample_moments
from bn_inspect.errors import ShapeMismatchError
from bn_inspect.model.graph import BATCH_NORM_OPS
from bn_inspect.model.layers import (
    NormFamily,
    NormLayer,
    as_materialized,
    describe_functional,
    functional_candidates,
)
from bn_inspect.model.qat import folded_input


@dataclass
class CallRecord:
    """What one call index of one layer has seen so far, merged over batches."""

    layer: NormLayer
    call: int
    input_shape: tuple[int, ...]
    is_unbatched: bool
    moments: Moments | None
    num_batches: int = 1
    # Samples per batch -> how many batches had that many (a DataLoader's last batch is often short).
    batch_sizes: Counter[int] = field(default_factory=Counter)
    # LayerNorm / RMSNorm: the input dims its kernel was seen to reduce; None keeps the trailing dims.
    reduced_dims: tuple[int, ...] | None = None
    # Batch-style layers with spatial dims, where the recorder was asked: moments of the per-sample
    # channel means (engine/moments.py's sample_moments).
    sample_moments: ChannelMoments | None = None


class StatisticsRecorder:
    """Receives each normalization layer's input during forward passes and merges its moments.

    With ``sample_means``, batch-style layers whose input has spatial dims also keep the moments of
    each sample's channel means (check's BN205 needs them); it costs one more read of those inputs.
    """

    def __init__(self, *, sample_means: bool = False) -> None:
        self.sample_means = sample_means
        self.records: dict[tuple[str, int], CallRecord] = {}
        self.last_layer: str | None = None
        # TorchScript passes a kernel's error back through dispatch capture without its message;
        # the observer keeps the message here so the error can still say what failed.
        self.last_kernel_error: str | None = None
        self._calls_in_batch: Counter[str] = Counter()

    def start_batch(self) -> None:
        """Call indices restart with every forward pass."""
        self._calls_in_batch.clear()

    def observe(self, layer: NormLayer, x: torch.Tensor) -> CallRecord | None:
        """Check ``x`` against ``layer`` and fold its per-channel moments into the layer's record.

        Returns:
            The record, when this call opened it (the first batch of this layer call), else None.
        """
        key, is_unbatched = self._enter(layer, x)
        moments = _moments(layer.family, x.unsqueeze(0) if is_unbatched else x)
        record = self.records.get(key)
        if record is None:
            record = self.records[key] = CallRecord(layer, key[1], tuple(x.shape), is_unbatched, moments)
            record.batch_sizes[_samples(x, is_unbatched)] += 1
            self._observe_samples(record, x)
            return record
        record.num_batches += 1
        record.batch_sizes[_samples(x, is_unbatched)] += 1
        if record.moments is not None and moments is not None:
            record.moments = record.moments.merge(moments)  # type: ignore[arg-type]
        self._observe_samples(record, x)
        return None

    def _observe_samples(self, record: CallRecord, x: torch.Tensor) -> None:
        if not self.sample_means or record.layer.family is not NormFamily.BATCH or x.dim() < 3:
            return
        found = sample_moments(x)
        record.sample_moments = found if record.sample_moments is None else record.sample_moments.merge(found)

    def observe_fused(
        self,
        layer: NormLayer,
        x: torch.Tensor,
        normalize: Callable[[ChannelMoments | None], tuple[torch.Tensor, ChannelMoments]],
    ) -> torch.Tensor:
        """Like ``observe``, for a kernel that normalizes ``x`` and merges its moments in one pass.

        ``normalize`` gets the moments seen so far and returns the layer's output and the merged
        moments; its output is returned.
        """
        key, is_unbatched = self._enter(layer, x)
        record = self.records.get(key)
        output, moments = normalize(None if record is None else record.moments)  # type: ignore[arg-type]
        if record is None:
            record = self.records[key] = CallRecord(layer, key[1], tuple(x.shape), is_unbatched, moments)
        else:
            record.num_batches += 1
            record.moments = moments
        record.batch_sizes[_samples(x, is_unbatched)] += 1
        self._observe_samples(record, x)
        return output

    def _enter(self, layer: NormLayer, x: torch.Tensor) -> tuple[tuple[str, int], bool]:
        is_unbatched = _check_input(layer, x)
        call = self._calls_in_batch[layer.name]
        self._calls_in_batch[layer.name] += 1
        self.last_layer = layer.name if call == 0 else f"{layer.name}#{call}"
        return (layer.name, call), is_unbatched


def _samples(x: torch.Tensor, is_unbatched: bool) -> int:
    return 1 if is_unbatched or x.dim() == 0 else int(x.shape[0])


def _moments(family: NormFamily, x: torch.Tensor) -> Moments | None:
    if family is NormFamily.BATCH:
        return channel_moments(x)
    if family is NormFamily.INSTANCE:
        return instance_moments(x)
    return None


def _describe(shape: torch.Size) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _check_input(layer: NormLayer, x: torch.Tensor) -> bool:
    """Raise a ShapeMismatchError naming the layer when ``x`` cannot fit; return is_unbatched."""
    label = f"layer {layer.name} ({layer.type_name})"
    if not x.is_floating_point():
        raise ShapeMismatchError(
            f"{label} received a {str(x.dtype).removeprefix('torch.')} tensor",
            "Normalization layers need floating-point input; convert the data to float",
        )
    ranks = layer.expected_ranks
    if ranks is not None and x.dim() not in ranks:
        wanted = " or ".join(f"{r}-D" for r in ranks)
        raise ShapeMismatchError(
            f"{label} expects {wanted} input but received {x.dim()}-D {_describe(x.shape)}",
            "Give input of the rank the model expects (see --shape)",
        )
    if layer.family in (NormFamily.LAYER, NormFamily.RMS):
        return False
    is_unbatched = layer.family is NormFamily.INSTANCE and ranks is not None and x.dim() == ranks[0]
    channel_dim = 0 if is_unbatched else 1
    if x.dim() <= channel_dim:
        raise ShapeMismatchError(
            f"{label} needs at least 2-D input but received {_describe(x.shape)}",
            "Give input of shape (N, C, ...)",
        )
    expected = layer.num_channels
    if layer.is_lazy and is_unbatched and expected is not None and x.shape[0] != expected:
        raise ShapeMismatchError(
            f"{label} materialized from unbatched input {_describe(x.shape)}: PyTorch takes a lazy layer's "
            f"channel count from dim 1 ({expected}), not from dim 0 ({x.shape[0]}), and its forward refuses the mismatch",
            "Give batched input (N, C, ...), or run one batched forward before inspecting",
        )
    # PyTorch checks the channel count only against the tensors a layer has (running statistics,
    # weight, bias): without any, it normalizes whatever channel count it is given.
    has_channel_tensors = layer.affine or layer.running_mean is not None
    if expected is not None and has_channel_tensors and x.shape[channel_dim] != expected:
        raise ShapeMismatchError(
            f"{label} expects {expected} channels in dim {channel_dim} but received "
            f"{x.shape[channel_dim]} in an input of shape {_describe(x.shape)}",
            "Give input whose channel count fits the model (--shape; for a table --input, drop label or id "
            "columns with --drop-column)",
        )
    return is_unbatched


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    candidate = kwargs.get("input")
    if isinstance(candidate, torch.Tensor):
        return candidate
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


def _layout(tensor: torch.Tensor) -> TensorLayout | None:
    try:
        storage = tensor.untyped_storage().data_ptr()
    except RuntimeError:
        return None  # a wrapper subclass (a nested jagged tensor) has no storage of its own
    return TensorLayout(tuple(tensor.shape), tuple(tensor.stride()), storage, int(tensor.storage_offset()))


# Where a LayerNorm / RMSNorm module's forward can hand its input to the kernel: F.layer_norm and
# F.rms_norm (what nn.LayerNorm, nn.RMSNorm and their subclasses call) and the torch.* functions
# they wrap. The mode sees only the outermost of these (torch disables it while it handles one).
# Watching at this level rather than the dispatcher's: on CPU, rms_norm reaches the dispatcher as
# plain pow/mean arithmetic.
_LAYER_NORM_FUNCTIONS = {
    function
    for owner, name in (
        (torch.nn.functional, "layer_norm"),
        (torch, "layer_norm"),
        (torch, "native_layer_norm"),
        (torch.nn.functional, "rms_norm"),
        (torch, "rms_norm"),
    )
    if (function := getattr(owner, name, None)) is not None
}


@dataclass
class _KernelWindow:
    """The forward of one LayerNorm / RMSNorm call whose kernel has yet to be seen."""

    module: nn.Module
    module_input: torch.Tensor
    record: CallRecord
    has_seen_kernel: bool = False


class _LayerNormKernelWatch(TorchFunctionMode):
    """Active only while the forward of a watched LayerNorm / RMSNorm call runs (its first call).

    The first layer-norm function called inside that forward tells which dims of the module's
    input are reduced (kernel_reduced_dims); a window on the stack per running call, so a watched
    layer inside another is told apart, and the innermost running one owns the call.
    """

    def __init__(self) -> None:
        super().__init__()
        self._windows: list[_KernelWindow] = []

    def open(self, module: nn.Module, module_input: torch.Tensor, record: CallRecord) -> None:
        """Start watching the forward of ``module`` (called from its forward pre-hook)."""
        if not self._windows:
            self.__enter__()  # type: ignore[no-untyped-call]
        self._windows.append(_KernelWindow(module, module_input, record))

    def close(self, module: nn.Module) -> None:
        """Stop watching ``module``'s forward (its forward hook: a no-op where its call opened nothing)."""
        if self._windows and self._windows[-1].module is module:
            self._windows.pop()
            if not self._windows:
                self.__exit__(None, None, None)  # type: ignore[no-untyped-call]

    def close_all(self) -> None:
        """Leave no mode behind where a forward ended without its forward hooks (KeyboardInterrupt)."""
        if self._windows:
            self._windows.clear()
            self.__exit__(None, None, None)  # type: ignore[no-untyped-call]

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        window = self._windows[-1]
        if func in _LAYER_NORM_FUNCTIONS and not window.has_seen_kernel:
            window.has_seen_kernel = True
            kernel_input = args[0] if args else kwargs.get("input")
            normalized_shape = args[1] if len(args) > 1 else kwargs.get("normalized_shape")
            module_layout = _layout(window.module_input)
            kernel_layout = _layout(kernel_input) if isinstance(kernel_input, torch.Tensor) else None
            if module_layout is not None and kernel_layout is not None and normalized_shape is not None:
                normalized_ndim = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
                window.record.reduced_dims = kernel_reduced_dims(module_layout, kernel_layout, normalized_ndim)
        return func(*args, **kwargs)


def _folded_hook(layer: NormLayer, recorder: StatisticsRecorder) -> Callable[..., None]:
    """A pre-hook on a QAT module that folds its BatchNorm in eval: it observes what the BN would normalize."""

    def hook(owner: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # A training bn is called, and its own hook sees its input; a folded one never is.
        x = _first_tensor(args, kwargs)
        if x is not None and not layer.module.training:
            recorder.observe(layer, folded_input(owner, x))

    return hook


@contextmanager
def hooks_capture(layers: list[NormLayer], recorder: StatisticsRecorder, *, fuse: bool = True) -> Iterator[None]:
    """Forward pre-hooks on every layer for the duration of the block, removed even on error.

    With ``fuse``, stock batch norms on a GPU with Triton instead run the fused kernel (see
    ``fused``), which normalizes and reduces in one read of the input. Its work is invisible to
    dispatch modes, so a caller that follows the ops of the forward passes ``fuse=False``.

    LayerNorm and RMSNorm layers also get a forward hook that ends the watch over their first call.
    """
    handles = []
    watch = _LayerNormKernelWatch()

    def make_hook(layer: NormLayer) -> Callable[..., None]:
        is_watched = layer.family in (NormFamily.LAYER, NormFamily.RMS)
        described = layer

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            nonlocal described
            x = _first_tensor(args, kwargs)
            if x is None:
                return
            described = as_materialized(described)
            opened = recorder.observe(described, x)
            if opened is not None and is_watched:
                watch.open(module, x, opened)

        return hook

    def make_fused_forward(layer: NormLayer) -> Callable[[torch.Tensor], torch.Tensor]:
        module = layer.module
        assert isinstance(module, _BatchNorm)

        def forward(input: torch.Tensor) -> torch.Tensor:
            if not fused_applies(module, input):
                recorder.observe(layer, input)
                return STOCK_FORWARD(module, input)

            def normalize(previous: ChannelMoments | None) -> tuple[torch.Tensor, ChannelMoments]:
                module._check_input_dim(input)  # type: ignore[no-untyped-call]
                return batch_norm_eval_with_moments(module, input, previous)

            return recorder.observe_fused(layer, input, normalize)

        return forward

    def end_watch(module: nn.Module, _args: tuple[Any, ...], _output: Any) -> None:
        watch.close(module)

    fused: list[nn.Module] = []
    try:
        for layer in layers:
            if layer.qat_owner is not None and layer.qat_owner.folds_in_eval:
                handles.append(
                    layer.qat_owner.module.register_forward_pre_hook(_folded_hook(layer, recorder), with_kwargs=True)
                )
            if fuse and layer.family is NormFamily.BATCH and fused_may_run(layer.module):
                # An instance attribute shadows the class's forward; __call__ (and so every hook
                # of the user's) runs as before, and the attribute is deleted again below.
                layer.module.forward = make_fused_forward(layer)  # type: ignore[method-assign]
                fused.append(layer.module)
                continue
            handles.append(layer.module.register_forward_pre_hook(make_hook(layer), with_kwargs=True))
            if layer.family in (NormFamily.LAYER, NormFamily.RMS):
                # always_call: a forward that raises still ends the watch its pre-hook began.
                handles.append(layer.module.register_forward_hook(end_watch, always_call=True))
        yield
    finally:
        watch.close_all()
        for handle in handles:
            handle.remove()
        for module in fused:
            del module.forward


_BATCH_NORM_OPS = {name for name in BATCH_NORM_OPS if hasattr(torch.ops.aten, name)}
# Where each op keeps the tensors that identify the owning layer (weight, bias, running stats).
_OWNER_ARGS = {name: (1, 2, 3, 4) for name in _BATCH_NORM_OPS} | {
    "native_group_norm": (1, 2),
    "native_layer_norm": (2, 3),
    "_fused_rms_norm": (2,),
}


class PlainDispatchMode(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """A dispatch mode whose ``__torch_dispatch__`` torch leaves unwrapped.

    Otherwise torch wraps it in ``torch._dynamo.disable``: the first op then imports
    torch._dynamo (about 3 s on a 2-core machine, longer than inspecting a small model) and every
    op pays a frame check. Nothing runs under torch.compile inside bn-inspect's modes.
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False


class _NormOpObserver(PlainDispatchMode):
    """Sees every aten normalization kernel and hands its input to the recorder.

    ``functional`` maps the storage of buffers that belong to no normalization module to their
    names: a batch-norm call handed one of them as running mean is a direct ``F.batch_norm``,
    which becomes a layer of its own the first time it runs.
    """

    def __init__(
        self,
        owners: dict[int, NormLayer],
        recorder: StatisticsRecorder,
        functional: dict[int, tuple[str, nn.Module]] | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._owners = owners
        self._recorder = recorder
        self._functional = functional or {}

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        op_name = func.overloadpacket.__name__
        positions = _OWNER_ARGS.get(op_name)
        if positions is not None and args and isinstance(args[0], torch.Tensor):
            layer = self._owner(op_name, positions, args)
            if layer is not None:
                self._recorder.observe(layer, args[0])
        try:
            return func(*args, **(kwargs or {}))
        except Exception as error:
            self._recorder.last_kernel_error = f"{type(error).__name__}: {error}"
            raise

    def _owner(self, op_name: str, positions: tuple[int, ...], args: tuple[Any, ...]) -> NormLayer | None:
        for position in positions:
            owner_arg = args[position] if position < len(args) else None
            if isinstance(owner_arg, torch.Tensor):
                layer = self._owners.get(owner_arg.data_ptr())
                if layer is not None:
                    return layer
        running_mean = args[3] if op_name in _BATCH_NORM_OPS and len(args) > 3 else None
        if isinstance(running_mean, torch.Tensor) and running_mean.data_ptr() in self._functional:
            name, module = self._functional[running_mean.data_ptr()]
            layer = describe_functional(name, module, args, op_name)
            self._owners[running_mean.data_ptr()] = layer
            return layer
        return None


@contextmanager
def dispatch_capture(layers: list[NormLayer], recorder: StatisticsRecorder) -> Iterator[None]:
    """Capture through the dispatcher, for modules (TorchScript, torch.export) whose hooks never fire."""
    owners: dict[int, NormLayer] = {}
    for layer in layers:
        tensors = layer.owner_tensors or (*layer.module.parameters(recurse=False), *layer.module.buffers(recurse=False))
        for tensor in tensors:
            if tensor.numel() > 0:
                owners.setdefault(tensor.data_ptr(), layer)
    with _NormOpObserver(owners, recorder):
        yield


@contextmanager
def hooks_and_functional_capture(
    model: nn.Module, layers: list[NormLayer], recorder: StatisticsRecorder
) -> Iterator[None]:
    """Module hooks, plus dispatch capture of direct F.batch_norm calls where the model could make any."""
    candidates = functional_candidates(model, layers)
    modules = dict(model.named_modules())
    functional = {ptr: (name, modules[name.rpartition(".")[0]]) for ptr, name in candidates.items()}
    with hooks_capture(layers, recorder):
        if not functional:
            yield
            return
        with _NormOpObserver({}, recorder, functional):
            yield
