"""Normalization layers of a torch.export graph: read off its batch-norm nodes, not off modules."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from bn_inspect.model.layers import NormFamily, NormLayer, dtype_name, host_values, optional_float, positional_arg

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
            eps=optional_float(
                node.args[-1] if name == "_native_batch_norm_legit_no_training" else positional_arg(node.args, 7)
            ),
            momentum=optional_float(
                positional_arg(node.args, 5 if name == "_native_batch_norm_legit_no_training" else 6)
            ),
            affine=node.args[1] is not None,
            track_running_stats=True,
            num_batches_tracked=_tracked(model, path),
            running_mean=host_values(running["running_mean"]),
            running_var=host_values(running.get("running_var")),
            weight=host_values(_graph_tensor(model, node.args[1])),
            bias=host_values(_graph_tensor(model, node.args[2])),
            is_frozen=False,
            is_lazy=False,
            num_groups=None,
            normalized_shape=None,
            is_training=bool(training),
            has_momentum=True,
            buffer_dtype=dtype_name(running["running_mean"]),
            owner_tensors=tuple(running.values()),
            observed_training=training,
        )
    return list(layers.values())


def _graph_training_flag(op_name: str, args: tuple[object, ...]) -> bool | None:
    if op_name in ("_native_batch_norm_legit_no_training", "_batch_norm_no_update"):
        return False
    if op_name == "_batch_norm_with_update":
        return True
    flag = positional_arg(args, 5)
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


def exported_input_shapes(model: nn.Module) -> list[tuple[int | None, ...]]:
    """The shape of each tensor input of a torch.export program's module, None for a dynamic size.

    Read off the graph's placeholders (``ep.module()`` keeps only the user's inputs as placeholders;
    weights and buffers are attributes). A size exported without ``dynamic_shapes`` is a plain int
    there, one the program's guards check on every call; a dynamic one is a SymInt.
    """
    # A ScriptModule has a graph too, of another kind: only an fx graph has placeholders.
    if not isinstance(model, torch.fx.GraphModule):
        return []
    shapes: list[tuple[int | None, ...]] = []
    for node in model.graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(value, torch.Tensor):
            shapes.append(tuple(size if isinstance(size, int) else None for size in value.shape))
    return shapes
