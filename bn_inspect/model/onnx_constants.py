"""The constants an ONNX exporter computes from stored tensors (the dynamo exporter's zero bias), worked out
by running only the nodes that compute them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from bn_inspect.model.onnx_module import graph_session

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


def computed_constants(
    proto: onnx.ModelProto, names: set[str], producers: dict[str, int], known: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The values of ``names`` that an exporter computes from stored tensors only, run by onnxruntime
    on those nodes alone; names computed otherwise are left out."""
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
    made = {name for node in kept for name in node.output}
    read = sorted({name for node in kept for name in node.input if name in known and name not in made})
    sub = onnx.helper.make_model(
        onnx.helper.make_graph(
            kept,
            "constants",
            [],
            [onnx.ValueInfoProto(name=name) for name in wanted],
            [onnx.numpy_helper.from_array(known[name], name) for name in read],
        ),
        opset_imports=list(proto.opset_import),
        ir_version=proto.ir_version,
    )
    try:
        values = graph_session(sub, [], optimize=False).run(wanted, {})
    except Exception:  # onnxruntime's own classes, one per status code: the values stay unknown
        return {}
    return {name: np.asarray(value) for name, value in zip(wanted, values, strict=True)}


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
