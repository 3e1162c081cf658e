"""Which ONNX BatchNormalization node folds into what, its tensors, and the graph with every foldable one folded.

The ONNX counterpart of model/folding.py: a BatchNormalization node folds into the Conv,
ConvTranspose (one group), Gemm or MatMul (with the Add of its bias, if any) whose output only it
reads. The tensors come from the initializers, or, where an exporter computes one from them (the
dynamo exporter's zero bias of a Conv built without one), from onnxruntime running those few nodes
alone. The arithmetic is model/folding.py's ``fold_parameters`` and model/fold_precision.py's
``layer_headrooms``, in float64, as for a PyTorch model.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from bn_inspect.model.fold_precision import FLOAT_FORMATS, INT8_LEVELS, layer_headrooms
from bn_inspect.model.folding import fold_parameters
from bn_inspect.model.onnx_constants import STANDARD_DOMAINS, computed_constants
from bn_inspect.model.onnx_graph import NormNode, constant_values, torch_name
from bn_inspect.model.onnx_module import OnnxModel, graph_session, run_session
from bn_inspect.options import Precision
from bn_inspect.report.folding import FoldHeadroom, FoldSite
from bn_inspect.text import Untrusted, inert

if TYPE_CHECKING:
    import onnx

FOLDS_INTO = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


@dataclass(frozen=True)
class OnnxFold:
    """Where a foldable BatchNormalization node folds, with its producer's tensors in float64.

    ``weight`` is (output channels, ...): a Conv's as stored, a ConvTranspose's and a MatMul's
    transposed, a Gemm's with transB and alpha applied; ``bias`` one value per output channel (a
    Gemm's beta * C, a MatMul's Add), None without one. ``dtype`` is the stored weight's.
    """

    norm: int
    producer: int
    bias_add: int | None
    weight: np.ndarray
    bias: np.ndarray | None
    dtype: np.dtype


@dataclass(frozen=True)
class OnnxBatchNorm:
    """One BatchNormalization layer of an ONNX graph: its fold site, its stored tensors, its fold if it folds."""

    site: FoldSite
    scale: np.ndarray | None
    bias: np.ndarray | None
    mean: np.ndarray | None
    var: np.ndarray | None
    epsilon: float
    fold: OnnxFold | None


@dataclass(frozen=True)
class _Graph:
    """What the site search reads off the main graph once."""

    graph: onnx.GraphProto
    known: dict[str, np.ndarray]
    stored: frozenset[str]
    producers: dict[str, int]
    readers: Counter[str]
    inputs: frozenset[str]


def onnx_batch_norms(model: OnnxModel) -> list[OnnxBatchNorm]:
    """Each BatchNormalization layer of ``model``'s graph (a layer exported twice once), in graph order."""
    graph = model.proto.graph
    known = constant_values(graph)
    producers = {output: index for index, node in enumerate(graph.node) for output in node.output if output}
    nodes = [(name, node) for name, node in model.named_nodes if node.op_type == "BatchNormalization"]
    wanted = {name for _, node in nodes for name in _tensor_names(graph, node.index, producers)} - known.keys()
    stored = frozenset(known)
    known |= computed_constants(model.proto, wanted, producers, known)
    initializers = {tensor.name for tensor in graph.initializer}
    inputs = frozenset(value.name for value in graph.input if value.name not in initializers)
    found = _Graph(graph, known, stored, producers, _reader_counts(graph), inputs)
    calls = Counter(name for name, _ in nodes)
    layers: dict[str, OnnxBatchNorm] = {}
    for name, node in nodes:
        if name not in layers:
            layers[name] = _batch_norm(Untrusted(name), node, found, calls[name])
    return list(layers.values())


def _tensor_names(graph: onnx.GraphProto, index: int, producers: dict[str, int]) -> list[str]:
    """The names whose values a BatchNormalization node's fold reads: its own tensors and those of
    the node before it (and of the MatMul before an Add)."""
    node = graph.node[index]
    names = list(node.input[1:5])
    before = producers.get(node.input[0])
    for _ in range(2):
        if before is None:
            break
        names += list(graph.node[before].input)
        before = producers.get(graph.node[before].input[0]) if graph.node[before].op_type == "Add" else None
    return [name for name in names if name]


def _reader_counts(graph: onnx.GraphProto) -> Counter[str]:
    """How often each value is read: by the graph's nodes, as a graph output, or by a nested graph
    (If, Loop, Scan), which may read any outer value. A Shape node reads only the shape, which folding
    keeps (the dynamo exporter reads a Conv's weight so to make its zero bias)."""
    counts = Counter(name for node in graph.node if node.op_type != "Shape" for name in node.input if name)
    counts.update(output.name for output in graph.output)
    for sub in _nested(graph):
        counts.update(name for node in sub.node for name in node.input if name)
    return counts


def _nested(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    # read_onnx bounded the nesting depth already.
    for node in graph.node:
        for attribute in node.attribute:
            for sub in (*([attribute.g] if attribute.HasField("g") else ()), *attribute.graphs):
                yield sub
                yield from _nested(sub)


def _float(values: np.ndarray | None) -> np.ndarray | None:
    return None if values is None or values.dtype.kind != "f" else values.astype(np.float64).reshape(-1)


def _batch_norm(layer: Untrusted, norm: NormNode, found: _Graph, num_calls: int) -> OnnxBatchNorm:
    node = found.graph.node[norm.index]
    tensors = [_float(found.known.get(name)) for name in [*node.input[1:5], "", "", "", ""][:4]]
    if any(tensor is None for tensor in tensors):
        # ONNX requires all four: one the graph computes is unknown here, so the node is not judged.
        tensors = [None] * 4
    scale, bias, mean, var = tensors
    site, fold = _site(layer, norm, found, num_calls, mean)
    return OnnxBatchNorm(site, scale, bias, mean, var, norm.epsilon, fold)


def _site(
    layer: Untrusted, norm: NormNode, found: _Graph, num_calls: int, mean: np.ndarray | None
) -> tuple[FoldSite, OnnxFold | None]:
    source = found.graph.node[norm.index].input[0]
    index = found.producers.get(source)
    if index is None:
        kind = "the model's input" if source in found.inputs else "a stored tensor"
        return FoldSite(layer, None, kind, False, f"it follows {kind}, not a Conv or Gemm"), None
    bias_add, read = None, source
    if found.graph.node[index].op_type == "Add" and (matmul := _matmul_before(index, found)) is not None:
        bias_add, index = index, matmul
    producer = found.graph.node[index]
    owner = Untrusted(torch_name(producer, found.known) or producer.name or f"{producer.op_type}_{index}")
    kind = inert(producer.op_type) + ("+Add" if bias_add is not None else "")

    def unfoldable(reason: str) -> tuple[FoldSite, None]:
        return FoldSite(layer, owner, kind, False, reason), None

    if producer.op_type not in FOLDS_INTO or producer.domain not in STANDARD_DOMAINS:
        return unfoldable(f"it follows {owner} ({kind}), not a Conv or Gemm")
    if norm.is_training_mode:
        return unfoldable(
            "it was exported in training mode (training_mode=1) and normalizes with each batch's statistics"
        )
    if mean is None:
        return unfoldable("its scale, bias or running statistics are computed in the graph, not stored")
    if num_calls > 1:
        return unfoldable("it is called more than once")
    if found.readers[read] > 1:
        return unfoldable(f"the output of {owner} is read elsewhere too")
    tensors = _oriented(producer, found, bias_add)
    if isinstance(tensors, str):
        return unfoldable(tensors.format(owner=owner))
    weight, bias, dtype = tensors
    if weight.shape[0] != mean.size:
        return unfoldable(f"{owner} gives {weight.shape[0]} channels, BatchNorm normalizes {mean.size}")
    bias_name = _bias_name(producer, found, bias_add)
    is_stored = bias is not None and bias_name in found.stored
    bias_max = float(np.abs(bias).max()) if is_stored and bias is not None and bias.size else None
    return FoldSite(layer, owner, kind, True, None, bias_max), OnnxFold(
        norm.index, index, bias_add, weight, bias, dtype
    )


def _matmul_before(add: int, found: _Graph) -> int | None:
    """The MatMul whose output the Add at ``add`` adds a stored bias to (only that Add reading it), else None."""
    node = found.graph.node[add]
    if len(node.input) != 2 or node.domain not in STANDARD_DOMAINS:
        return None
    for value, other in (node.input, node.input[::-1]):
        matmul = found.producers.get(value)
        if (
            matmul is not None
            and found.graph.node[matmul].op_type == "MatMul"
            and other in found.known
            and found.readers[value] == 1
        ):
            return matmul
    return None


def _bias_name(producer: onnx.NodeProto, found: _Graph, bias_add: int | None) -> str | None:
    if bias_add is not None:
        add = found.graph.node[bias_add]
        return str(add.input[1] if add.input[0] == producer.output[0] else add.input[0])
    return producer.input[2] if len(producer.input) > 2 and producer.input[2] else None


def _attributes(node: onnx.NodeProto) -> dict[str, object]:
    from onnx import helper

    return {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}


def _scalar(attributes: dict[str, object], name: str, default: float) -> float:
    value = attributes.get(name, default)
    return float(value) if isinstance(value, (int, float)) else default


def _oriented(
    producer: onnx.NodeProto, found: _Graph, bias_add: int | None
) -> tuple[np.ndarray, np.ndarray | None, np.dtype] | str:
    """The producer's weight (output channels first) and bias per channel, or why they cannot fold
    (a string with ``{owner}`` in it)."""
    weight_name = producer.input[1] if len(producer.input) > 1 else ""
    stored = found.known.get(weight_name)
    if stored is None or stored.dtype.kind != "f":
        return "the weight of {owner} is computed in the graph (or not a float), not stored"
    if found.readers[weight_name] > 1:
        return "{owner} shares its weight with another node"
    bias_name = _bias_name(producer, found, bias_add)
    bias = None if bias_name is None else found.known.get(bias_name)
    if bias_name is not None and (bias is None or bias.dtype.kind != "f"):
        return "the bias of {owner} is computed in the graph, not stored"
    attributes = _attributes(producer)
    weight = stored.astype(np.float64)
    if producer.op_type == "ConvTranspose":
        if _scalar(attributes, "group", 1) != 1 or weight.ndim < 3:
            return "{owner} is a grouped ConvTranspose, whose weight keeps each group's channels apart"
        weight = weight.swapaxes(0, 1)
    elif producer.op_type == "Gemm":
        if weight.ndim != 2:
            return "the weight of {owner} is not a matrix"
        weight = (weight if _scalar(attributes, "transB", 0) else weight.T) * _scalar(attributes, "alpha", 1.0)
        bias = None if bias is None else bias * _scalar(attributes, "beta", 1.0)
    elif producer.op_type == "MatMul":
        if weight.ndim != 2:
            return "the weight of {owner} is not a matrix"
        weight = weight.T
    elif weight.ndim < 3:
        return "the weight of {owner} is not a convolution's"
    if bias is not None:
        if bias.size not in (1, weight.shape[0]) or any(size != 1 for size in bias.shape[:-1]):
            return "the bias of {owner} is not one value per output channel"
        bias = np.broadcast_to(bias.astype(np.float64).reshape(-1), (weight.shape[0],)).copy()
    return weight, bias, stored.dtype


def _tensor(values: np.ndarray | None) -> torch.Tensor | None:
    return None if values is None else torch.from_numpy(values)


def onnx_headrooms(norms: Sequence[OnnxBatchNorm], precision: Precision) -> list[FoldHeadroom]:
    """BN403's worst channel of each quantity of each BatchNormalization layer, folded where it can be."""
    out: list[FoldHeadroom] = []
    for norm in norms:
        if norm.mean is None or norm.var is None:
            continue
        fold = norm.fold
        out += layer_headrooms(
            norm.site.layer,
            precision,
            _tensor(fold.weight) if fold is not None else None,
            _tensor(fold.bias) if fold is not None else None,
            _tensor(norm.scale),
            _tensor(norm.bias),
            torch.from_numpy(norm.mean),
            torch.from_numpy(norm.var),
            norm.epsilon,
        )
    return out


def rounding(precision: Precision | None) -> Callable[[np.ndarray, bool], np.ndarray]:
    """How a deployment stores a folded tensor (``is_weight`` False for a bias): as computed (None),
    rounded to fp16 or bf16, or for int8 the weight rounded to 127 levels under one scale per tensor."""

    def rounded(values: np.ndarray, is_weight: bool) -> np.ndarray:
        if precision is None:
            return values
        if precision is Precision.INT8:
            step = float(np.abs(values).max()) / INT8_LEVELS if values.size else 0.0
            return np.round(values / step) * step if is_weight and step > 0 else values
        return torch.from_numpy(values).to(FLOAT_FORMATS[precision]).double().numpy()

    return rounded


def folded_graph(
    proto: onnx.ModelProto, norms: Sequence[OnnxBatchNorm], rounded: Callable[[np.ndarray, bool], np.ndarray]
) -> onnx.ModelProto:
    """A copy of ``proto`` with every foldable BatchNormalization folded into its producer as a
    deployment compiler does: the producer's weight and bias replaced by the folded ones (computed
    in float64, passed through ``rounded``, stored in the weight's dtype) and the BatchNormalization
    node made an Identity (an Add of the folded bias after a MatMul that had none)."""
    import onnx

    folded = onnx.ModelProto()
    folded.CopyFrom(proto)
    graph = folded.graph
    for norm in norms:
        fold = norm.fold
        if fold is None or norm.mean is None or norm.var is None:
            continue
        weight, bias, _ = fold_parameters(
            torch.from_numpy(fold.weight),
            _tensor(fold.bias),
            _tensor(norm.scale),
            _tensor(norm.bias),
            torch.from_numpy(norm.mean),
            torch.from_numpy(norm.var),
            norm.epsilon,
        )
        stem = f"bn_inspect_folded_{fold.norm}"
        graph.initializer.extend(
            [
                onnx.numpy_helper.from_array(
                    _stored(graph.node[fold.producer], rounded(weight.numpy(), True), fold), f"{stem}_weight"
                ),
                onnx.numpy_helper.from_array(rounded(bias.numpy(), False).astype(fold.dtype), f"{stem}_bias"),
            ]
        )
        _rewire(graph, fold, f"{stem}_weight", f"{stem}_bias")
    return folded


def _stored(producer: onnx.NodeProto, weight: np.ndarray, fold: OnnxFold) -> np.ndarray:
    """The folded weight in the layout the producer reads (a Gemm's as transB=1)."""
    if producer.op_type == "ConvTranspose":
        weight = weight.swapaxes(0, 1)
    elif producer.op_type == "MatMul":
        weight = weight.T
    return np.ascontiguousarray(weight).astype(fold.dtype)


def _rewire(graph: onnx.GraphProto, fold: OnnxFold, weight: str, bias: str) -> None:
    from onnx import helper

    producer, norm = graph.node[fold.producer], graph.node[fold.norm]
    producer.input[1] = weight
    del norm.input[1:], norm.output[1:], norm.attribute[:]
    norm.op_type = "Identity"
    if producer.op_type == "MatMul":
        if fold.bias_add is None:
            norm.op_type = "Add"
            norm.input.append(bias)
            return
        add = graph.node[fold.bias_add]
        constant = 1 if add.input[0] == producer.output[0] else 0
        add.input[constant] = bias
        return
    del producer.input[2:]
    producer.input.append(bias)
    if producer.op_type == "Gemm":
        kept = [a for a in producer.attribute if a.name not in ("alpha", "beta", "transB")]
        del producer.attribute[:]
        producer.attribute.extend(
            [
                *kept,
                helper.make_attribute("alpha", 1.0),
                helper.make_attribute("beta", 1.0),
                helper.make_attribute("transB", 1),
            ]
        )


def run_graph(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
    """``outputs`` of ``proto`` on ``feeds``, run by onnxruntime as written (no fusion of its own).

    Raises:
        ForwardError: onnxruntime could not run it.
    """
    values = run_session(graph_session(proto, outputs, optimize=False), outputs, feeds, "the folded graph")
    return {name: np.asarray(value) for name, value in zip(outputs, values, strict=True)}
