"""What a loaded module is: its device and dtype, its compiled wrapper, lazy parts, modes and norm layers."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from bn_inspect.errors import LazyModelError
from bn_inspect.model.graph import iter_graph_norm_layers
from bn_inspect.model.layers import NormLayer, is_uninitialized, iter_norm_layers
from bn_inspect.report.records import IN_MEMORY_FORMAT, ModelInfo


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def model_float_dtype(model: nn.Module) -> torch.dtype | None:
    """What floating-point inputs are cast to: the dtype of the model's first initialized float tensor.

    None for a model without one (an InstanceNorm without affine or tracking): its inputs keep
    their own precision (see ``Batch.to``), so a float64 input is reduced in float64.
    """
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point() and not is_uninitialized(tensor):
            return tensor.dtype
    return None


def refuse_lazy_modules(model: nn.Module, why: str, fix: str) -> None:
    """Raise LazyModelError when lazy modules have not run yet (their tensors are still uninitialized).

    Args:
        why: what running the analysis would mean for them, appended to the message (", so ...").
        fix: what to do instead.
    """
    if any(is_uninitialized(t) for t in (*model.parameters(), *model.buffers())):
        raise LazyModelError(f"the model has lazy modules that have not run yet{why}", fix)


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


def set_norm_layers_training(model: nn.Module, layers: Iterable[NormLayer]) -> None:
    """Every module in eval mode except the given normalization layers, which train.

    Non-recursive for the layers, so a layer's own submodules (the dropout inside timm's
    BatchNormAct2d) stay in eval.
    """
    set_training(model, False)
    for layer in layers:
        layer.module.training = True


def in_memory_model_info(model: nn.Module) -> ModelInfo:
    """The record of a model handed over in memory (the Python API): its class name, "ResNet (in memory)".

    A TorchScript module is named by the class it was scripted or traced from, not RecursiveScriptModule.
    """
    name = getattr(model, "original_name", None) if isinstance(model, torch.jit.ScriptModule) else None
    return ModelInfo.of(f"{name or type(model).__name__} (in memory)", IN_MEMORY_FORMAT)
