"""An ONNX model as an ``nn.Module``: onnxruntime runs the graph, and each normalization node's input
is handed to a stand-in normalization module, so that the PyTorch path's hooks, moments, sentences
and rules see it as they see a PyTorch layer.

The stand-ins (``BatchNormalization``, ``InstanceNormalization``, ``LayerNormalization``,
``GroupNormalization``, named as the ONNX operators) hold the node's stored tensors as their
buffers and parameters; their forward returns its input, since onnxruntime has already normalized.
Each is named by the PyTorch module path the exporter kept, else by the node's name.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from bn_inspect.boundary.reading import OpenedInput
from bn_inspect.errors import (
    BnInspectError,
    ExportModeError,
    ForwardError,
    ModelFileError,
    NoNormLayersError,
    ShapeMismatchError,
)
from bn_inspect.model.onnx_graph import NormNode, declared_inputs, norm_nodes, read_onnx
from bn_inspect.text import inert

if TYPE_CHECKING:
    import onnx

NO_NORM_NODES = (
    "the ONNX graph has no normalization node (BatchNormalization, InstanceNormalization, LayerNormalization "
    "or GroupNormalization): exporters fold BatchNorm into the convolution before it in eval mode"
)
KEEP_NORM_NODES = (
    "Export again keeping them: torch.onnx.export(..., dynamo=False, do_constant_folding=False) "
    "or training=torch.onnx.TrainingMode.PRESERVE; with dynamo=True, optimize=False"
)


def _tensor(values: np.ndarray | None) -> torch.Tensor | None:
    if values is None or values.dtype.kind != "f":
        return None
    return torch.from_numpy(np.array(values, copy=True).reshape(-1))


class _Standin:
    """What every stand-in shares: its mode is the one fixed at export, and its forward passes its input on."""

    exported_training: bool

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return input

    def train(self: Any, mode: bool = True) -> Any:
        # The node's mode was fixed at export: BatchNormalization's training_mode, eval otherwise.
        self.training = self.exported_training
        return self


class BatchNormalization(_Standin, _BatchNorm):  # type: ignore[misc]
    """An ONNX BatchNormalization node: scale, B, input_mean and input_var as weight, bias and running statistics."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        return None


class InstanceNormalization(_Standin, _InstanceNorm):  # type: ignore[misc]
    """An ONNX InstanceNormalization node: scale and B as weight and bias."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        return None

    def _get_no_batch_dim(self) -> int:
        return -1


class LayerNormalization(_Standin, nn.LayerNorm):  # type: ignore[misc]
    """An ONNX LayerNormalization node: Scale and B as weight and bias over the dims from ``axis`` on."""


class GroupNormalization(_Standin, nn.GroupNorm):  # type: ignore[misc]
    """An ONNX GroupNormalization node."""


def _standin(node: NormNode) -> nn.Module:
    """The stand-in module for ``node``, holding its stored tensors (float64 copies are taken later)."""
    scale, bias = _tensor(node.scale), _tensor(node.bias)
    module: nn.Module
    if node.op_type == "BatchNormalization":
        mean, var = _tensor(node.mean), _tensor(node.var)
        channels = next((len(t) for t in (scale, bias, mean, var) if t is not None), 0)
        module = BatchNormalization(
            channels,
            eps=node.epsilon,
            momentum=node.momentum,
            affine=scale is not None and bias is not None,
            track_running_stats=mean is not None and var is not None,
        )
    elif node.op_type == "InstanceNormalization":
        mean, var = _tensor(node.mean), _tensor(node.var)
        channels = next((len(t) for t in (scale, bias, mean, var) if t is not None), 0)
        tracks = mean is not None and var is not None
        module = InstanceNormalization(
            channels,
            eps=node.epsilon,
            momentum=node.momentum if node.momentum is not None else 0.1,
            affine=scale is not None and bias is not None,
            track_running_stats=tracks,
        )
        if not tracks:
            # ONNX's InstanceNormalization keeps no running statistics, so it has no momentum to report.
            del module.momentum
    elif node.op_type == "LayerNormalization":
        shape = tuple(node.scale.shape) if node.scale is not None else (1,)
        module = LayerNormalization(
            shape, eps=node.epsilon, elementwise_affine=scale is not None, bias=bias is not None
        )
        scale, bias = _shaped(scale, shape), _shaped(bias, shape)
    else:
        groups = node.num_groups or 1
        per_channel = scale is not None and len(scale) % groups == 0 and len(scale) != groups
        module = GroupNormalization(
            groups, len(scale) if per_channel and scale is not None else groups, eps=node.epsilon, affine=per_channel
        )
        if not per_channel:
            scale = bias = None
            module.num_channels = 0  # opset 18 keeps one scale per group: the channel count is the input's
    if getattr(module, "num_batches_tracked", None) is not None:
        # ONNX does not keep the count; None rather than a fresh module's 0, which reads as untrained.
        module.register_buffer("num_batches_tracked", None)
    stored = next((t for t in (scale, bias, _tensor(node.mean), _tensor(node.var)) if t is not None), None)
    if stored is not None:
        # The initializers' own precision, so that the precision rule (BN109) sees float16 statistics.
        module.to(stored.dtype)
        _fill(module, node, weight=scale, bias=bias, running_mean=_tensor(node.mean), running_var=_tensor(node.var))
    module.exported_training = node.is_training_mode  # type: ignore[assignment]
    module.training = node.is_training_mode
    module.requires_grad_(False)
    return module


def _shaped(tensor: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor | None:
    return None if tensor is None or tensor.numel() != int(np.prod(shape)) else tensor.reshape(shape)


def _fill(module: nn.Module, node: NormNode, **tensors: torch.Tensor | None) -> None:
    """Copy the node's stored tensors into the stand-in's; a tensor of another size is a damaged file."""
    with torch.no_grad():
        for name, value in tensors.items():
            current = getattr(module, name, None)
            if not isinstance(current, torch.Tensor) or value is None:
                continue
            if current.shape != value.shape:
                raise ModelFileError(
                    f"ONNX node {inert(node.node_name)!r} ({node.op_type}) stores {name} of shape "
                    f"{tuple(value.shape)} where {tuple(current.shape)} fits its other tensors",
                    "Re-export the model",
                )
            current.copy_(value.to(current.dtype))


class OnnxModel(nn.Module):
    """An ONNX graph run by onnxruntime, its normalization nodes' inputs handed to stand-in modules.

    ``named_modules`` yields the stand-ins under their layer names (which may hold dots, being
    PyTorch paths), so the module tree is flat: ``nodes`` holds them.
    """

    def __init__(self, model: onnx.ModelProto, nodes: list[NormNode]) -> None:
        super().__init__()
        self.nodes = nn.ModuleList()
        self._names: dict[int, str] = {}
        self._calls: list[tuple[nn.Module, str]] = []
        by_key: dict[tuple[str, tuple[str, ...]], nn.Module] = {}
        taken: set[str] = set()
        # Each node with the name of the layer its stand-in is, for the folding rules (model/onnx_folding.py).
        self.named_nodes: list[tuple[str, NormNode]] = []
        for node in nodes:
            name = node.torch_name or node.node_name or f"{node.op_type}_{node.index}"
            shared = by_key.get((name, node.stored_key))
            if shared is None:
                if name in taken:
                    name = node.node_name if node.node_name and node.node_name not in taken else f"{name}@{node.index}"
                shared = _standin(node)
                by_key[(name, node.stored_key)] = shared
                self.nodes.append(shared)
                self._names[id(shared)] = name
                taken.add(name)
            # The same module exported twice (called twice) is one layer with two calls, as in PyTorch.
            self._calls.append((shared, node.input_name))
            self.named_nodes.append((self._names[id(shared)], node))
        self.inputs = declared_inputs(model)
        # Made at the first forward: listing layers and the stored-state rules need no onnxruntime.
        self.proto = model
        self._session: Any = None
        self._outputs = [output.name for output in model.graph.output]

    def named_modules(
        self, memo: set[nn.Module] | None = None, prefix: str = "", remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Module]]:
        """The model, then each stand-in once under its layer name."""
        yield prefix, self
        for module in self.nodes:
            name = self._names[id(module)]
            yield (f"{prefix}.{name}" if prefix else name), module

    def train(self, mode: bool = True) -> OnnxModel:
        """Only the root's flag changes: each node's mode was fixed at export."""
        self.training = mode
        return self

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        """Run the graph on ``args`` (the graph's inputs in order) and ``kwargs`` (by name)."""
        if self.training:
            raise ExportModeError(
                "an ONNX graph fixes each node's mode at export, so it runs only as exported (--mode eval); "
                "BatchNormalization nodes exported with training_mode=1 normalize with batch statistics there",
                "Use --mode eval (check reports such nodes as BN112)",
            )
        feeds = self.feeds(args, kwargs)
        fetch = [name for name in self._session_outputs if name not in feeds]
        if self._session is None:
            self._session = graph_session(self.proto, [name for _, name in self._calls if name not in feeds])
        results = dict(zip(fetch, run_session(self._session, fetch, feeds, "the graph"), strict=True))
        results.update(feeds)
        for module, name in self._calls:
            module(torch.from_numpy(np.asarray(results[name])))
        first_output = results.get(self._outputs[0]) if self._outputs else None
        return torch.from_numpy(np.asarray(first_output)) if first_output is not None else torch.zeros(())

    @property
    def _session_outputs(self) -> list[str]:
        return list(dict.fromkeys([*self._outputs, *(name for _, name in self._calls)]))

    def feeds(self, args: tuple[torch.Tensor, ...], kwargs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """The graph's inputs as onnxruntime takes them: ``args`` in order, ``kwargs`` by name, each checked
        against the declared shape and cast to the declared type."""
        from onnx import helper

        given = dict(zip((name for name, _, _ in self.inputs), args, strict=False)) | kwargs
        missing = [name for name, _, _ in self.inputs if name not in given]
        if missing or len(args) > len(self.inputs):
            raise ShapeMismatchError(
                f"the ONNX graph takes {len(self.inputs)} input(s) ({', '.join(inert(n) for n, _, _ in self.inputs)}), "
                f"but {len(args) + len(kwargs)} were given",
                "Give one tensor per graph input",
            )
        feeds = {}
        for name, elem_type, shape in self.inputs:
            tensor = given[name]
            if shape is not None and (
                len(shape) != tensor.dim()
                or any(d is not None and d != s for d, s in zip(shape, tensor.shape, strict=True))
            ):
                spelled = "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"
                only_batch = len(shape) == tensor.dim() and all(
                    d is None or d == s for d, s in zip(shape[1:], tensor.shape[1:], strict=True)
                )
                raise ShapeMismatchError(
                    f"the data has shape {tuple(tensor.shape)}, but the ONNX graph's input {inert(name)} is "
                    f"declared {spelled}",
                    f"Give batches of {shape[0]} samples (--batch-size {shape[0]}, or the first dim of --shape)"
                    if only_batch
                    else "Give input of the declared shape (--input, or --shape)",
                )
            dtype = helper.tensor_dtype_to_np_dtype(elem_type) if elem_type else np.float32
            feeds[name] = tensor.detach().cpu().numpy().astype(dtype, copy=False)
        return feeds


def graph_session(model: onnx.ModelProto, extra_outputs: list[str], *, optimize: bool = True) -> Any:
    """An onnxruntime session on a copy of ``model`` whose ``extra_outputs`` (the norm nodes' inputs) are
    graph outputs too; ``optimize`` False runs the graph as written (no fusion of Conv and BatchNormalization).

    No custom-op library is registered, and every external tensor was read in already, so
    onnxruntime opens no file.
    """
    import onnx
    import onnxruntime

    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {output.name for output in exposed.graph.output}
    for name in dict.fromkeys(extra_outputs):
        if name not in present:
            exposed.graph.output.append(onnx.ValueInfoProto(name=name))
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = (
        onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
        if optimize
        else onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    try:
        return onnxruntime.InferenceSession(
            exposed.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as error:  # onnxruntime raises its own classes, one per status code
        text = str(error).strip()
        raise ModelFileError(
            f"onnxruntime cannot load the ONNX model: {inert(text.splitlines()[0] if text else type(error).__name__)[:300]}",
            "Check it with onnx.checker.check_model, or re-export it",
        ) from error


def load_onnx(opened: OpenedInput) -> OnnxModel:
    """The ONNX model file as an ``OnnxModel``, read through the boundary.

    Raises:
        ModelFileError: as read_onnx, or onnx or onnxruntime is not installed.
        NoNormLayersError: the graph has no normalization node.
    """
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as error:
        raise ModelFileError(
            f"{opened.path} is an ONNX model, and reading one needs {error.name or 'onnx'}, which is not installed",
            "pip install 'bn-inspect[onnx]' (onnx and onnxruntime)",
        ) from error
    model = read_onnx(opened)
    nodes = norm_nodes(model)
    if not nodes:
        raise NoNormLayersError(NO_NORM_NODES, KEEP_NORM_NODES)
    return OnnxModel(model, nodes)


def onnx_input_shape(module: nn.Module) -> tuple[int | None, ...] | None:
    """The declared shape of an ONNX model's one input (None for a free dim), else None."""
    if isinstance(module, OnnxModel) and len(module.inputs) == 1:
        return module.inputs[0][2]
    return None


def fixed_batch_size(module: nn.Module) -> tuple[str, int] | None:
    """The name of an ONNX model's one input and the batch size it declares, None for a free batch dim
    (or another model): both exporters fix it unless asked for a dynamic one."""
    return _fixed_batch(module.inputs) if isinstance(module, OnnxModel) else None


def file_fixed_batch_size(path: Path) -> tuple[str, int] | None:
    """fixed_batch_size of the model file at ``path``, read through the boundary; None for a file
    that is no ONNX model, or that cannot be read (loading it says why, in its turn)."""
    from bn_inspect.model.files import FileKind, file_kind, open_model_file
    from bn_inspect.model.hub import is_model_folder

    if is_model_folder(path):
        return None
    try:
        with open_model_file(path) as opened:
            if file_kind(opened) is not FileKind.ONNX:
                return None
            import onnx  # noqa: F401

            return _fixed_batch(declared_inputs(read_onnx(opened)))
    except (BnInspectError, ImportError):
        return None


def _fixed_batch(inputs: list[tuple[str, int, tuple[int | None, ...] | None]]) -> tuple[str, int] | None:
    if len(inputs) != 1:
        return None
    name, _, shape = inputs[0]
    return (inert(name), shape[0]) if shape and shape[0] is not None else None


def run_session(session: Any, outputs: list[str], feeds: dict[str, np.ndarray], what: str) -> list[Any]:
    """``outputs`` of an onnxruntime ``session`` on ``feeds``; ``what`` names the graph in the error.

    Raises:
        ForwardError: onnxruntime could not run it.
    """
    try:
        return list(session.run(outputs, feeds))
    except Exception as error:  # onnxruntime raises its own classes, one per status code
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ForwardError(
            f"onnxruntime could not run {what}: {inert(first)[:300]}",
            "Check that the input fits the graph's declared inputs (--shape, --input)",
        ) from error
