"""The constants an ONNX exporter computes from stored tensors (the dynamo exporter's zero bias), worked out
by running only the nodes that compute them, with onnx's numpy reference implementation and a bound
on every value's size."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

STANDARD_DOMAINS = ("", "ai.onnx")
# The operators an exporter computes a constant with from stored tensors (the dynamo exporter's
# zero bias: Shape, Expand, CastLike); a value computed by any other, or by more than
# _MAX_CONSTANT_NODES nodes, is not read, and its node does not fold.
_CONSTANT_OPS = frozenset(
    {"Shape", "Expand", "CastLike", "Cast", "Constant", "ConstantOfShape", "Identity", "Reshape"}
    | {"Unsqueeze", "Squeeze", "Gather", "Concat", "Slice", "Mul", "Add", "Sub", "Div", "Transpose"}
)
_MAX_CONSTANT_NODES = 32
# No computed constant is larger than a layer's stored weights could reasonably be.
_MAX_CONSTANT_VALUES = 1 << 24


def computed_constants(
    proto: onnx.ModelProto, names: set[str], producers: dict[str, int], known: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The values of ``names`` that an exporter computes from stored tensors only, run node by node
    by onnx's reference implementation; names computed otherwise, or too large, are left out."""
    import onnx

    graph = proto.graph
    keep: set[int] = set()
    wanted = []
    for name in sorted(names):
        nodes = _constant_ancestors(name, graph, producers, known)
        if nodes:
            wanted.append(name)
            keep |= nodes
    if not wanted:
        return {}
    kept = [onnx.NodeProto() for _ in sorted(keep)]
    for copy, index in zip(kept, sorted(keep), strict=True):
        copy.CopyFrom(graph.node[index])
        if copy.op_type == "CastLike":
            # Only its first input's values matter; the second, a value of the running graph, gives its type.
            copy.op_type = "Identity"
            del copy.input[1:]
    values = {name: known[name] for node in kept for name in node.input if name in known}
    # Node by node, in graph order, each output's size bounded before the node runs: a hostile
    # Expand or ConstantOfShape would otherwise allocate whatever size it names.
    for node in kept:
        inputs = [values.get(name) for name in node.input if name]
        present = [value for value in inputs if value is not None]
        if len(present) < len(inputs) or _output_size(node.op_type, present) > _MAX_CONSTANT_VALUES:
            return {}
        try:
            outputs = _run_node(node, present, proto)
        except Exception:  # the reference implementation's errors, one per operator: the values stay unknown
            return {}
        values.update(zip(node.output, outputs, strict=False))
    return {name: np.asarray(values[name]) for name in wanted if name in values}


def _output_size(op_type: str, inputs: list[np.ndarray]) -> float:
    """The most values ``op_type`` makes from ``inputs`` (one of _CONSTANT_OPS), without making them."""
    try:
        if op_type == "ConstantOfShape":
            dims = [int(d) for d in inputs[0].reshape(-1)]
            return math.prod(dims) if min(dims, default=0) >= 0 else math.inf
        if op_type == "Expand":
            dims = [int(d) for d in inputs[1].reshape(-1)]
            return (
                math.prod(np.broadcast_shapes(inputs[0].shape, tuple(dims))) if min(dims, default=0) >= 0 else math.inf
            )
        if op_type in ("Add", "Sub", "Mul", "Div"):
            return math.prod(np.broadcast_shapes(*(value.shape for value in inputs)))
        if op_type == "Concat":
            return sum(value.size for value in inputs)
        if op_type == "Gather":
            return inputs[0].size * inputs[1].size
    except (ValueError, IndexError, OverflowError):
        return math.inf
    return max((value.size for value in inputs), default=0)


def _run_node(node: onnx.NodeProto, inputs: list[np.ndarray], proto: onnx.ModelProto) -> list[np.ndarray]:
    """``node``'s outputs on ``inputs``, by onnx's numpy reference implementation under the model's opsets."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    names = [name for name in node.input if name]
    graph = onnx.helper.make_graph(
        [node],
        "constant",
        [onnx.ValueInfoProto(name=name) for name in names],
        [onnx.ValueInfoProto(name=name) for name in node.output],
    )
    model = onnx.helper.make_model(graph, opset_imports=list(proto.opset_import), ir_version=proto.ir_version)
    return list(ReferenceEvaluator(model).run(None, dict(zip(names, inputs, strict=True))))


def _constant_ancestors(
    name: str, graph: onnx.GraphProto, producers: dict[str, int], known: dict[str, np.ndarray]
) -> set[int] | None:
    """The nodes that compute ``name`` from stored tensors alone, or None if it needs anything else."""
    nodes: set[int] = set()
    pending = [name]
    while pending:
        value = pending.pop()
        if value in known or not value:
            continue
        index = producers.get(value)
        if index is None:
            return None
        node = graph.node[index]
        if (
            node.op_type not in _CONSTANT_OPS
            or node.domain not in STANDARD_DOMAINS
            or any(a.g.node for a in node.attribute)
        ):
            return None
        if index not in nodes:
            nodes.add(index)
            pending += node.input[:1] if node.op_type == "CastLike" else node.input
        if len(nodes) > _MAX_CONSTANT_NODES:
            return None
    return nodes
