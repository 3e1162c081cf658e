"""check's folding rules on a model: BN401/BN402 from its traced graph, BN403 from its tensors, BN404 from one batch.

The model is never changed: BN404 runs deep copies (the original in eval mode, the folded one in
float32 and in the --precision format).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from bn_inspect.data.batch import Batch
from bn_inspect.model.fold_precision import FLOAT_FORMATS, layer_headrooms
from bn_inspect.model.folding import FoldGraph, find_fold_sites, folded_copy
from bn_inspect.model.layers import is_uninitialized
from bn_inspect.model.modules import model_device
from bn_inspect.model.onnx_folding import (
    OnnxBatchNorm,
    folded_graph,
    onnx_batch_norms,
    onnx_headrooms,
    rounding,
    run_graph,
)
from bn_inspect.model.onnx_module import OnnxModel
from bn_inspect.options import Precision
from bn_inspect.report.findings import Finding
from bn_inspect.report.folding import (
    FoldChange,
    FoldHeadroom,
    FoldSite,
    change_findings,
    change_summary,
    headroom_findings,
    site_findings,
)
from bn_inspect.text import Untrusted


def folding_findings(
    model: nn.Module, precision: Precision | None, batch: Batch | None
) -> tuple[list[Finding], list[str]]:
    """The BN4xx findings and the notes on what could not run.

    Args:
        model: the model as loaded (left unchanged).
        precision: the deployment format (--precision); None runs BN401 and BN402 only.
        batch: one batch on the model's device and in its dtype, for BN404; None skips it.
    """
    if isinstance(model, OnnxModel):
        return _onnx_folding_findings(model, precision, batch)
    graph = find_fold_sites(model)
    if any(is_uninitialized(tensor) for tensor in (*model.parameters(), *model.buffers())):
        graph = FoldGraph((), "the model has lazy modules that have not run yet, so their weights do not exist")
    notes = [] if graph.untraced is None else [f"the folding rules (BN401-BN404) did not run: {graph.untraced}"]
    findings = site_findings(graph.sites, deploys=precision is not None)
    if graph.is_exported:
        if precision is not None:
            notes.append(
                "BN403 and BN404 did not run: they read BatchNorm modules, which a torch.export graph no longer has"
            )
        return findings, notes
    if precision is not None:
        findings += headroom_findings(fold_headrooms(model, graph.sites, precision), precision.value)
    if precision is not None and batch is not None and graph.sites:
        changes = fold_changes(model, graph, precision, batch)
        findings += change_findings(changes)
        summary = change_summary(changes)
        notes += [summary] if summary is not None else []
    return findings, notes


def fold_headrooms(model: nn.Module, sites: tuple[FoldSite, ...], precision: Precision) -> list[FoldHeadroom]:
    """BN403's worst channel of each quantity of each BatchNorm, folded where it can be."""
    out: list[FoldHeadroom] = []
    for site in sites:
        norm = model.get_submodule(site.layer.raw)
        if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
            continue
        mean, var = norm.running_mean, norm.running_var
        if mean is None or var is None:
            continue
        producer = model.get_submodule(site.producer.raw) if site.is_foldable and site.producer else None
        weight, bias = _weight_and_bias(producer)
        out += layer_headrooms(site.layer, precision, weight, bias, norm.weight, norm.bias, mean, var, norm.eps)
    return out


def _weight_and_bias(producer: nn.Module | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A Conv's or Linear's weight and bias (None, None for no producer)."""
    if not isinstance(producer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        return None, None
    return producer.weight, producer.bias


def fold_changes(model: nn.Module, graph: FoldGraph, precision: Precision, batch: Batch) -> list[FoldChange]:
    """BN404: on ``batch``, each folded layer's and the model's output, folded (float32 and
    ``precision``) against the original, as the largest change over the output's root mean square."""
    reference_model = copy.deepcopy(model).eval()
    folded = [site for site in graph.sites if site.is_foldable and site.producer is not None]
    reference: dict[str, torch.Tensor] = {}
    with _outputs(reference_model, {site.layer.raw: site.layer.raw for site in folded}, reference.__setitem__):
        reference_output = _first_tensor(reference_model(*batch.args, **batch.kwargs))
    changes: list[FoldChange] = []
    for name, candidate, inputs in _folded_models(model, graph.sites, precision, batch):
        seen: dict[str, torch.Tensor] = {}
        producers = {site.producer.raw: site.layer.raw for site in folded if site.producer is not None}
        with _outputs(candidate, producers, seen.__setitem__):
            output = _first_tensor(candidate(*inputs.args, **inputs.kwargs))
        changes += [
            _change(Untrusted(layer), name, reference[layer], seen[layer]) for layer in reference if layer in seen
        ]
        if reference_output is not None and output is not None:
            changes.append(_change(None, name, reference_output, output))
    return changes


def _folded_models(
    model: nn.Module, sites: tuple[FoldSite, ...], precision: Precision, batch: Batch
) -> Iterator[tuple[str, nn.Module, Batch]]:
    """The folded model in float32, then in ``precision`` (int8: its folded weights fake-quantized)."""
    yield "float32", folded_copy(model, sites), batch
    low = folded_copy(model, sites)
    if precision is Precision.INT8:
        with torch.no_grad():
            for site in sites:
                weight, _ = _weight_and_bias(low.get_submodule(site.producer.raw)) if site.producer else (None, None)
                if site.is_foldable and weight is not None:
                    step = weight.abs().max() / 127
                    if step > 0:
                        weight.copy_(torch.round(weight / step) * step)
        yield "int8 (per-tensor weights)", low, batch
        return
    dtype = FLOAT_FORMATS[precision]
    yield precision.value, low.to(dtype), batch.to(model_device(model), dtype)


@contextmanager
def _outputs(model: nn.Module, names: dict[str, str], keep: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Hooks that hand each named module's output (a tensor) to ``keep`` under its label; removed on exit."""
    handles = []
    try:
        for module_name, label in names.items():

            def hook(_module: nn.Module, _args: Any, output: Any, label: str = label) -> None:
                if isinstance(output, torch.Tensor):
                    keep(label, output.detach())

            handles.append(model.get_submodule(module_name).register_forward_hook(hook))
        with torch.no_grad():
            yield
    finally:
        for handle in handles:
            handle.remove()


def _first_tensor(output: Any) -> torch.Tensor | None:
    """The model's output tensor, or the first floating tensor of a tuple, list or dict output."""
    if isinstance(output, torch.Tensor):
        return output if output.is_floating_point() else None
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    return next((found for value in values if (found := _first_tensor(value)) is not None), None)


def _change(layer: Untrusted | None, format: str, reference: torch.Tensor, folded: torch.Tensor) -> FoldChange:
    exact = reference.double()
    scale = float(exact.square().mean().sqrt()) if exact.numel() else 0.0
    moved = float((folded.double() - exact).square().mean().sqrt()) if exact.numel() else 0.0
    change = moved / scale if scale > 0 else (0.0 if moved == 0 else math.inf)
    return FoldChange(layer, format, change, scale)


# What the folding rules read in an ONNX graph, and, where BN404 ran, how it differs from a PyTorch model's.
ONNX_FOLDING_NOTE = (
    "ONNX model: the folding rules read the BatchNormalization nodes and the Conv, ConvTranspose, Gemm or "
    "MatMul(+Add) before them"
)
ONNX_BN404_NOTE = (
    "; BN404 folds a copy of the graph and runs it in onnxruntime in float32, with the folded weights and "
    "biases rounded to the --precision format (the activations stay float32)"
)


def _onnx_folding_findings(
    model: OnnxModel, precision: Precision | None, batch: Batch | None
) -> tuple[list[Finding], list[str]]:
    """folding_findings for an ONNX graph: its BatchNormalization nodes' sites and initializers."""
    norms = onnx_batch_norms(model)
    findings = site_findings([norm.site for norm in norms], deploys=precision is not None)
    notes = [ONNX_FOLDING_NOTE]
    if precision is not None:
        findings += headroom_findings(onnx_headrooms(norms, precision), precision.value)
    if precision is not None and batch is not None and any(norm.fold is not None for norm in norms):
        notes = [ONNX_FOLDING_NOTE + ONNX_BN404_NOTE]
        changes = onnx_fold_changes(model, norms, precision, batch)
        findings += change_findings(changes)
        summary = change_summary(changes)
        notes += [summary] if summary is not None else []
    return findings, notes


def onnx_fold_changes(
    model: OnnxModel, norms: list[OnnxBatchNorm], precision: Precision, batch: Batch
) -> list[FoldChange]:
    """BN404 on an ONNX graph: on ``batch``, each folded layer's and the model's first output, the graph
    folded (float32, then with the folded tensors rounded to ``precision``) against the graph as stored."""
    graph = model.proto.graph
    folded = {graph.node[norm.fold.norm].output[0]: norm.site.layer for norm in norms if norm.fold is not None}
    output = graph.output[0].name if graph.output else None
    names = list(dict.fromkeys([*folded, *([output] if output is not None else [])]))
    feeds = model.feeds(batch.args, batch.kwargs)
    reference = run_graph(model.proto, feeds, names)
    label = "int8 (per-tensor weights)" if precision is Precision.INT8 else f"{precision.value} (folded tensors)"
    changes: list[FoldChange] = []
    for format, rounded in (("float32", rounding(None)), (label, rounding(precision))):
        seen = run_graph(folded_graph(model.proto, norms, rounded), feeds, names)
        changes += [
            _change(layer, format, torch.from_numpy(reference[name]), torch.from_numpy(seen[name]))
            for name, layer in folded.items()
        ]
        if output is not None and reference[output].dtype.kind == "f":
            changes.append(_change(None, format, torch.from_numpy(reference[output]), torch.from_numpy(seen[output])))
    return changes
