"""An ONNX file read safely: the protobuf parsed within bounds, external data kept inside the model's
folder, custom domains refused, and the normalization nodes found with their stored tensors.

The onnx package is imported only here and in ``onnx_module.py``, and only for an ONNX file.
"""

from __future__ import annotations

import ast
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bn_inspect.boundary.reading import OpenedInput, Source, open_checked
from bn_inspect.errors import ModelFileError

if TYPE_CHECKING:
    import onnx

# protobuf cannot serialize a message over 2 GiB: larger weights live in external data files.
MAX_PROTOBUF_BYTES = 2**31 - 1
# Control flow (If, Loop, Scan) nests graphs in attributes; real models nest a few levels.
MAX_GRAPH_DEPTH = 16
MAX_NODES = 1_000_000
# Domains whose operators onnxruntime implements itself; any other must be a function of the model.
KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.preview.training"})
NORM_OPS = ("BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization")
_BAD_FILE_FIX = "Re-export or re-download it"


@dataclass(frozen=True)
class NormNode:
    """One normalization node of the main graph and what it stores.

    ``input_name`` is the tensor it normalizes; ``torch_name`` the PyTorch module path the exporter
    kept (initializer names such as ``layer1.0.bn1.running_mean``, or the dynamo exporter's
    ``pkg.torch.onnx.name_scopes`` metadata), else None. Tensors are None where the node computes
    them in the graph rather than reading an initializer or a Constant.
    """

    index: int
    node_name: str
    op_type: str
    input_name: str
    torch_name: str | None
    stored_key: tuple[str, ...]
    scale: np.ndarray | None
    bias: np.ndarray | None
    mean: np.ndarray | None
    var: np.ndarray | None
    epsilon: float
    momentum: float | None
    is_training_mode: bool
    num_groups: int | None
    axis: int


def read_onnx(opened: OpenedInput) -> onnx.ModelProto:
    """Parse the opened file as an ONNX model, bounded, with its external data read in from its folder.

    Raises:
        ModelFileError: too large, malformed or truncated, too deep, custom operators, or external
            data that is missing, damaged or outside the model's folder.
    """
    import onnx
    from google.protobuf.message import DecodeError

    if opened.size > MAX_PROTOBUF_BYTES:
        raise ModelFileError(
            f"ONNX model {opened.path} is {opened.size:,} bytes, over protobuf's 2 GiB limit",
            "Save its weights as external data (onnx.save(..., save_as_external_data=True))",
        )
    try:
        model = onnx.load_model_from_string(opened.read_bytes())
    except (DecodeError, ValueError, RuntimeError) as error:
        raise ModelFileError(
            f"ONNX model {opened.path} is malformed or truncated ({type(error).__name__})", _BAD_FILE_FIX
        ) from error
    _check_structure(model, opened.path)
    budget = opened.size + _read_external_data(model, opened.path)
    _check_declared_sizes(model, opened.path, budget)
    return model


def _walk_graphs(graph: onnx.GraphProto, path: Path) -> Iterator[onnx.GraphProto]:
    """The graph and every graph nested in node attributes, depth and node count bounded, iteratively."""
    stack = [(graph, 0)]
    num_nodes = 0
    while stack:
        current, depth = stack.pop()
        if depth > MAX_GRAPH_DEPTH:
            raise ModelFileError(
                f"ONNX model {path} nests graphs more than {MAX_GRAPH_DEPTH} levels deep", _BAD_FILE_FIX
            )
        num_nodes += len(current.node)
        if num_nodes > MAX_NODES:
            raise ModelFileError(f"ONNX model {path} has more than {MAX_NODES:,} nodes", _BAD_FILE_FIX)
        yield current
        for node in current.node:
            for attribute in node.attribute:
                stack.extend(
                    (sub, depth + 1) for sub in (*([attribute.g] if attribute.HasField("g") else ()), *attribute.graphs)
                )


def _check_structure(model: onnx.ModelProto, path: Path) -> None:
    from bn_inspect.text import inert

    if not model.HasField("graph"):
        raise ModelFileError(f"ONNX model {path} has no graph", _BAD_FILE_FIX)
    functions = {function.domain for function in model.functions}
    for node in _all_nodes(model, path)[1]:
        if node.domain not in KNOWN_DOMAINS and node.domain not in functions:
            raise ModelFileError(
                f"ONNX model {path} uses operator {inert(node.op_type)} of the custom domain "
                f"{inert(node.domain)}, whose library bn-inspect never loads",
                "Export the model with standard ONNX operators only",
            )


def _all_nodes(model: onnx.ModelProto, path: Path) -> tuple[list[onnx.GraphProto], list[onnx.NodeProto]]:
    """Every graph (the main one and those nested in attributes, also inside the model's functions)
    and every node of them and of the functions, bounded as ``_walk_graphs``."""
    graphs = list(_walk_graphs(model.graph, path))
    nodes = [node for function in model.functions for node in function.node]
    for node in list(nodes):
        for attribute in node.attribute:
            for sub in (*([attribute.g] if attribute.HasField("g") else ()), *attribute.graphs):
                graphs += _walk_graphs(sub, path)
    return graphs, nodes + [node for graph in graphs for node in graph.node]


def iter_tensors(model: onnx.ModelProto, path: Path) -> Iterator[onnx.TensorProto]:
    """Every tensor the model stores: initializers (sparse ones too) and attribute tensors, in every
    nested graph and function."""
    graphs, nodes = _all_nodes(model, path)
    for graph in graphs:
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield from (sparse.values, sparse.indices)
    for node in nodes:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("sparse_tensor"):
                yield from (attribute.sparse_tensor.values, attribute.sparse_tensor.indices)
            for sparse in attribute.sparse_tensors:
                yield from (sparse.values, sparse.indices)


def _read_external_data(model: onnx.ModelProto, path: Path) -> int:
    """Read every external tensor's bytes into the model, each file opened through the boundary's opener.

    Returns the number of bytes read. Raises ModelFileError for a location that leaves the model's
    folder (absolute, ``..``, or a symlink out), a missing file, or an offset and length past its end.
    """
    from onnx import TensorProto

    folder = os.path.realpath(path.parent)
    total = 0
    for tensor in iter_tensors(model, path):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        location = entries.get("location", "")
        target = _external_path(location, folder, path)
        offset, length = _int_entry(entries, "offset", path), _int_entry(entries, "length", path)
        with open_checked(target, Source.ONNX_EXTERNAL_DATA, noun="external data file", error=ModelFileError) as opened:
            _refuse_outside(os.path.realpath(opened.library_path()), folder, location, path)
            offset = offset or 0
            length = opened.size - offset if length is None else length
            if offset < 0 or length < 0 or offset + length > opened.size:
                raise ModelFileError(
                    f"ONNX model {path}: external data {_shown(location)} is {opened.size:,} bytes, "
                    f"shorter than the offset {offset:,} and length {length:,} a tensor declares",
                    _BAD_FILE_FIX,
                )
            with opened.stream() as stream:
                stream.seek(offset)
                tensor.raw_data = stream.read(length)
        del tensor.external_data[:]
        tensor.data_location = TensorProto.DEFAULT
        total += length
    return total


def _shown(text: str) -> str:
    from bn_inspect.text import inert

    return repr(inert(text))


def _external_path(location: str, folder: str, path: Path) -> Path:
    parts = Path(location).parts
    if not location or "\0" in location or Path(location).is_absolute() or ".." in parts:
        raise ModelFileError(
            f"ONNX model {path} names external data {_shown(location)} outside its folder",
            "Keep external data files beside the model, named relative to its folder",
        )
    target = Path(folder, location)
    _refuse_outside(os.path.realpath(target), folder, location, path)
    return target


def _refuse_outside(resolved: str, folder: str, location: str, path: Path) -> None:
    if os.path.commonpath([resolved, folder]) != folder:
        raise ModelFileError(
            f"ONNX model {path} names external data {_shown(location)}, which resolves outside its folder",
            "Keep external data files beside the model, not behind a symlink that leads elsewhere",
        )


def _int_entry(entries: dict[str, str], key: str, path: Path) -> int | None:
    if key not in entries:
        return None
    try:
        return int(entries[key])
    except ValueError:
        raise ModelFileError(f"ONNX model {path} has an external {key} that is no integer", _BAD_FILE_FIX) from None


def _check_declared_sizes(model: onnx.ModelProto, path: Path, budget: int) -> None:
    """Refuse a tensor whose declared dims hold more values than the file and its external data could."""
    from onnx import helper

    for tensor in iter_tensors(model, path):
        dims = tuple(int(d) for d in tensor.dims)
        numel = math.prod(dims) if all(d >= 0 for d in dims) else -1
        try:
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        except (KeyError, TypeError, ValueError):
            itemsize = 1
        if numel < 0 or numel * max(itemsize, 1) > budget + 64:
            raise ModelFileError(
                f"ONNX model {path}: tensor {_shown(tensor.name)} declares dims {dims}, more values "
                f"than its {budget:,} bytes hold",
                _BAD_FILE_FIX,
            )


def constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """The tensors of ``graph`` known without running it: initializers, Constant outputs and Identity of either."""
    known: dict[str, np.ndarray] = {}
    for tensor in graph.initializer:
        known[tensor.name] = _array(tensor)
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
            value = next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None)
            if value is not None:
                known[node.output[0]] = _array(value)
        elif node.op_type == "Identity" and len(node.input) == 1 and node.input[0] in known:
            known[node.output[0]] = known[node.input[0]]
    return known


def _array(tensor: onnx.TensorProto) -> np.ndarray:
    from onnx import numpy_helper

    try:
        return np.asarray(numpy_helper.to_array(tensor))
    except (ValueError, TypeError) as error:
        raise ModelFileError(
            f"ONNX tensor {_shown(tensor.name)} is damaged ({type(error).__name__})", _BAD_FILE_FIX
        ) from error


def _attributes(node: onnx.NodeProto) -> dict[str, object]:
    from onnx import helper

    return {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}


def norm_nodes(model: onnx.ModelProto) -> list[NormNode]:
    """The normalization nodes of the main graph, in graph (execution) order."""
    graph = model.graph
    known = constant_values(graph)
    producers = {output: node for node in graph.node for output in node.output}
    found = []
    for index, node in enumerate(graph.node):
        if node.op_type not in NORM_OPS or node.domain not in ("", "ai.onnx") or not node.input:
            continue
        attributes = _attributes(node)
        stored = [known.get(name) for name in node.input[1:5]] + [None] * 4
        is_bn = node.op_type == "BatchNormalization"
        op_type, input_name = node.op_type, node.input[0]
        tracked_instance = _tracked_instance_norm(node, producers, known) if is_bn else None
        if tracked_instance is not None:
            op_type, input_name, stored = "InstanceNormalization", *tracked_instance
        momentum = attributes.get("momentum", 0.9) if is_bn else None
        found.append(
            NormNode(
                index=index,
                node_name=node.name,
                op_type=op_type,
                input_name=input_name,
                torch_name=torch_name(node, known),
                stored_key=tuple(node.input[1:]),
                scale=stored[0],
                bias=stored[1],
                mean=stored[2],
                var=stored[3],
                epsilon=float(_number(attributes.get("epsilon"), 1e-5)),
                # ONNX keeps the weight of the old statistics; PyTorch that of the batch's.
                momentum=None if momentum is None else 1.0 - float(_number(momentum, 0.9)),
                is_training_mode=bool(_number(attributes.get("training_mode"), 0)),
                num_groups=int(_number(attributes.get("num_groups"), 0)) or None,
                axis=int(_number(attributes.get("axis"), -1)),
            )
        )
    return found


# How both exporters write an InstanceNorm with running statistics: its input reshaped to
# (1, N*C, ...) and a BatchNormalization whose statistics are the stored ones tiled N times.
_TILING_OPS = frozenset({"Tile", "Expand", "Identity", "Cast"})


def _tracked_instance_norm(
    node: onnx.NodeProto, producers: dict[str, onnx.NodeProto], known: dict[str, np.ndarray]
) -> tuple[str, list[np.ndarray | None]] | None:
    """(the InstanceNorm's own input, its stored scale, bias, mean and var) where ``node`` is that pattern, else None."""
    if len(node.input) < 5 or node.input[3] in known or node.input[4] in known:
        return None
    reshape = producers.get(node.input[0])
    stored = [_untiled(name, producers, known) for name in node.input[1:5]]
    if reshape is None or reshape.op_type != "Reshape" or not reshape.input or stored[2] is None or stored[3] is None:
        return None
    return str(reshape.input[0]), stored


def _untiled(name: str, producers: dict[str, onnx.NodeProto], known: dict[str, np.ndarray]) -> np.ndarray | None:
    """The stored tensor that ``name`` repeats (through Tile, Expand, Identity, Cast), or None."""
    for _ in range(8):
        if name in known:
            return known[name]
        producer = producers.get(name)
        if producer is None or producer.op_type not in _TILING_OPS or not producer.input:
            return None
        name = producer.input[0]
    return None


def _number(value: object, default: float) -> float:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else default


_PARAMETER_SUFFIXES = (".running_mean", ".running_var", ".weight", ".bias")


def torch_name(node: onnx.NodeProto, known: dict[str, np.ndarray]) -> str | None:
    """The PyTorch module path an exporter kept for ``node``, or None.

    The dynamo exporter writes ``pkg.torch.onnx.name_scopes`` (the module path's scopes, then the
    op); the TorchScript exporter, without constant folding, names the initializers after the
    module's parameters and buffers.
    """
    for entry in node.metadata_props:
        if entry.key == "pkg.torch.onnx.name_scopes" and len(entry.value) < 4096:
            try:
                scopes = ast.literal_eval(entry.value)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                continue
            if isinstance(scopes, list) and len(scopes) >= 2 and isinstance(scopes[-2], str) and scopes[-2]:
                return str(scopes[-2])
    for name in node.input[1:]:
        if name in known and not name.startswith("onnx::"):
            for suffix in _PARAMETER_SUFFIXES:
                if name.endswith(suffix) and len(name) > len(suffix):
                    return str(name)[: -len(suffix)]
    return _scope_name(str(node.name), str(node.op_type))


def _scope_name(node_name: str, op_type: str) -> str | None:
    """The module path in a TorchScript exporter's node name: ``/layer1/layer1.0/bn1/BatchNormalization``
    is ``layer1.0.bn1`` (each scope is a module's qualified name, or its attribute name under the last)."""
    scopes = node_name.split("/")
    if len(scopes) < 3 or scopes[0] or not re.fullmatch(re.escape(op_type) + r"(_\d+)?", scopes[-1]):
        return None
    path = ""
    for scope in scopes[1:-1]:
        if not scope:
            return None
        path = scope if not path or scope.startswith(path + ".") else f"{path}.{scope}"
    return path


def declared_inputs(model: onnx.ModelProto) -> list[tuple[str, int, tuple[int | None, ...] | None]]:
    """The graph's real inputs (initializers excluded): name, element type and declared shape (None: free dim)."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    inputs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        shape = None
        if tensor_type.HasField("shape"):
            shape = tuple(
                int(dim.dim_value) if dim.HasField("dim_value") and dim.dim_value > 0 else None
                for dim in tensor_type.shape.dim
            )
        inputs.append((value.name, int(tensor_type.elem_type), shape))
    return inputs
