"""Which modules are normalization layers, and their static facts (read without running data)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from bn_inspect.report.records import LayerState


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

    def state(self) -> LayerState:
        """The torch-free facts of this layer, for reports and rules."""
        return LayerState(
            name=self.name,
            type=self.type_name,
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
        if self.is_frozen:
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
    for name, module in model.named_modules():
        family = norm_family(module)
        if family is not None:
            layers.append(describe_layer(name or type(module).__name__, module, family))
    return layers


def _host_values(tensor: object) -> tuple[float, ...] | None:
    if not isinstance(tensor, torch.Tensor) or is_uninitialized(tensor):
        return None
    return tuple(float(v) for v in tensor.detach().to("cpu", torch.float64).reshape(-1).tolist())


def _optional_float(value: object) -> float | None:
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
    running_mean = _host_values(buffers.get("running_mean"))
    running_var = _host_values(buffers.get("running_var"))
    tracked = buffers.get("num_batches_tracked")
    num_channels: int | None = getattr(module, "num_features", None)
    if num_channels is None and family is NormFamily.GROUP:
        num_channels = getattr(module, "num_channels", None)
    if num_channels is None and running_mean is not None:
        num_channels = len(running_mean)
    if is_lazy:
        num_channels = None
    normalized_shape = getattr(module, "normalized_shape", None)
    momentum = _optional_float(getattr(module, "momentum", None))
    eps = _optional_float(getattr(module, "eps", None))
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
        weight=_host_values(weight),
        bias=_host_values(bias),
        is_frozen=is_frozen,
        is_lazy=is_lazy,
        num_groups=getattr(module, "num_groups", None),
        normalized_shape=tuple(normalized_shape) if normalized_shape is not None else None,
        is_training=bool(module.training),
        has_momentum=hasattr(module, "momentum"),
        affine_requires_grad=_requires_grad(weight, bias),
        buffer_dtype=_dtype_name(buffers.get("running_var", buffers.get("running_mean"))),
    )


def _requires_grad(weight: object, bias: object) -> bool | None:
    # Only trainable parameters can be frozen; FrozenBatchNorm2d keeps its affine terms as buffers.
    params = [p for p in (weight, bias) if isinstance(p, nn.Parameter)]
    return any(p.requires_grad for p in params) if params else None


def _dtype_name(tensor: object) -> str | None:
    if isinstance(tensor, torch.Tensor) and not is_uninitialized(tensor):
        return str(tensor.dtype).removeprefix("torch.")
    return None


# The aten batch-norm kernels, as eager code, TorchScript and exported graphs reach them.
BATCH_NORM_OPS = frozenset(
    {
        "native_batch_norm",
        "_native_batch_norm_legit",
        "_native_batch_norm_legit_no_training",
        "_native_batch_norm_legit_functional",
        "_batch_norm_with_update",
        "_batch_norm_no_update",
        "cudnn_batch_norm",
        "miopen_batch_norm",
    }
)
_GRAPH_BATCH_NORM_OPS = BATCH_NORM_OPS | {"batch_norm"}


def _graph_op_name(target: object) -> str | None:
    packet = getattr(target, "overloadpacket", None)
    return getattr(packet, "__name__", None)


def lowered_graph_norm_modules(
    model: nn.Module, found: Iterable[str], kind: str = "BatchNorm"
) -> list[tuple[str, str]]:
    """(path, class) of normalization modules a torch.export graph kept only as plain arithmetic.

    Export traces a module's forward, so a layer that normalizes with its own arithmetic (such as
    torchvision's FrozenBatchNorm2d: ``x * scale + shift``) leaves no batch-norm kernel to watch;
    ``nn_module_stack`` still names it. Any class whose name contains ``kind`` and that does not
    appear among ``found`` is listed ("Norm" lists the other families too, which bn-inspect does
    not report inside export programs).
    """
    graph = getattr(model, "graph", None)
    if graph is None:
        return []
    known = set(found)
    lowered: dict[str, str] = {}
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack") or {} if node.op == "call_function" else {}
        if not stack:
            continue
        path, cls = list(stack.values())[-1]
        type_name = (cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))).rsplit(".", 1)[-1]
        if kind in type_name and path not in known:
            lowered.setdefault(path, type_name)
    return list(lowered.items())


def iter_graph_norm_layers(model: nn.Module) -> list[NormLayer]:
    """Batch-norm calls of a torch.export program's module (``ep.module()``), named by module path.

    The graph keeps no normalization submodules, only ``aten`` calls whose ``nn_module_stack``
    metadata records the original path and class; the layer is then recognised at run time by
    the running buffers the call is handed.
    """
    graph = getattr(model, "graph", None)
    if graph is None:
        return []
    layers: dict[str, NormLayer] = {}
    for node in graph.nodes:
        name = _graph_op_name(node.target) if node.op == "call_function" else None
        if name not in _GRAPH_BATCH_NORM_OPS:
            continue
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            continue
        path, cls = list(stack.values())[-1]
        type_name = (cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))).rsplit(".", 1)[-1]
        buffer_args = [a for a in node.args[1:5] if getattr(a, "op", None) == "get_attr"]
        running = {
            arg.target.rsplit(".", 1)[-1]: model.get_buffer(arg.target)
            for arg in buffer_args
            if arg.target.endswith(("running_mean", "running_var"))
        }
        if "running_mean" not in running or path in layers:
            continue
        training = _graph_training_flag(name, node.args)
        layers[path] = NormLayer(
            name=path,
            module=model,
            family=NormFamily.BATCH,
            type_name=type_name,
            num_channels=int(running["running_mean"].numel()),
            eps=_optional_float(
                node.args[-1] if name == "_native_batch_norm_legit_no_training" else _arg(node.args, 7)
            ),
            momentum=_optional_float(_arg(node.args, 5 if name == "_native_batch_norm_legit_no_training" else 6)),
            affine=node.args[1] is not None,
            track_running_stats=True,
            num_batches_tracked=_tracked(model, path),
            running_mean=_host_values(running["running_mean"]),
            running_var=_host_values(running.get("running_var")),
            weight=_host_values(_graph_tensor(model, node.args[1])),
            bias=_host_values(_graph_tensor(model, node.args[2])),
            is_frozen=False,
            is_lazy=False,
            num_groups=None,
            normalized_shape=None,
            is_training=bool(training),
            has_momentum=True,
            buffer_dtype=_dtype_name(running["running_mean"]),
            owner_tensors=tuple(running.values()),
            observed_training=training,
        )
    return list(layers.values())


def _arg(args: tuple[object, ...], index: int) -> object:
    return args[index] if index < len(args) else None


def _graph_training_flag(op_name: str, args: tuple[object, ...]) -> bool | None:
    if op_name in ("_native_batch_norm_legit_no_training", "_batch_norm_no_update"):
        return False
    if op_name == "_batch_norm_with_update":
        return True
    flag = _arg(args, 5)
    return flag if isinstance(flag, bool) else None


def _graph_tensor(model: nn.Module, arg: object) -> torch.Tensor | None:
    target = getattr(arg, "target", None)
    if getattr(arg, "op", None) != "get_attr" or not isinstance(target, str):
        return None
    try:
        return model.get_parameter(target)
    except AttributeError:
        pass
    try:
        return model.get_buffer(target)
    except AttributeError:
        return None


def _tracked(model: nn.Module, path: str) -> int | None:
    try:
        tracked = model.get_buffer(f"{path}.num_batches_tracked")
    except AttributeError:
        return None
    return int(tracked.item()) if tracked.numel() else None


def exported_training_mode(layers: list[NormLayer]) -> bool | None:
    """The mode a torch.export program's batch norms were frozen in, or None if it has none."""
    flags = {layer.observed_training for layer in layers if layer.observed_training is not None}
    return flags.pop() if len(flags) == 1 else (True if flags else None)


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
    training = False if no_training else _arg(args, 5)
    running_mean, running_var = _arg(args, 3), _arg(args, 4)
    weight, bias = _arg(args, 1), _arg(args, 2)
    return NormLayer(
        name=running_mean_name,
        module=module,
        family=NormFamily.BATCH,
        type_name="functional batch_norm",
        num_channels=int(running_mean.numel()) if isinstance(running_mean, torch.Tensor) else None,
        eps=_optional_float(_arg(args, 6 if no_training else 7)),
        momentum=_optional_float(_arg(args, 5 if no_training else 6)),
        affine=isinstance(weight, torch.Tensor),
        track_running_stats=True,
        num_batches_tracked=None,
        running_mean=_host_values(running_mean),
        running_var=_host_values(running_var),
        weight=_host_values(weight),
        bias=_host_values(bias),
        is_frozen=False,
        is_lazy=False,
        num_groups=None,
        normalized_shape=None,
        is_training=bool(training),
        has_momentum=True,
        buffer_dtype=_dtype_name(running_mean),
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
                name=prefix.rstrip(".") or "(root)",
                type=INFERRED_TYPE,
                family=NormFamily.BATCH.value,
                num_channels=int(running_mean.numel()),
                eps=None,
                momentum=None,
                is_cumulative_average=False,
                affine=weight is not None,
                track_running_stats=True,
                num_batches_tracked=int(tracked.item()) if tracked is not None and tracked.numel() == 1 else None,
                is_training=False,
                affine_requires_grad=None,
                buffer_dtype=_dtype_name(running_mean),
                running_mean=_host_values(running_mean),
                running_var=_host_values(running_var),
                weight=_host_values(weight),
                bias=_host_values(bias),
                is_frozen=False,
                is_lazy=False,
                eval_uses="running",
            )
        )
    return states
