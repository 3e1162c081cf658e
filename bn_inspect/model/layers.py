"""Which modules are normalization layers, and their static facts (read without running data)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import Enum

import torch
from torch import nn

from bn_inspect.model.qat import QatOwner, qat_owners
from bn_inspect.report.records import LayerState
from bn_inspect.text import Untrusted


class NormFamily(str, Enum):
    """How a layer reduces its input; decides the statistics and the explanation."""

    BATCH = "batch"
    INSTANCE = "instance"
    GROUP = "group"
    LAYER = "layer"
    RMS = "rms"


_SCRIPT_FAMILIES = {
    "BatchNorm1d": NormFamily.BATCH,
    "BatchNorm2d": NormFamily.BATCH,
    "BatchNorm3d": NormFamily.BATCH,
    "SyncBatchNorm": NormFamily.BATCH,
    "FrozenBatchNorm2d": NormFamily.BATCH,
    "InstanceNorm1d": NormFamily.INSTANCE,
    "InstanceNorm2d": NormFamily.INSTANCE,
    "InstanceNorm3d": NormFamily.INSTANCE,
    "GroupNorm": NormFamily.GROUP,
    "LayerNorm": NormFamily.LAYER,
    "RMSNorm": NormFamily.RMS,
}

# Input rank each layer class is built for; None where any rank >= 2 is allowed.
_EXPECTED_RANKS: dict[str, tuple[int, ...]] = {
    "BatchNorm1d": (2, 3),
    "BatchNorm2d": (4,),
    "BatchNorm3d": (5,),
    "FrozenBatchNorm2d": (4,),
    "InstanceNorm1d": (2, 3),
    "InstanceNorm2d": (3, 4),
    "InstanceNorm3d": (4, 5),
}


@dataclass(frozen=True)
class NormLayer:
    """A normalization layer of a model and what is known about it before any data runs.

    Running statistics and affine parameters are float64 host copies taken when the layer was
    found, so a train-mode forward that updates the buffers cannot change what is reported.
    """

    name: str
    module: nn.Module
    family: NormFamily
    type_name: str
    num_channels: int | None
    eps: float | None
    momentum: float | None
    affine: bool
    track_running_stats: bool
    num_batches_tracked: int | None
    running_mean: tuple[float, ...] | None
    running_var: tuple[float, ...] | None
    weight: tuple[float, ...] | None
    bias: tuple[float, ...] | None
    is_frozen: bool
    is_lazy: bool
    num_groups: int | None
    normalized_shape: tuple[int, ...] | None
    is_training: bool = False
    has_momentum: bool = False
    affine_requires_grad: bool | None = None
    buffer_dtype: str | None = None
    owner_tensors: tuple[torch.Tensor, ...] = ()
    observed_training: bool | None = None
    qat_owner: QatOwner | None = None
    is_exported_training: bool = False

    def state(self) -> LayerState:
        """The torch-free facts of this layer, for reports and rules."""
        return LayerState(
            name=Untrusted(self.name),
            type=Untrusted(self.type_name),
            family=self.family.value,
            num_channels=self.num_channels,
            eps=self.eps,
            momentum=self.momentum,
            is_cumulative_average=self.has_momentum and self.momentum is None,
            affine=self.affine,
            track_running_stats=self.track_running_stats,
            num_batches_tracked=self.num_batches_tracked,
            is_training=self.is_training,
            affine_requires_grad=self.affine_requires_grad,
            buffer_dtype=self.buffer_dtype,
            running_mean=self.running_mean,
            running_var=self.running_var,
            weight=self.weight,
            bias=self.bias,
            is_frozen=self.is_frozen,
            is_lazy=self.is_lazy,
            eval_uses=self.normalizes_with(is_training=False),
            fused_into=None if self.qat_owner is None else Untrusted(self.qat_owner.type_name),
            is_qat_frozen=self.qat_owner is not None and self.qat_owner.is_frozen,
            is_exported_training=self.is_exported_training,
        )

    @property
    def expected_ranks(self) -> tuple[int, ...] | None:
        """Input ranks the layer's class accepts, or None where it does not restrict them."""
        for cls_name, ranks in _EXPECTED_RANKS.items():
            if self.type_name == cls_name or self.type_name == "Lazy" + cls_name:
                return ranks
        return None

    def normalizes_with(self, is_training: bool) -> str:
        """'running' where the layer normalizes with its stored statistics in this mode, else 'batch'.

        BatchNorm uses batch statistics when training or when it has no running buffers
        (``bn_training = training or (running_mean is None and running_var is None)``); setting
        ``track_running_stats = False`` after construction does not change eval. InstanceNorm uses
        input statistics unless it tracks running ones and is in eval mode. Group, layer and RMS
        norms always use the statistics of the input itself.
        """
        if self.is_frozen or (self.qat_owner is not None and self.qat_owner.is_frozen):
            return "running"
        if self.observed_training is not None:
            is_training = self.observed_training
        has_running = self.running_mean is not None and self.running_var is not None
        if self.family is NormFamily.BATCH:
            return "batch" if is_training or not has_running else "running"
        if self.family is NormFamily.INSTANCE:
            return "running" if (not is_training and self.track_running_stats and has_running) else "batch"
        return "batch"


def _is_script_module(module: nn.Module) -> bool:
    return isinstance(module, torch.jit.ScriptModule)


def is_uninitialized(tensor: object) -> bool:
    """True for the placeholder parameters and buffers of a lazy module before its first forward."""
    return isinstance(tensor, (nn.parameter.UninitializedParameter, nn.parameter.UninitializedBuffer))


def norm_family(module: nn.Module) -> NormFamily | None:
    """The normalization family of ``module``, or None when it is no normalization layer."""
    if _is_script_module(module):
        return _SCRIPT_FAMILIES.get(str(module.original_name))
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return NormFamily.BATCH
    if _is_frozen_batch_norm(module):
        return NormFamily.BATCH
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return NormFamily.INSTANCE
    if isinstance(module, nn.GroupNorm):
        return NormFamily.GROUP
    if isinstance(module, nn.LayerNorm):
        return NormFamily.LAYER
    rms_norm = getattr(nn, "RMSNorm", None)
    if rms_norm is not None and isinstance(module, rms_norm):
        return NormFamily.RMS
    return None


def _is_frozen_batch_norm(module: nn.Module) -> bool:
    # torchvision's FrozenBatchNorm2d is a plain Module whose statistics and affine terms are all
    # buffers; recognise it (and look-alikes) by shape rather than by importing torchvision.
    buffers = dict(module.named_buffers(recurse=False))
    return (
        type(module).__name__.startswith("FrozenBatchNorm")
        and {"weight", "bias", "running_mean", "running_var"} <= buffers.keys()
    )


def iter_norm_layers(model: nn.Module) -> list[NormLayer]:
    """Every normalization layer of ``model`` in registration order, shared modules once."""
    layers = []
    owners = qat_owners(model)
    for name, module in model.named_modules():
        family = norm_family(module)
        if family is not None:
            layer = describe_layer(name or type(module).__name__, module, family)
            layers.append(replace(layer, qat_owner=owners.get(id(module))))
    return layers


def host_values(tensor: object) -> tuple[float, ...] | None:
    """A tensor's values as float64 host floats; None for anything else or an uninitialized tensor."""
    if not isinstance(tensor, torch.Tensor) or is_uninitialized(tensor):
        return None
    return tuple(float(v) for v in tensor.detach().to("cpu", torch.float64).reshape(-1).tolist())


def optional_float(value: object) -> float | None:
    """A number as a float; None for anything else (bools included)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def describe_layer(name: str, module: nn.Module, family: NormFamily) -> NormLayer:
    """Static facts of one normalization layer, copied to the host."""
    is_script = _is_script_module(module)
    type_name = str(module.original_name) if is_script else type(module).__name__
    is_frozen = type_name.startswith("FrozenBatchNorm")
    is_lazy = isinstance(module, nn.modules.lazy.LazyModuleMixin) and bool(module.has_uninitialized_params())
    buffers = dict(module.named_buffers(recurse=False))
    params = dict(module.named_parameters(recurse=False))
    weight = params.get("weight", buffers.get("weight"))
    bias = params.get("bias", buffers.get("bias"))
    running_mean = host_values(buffers.get("running_mean"))
    running_var = host_values(buffers.get("running_var"))
    tracked = buffers.get("num_batches_tracked")
    num_channels: int | None = getattr(module, "num_features", None)
    if num_channels is None and family is NormFamily.GROUP:
        num_channels = getattr(module, "num_channels", None)
    # A lazy module that load_state_dict materialized keeps num_features == 0 (PyTorch sets it on
    # the first forward); its buffers know the count.
    if not num_channels and running_mean is not None:
        num_channels = len(running_mean)
    # A lazy layer with nothing to materialize (no affine, no running statistics) keeps 0 for good.
    if num_channels == 0:
        num_channels = None
    if is_lazy:
        num_channels = None
    normalized_shape = getattr(module, "normalized_shape", None)
    momentum = optional_float(getattr(module, "momentum", None))
    eps = optional_float(getattr(module, "eps", None))
    if eps is not None and math.isnan(eps):
        eps = None
    return NormLayer(
        name=name,
        module=module,
        family=family,
        type_name=type_name,
        num_channels=num_channels,
        eps=eps,
        momentum=momentum,
        affine=weight is not None,
        track_running_stats=bool(getattr(module, "track_running_stats", running_mean is not None)),
        num_batches_tracked=int(tracked.item()) if isinstance(tracked, torch.Tensor) and tracked.numel() else None,
        running_mean=running_mean,
        running_var=running_var,
        weight=host_values(weight),
        bias=host_values(bias),
        is_frozen=is_frozen,
        is_lazy=is_lazy,
        num_groups=getattr(module, "num_groups", None),
        normalized_shape=tuple(normalized_shape) if normalized_shape is not None else None,
        is_training=bool(module.training),
        has_momentum=hasattr(module, "momentum"),
        affine_requires_grad=_requires_grad(weight, bias),
        buffer_dtype=dtype_name(buffers.get("running_var", buffers.get("running_mean"))),
        # A stand-in for an exported graph's node (model/onnx_module.py) runs in the mode fixed at export.
        observed_training=exported
        if isinstance(exported := getattr(module, "exported_training", None), bool)
        else None,
        is_exported_training=getattr(module, "exported_training", None) is True,
    )


def as_materialized(layer: NormLayer) -> NormLayer:
    """``layer`` described again once its first forward has materialized it, else ``layer`` itself.

    A lazy layer's tensors exist only after the lazy pre-hook of its first forward (which runs
    before bn-inspect's own), and that forward already normalizes with them: fresh running
    statistics (zeros and ones) in eval mode. The report keeps the class name and the lazy flag
    the layer had when the run began.
    """
    module = layer.module
    if not layer.is_lazy or (isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params()):
        return layer
    return replace(describe_layer(layer.name, module, layer.family), type_name=layer.type_name, is_lazy=True)


def _requires_grad(weight: object, bias: object) -> bool | None:
    # Only trainable parameters can be frozen; FrozenBatchNorm2d keeps its affine terms as buffers.
    params = [p for p in (weight, bias) if isinstance(p, nn.Parameter)]
    return any(p.requires_grad for p in params) if params else None


def dtype_name(tensor: object) -> str | None:
    """ "float32" for a float32 tensor; None for anything else or an uninitialized tensor."""
    if isinstance(tensor, torch.Tensor) and not is_uninitialized(tensor):
        return str(tensor.dtype).removeprefix("torch.")
    return None


def functional_candidates(model: nn.Module, layers: list[NormLayer]) -> dict[int, str]:
    """Where a direct ``F.batch_norm`` call keeps its running statistics: 1-D float buffers of
    modules that are not normalization layers, by storage address -> qualified buffer name."""
    norm_modules = {id(layer.module) for layer in layers}
    found: dict[int, str] = {}
    for name, module in model.named_modules():
        if id(module) in norm_modules:
            continue
        for buffer_name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point() and buffer.dim() == 1 and buffer.numel() and not is_uninitialized(buffer):
                found[buffer.data_ptr()] = f"{name}.{buffer_name}" if name else buffer_name
    return found


def describe_functional(running_mean_name: str, module: nn.Module, args: tuple[object, ...], op_name: str) -> NormLayer:
    """A NormLayer for a direct F.batch_norm call, named by the running-mean buffer it was handed."""
    no_training = op_name == "_native_batch_norm_legit_no_training"
    training = False if no_training else positional_arg(args, 5)
    running_mean, running_var = positional_arg(args, 3), positional_arg(args, 4)
    weight, bias = positional_arg(args, 1), positional_arg(args, 2)
    return NormLayer(
        name=running_mean_name,
        module=module,
        family=NormFamily.BATCH,
        type_name="functional batch_norm",
        num_channels=int(running_mean.numel()) if isinstance(running_mean, torch.Tensor) else None,
        eps=optional_float(positional_arg(args, 6 if no_training else 7)),
        momentum=optional_float(positional_arg(args, 5 if no_training else 6)),
        affine=isinstance(weight, torch.Tensor),
        track_running_stats=True,
        num_batches_tracked=None,
        running_mean=host_values(running_mean),
        running_var=host_values(running_var),
        weight=host_values(weight),
        bias=host_values(bias),
        is_frozen=False,
        is_lazy=False,
        num_groups=None,
        normalized_shape=None,
        is_training=bool(training),
        has_momentum=True,
        buffer_dtype=dtype_name(running_mean),
        observed_training=training if isinstance(training, bool) else None,
    )


INFERRED_TYPE = "BatchNorm-like (inferred)"


def states_from_state_dict(state_dict: dict[str, torch.Tensor]) -> list[LayerState]:
    """Normalization layers read off a bare state_dict: every prefix with running_mean and running_var.

    Without the architecture the class cannot be known: BatchNorm1d/2d/3d, SyncBatchNorm,
    FrozenBatchNorm2d and InstanceNorm with running statistics all save the same buffers. eps
    and momentum are not saved at all.
    """
    states = []
    for key in state_dict:
        if not key.endswith("running_mean"):
            continue
        prefix = key[: -len("running_mean")]
        running_var = state_dict.get(prefix + "running_var")
        if running_var is None:
            continue
        running_mean = state_dict[key]
        weight, bias = state_dict.get(prefix + "weight"), state_dict.get(prefix + "bias")
        tracked = state_dict.get(prefix + "num_batches_tracked")
        states.append(
            LayerState(
                name=Untrusted(prefix.rstrip(".") or "(root)"),
                type=Untrusted(INFERRED_TYPE),
                family=NormFamily.BATCH.value,
                num_channels=int(running_mean.numel()),
                eps=None,
                momentum=None,
                is_cumulative_average=False,
                affine=weight is not None,
                track_running_stats=True,
                num_batches_tracked=int(tracked.item()) if tracked is not None and tracked.numel() == 1 else None,
                is_training=None,
                affine_requires_grad=None,
                buffer_dtype=dtype_name(running_mean),
                running_mean=host_values(running_mean),
                running_var=host_values(running_var),
                weight=host_values(weight),
                bias=host_values(bias),
                is_frozen=False,
                is_lazy=False,
                eval_uses="running",
            )
        )
    return states


def positional_arg(args: tuple[object, ...], index: int) -> object:
    """args[index], or None where the call passed fewer arguments."""
    return args[index] if index < len(args) else None
