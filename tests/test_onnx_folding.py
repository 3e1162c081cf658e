"""The folding rules BN401-BN404 on ONNX graphs (#28): real exports by both exporters and hand-built graphs,
each rule firing on a planted case and silent on a healthy export, numbers against float64 references."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from bn_inspect.analyses.checking import check_model
from bn_inspect.analyses.folding import fold_changes, onnx_fold_changes
from bn_inspect.data.batch import as_batch
from bn_inspect.model.folding import find_fold_sites
from bn_inspect.model.loading import load_model
from bn_inspect.model.onnx_folding import onnx_batch_norms
from bn_inspect.model.onnx_module import OnnxModel
from bn_inspect.options import Precision
from bn_inspect.report.findings import Finding
from sample_models.architectures import DigitsCNN
from tests import models
from tests.helpers import DIGITS, invoke
from tests.test_folding import AfterEverything
from tests.test_onnx import export

# Left out of the quick subset (`-m "not slow"`): exports with both ONNX exporters, runs onnxruntime.
pytestmark = pytest.mark.slow

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

# The two exports that keep BatchNormalization nodes (tests/test_onnx.py: EXPORTS).
KEEPING = {
    "torchscript": {"dynamo": False, "do_constant_folding": False},
    "dynamo": {"dynamo": True, "optimize": False},
}


def _exported(model: nn.Module, x: torch.Tensor, path: Path, exporter: str) -> OnnxModel:
    module = load_model(export(model, x, path, **KEEPING[exporter])).module
    assert isinstance(module, OnnxModel)
    return module


def _bn4(module: nn.Module, batches: list[torch.Tensor] | None = None, **kwargs: Any) -> list[Finding]:
    return [f for f in check_model(module, batches, **kwargs).findings if f.code.startswith("BN4")]


def _messages(findings: list[Finding]) -> dict[tuple[str, str | None], str]:
    return {(f.code, None if f.layer is None else f.layer.raw): f.message for f in findings}


@pytest.mark.parametrize("exporter", KEEPING)
def test_bn401_and_bn403_say_what_the_pytorch_model_gets(tmp_path: Path, exporter: str) -> None:
    model = models.randomize_norm_state(models.ConvBN2d()).eval()
    with torch.no_grad():
        model.bn1.running_var[2] = 1e-9  # fp16 makes it 0
        model.bn2.weight[1] = 1e5  # its folded weights overflow fp16
    module = _exported(model, torch.randn(2, 3, 8, 8), tmp_path / "convbn.onnx", exporter)
    found = _messages(_bn4(module, precision="fp16"))
    # The same sentences, the producer named by its ONNX operator rather than its PyTorch class.
    traced = _messages(_bn4(model, precision="fp16"))
    assert found == {key: message.replace("(Conv2d)", "(Conv)") for key, message in traced.items()}
    assert set(found) == {("BN401", "bn1"), ("BN401", "bn2"), ("BN403", "bn1"), ("BN403", "bn2")}
    largest = np.abs(model.conv1.bias.detach().double().numpy()).max()
    assert f"largest |bias| {largest:.3g}" in found[("BN401", "bn1")]
    scale = model.bn2.weight.detach().double().numpy() / np.sqrt(model.bn2.running_var.double().numpy() + 1e-5)
    assert f"{scale[1]:.4g}" in found[("BN403", "bn2")] and "becomes inf" in found[("BN403", "bn2")]


@pytest.mark.parametrize("exporter", KEEPING)
def test_bn402_gives_the_reasons_the_pytorch_model_gets(tmp_path: Path, exporter: str) -> None:
    model = models.randomize_norm_state(AfterEverything()).eval()
    module = _exported(model, torch.randn(2, 3, 8, 8), tmp_path / "after.onnx", exporter)
    found = {f.layer.raw: f.message for f in _bn4(module, fold=True) if f.code == "BN402" and f.layer is not None}
    traced = {site.layer.raw for site in find_fold_sites(model).sites if not site.is_foldable}
    assert set(found) == traced
    assert "it follows the model's input" in found["bn_input"]
    assert "it follows relu (Relu)" in found["bn_relu"] and "it follows pool (MaxPool)" in found["bn_pool"]
    assert "(Add), not a Conv or Gemm" in found["bn_add"] and "(Concat), not a Conv or Gemm" in found["bn_cat"]
    assert "the output of shared is read elsewhere too" in found["bn_shared"]


def test_a_training_mode_export_cannot_fold(tmp_path: Path) -> None:
    model = models.randomize_norm_state(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)))
    path = export(
        model, torch.randn(2, 3, 8, 8), tmp_path / "train.onnx", dynamo=False, training=torch.onnx.TrainingMode.TRAINING
    )
    (finding,) = _bn4(load_model(path).module, fold=True)
    assert finding.code == "BN402" and "exported in training mode (training_mode=1)" in finding.message


@pytest.fixture(scope="module")
def resnet_exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, OnnxModel]:
    folder = tmp_path_factory.mktemp("resnet")
    model, data = models.calibrated_resnet(), models.resnet_data()[1][:16]
    return {name: _exported(model, data, folder / f"{name}.onnx", name) for name in KEEPING}


@pytest.mark.parametrize("exporter", KEEPING)
@pytest.mark.parametrize("precision", ["fp16", "bf16", "int8"])
def test_a_healthy_export_is_silent_and_folds_as_the_pytorch_model(
    resnet_exports: dict[str, OnnxModel], exporter: str, precision: str
) -> None:
    module, data = resnet_exports[exporter], models.resnet_data()[1][:16]
    proto = module.proto.SerializeToString()
    norms = onnx_batch_norms(module)
    assert norms and all(norm.fold is not None for norm in norms)
    assert _bn4(module, [data], precision=precision) == []
    assert module.proto.SerializeToString() == proto
    if precision == "int8":
        # Both fold in float64 and round the folded weights alike: the int8 changes agree.
        pytorch = models.calibrated_resnet()
        expected = {
            (c.format, c.layer and c.layer.raw): c.change
            for c in fold_changes(pytorch, find_fold_sites(pytorch), Precision.INT8, as_batch(data))
        }
        got = {
            (c.format, c.layer and c.layer.raw): c.change
            for c in onnx_fold_changes(module, norms, Precision.INT8, as_batch(data))
        }
        assert got.keys() == expected.keys()
        for key, change in got.items():
            np.testing.assert_allclose(change, expected[key], rtol=1e-3, atol=1e-5)


def _graph(nodes: list[Any], initializers: dict[str, np.ndarray], shape: list[int], out: list[int]) -> Any:
    helper = onnx.helper
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, out)],
        [onnx.numpy_helper.from_array(value.astype(np.float32), name) for name, value in initializers.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _batch_norm_tensors(generator: np.random.Generator, channels: int) -> dict[str, np.ndarray]:
    return {
        "gamma": generator.normal(size=channels),
        "beta": generator.normal(size=channels),
        "mean": generator.normal(size=channels) + 5.0,
        "var": generator.uniform(1e-3, 2.0, size=channels),
    }


_BN = ["gamma", "beta", "mean", "var"]


def _producer(kind: str, generator: np.random.Generator) -> tuple[list[Any], dict[str, np.ndarray], list[int]]:
    """(nodes computing ``h`` from ``x``, their tensors, x's shape) for each kind of producer, 4 output channels."""
    make = onnx.helper.make_node
    if kind == "Conv":
        tensors = {"w": generator.normal(size=(4, 3, 3, 3)), "b": generator.normal(size=4)}
        return [make("Conv", ["x", "w", "b"], ["h"], pads=[1, 1, 1, 1])], tensors, [2, 3, 6, 6]
    if kind == "ConvTranspose":
        tensors = {"w": generator.normal(size=(3, 4, 2, 2)), "b": generator.normal(size=4)}
        return [make("ConvTranspose", ["x", "w", "b"], ["h"])], tensors, [2, 3, 5, 5]
    if kind == "Gemm":
        tensors = {"w": generator.normal(size=(5, 4)), "b": generator.normal(size=(1, 4))}
        return [make("Gemm", ["x", "w", "b"], ["h"], alpha=0.5, beta=2.0)], tensors, [16, 5]
    if kind == "MatMul+Add":
        tensors = {"w": generator.normal(size=(5, 4)), "b": generator.normal(size=4)}
        return [make("MatMul", ["x", "w"], ["m"]), make("Add", ["b", "m"], ["h"])], tensors, [16, 5]
    return [make("MatMul", ["x", "w"], ["h"])], {"w": generator.normal(size=(5, 4))}, [16, 5]


def _reference(kind: str, tensors: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The producer's output in float64, computed by torch's functional ops (not onnxruntime)."""
    t = {name: torch.from_numpy(value.astype(np.float32).astype(np.float64)) for name, value in tensors.items()}
    inputs = torch.from_numpy(x).double()
    if kind == "Conv":
        return torch.nn.functional.conv2d(inputs, t["w"], t["b"], padding=1).numpy()
    if kind == "ConvTranspose":
        return torch.nn.functional.conv_transpose2d(inputs, t["w"], t["b"]).numpy()
    if kind == "Gemm":
        return (0.5 * inputs @ t["w"] + 2.0 * t["b"]).numpy()
    return (inputs @ t["w"] + t.get("b", torch.zeros(4, dtype=torch.float64))).numpy()


KINDS = ["Conv", "ConvTranspose", "Gemm", "MatMul+Add", "MatMul"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_bn404_matches_a_float64_reference_for_each_producer(tmp_path: Path, kind: str, precision: str) -> None:
    generator = np.random.default_rng(KINDS.index(kind))
    nodes, tensors, shape = _producer(kind, generator)
    tensors |= _batch_norm_tensors(generator, 4)
    tensors["gamma"][0] = 40.0  # channel 0's folded weights set the int8 scale of the whole tensor
    node = onnx.helper.make_node("BatchNormalization", ["h", *_BN], ["y"], name="bn", epsilon=1e-5)
    x = (generator.normal(size=shape) + 2.0).astype(np.float32)
    out = list(_reference(kind, {k: v for k, v in tensors.items() if k in ("w", "b")}, x).shape)
    path = tmp_path / "graph.onnx"
    onnx.save(_graph([*nodes, node], tensors, shape, out), path)
    module = load_model(path).module
    assert isinstance(module, OnnxModel)
    changes = {
        (c.format, c.layer is None): c.change
        for c in onnx_fold_changes(
            module, onnx_batch_norms(module), Precision(precision), as_batch(torch.from_numpy(x))
        )
    }
    f32 = {name: value.astype(np.float32).astype(np.float64) for name, value in tensors.items()}
    scale = f32["gamma"] / np.sqrt(f32["var"] + 1e-5)
    channels = (1, -1, 1, 1) if kind.startswith("Conv") else (1, -1)
    produced = _reference(kind, {k: v for k, v in tensors.items() if k in ("w", "b")}, x)
    exact = (produced - f32["mean"].reshape(channels)) * scale.reshape(channels) + f32["beta"].reshape(channels)
    folded = _rounded_fold(kind, tensors, scale, precision)
    moved = _reference(kind, folded, x) - exact
    expected = np.sqrt(np.mean(moved**2)) / np.sqrt(np.mean(exact**2))
    # fp16 rounds each value by at most 2**-11 of itself, so its change is small, and onnxruntime's own
    # float32 arithmetic (the float32 fold moves by < 1e-6) is a larger share of it.
    assert expected > (1e-4 if precision == "int8" else 1e-5)
    tolerance = 1e-3 if precision == "int8" else 2e-2
    label = "int8 (per-tensor weights)" if precision == "int8" else "fp16 (folded tensors)"
    np.testing.assert_allclose(changes[(label, True)], expected, rtol=tolerance)
    np.testing.assert_allclose(changes[(label, False)], expected, rtol=tolerance)
    assert changes[("float32", True)] < 1e-6


def _rounded_fold(kind: str, tensors: dict[str, np.ndarray], scale: np.ndarray, precision: str) -> dict[str, Any]:
    """The folded weight and bias in the producer's own layout, computed in numpy and rounded to the format."""
    f32 = {name: value.astype(np.float32).astype(np.float64) for name, value in tensors.items()}
    weight, bias = f32["w"], f32.get("b", np.zeros(4)).reshape(-1)
    if kind == "Gemm":
        weight, bias = 0.5 * weight, 2.0 * bias
    out_axis = 0 if kind == "Conv" else 1
    shape = [1] * weight.ndim
    shape[out_axis] = -1
    folded = weight * scale.reshape(shape)
    folded_bias = (bias - f32["mean"]) * scale + f32["beta"]
    if precision == "int8":
        step = np.abs(folded).max() / 127
        folded = np.round(folded / step) * step
    else:
        folded, folded_bias = (
            folded.astype(np.float16).astype(np.float64),
            folded_bias.astype(np.float16).astype(np.float64),
        )
    if kind == "Gemm":
        # _reference computes 0.5 * x @ w + 2.0 * b: undo the alpha and beta now baked into the fold.
        return {"w": folded / 0.5, "b": folded_bias / 2.0}
    return {"w": folded, "b": folded_bias}


def _digits(change: Callable[[DigitsCNN], object] | None = None) -> DigitsCNN:
    model = DigitsCNN()
    model.load_state_dict(torch.load(DIGITS / "state_dict.pt"))
    with torch.no_grad():
        if change is not None:
            change(model)
    return model.eval()


def test_a_tiny_running_var_moves_the_int8_output_of_the_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = DIGITS / "test_images.npy"
    data = torch.from_numpy(np.load(images)).float()[:64]
    healthy = export(
        _digits(),
        data,
        tmp_path / "digits.onnx",
        **KEEPING["torchscript"],
        input_names=["x"],
        dynamic_axes={"x": {0: "batch"}},
    )
    planted = export(
        _digits(lambda m: m.features[8].running_var.__setitem__(0, 1e-8)),
        data,
        tmp_path / "planted.onnx",
        **KEEPING["torchscript"],
        input_names=["x"],
        dynamic_axes={"x": {0: "batch"}},
    )
    quiet = invoke(capsys, ["check", healthy, "--input", images, "--precision", "int8", "--format", "json"])
    assert quiet.code == 0, quiet.err
    assert {f["code"] for f in json.loads(quiet.out)["findings"]} == {"BN401"}
    loud = invoke(capsys, ["check", planted, "--input", images, "--precision", "int8", "--format", "json"])
    document = json.loads(loud.out)
    model_change = [f for f in document["findings"] if f["code"] == "BN404" and f["layer"] is None]
    assert model_change, document["findings"]
    assert any(
        note.startswith("ONNX model: the folding rules read") and "BN404 folds" in note for note in document["notes"]
    )
    # Without data BN404 does not run, and the note does not speak of it.
    no_data = invoke(capsys, ["check", planted, "--no-data", "--precision", "int8", "--format", "json"])
    notes = json.loads(no_data.out)["notes"]
    assert any(note.startswith("ONNX model: the folding rules read") for note in notes)
    assert not any("BN404 folds" in note for note in notes)


def test_bn401_needs_a_stored_bias_and_a_hostile_node_name_is_inert(tmp_path: Path) -> None:
    generator = np.random.default_rng(5)
    tensors = {"w": generator.normal(size=(4, 3, 1, 1)), "b": generator.normal(size=4)}
    tensors |= _batch_norm_tensors(generator, 4)
    conv = onnx.helper.make_node("Conv", ["x", "w", "b"], ["h"], name="conv\x1b[31m")
    norm = onnx.helper.make_node("BatchNormalization", ["h", *_BN], ["y"], name="bn")
    path = tmp_path / "hostile.onnx"
    onnx.save(_graph([conv, norm], tensors, [2, 3, 4, 4], [2, 4, 4, 4]), path)
    (finding,) = _bn4(load_model(path).module, fold=True)
    assert finding.code == "BN401" and "\x1b" not in finding.message
    assert "conv\\x1b[31m (Conv)" in finding.message


def test_the_pytorch_model_and_its_export_stay_unchanged(tmp_path: Path) -> None:
    model = models.randomize_norm_state(models.ConvBN2d()).eval()
    path = export(model, torch.randn(2, 3, 8, 8), tmp_path / "convbn.onnx", **KEEPING["torchscript"])
    before = path.read_bytes()
    module = load_model(path).module
    twin = copy.deepcopy(module.proto)
    _bn4(module, [torch.randn(2, 3, 8, 8)], precision="bf16")
    assert path.read_bytes() == before and module.proto == twin


def _unfoldable(kind: str) -> tuple[list[Any], dict[str, np.ndarray], list[str]]:
    """(nodes, tensors, extra graph inputs) of a graph whose BatchNormalization cannot fold, for each ONNX-only reason."""
    make = onnx.helper.make_node
    generator = np.random.default_rng(3)
    tensors = {"w": generator.normal(size=(4, 3, 1, 1))} | _batch_norm_tensors(generator, 4)
    conv = make("Conv", ["x", "w"], ["h"])
    norm = make("BatchNormalization", ["h", *_BN], ["y"], name="bn")
    if kind == "shared-weight":
        return [conv, make("Conv", ["x", "w"], ["unused"]), norm], tensors, []
    if kind == "grouped-transpose":
        tensors["w"] = generator.normal(size=(4, 2, 1, 1))
        return [make("ConvTranspose", ["x4", "w"], ["h"], group=2), norm], tensors, ["x4"]
    if kind == "computed-statistics":
        del tensors["mean"]
        return [conv, norm], tensors, ["mean"]
    tensors["w"], tensors["c"] = generator.normal(size=(3, 4)), generator.normal(size=(2, 1))
    return [make("Gemm", ["x2", "w", "c"], ["h"]), norm], tensors, ["x2"]


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("shared-weight", "cannot be folded: conv shares its weight with another node"),
        ("grouped-transpose", "is a grouped ConvTranspose"),
        ("computed-statistics", "its scale, bias or running statistics are computed in the graph"),
        ("bias-per-row", "is not one value per output channel"),
    ],
)
def test_onnx_only_reasons_not_to_fold_are_bn402(tmp_path: Path, kind: str, reason: str) -> None:
    nodes, tensors, extra = _unfoldable(kind)
    if kind == "shared-weight":
        nodes[0].name = "conv"
    shapes = {"x": [2, 3, 4, 4], "x4": [2, 4, 4, 4], "x2": [2, 3], "mean": [4]}
    model = _graph(nodes, tensors, shapes["x"], [2, 4, 4, 4] if kind != "bias-per-row" else [2, 4])
    for name in extra:
        model.graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shapes[name]))
    path = tmp_path / f"{kind}.onnx"
    onnx.save(model, path)
    (finding,) = _bn4(load_model(path).module, fold=True)
    assert finding.code == "BN402" and reason in finding.message, finding.message


@pytest.mark.surface("read:model", "memory")
@pytest.mark.parametrize("op_type", ["ConstantOfShape", "Expand"])
def test_a_computed_bias_that_asks_for_a_huge_tensor_is_not_made(tmp_path: Path, op_type: str) -> None:
    # A hostile graph computes the Conv's bias from a shape of 2**25 values, past the bound on a
    # computed constant (2**24): it stays unknown (BN402) and is never made. Made, it would be judged
    # as a bias that is not one value per channel.
    make = onnx.helper.make_node
    generator = np.random.default_rng(5)
    tensors = {"w": generator.normal(size=(4, 3, 1, 1))} | _batch_norm_tensors(generator, 4)
    huge = onnx.numpy_helper.from_array(np.array([1 << 13, 1 << 12], dtype=np.int64))
    one = onnx.numpy_helper.from_array(np.array([1.0], dtype=np.float32))
    if op_type == "ConstantOfShape":
        made = [make("Constant", [], ["dims"], value=huge), make("ConstantOfShape", ["dims"], ["b"])]
    else:
        made = [make("Constant", [], ["dims"], value=huge), make("Constant", [], ["one"], value=one)]
        made.append(make("Expand", ["one", "dims"], ["b"]))
    nodes = [*made, make("Conv", ["x", "w", "b"], ["h"]), make("BatchNormalization", ["h", *_BN], ["y"], name="bn")]
    path = tmp_path / "huge.onnx"
    onnx.save(_graph(nodes, tensors, [2, 3, 4, 4], [2, 4, 4, 4]), path)
    (finding,) = _bn4(load_model(path).module, fold=True)
    assert finding.code == "BN402" and "computed in the graph" in finding.message, finding.message
