"""ONNX model files: real exports of small trained models by both exporters, inspected as their PyTorch
originals are (same names, numbers and sentences), checked (BN112), and read safely."""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from bn_inspect.analyses.inspection import inspect_model
from bn_inspect.errors import ExportModeError, ModelFileError, NoNormLayersError
from bn_inspect.model.layers import iter_norm_layers
from bn_inspect.model.loading import load_model
from tests.helpers import DIGITS, SAMPLES, assert_one_error_line, invoke
from tests.models import calibrated_resnet, randomize_norm_state, resnet_data

# Left out of the quick subset (`-m "not slow"`): exports models with both ONNX exporters and runs them in onnxruntime (about 45 s).
pytestmark = pytest.mark.slow

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

TRAINING = torch.onnx.TrainingMode
# A free batch size, so that batches of any size run.
FREE_BATCH = {"input_names": ["x"], "dynamic_axes": {"x": {0: "batch"}}}


def export(model: nn.Module, x: torch.Tensor, path: Path, **options: Any) -> Path:
    """torch.onnx.export of a copy (a training-mode export runs the model in train mode, updating its
    statistics), its progress and warnings kept out of the test's output."""
    import copy

    model = copy.deepcopy(model)
    if options.get("dynamo"):
        pytest.importorskip("onnxscript")
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, **options)
    return path


# Which export keeps the BatchNormalization nodes, with torch 2.13's two exporters.
EXPORTS: dict[str, tuple[dict[str, Any], int]] = {
    "torchscript-default": ({"dynamo": False}, 0),
    "torchscript-no-folding": ({"dynamo": False, "do_constant_folding": False, **FREE_BATCH}, 14),
    "torchscript-preserve": ({"dynamo": False, "training": TRAINING.PRESERVE, **FREE_BATCH}, 14),
    "torchscript-training": ({"dynamo": False, "training": TRAINING.TRAINING}, 14),
    "dynamo-default": ({"dynamo": True}, 0),
    "dynamo-no-folding": ({"dynamo": True, "do_constant_folding": False}, 0),
    "dynamo-preserve": ({"dynamo": True, "training": TRAINING.PRESERVE}, 0),
    "dynamo-no-optimize": ({"dynamo": True, "optimize": False}, 14),
}


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    return calibrated_resnet()


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return resnet_data()[1][:16]


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory, resnet: nn.Module, data: torch.Tensor) -> Callable[[str], Path]:
    folder = tmp_path_factory.mktemp("onnx")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = export(resnet, data, folder / f"{name}.onnx", **EXPORTS[name][0])
        return made[name]

    return get


@pytest.mark.parametrize("name", EXPORTS)
def test_which_exports_keep_batch_norm_nodes(exports: Callable[[str], Path], name: str) -> None:
    graph = onnx.load(exports(name)).graph
    nodes = [node for node in graph.node if node.op_type == "BatchNormalization"]
    assert len(nodes) == EXPORTS[name][1]
    if name == "torchscript-training":
        assert all(
            onnx.helper.get_attribute_value(a) == 1 for n in nodes for a in n.attribute if a.name == "training_mode"
        )


def float64_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Every BatchNorm's input in a float64 copy of ``model`` on ``x``: the independent reference."""
    import copy

    twin = copy.deepcopy(model).double().eval()
    seen: dict[str, np.ndarray] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            seen[name] = args[0].numpy().copy()

        return hook

    handles = [
        module.register_forward_pre_hook(keep(name))
        for name, module in twin.named_modules()
        if isinstance(module, nn.BatchNorm2d)
    ]
    with torch.no_grad():
        twin(x.double())
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize("name", ["torchscript-no-folding", "torchscript-preserve", "dynamo-no-optimize"])
def test_numbers_match_the_float64_reference(
    exports: Callable[[str], Path], resnet: nn.Module, data: torch.Tensor, name: str
) -> None:
    # The dynamo export keeps the example's batch size of 16; the others take any.
    batches = [data] if name.startswith("dynamo") else [data[:5], data[5:]]
    report = inspect_model(load_model(exports(name)).module, batches)
    reference = float64_inputs(resnet, data)
    stored = {layer.name: layer for layer in iter_norm_layers(resnet)}
    assert [layer.name.raw for layer in report.layers] == list(reference)
    for layer in report.layers:
        x = reference[layer.name.raw]
        mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
        # onnxruntime's float32 convolutions round differently from the float64 reference: measured
        # within 7e-7 of the layer's largest value at the deepest of 14 layers; 2e-6 leaves margin.
        np.testing.assert_allclose(layer.batch_mean, mean, rtol=0, atol=2e-6 * np.abs(mean).max())
        np.testing.assert_allclose(layer.batch_var, var, rtol=0, atol=2e-6 * var.max())
        assert layer.values_per_channel == 16 * x.shape[2] * x.shape[3]
        # The stored statistics are the initializers, bit for bit.
        assert layer.running_mean == stored[layer.name.raw].running_mean
        assert layer.running_var == stored[layer.name.raw].running_var
        assert layer.weight == stored[layer.name.raw].weight
        assert layer.momentum is not None and math.isclose(layer.momentum, 0.1, rel_tol=1e-6)


def test_sentences_and_names_are_the_pytorch_ones(
    exports: Callable[[str], Path], resnet: nn.Module, data: torch.Tensor
) -> None:
    original = inspect_model(resnet, [data])
    exported = inspect_model(load_model(exports("torchscript-no-folding")).module, [data])
    for mine, theirs in zip(exported.layers, original.layers, strict=True):
        assert mine.type.raw == "BatchNormalization"
        assert mine.explanation.raw == theirs.explanation.raw.replace("(BatchNorm2d)", "(BatchNormalization)")
        assert mine.input_shape == theirs.input_shape and mine.reduced_axes == theirs.reduced_axes
        # PyTorch's own float32 run differs from the float64 reference by as much as onnxruntime's.
        assert mine.batch_var is not None and theirs.batch_var is not None
        np.testing.assert_allclose(mine.batch_var, theirs.batch_var, rtol=0, atol=2e-6 * max(theirs.batch_var))


def test_python_api_checks_an_onnx_model(exports: Callable[[str], Path], data: torch.Tensor) -> None:
    import bn_inspect

    result = bn_inspect.check_model(bn_inspect.load_model(exports("torchscript-training")).module, [data])
    assert not result.passed
    assert {finding.code for finding in result.findings} == {"BN112"}


def test_inspecting_leaves_the_file_unchanged(exports: Callable[[str], Path], data: torch.Tensor) -> None:
    path = exports("torchscript-no-folding")
    before = path.read_bytes()
    loaded = load_model(path).module
    buffers = [b.clone() for b in loaded.buffers()]
    inspect_model(loaded, [data])
    assert path.read_bytes() == before
    assert all(torch.equal(a, b) for a, b in zip(buffers, loaded.buffers(), strict=True))


def test_folded_export_says_how_to_keep_the_nodes(
    exports: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(NoNormLayersError, match="fold BatchNorm into the convolution"):
        load_model(exports("dynamo-default"))
    result = invoke(capsys, ["check", exports("torchscript-default"), "--no-data"])
    assert result.code == 2
    assert_one_error_line(result, "no normalization node", "do_constant_folding=False", "optimize=False")


def test_training_mode_export_is_bn112(exports: Callable[[str], Path], capsys: pytest.CaptureFixture[str]) -> None:
    result = invoke(capsys, ["check", exports("torchscript-training"), "--no-data", "--format", "json"])
    assert result.code == 1
    codes = {finding["code"] for finding in json.loads(result.out)["findings"]}
    assert codes == {"BN112"}
    healthy = invoke(capsys, ["check", exports("torchscript-no-folding"), "--no-data", "--format", "json"])
    assert healthy.code == 0 and json.loads(healthy.out)["findings"] == []
    assert any("BN106-BN108 need a PyTorch module" in note for note in json.loads(healthy.out)["notes"])


def test_train_mode_is_refused(exports: Callable[[str], Path], data: torch.Tensor) -> None:
    with pytest.raises(ExportModeError, match="fixes each node's mode at export"):
        inspect_model(load_model(exports("torchscript-no-folding")).module, [data], mode="train")


def test_cli_inspect_layers_diff_and_baseline(
    exports: Callable[[str], Path], data: torch.Tensor, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = tmp_path / "data.npy"
    np.save(inputs, data.numpy())
    model = exports("torchscript-no-folding")
    inspected = invoke(capsys, ["inspect", model, "--input", inputs, "--batch-size", "16", "--format", "json"])
    assert inspected.code == 0, inspected.err
    assert len(json.loads(inspected.out)["layers"]) == 14
    page = tmp_path / "page.html"
    drawn = invoke(capsys, ["inspect", model, "--input", inputs, "--format", "html", "--output", page])
    assert drawn.code == 0 and "layer1.0.bn1" in page.read_text()
    listed = invoke(capsys, ["layers", model, "--format", "json"])
    assert listed.code == 0 and "layer2.0.downsample.1" in listed.out
    diffed = invoke(capsys, ["diff", model, exports("dynamo-no-optimize"), "--input", inputs, "--batch-size", "16"])
    assert diffed.code == 0, diffed.err
    baseline = tmp_path / "baseline.json"
    wrote = invoke(capsys, ["check", model, "--input", inputs, "--batch-size", "16", "--write-baseline", baseline])
    assert wrote.code == 0, wrote.err
    checked = invoke(
        capsys,
        ["check", exports("dynamo-no-optimize"), "--input", inputs, "--batch-size", "16", "--baseline", baseline],
    )
    assert checked.code == 0, checked.out + checked.err


def test_declared_shape_is_the_default_and_a_wrong_shape_is_one_line(
    exports: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model = exports("dynamo-no-optimize")
    guessed = invoke(capsys, ["inspect", model])
    assert guessed.code == 0 and "(16, 3, 8, 8), because the ONNX graph's input is declared" in guessed.err
    free = invoke(capsys, ["inspect", exports("torchscript-no-folding")])
    assert free.code == 0 and "(8, 3, 8, 8), because the ONNX graph's input is declared" in free.err
    wrong = invoke(capsys, ["inspect", model, "--shape", "4,3,8,8"])
    assert wrong.code == 2
    assert_one_error_line(
        wrong, "the data has shape (4, 3, 8, 8), but the ONNX graph's input x is declared (16, 3, 8, 8)"
    )


class _Family(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.ln = nn.LayerNorm(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.inorm(x))


@pytest.mark.parametrize(
    "options", [{"dynamo": False, "do_constant_folding": False}, {"dynamo": True, "optimize": False}]
)
def test_instance_and_layer_normalization(tmp_path: Path, options: dict[str, Any]) -> None:
    model = randomize_norm_state(_Family()).eval()
    x = torch.randn(2, 4, 5, 6)
    report = inspect_model(load_model(export(model, x, tmp_path / "family.onnx", **options)).module, [x])
    assert [layer.name.raw for layer in report.layers] == ["inorm", "ln"]
    assert all(layer.momentum is None for layer in report.layers)
    by_type = {layer.type.raw: layer for layer in report.layers}
    assert set(by_type) == {"InstanceNormalization", "LayerNormalization"}
    assert by_type["LayerNormalization"].input_shape == (2, 4, 5, 6)
    assert "6 values" in by_type["LayerNormalization"].explanation.raw
    assert by_type["InstanceNormalization"].input_shape == (2, 4, 5, 6)


def test_import_bn_inspect_does_not_import_onnx() -> None:
    code = "import sys, bn_inspect; print([m for m in ('onnx', 'onnxruntime') if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ---- hostile files ----


def _tiny_model(node_name: str = "bn", domain: str = "", op_type: str = "BatchNormalization") -> Any:
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    stored = [
        numpy_helper.from_array(np.ones(3, np.float32) * v, name)
        for v, name in ((1, "s"), (0, "b"), (0, "m"), (1, "v"))
    ]
    node = helper.make_node(op_type, ["x", "s", "b", "m", "v"], ["y"], name=node_name, domain=domain)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 4, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3, 4, 4])],
        stored,
    )
    opsets = [helper.make_opsetid("", 15)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


def test_a_hand_built_graph_works(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tiny.onnx"
    onnx.save(_tiny_model(), path)
    result = invoke(capsys, ["inspect", path])
    assert result.code == 0, result.err
    assert "bn (BatchNormalization) got (2, 3, 4, 4)" in result.out


@pytest.mark.surface("read:model", "traceback")
def test_a_malformed_protobuf_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(b"\x08\x08\x12\xff\xff\xff\xff\x0fgarbage")
    result = invoke(capsys, ["inspect", path])
    assert result.code == 2
    assert_one_error_line(result, "is malformed or truncated")


@pytest.mark.surface("read:model", "traceback")
def test_a_truncated_export_is_one_line(
    exports: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    whole = exports("torchscript-no-folding").read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(whole[: len(whole) // 2])
    result = invoke(capsys, ["inspect", path])
    assert result.code == 2
    assert_one_error_line(result, "is malformed or truncated")


@pytest.mark.surface("read:model", "memory")
def test_a_huge_declared_tensor_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _tiny_model()
    huge = onnx.TensorProto(name="huge", data_type=onnx.TensorProto.FLOAT, dims=[10**6, 10**6])
    model.graph.initializer.append(huge)
    path = tmp_path / "huge.onnx"
    path.write_bytes(model.SerializeToString())
    result = invoke(capsys, ["inspect", path])
    assert result.code == 2
    assert_one_error_line(result, "tensor 'huge' declares dims (1000000, 1000000)")


@pytest.mark.surface("read:model", "execution")
def test_a_custom_domain_operator_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "custom.onnx"
    onnx.save(_tiny_model(domain="evil.ops", op_type="Backdoor"), path)
    result = invoke(capsys, ["inspect", path])
    assert result.code == 2
    assert_one_error_line(result, "custom domain evil.ops", "never loads")


@pytest.mark.surface("render:table", "inert")
def test_a_node_name_with_terminal_escapes_is_rendered_inertly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "escapes.onnx"
    onnx.save(_tiny_model(node_name="bn\x1b]0;pwned\x07\x1b[2J"), path)
    result = invoke(capsys, ["inspect", path])
    assert result.code == 0, result.err
    assert "\x1b" not in result.out + result.err and "\x07" not in result.out
    assert "pwned" in result.out


def _with_external(tmp_path: Path, location: str, *, length: int | None = None) -> Path:
    model = _tiny_model()
    scale = model.graph.initializer[0]
    scale.ClearField("raw_data")
    scale.ClearField("float_data")
    scale.data_location = onnx.TensorProto.EXTERNAL
    entries = {"location": location, "offset": "0"} | ({} if length is None else {"length": str(length)})
    for key, value in entries.items():
        scale.external_data.add(key=key, value=value)
    path = tmp_path / "model" / "external.onnx"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def test_external_data_beside_the_model_is_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _with_external(tmp_path, "weights.bin")
    (path.parent / "weights.bin").write_bytes(np.full(3, 2.5, np.float32).tobytes())
    result = invoke(capsys, ["layers", path, "--format", "json"])
    assert result.code == 0, result.err
    assert json.loads(result.out)["layers"][0]["weight"] == [2.5, 2.5, 2.5]


@pytest.mark.surface("read:onnx-external-data", "traceback")
@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "link.bin"])
def test_external_data_outside_the_folder_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], location: str
) -> None:
    path = _with_external(tmp_path, location)
    (tmp_path / "secret.bin").write_bytes(b"\0" * 12)
    (path.parent / "link.bin").symlink_to(tmp_path / "secret.bin")
    result = invoke(capsys, ["inspect", path])
    assert result.code == 2
    assert_one_error_line(result, "outside its folder" if location != "link.bin" else "resolves outside its folder")


@pytest.mark.surface("read:onnx-external-data", "memory")
def test_external_data_shorter_than_declared_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _with_external(tmp_path, "weights.bin", length=2**40)
    (path.parent / "weights.bin").write_bytes(b"\0" * 12)
    result = invoke(capsys, ["inspect", path])
    assert result.code == 2
    assert_one_error_line(result, "shorter than the offset 0 and length 1,099,511,627,776")


@pytest.mark.surface("read:onnx-external-data", "hang")
def test_external_data_that_is_a_named_pipe_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import os

    path = _with_external(tmp_path, "weights.bin")
    os.mkfifo(path.parent / "weights.bin")
    result = invoke(capsys, ["inspect", path])
    assert result.code == 2
    assert_one_error_line(result, "is a named pipe")


def test_model_file_error_is_the_class(tmp_path: Path) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(b"\x08\x08\x12\x03abc\x3a\xff")
    with pytest.raises(ModelFileError):
        load_model(path)


def test_stored_tensors_through_constant_and_identity_nodes(tmp_path: Path) -> None:
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    model = _tiny_model()
    graph = model.graph
    mean = np.array([0.5, -1.0, 2.0], np.float32)
    del graph.initializer[2]  # "m" now comes from a Constant node through an Identity
    constant = helper.make_node("Constant", [], ["m_const"], value=numpy_helper.from_array(mean, "m_value"))
    identity = helper.make_node("Identity", ["m_const"], ["m"])
    graph.node.insert(0, identity)
    graph.node.insert(0, constant)
    path = tmp_path / "constants.onnx"
    onnx.save(model, path)
    x = torch.randn(2, 3, 4, 4)
    (layer,) = inspect_model(load_model(path).module, [x]).layers
    assert layer.running_mean == tuple(float(v) for v in mean)
    # The engine sums float32 input in float32 (engine/moments.py), as for a PyTorch layer.
    np.testing.assert_allclose(layer.batch_mean, x.double().mean(dim=(0, 2, 3)).numpy(), rtol=2e-6)


def test_group_normalization_node(tmp_path: Path) -> None:
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    scale = numpy_helper.from_array(np.linspace(0.5, 2, 6).astype(np.float32), "scale")
    bias = numpy_helper.from_array(np.zeros(6, np.float32), "bias")
    node = helper.make_node("GroupNormalization", ["x", "scale", "bias"], ["y"], name="gn", num_groups=3)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 6, 5])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 6, 5])],
        [scale, bias],
    )
    path = tmp_path / "group.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), path)
    (layer,) = inspect_model(load_model(path).module, [torch.randn(2, 6, 5)]).layers
    assert (layer.type.raw, layer.family, layer.num_groups, layer.num_channels) == ("GroupNormalization", "group", 3, 6)
    assert "3 groups" in layer.explanation.raw or "groups" in layer.explanation.raw


def test_recalibrate_refuses_an_onnx_file_before_running(
    exports: Callable[[str], Path], data: torch.Tensor, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = tmp_path / "data.npy"
    np.save(inputs, data.numpy())
    result = invoke(
        capsys, ["recalibrate", exports("dynamo-no-optimize"), "--input", inputs, "--output", tmp_path / "out.onnx"]
    )
    assert result.code == 2
    assert_one_error_line(result, "recalibrate does not write ONNX files")
    assert not (tmp_path / "out.onnx").exists()


def test_float16_statistics_are_bn109_and_need_no_onnxruntime(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _tiny_model()
    for tensor in model.graph.initializer:
        values = onnx.numpy_helper.to_array(tensor).astype(np.float16)
        tensor.CopyFrom(onnx.numpy_helper.from_array(values, tensor.name))
    path = tmp_path / "half.onnx"
    onnx.save(model, path)
    result = invoke(capsys, ["check", path, "--no-data", "--format", "json"])
    assert result.code == 0, result.err
    assert {finding["code"] for finding in json.loads(result.out)["findings"]} == {"BN109"}


def test_stored_tensors_of_different_lengths_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _tiny_model()
    model.graph.initializer[2].CopyFrom(onnx.numpy_helper.from_array(np.zeros(5, np.float32), "m"))
    path = tmp_path / "mismatch.onnx"
    onnx.save(model, path)
    result = invoke(capsys, ["layers", path])
    assert result.code == 2
    assert_one_error_line(result, "stores running_mean of shape (5,) where (3,) fits its other tensors")


def test_without_onnxruntime_installed_it_is_one_line(exports: Callable[[str], Path]) -> None:
    code = (
        "import sys; sys.modules['onnxruntime'] = None\n"
        "from bn_inspect.cli.main import run\n"
        f"sys.exit(run(['layers', {str(exports('dynamo-no-optimize'))!r}]))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"Error: {exports('dynamo-no-optimize')} is an ONNX model, and reading one needs onnxruntime, which is not "
        "installed. pip install 'bn-inspect[onnx]' (onnx and onnxruntime)"
    ]


def _nested(depth: int) -> Any:
    """A graph whose If nodes nest ``depth`` graphs deep."""
    helper = onnx.helper
    inner = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "leaf",
        [],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    for level in range(depth):
        node = helper.make_node("If", ["c"], [f"y{level}"], then_branch=inner, else_branch=inner)
        inner = helper.make_graph(
            [node], f"g{level}", [], [helper.make_tensor_value_info(f"y{level}", onnx.TensorProto.FLOAT, [1])]
        )
    return inner


@pytest.mark.surface("read:model", "hang")
def test_graphs_nested_too_deep_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _tiny_model()
    model.graph.node.append(onnx.helper.make_node("If", ["c"], ["z"], then_branch=_nested(20), else_branch=_nested(1)))
    path = tmp_path / "deep.onnx"
    path.write_bytes(model.SerializeToString())
    result = invoke(capsys, ["layers", path])
    assert result.code == 2
    assert_one_error_line(result, "nests graphs more than 16 levels deep")


@pytest.mark.surface("read:model", "execution")
def test_a_custom_operator_inside_a_model_function_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    helper = onnx.helper
    model = _tiny_model()
    body = helper.make_node("Backdoor", ["a"], ["b"], domain="evil.ops")
    model.functions.append(
        helper.make_function("local.fns", "Wrapped", ["a"], ["b"], [body], [helper.make_opsetid("", 15)])
    )
    model.graph.node.append(helper.make_node("Wrapped", ["y"], ["w"], domain="local.fns"))
    path = tmp_path / "function.onnx"
    path.write_bytes(model.SerializeToString())
    result = invoke(capsys, ["layers", path])
    assert result.code == 2
    assert_one_error_line(result, "custom domain evil.ops")


def test_diff_of_the_pytorch_model_and_its_export_finds_no_change(
    exports: Callable[[str], Path], resnet: nn.Module, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scripted = tmp_path / "resnet.pt"
    torch.jit.save(torch.jit.script(resnet), scripted)
    result = invoke(capsys, ["diff", scripted, exports("torchscript-no-folding"), "--shape", "16,3,8,8"])
    assert result.code == 0, result.err
    assert "No layer's stored statistics changed and no input changed." in result.out


class _TrackedInstance(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(4, affine=True, track_running_stats=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inorm(self.conv(x))


@pytest.mark.parametrize(
    "options", [{"dynamo": False, "do_constant_folding": False}, {"dynamo": True, "optimize": False}]
)
def test_instance_norm_with_running_statistics_is_read_back_from_its_tiled_batch_norm(
    tmp_path: Path, options: dict[str, Any]
) -> None:
    model = randomize_norm_state(_TrackedInstance()).eval()
    x = torch.randn(2, 3, 5, 6) * 2 + 1
    (theirs,) = inspect_model(model, [x]).layers
    (mine,) = inspect_model(load_model(export(model, x, tmp_path / "tracked.onnx", **options)).module, [x]).layers
    assert (mine.name.raw, mine.type.raw, mine.normalizes_with) == ("inorm", "InstanceNormalization", "running")
    assert mine.running_mean == theirs.running_mean and mine.running_var == theirs.running_var
    assert mine.explanation.raw == theirs.explanation.raw.replace("(InstanceNorm2d)", "(InstanceNormalization)")
    assert mine.batch_mean is not None and theirs.batch_mean is not None
    np.testing.assert_allclose(mine.batch_mean, theirs.batch_mean, rtol=0, atol=2e-6 * max(map(abs, theirs.batch_mean)))


@pytest.fixture(scope="module")
def digits() -> nn.Module:
    from sample_models.architectures import DigitsCNN

    model = DigitsCNN()
    model.load_state_dict(torch.load(DIGITS / "state_dict.pt", weights_only=True))
    return model.eval()


@pytest.fixture(scope="module")
def static_digits(tmp_path_factory: pytest.TempPathFactory, digits: nn.Module) -> Path:
    """The digits net exported as most users export: input of 8 samples, no dynamic batch dim."""
    folder = tmp_path_factory.mktemp("static")
    x = torch.from_numpy(np.load(DIGITS / "test_images.npy")[:8])
    return export(digits, x, folder / "static.onnx", dynamo=False, do_constant_folding=False, input_names=["x"])


def test_a_fixed_batch_dim_batches_the_data_and_leaves_out_a_short_last_batch(
    static_digits: Path, digits: nn.Module, capsys: pytest.CaptureFixture[str]
) -> None:
    """Fails before the fix: the data ran in batches of 64 (--batch-size's default) and the graph refused them."""
    images = DIGITS / "test_images.npy"
    for command in ("inspect", "check"):
        result = invoke(capsys, [command, static_digits, "--input", images, "--format", "json"])
        assert result.code == 0, result.err
        assert "declared with a batch size of 8, so the data runs in batches of 8" in result.err
        assert "the last 2 samples are left out" in result.err
    report = json.loads(invoke(capsys, ["inspect", static_digits, "--input", images, "--format", "json"]).out)
    assert (report["input"]["num_batches"], report["input"]["num_samples"]) == (56, 448)
    reference = float64_inputs(digits, torch.from_numpy(np.load(images)[:448]))
    for layer in report["layers"]:
        expected = reference[layer["name"]].mean(axis=(0, 2, 3))
        np.testing.assert_allclose(layer["batch_mean"], expected, rtol=1e-5, atol=1e-6)
    diffed = invoke(
        capsys,
        [
            "diff",
            DIGITS / "state_dict.pt",
            static_digits,
            "--arch",
            f"{SAMPLES}/architectures.py:DigitsCNN",
            "--input",
            images,
        ],
    )
    assert diffed.code == 0, diffed.err
    assert "NEW's ONNX graph input x is declared with a batch size of 8, so both models run" in diffed.err
    assert "no input changed" in diffed.out


def test_a_batch_size_other_than_the_fixed_one_is_refused_before_any_batch_runs(
    static_digits: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Fails before the fix: 56 batches ran before the short last one was refused, with a hint to use --shape."""
    images = DIGITS / "test_images.npy"
    for command in ("inspect", "check"):
        result = invoke(capsys, [command, static_digits, "--input", images, "--batch-size", "16"])
        assert result.code == 2
        assert_one_error_line(result, "--batch-size 16 was given", "fixed batch size of 8", "Pass --batch-size 8")
    diffed = invoke(capsys, ["diff", static_digits, static_digits, "--input", images, "--batch-size", "64"])
    assert diffed.code == 2
    assert_one_error_line(diffed, "--batch-size 64 was given", "OLD's ONNX graph input x", "Pass --batch-size 8")
    random = invoke(capsys, ["inspect", static_digits, "--shape", "4,1,8,8"])
    assert random.code == 2
    assert_one_error_line(random, "Give batches of 8 samples (--batch-size 8, or the first dim of --shape)")


def test_diff_fails_an_export_that_normalizes_with_batch_statistics(
    digits: nn.Module, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Fails before the fix: diff PASSED a training-mode export, whose every batch is normalized with its own statistics."""
    x = torch.from_numpy(np.load(DIGITS / "test_images.npy")[:8])
    trained = export(digits, x, tmp_path / "train.onnx", dynamo=False, training=TRAINING.TRAINING, input_names=["x"])
    arch = ("--arch", f"{SAMPLES}/architectures.py:DigitsCNN")
    argv = ["diff", DIGITS / "state_dict.pt", trained, *arch, "--input", DIGITS / "test_images.npy"]
    result = invoke(capsys, argv)
    assert result.code == 1, result.err
    assert "3 layers normalize with batch statistics in NEW, running in OLD." in result.out
    assert "uses batch" in result.out and "FAILED" in result.out
    layers = json.loads(invoke(capsys, [*argv, "--format", "json"]).out)["layers"]
    assert {(layer["changed"], layer["old_normalizes_with"], layer["new_normalizes_with"]) for layer in layers} == {
        ("normalization", "running", "batch")
    }
