"""Which BatchNorm folds into what: the producers of each BatchNorm module in a torch.fx trace, and the fold itself.

A BatchNorm folds into the Conv or Linear directly before it when only it reads that layer's
output (report/folding.py has the formula). torch.fx traces the model symbolically (no data runs,
no state changes); a torch.export program is read off its own graph (its BatchNorm is no longer a
module, so only where it folds is known); a model whose forward torch.fx cannot trace
(data-dependent control flow) and TorchScript get no sites.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from bn_inspect.model.graph import BATCH_NORM_OPS
from bn_inspect.report.folding import FoldSite
from bn_inspect.text import Untrusted, inert

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass(frozen=True)
class FoldGraph:
    """The fold sites of a model, or why its graph could not be traced (``untraced``, then no sites)."""

    sites: tuple[FoldSite, ...]
    untraced: str | None = None
    # Sites read off a torch.export graph: BN401/BN402 only, since BN403/BN404 need the modules.
    is_exported: bool = False


def find_fold_sites(model: nn.Module) -> FoldGraph:
    """Each BatchNorm module call of ``model``'s torch.fx trace, with what comes directly before it."""
    if isinstance(model, torch.fx.GraphModule) and any(_is_batch_norm(node) for node in model.graph.nodes):
        return FoldGraph(
            tuple(_exported_site(node, model) for node in model.graph.nodes if _is_batch_norm(node)), None, True
        )
    if isinstance(model, (torch.jit.ScriptModule, torch.fx.GraphModule)):
        return FoldGraph((), "a TorchScript model keeps no BatchNorm modules to fold")
    try:
        graph = _LeafTracer().trace(model)
    except Exception as error:  # tracing runs the model's own forward: whatever it raises means no graph
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return FoldGraph((), f"torch.fx could not trace the model ({inert(first[:160])})")
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    sites = [
        _site(node, modules, calls)
        for node in graph.nodes
        if node.op == "call_module" and isinstance(modules.get(node.target), _BATCH_NORMS)
    ]
    return FoldGraph(tuple(sites))


class _LeafTracer(torch.fx.Tracer):  # type: ignore[misc]
    """torch.fx's tracer, with every BatchNorm, Conv and Linear (subclasses too: timm's BatchNormAct2d)
    kept as one call, so that each is a site or a producer rather than the functions inside it."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, (*_BATCH_NORMS, *_CONVS, nn.Linear)) or bool(
            super().is_leaf_module(module, qualified_name)
        )


def _site(node: torch.fx.Node, modules: dict[str, nn.Module], calls: dict[str, int]) -> FoldSite:
    name = Untrusted(str(node.target))
    source = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    if not isinstance(source, torch.fx.Node):
        return FoldSite(name, None, "a constant", False, "its input is not a traced value")
    producer = modules.get(str(source.target)) if source.op == "call_module" else None
    kind = _kind(source, producer)
    owner = Untrusted(str(source.target)) if producer is not None else None
    norm = modules[str(node.target)]
    if owner is None or not isinstance(producer, (*_CONVS, nn.Linear)):
        return FoldSite(name, owner, kind, False, f"it follows {_named(owner, kind)}, not a Conv or Linear")
    subclassed = next((m for m in (norm, producer) if type(m) not in (*_BATCH_NORMS, *_CONVS, nn.Linear)), None)
    if subclassed is not None:
        what = inert(type(subclassed).__name__)
        return FoldSite(name, owner, kind, False, f"{what} subclasses PyTorch's class, and its forward may do more")
    if calls[str(node.target)] > 1 or calls[str(source.target)] > 1:
        return FoldSite(name, owner, kind, False, "it or its producer is called more than once")
    if len(source.users) > 1:
        return FoldSite(name, owner, kind, False, f"the output of {owner} is read elsewhere too")
    channels = producer.out_channels if isinstance(producer, _CONVS) else producer.out_features
    if channels != getattr(norm, "num_features", None):
        return FoldSite(name, owner, kind, False, f"{owner} gives {channels} channels, BatchNorm normalizes others")
    bias = producer.bias
    bias_max = float(bias.detach().abs().max()) if bias is not None and bias.numel() else None
    return FoldSite(name, owner, kind, True, None, bias_max)


_GRAPH_PRODUCERS = frozenset({"conv1d", "conv2d", "conv3d", "convolution", "linear"})


def _op_name(node: object) -> str | None:
    """The aten op a torch.export graph node calls (``conv2d``, ``batch_norm``), else None."""
    if getattr(node, "op", None) != "call_function":
        return None
    return getattr(getattr(getattr(node, "target", None), "overloadpacket", None), "__name__", None)


def _is_batch_norm(node: torch.fx.Node) -> bool:
    return _op_name(node) in BATCH_NORM_OPS | {"batch_norm"} and bool(node.meta.get("nn_module_stack"))


def _stack_entry(node: torch.fx.Node) -> tuple[str, str] | None:
    """(module path, class name) of the module a torch.export graph node came from."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    return str(path), (cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))).rsplit(".", 1)[-1]


def _exported_site(node: torch.fx.Node, model: nn.Module) -> FoldSite:
    """A fold site read off a torch.export graph: the batch-norm call and the node its input comes from."""
    entry = _stack_entry(node)
    name = Untrusted(entry[0] if entry else str(node.name))
    source = node.args[0]
    if not isinstance(source, torch.fx.Node):
        return FoldSite(name, None, "a constant", False, "its input is not a traced value")
    if source.op == "placeholder":
        return FoldSite(name, None, "the model's input", False, "it follows the model's input, not a Conv or Linear")
    producer_entry = _stack_entry(source)
    # A function called in the root's forward (an add, a cat) belongs to no submodule: it is named by its op.
    owner = Untrusted(producer_entry[0]) if producer_entry and producer_entry[0] else None
    kind = inert(producer_entry[1] if owner is not None and producer_entry else str(_op_name(source) or source.op))
    transposed = _op_name(source) == "convolution" and len(source.args) > 6 and bool(source.args[6])
    if _op_name(source) not in _GRAPH_PRODUCERS or transposed or owner is None:
        return FoldSite(name, owner, kind, False, f"it follows {_named(owner, kind)}, not a Conv or Linear")
    if len(source.users) > 1:
        return FoldSite(name, owner, kind, False, f"the output of {owner} is read elsewhere too")
    bias = _graph_attribute(model, source.args[2] if len(source.args) > 2 else None)
    bias_max = float(bias.detach().abs().max()) if bias is not None and bias.numel() else None
    return FoldSite(name, owner, kind, True, None, bias_max)


def _graph_attribute(model: nn.Module, arg: object) -> torch.Tensor | None:
    """The parameter or buffer a graph's ``get_attr`` node names, else None."""
    target = getattr(arg, "target", None)
    if getattr(arg, "op", None) != "get_attr" or not isinstance(target, str):
        return None
    for lookup in (model.get_parameter, model.get_buffer):
        try:
            return lookup(target)
        except AttributeError:
            continue
    return None


def _kind(source: torch.fx.Node, producer: nn.Module | None) -> str:
    if source.op == "placeholder":
        return "the model's input"
    if producer is not None:
        return inert(type(producer).__name__)
    target = source.target
    return inert(target if isinstance(target, str) else str(getattr(target, "__name__", target)))


def _named(owner: Untrusted | None, kind: str) -> str:
    return f"{owner} ({kind})" if owner is not None else kind


def fold_parameters(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The folded weight and bias and the per-channel scale, in float64 (no nn.Module needed).

    ``scale = norm_weight / sqrt(running_var + eps)``; ``W' = W * scale`` along the output
    channels (dim 0 of a Conv's or a Linear's weight); ``b' = (bias - running_mean) * scale +
    norm_bias``. A missing bias or affine term is 0 (bias) or 1 (norm_weight).
    """
    mean, var = running_mean.detach().double(), running_var.detach().double()
    gamma = torch.ones_like(mean) if norm_weight is None else norm_weight.detach().double()
    beta = torch.zeros_like(mean) if norm_bias is None else norm_bias.detach().double()
    scale = gamma / torch.sqrt(var + eps)
    folded_weight = weight.detach().double() * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    folded_bias = ((torch.zeros_like(mean) if bias is None else bias.detach().double()) - mean) * scale + beta
    return folded_weight, folded_bias, scale


def folded_copy(model: nn.Module, sites: tuple[FoldSite, ...]) -> nn.Module:
    """A deep copy of ``model`` in eval mode with every foldable BatchNorm folded into its producer
    (torch.nn.utils.fusion, as PyTorch's own fusion computes it, in the model's dtype) and replaced
    by an identity; ``model`` itself is not touched."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

    folded = copy.deepcopy(model).eval()
    for site in sites:
        if not site.is_foldable or site.producer is None:
            continue
        producer, norm = folded.get_submodule(site.producer.raw), folded.get_submodule(site.layer.raw)
        if not isinstance(norm, _BATCH_NORMS) or norm.running_mean is None or norm.running_var is None:
            continue
        mean, var = norm.running_mean, norm.running_var
        if not isinstance(producer, (*_CONVS, nn.Linear)):
            continue
        if isinstance(producer, nn.Linear):
            weight, bias = fuse_linear_bn_weights(
                producer.weight, producer.bias, mean, var, norm.eps, _affine(norm, 1.0), _affine(norm, 0.0)
            )
        else:
            weight, bias = fuse_conv_bn_weights(
                producer.weight, producer.bias, mean, var, norm.eps, norm.weight, norm.bias
            )
        producer.weight, producer.bias = weight, bias
        folded.set_submodule(site.layer.raw, nn.Identity())
    return folded


def _affine(norm: nn.modules.batchnorm._BatchNorm, fill: float) -> torch.Tensor:
    """BatchNorm's weight (fill 1) or bias (fill 0), as ones or zeros where it has none (affine=False)."""
    tensor = norm.weight if fill == 1.0 else norm.bias
    return tensor if tensor is not None else torch.full_like(norm.running_mean, fill)  # type: ignore[arg-type]
