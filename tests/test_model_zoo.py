"""Model zoo: real torchvision and timm architectures, inspected the way users do, against float64.

Every torchvision classification model with a BatchNorm, a representative timm set (EfficientNet,
MobileNetV3, RegNet, ResNet, and ConvNeXt for LayerNorm) and a torchvision detection backbone
with FrozenBatchNorm2d. Each model is built with random weights, its running statistics warmed by
a few train-mode batches, saved, and inspected twice through the CLI: as a state_dict with
``--arch``, and as a torch.export archive. Every layer call the tool reports must match, in order,
what forward pre-hooks of our own see on the same eval-mode model and batch: per-channel mean and
biased variance computed in float64, the stored running statistics and affine terms, the input
shape, and for LayerNorm the axes it reduces.

Marked ``zoo`` (and ``slow``). The module is skipped where torchvision is not installed, the timm
cases where timm is not (CI stage 1, torch 2.13); CI stage 2 runs it in a venv with torch 2.14.1,
torchvision and timm (``pip install -e '.[test,zoo]'``, see docs/model-zoo.md). Models of more than
about 100M parameters are marked ``zoo_heavy`` and skipped, with a reason in the summary, unless
``BN_INSPECT_ZOO_HEAVY=1`` is set.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from bn_inspect.analyses.inspection import inspect_model
from bn_inspect.cli.main import run
from tests.helpers import invoke

torchvision = pytest.importorskip("torchvision")

pytestmark = [pytest.mark.zoo, pytest.mark.slow]

HEAVY = os.environ.get("BN_INSPECT_ZOO_HEAVY") == "1"
HEAVY_PARAMETERS = 100_000_000
WARMUP_BATCHES = 2
BATCH = 2
# 32x32 unless a model needs more. Most accept far less (1x1), but then every layer but the
# first sees a 1x1 map and two values per channel, and the time saved is nil: export, save and
# load dominate. The true minima: densenet 29, googlenet 15, vgg 32, inception_v3 75 (its own
# check), maxvit_t 224 (its partition size of 7 must divide every stage).
DEFAULT_SIZE = 32
SIZES = {"inception_v3": 75, "maxvit_t": 224}

# Every torchvision classification model that contains a BatchNorm (test_the_zoo_lists_... keeps
# this true), split at about 100M parameters as built here (num_classes=10).
TORCHVISION_MODELS = (
    *("densenet121", "densenet161", "densenet169", "densenet201"),
    *(f"efficientnet_b{i}" for i in range(8)),
    *("efficientnet_v2_s", "efficientnet_v2_m"),
    *("googlenet", "inception_v3", "maxvit_t"),
    *("mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3"),
    *("mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small"),
    *(f"regnet_{xy}_{size}" for xy in "xy" for size in ("400mf", "800mf", "1_6gf", "3_2gf", "8gf", "16gf")),
    *("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"),
    *("resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d"),
    *("shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0"),
    "wide_resnet50_2",
)
TORCHVISION_HEAVY = (
    "efficientnet_v2_l",
    "regnet_x_32gf",
    "regnet_y_32gf",
    "regnet_y_128gf",
    *("vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"),
    "wide_resnet101_2",
)
TIMM_MODELS = ("efficientnet_b0", "mobilenetv3_large_100", "regnetx_002", "resnet18", "convnext_atto")

# bn_inspect's own unit tests hold batch_var to 2e-5..3e-5 of a float64 reference.
VAR_RTOL = 3e-5


class VarianceImprecision(AssertionError):
    """batch_var further from the float64 reference than VAR_RTOL (everything else matched)."""


@dataclass(frozen=True)
class ZooModel:
    """One model: how the CLI builds it (--arch, --arch-kwargs), its input size and its package."""

    id: str
    arch: str
    kwargs: tuple[tuple[str, Any], ...]
    size: int = DEFAULT_SIZE
    package: str = "torchvision"
    frozen: bool = False

    @property
    def arch_kwargs(self) -> dict[str, Any]:
        return dict(self.kwargs)

    def build(self) -> nn.Module:
        module, _, attribute = self.arch.partition(":")
        model: nn.Module = getattr(importlib.import_module(module), attribute)(**self.arch_kwargs)
        return model


def torchvision_model(name: str) -> ZooModel:
    kwargs: dict[str, Any] = {"num_classes": 10}
    if name in ("googlenet", "inception_v3"):
        kwargs |= {"aux_logits": False, "init_weights": False}
    return ZooModel(
        f"torchvision-{name}", f"torchvision.models:{name}", tuple(kwargs.items()), SIZES.get(name, DEFAULT_SIZE)
    )


def timm_model(name: str) -> ZooModel:
    return ZooModel(f"timm-{name}", "timm:create_model", (("model_name", name), ("num_classes", 10)), package="timm")


DETECTION_BACKBONE = ZooModel(
    "torchvision-fasterrcnn_resnet50_fpn-backbone",
    "torchvision.models.detection.backbone_utils:resnet_fpn_backbone",
    (("backbone_name", "resnet50"), ("weights", None)),
    size=64,
    frozen=True,
)

PATHS = ("state_dict", "export")


def _cases() -> list[Any]:
    heavy_marks = [
        pytest.mark.zoo_heavy,
        pytest.mark.skipif(not HEAVY, reason="over ~100M parameters: set BN_INSPECT_ZOO_HEAVY=1 to run"),
    ]
    models = [
        *((torchvision_model(name), False) for name in TORCHVISION_MODELS),
        *((timm_model(name), False) for name in TIMM_MODELS),
        (DETECTION_BACKBONE, False),
        *((torchvision_model(name), True) for name in TORCHVISION_HEAVY),
    ]
    cases = []
    for model, heavy in models:
        for path in PATHS:
            marks = list(heavy_marks) if heavy else []
            cases.append(pytest.param(model, path, marks=marks, id=f"{model.id}-{path}"))
    return cases


@dataclass
class Call:
    """One call of one normalization module, as our own pre-hook saw it (float64)."""

    name: str
    call: int
    type: str
    kind: str  # "batch" or "layer"
    shape: tuple[int, ...]
    mean: np.ndarray | None = None
    var: np.ndarray | None = None
    reduced_axes: tuple[int, ...] | None = None
    is_2d_layer_norm: bool = False
    state: dict[str, Any] = field(default_factory=dict)


@dataclass
class Prepared:
    """A warmed, saved model, the saved input, and the reference calls on it."""

    model: nn.Module
    folder: Path
    state_dict: Path
    input: Path
    x: torch.Tensor
    calls: list[Call]


def _layer_norm_2d_classes() -> tuple[type, ...]:
    classes: list[type] = [torchvision.models.convnext.LayerNorm2d]
    try:
        from timm.layers import LayerNorm2d, LayerNorm2dFp32
    except ImportError:
        pass
    else:
        classes += [LayerNorm2d, LayerNorm2dFp32]
    return tuple(classes)


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, torchvision.ops.FrozenBatchNorm2d)):
        return "batch"
    if isinstance(module, nn.LayerNorm):
        return "layer"
    assert not isinstance(module, (nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)), "not in this zoo"
    return None


def _floats(tensor: torch.Tensor | None) -> list[float] | None:
    return None if tensor is None else tensor.detach().double().reshape(-1).tolist()


def _state(module: nn.Module) -> dict[str, Any]:
    tracked = getattr(module, "num_batches_tracked", None)
    return {
        "running_mean": _floats(module.running_mean),
        "running_var": _floats(module.running_var),
        "weight": _floats(module.weight),
        "bias": _floats(module.bias),
        "eps": float(module.eps),
        "num_batches_tracked": None if tracked is None else int(tracked),
    }


@contextmanager
def reference_hooks(model: nn.Module) -> Iterator[list[Call]]:
    """Forward pre-hooks on every normalization module, reducing its input in float64."""
    calls: list[Call] = []
    counts: dict[str, int] = {}
    layer_norm_2d = _layer_norm_2d_classes()

    def hook_for(name: str, module: nn.Module, kind: str) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().double()
            call = Call(name, counts.get(name, 0), type(module).__name__, kind, tuple(x.shape))
            counts[name] = call.call + 1
            if kind == "batch":
                var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=0)
                call.mean, call.var, call.state = mean.numpy(), var.numpy(), _state(module)
            elif isinstance(module, layer_norm_2d):
                call.reduced_axes, call.is_2d_layer_norm = (1,), True
            else:
                ndim = len(module.normalized_shape)
                call.reduced_axes = tuple(range(x.dim() - ndim, x.dim()))
            calls.append(call)

        return hook

    handles = []
    for name, module in model.named_modules():
        kind = _kind(module)
        if kind is not None:
            handles.append(module.register_forward_pre_hook(hook_for(name, module, kind)))
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def _randn(shape: tuple[int, ...], seed: int, mean: float, std: float) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * std + mean


def _freeze_with_values(model: nn.Module) -> None:
    """FrozenBatchNorm2d never trains: give its buffers trained-looking values directly."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torchvision.ops.FrozenBatchNorm2d):
                for tensor, (scale, shift) in (
                    (module.weight, (0.3, 1.0)),
                    (module.bias, (0.3, 0.0)),
                    (module.running_mean, (0.5, 0.0)),
                ):
                    tensor.copy_(torch.randn(tensor.shape, generator=generator) * scale + shift)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) * 2 + 0.1)


def prepare(case: ZooModel, folder: Path) -> Prepared:
    torch.manual_seed(0)
    model = case.build()
    shape = (BATCH, 3, case.size, case.size)
    if case.frozen:
        _freeze_with_values(model)
    else:
        model.train()
        with torch.no_grad():
            for seed in range(WARMUP_BATCHES):
                model(_randn(shape, seed, mean=0.5, std=2.0))
    model.eval()
    state_dict = folder / "state_dict.pt"
    torch.save(model.state_dict(), state_dict)
    x = _randn(shape, 100, mean=-0.3, std=1.5)
    input_file = folder / "input.pt"
    torch.save(x, input_file)
    with reference_hooks(model) as calls, torch.no_grad():
        model(x)
    return Prepared(model, folder, state_dict, input_file, x, calls)


_PREPARED: dict[str, Prepared] = {}


def prepared(case: ZooModel, tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    """The prepared model, shared by its state_dict and export tests (which run one after the other)."""
    if case.id not in _PREPARED:
        for old in _PREPARED.values():
            shutil.rmtree(old.folder, ignore_errors=True)
        _PREPARED.clear()
        _PREPARED[case.id] = prepare(case, tmp_path_factory.mktemp(case.id))
    return _PREPARED[case.id]


@pytest.fixture(scope="module", autouse=True)
def _release_prepared() -> Iterator[None]:
    yield
    for old in _PREPARED.values():
        shutil.rmtree(old.folder, ignore_errors=True)
    _PREPARED.clear()


def inspect_json(argv: list[str], output: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    result = invoke(capsys, ["inspect", *argv, "--format", "json", "--output", output, "--quiet"])
    assert result.code == 0, result.err
    document: dict[str, Any] = json.loads(output.read_text())
    return document


def assert_matches_reference(document: dict[str, Any], calls: list[Call], *, exported: bool) -> None:
    """Every reported layer call against our own, in execution order; exports report batch norms only."""
    expected = [call for call in calls if call.kind == "batch" or not exported]
    assert expected, "the reference saw no normalization layer"
    layers = document["layers"]
    assert [(entry["name"], entry["call"]) for entry in layers] == [(call.name, call.call) for call in expected]
    assert document["not_executed"] == []
    imprecise = []
    for entry, call in zip(layers, expected, strict=True):
        where = f"{call.name}#{call.call}"
        assert entry["type"] == call.type, where
        assert tuple(entry["input_shape"]) == call.shape, where
        if call.kind == "layer":
            assert entry["family"] == "layer" and entry["batch_mean"] is None, where
            assert tuple(entry["reduced_axes"]) == call.reduced_axes, where
            continue
        assert call.mean is not None and call.var is not None
        assert entry["family"] == "batch" and entry["normalizes_with"] == "running", where
        assert tuple(entry["reduced_axes"]) == (0, *range(2, len(call.shape))), where
        assert entry["values_per_channel"] == math.prod(call.shape) // call.shape[1], where
        # The tool sums float32 activations: a few float32 ulps of the spread for the mean; the
        # variance is checked last (see VAR_RTOL), after every other field.
        spread = math.sqrt(float(call.var.max()))
        np.testing.assert_allclose(entry["batch_mean"], call.mean, rtol=1e-6, atol=1e-6 * spread, err_msg=where)
        for key in ("running_mean", "running_var", "weight", "bias", "num_batches_tracked"):
            assert entry[key] == call.state[key], f"{where} {key}"
        assert entry["eps"] == pytest.approx(call.state["eps"]), where
        var = np.asarray(entry["batch_var"], dtype=np.float64)
        error = np.abs(var - call.var)
        beyond = error > VAR_RTOL * call.var + 1e-6 * float(call.var.max())
        if beyond.any():
            relative = np.where(beyond, error / call.var, -1.0)
            worst = int(np.argmax(relative))
            imprecise.append(
                f"{where}: {int(beyond.sum())} channels, worst {worst}: batch_var {var[worst]:.9g} vs "
                f"{call.var[worst]:.9g} (relative error {relative[worst]:.1e})"
            )
    if imprecise:
        raise VarianceImprecision(
            f"batch_var beyond rtol {VAR_RTOL:g} in {len(imprecise)} layers:\n" + "\n".join(imprecise)
        )


def state_dict_argv(case: ZooModel, ready: Prepared) -> list[str]:
    """The CLI arguments of inspecting the saved state_dict through --arch, as a user would."""
    arch = ["--arch", case.arch, "--arch-kwargs", json.dumps(case.arch_kwargs)]
    return [str(ready.state_dict), *arch, "--input", str(ready.input)]


@pytest.mark.parametrize(("case", "path"), _cases())
def test_model_matches_float64_reference(
    case: ZooModel, path: str, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    if case.package != "torchvision":
        pytest.importorskip(case.package)
    ready = prepared(case, tmp_path_factory)
    if path == "state_dict":
        document = inspect_json(state_dict_argv(case, ready), ready.folder / "state_dict.json", capsys)
        assert document["model"]["format"] == "state_dict"
        assert_matches_reference(document, ready.calls, exported=False)
        return
    archive = ready.folder / "model.pt2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(torch.export.export(ready.model, (ready.x,)), str(archive))
    try:
        if case.frozen:
            # torch.export traces FrozenBatchNorm2d into mul/add: the tool must say so, not report nothing.
            code = run(["inspect", str(archive), "--input", str(ready.input), "--format", "json", "--quiet"])
            captured = capsys.readouterr()
            message = captured.err
            assert code == 2 and "(FrozenBatchNorm2d)" in message and "only as plain arithmetic" in message, message
            return
        if not any(call.kind == "batch" for call in ready.calls):
            # As documented: inside torch.export programs only batch norms are reported, so a model
            # with only other families ends with exit 2, naming them and pointing to --arch.
            code = run(["inspect", str(archive), "--input", str(ready.input), "--format", "json", "--quiet"])
            captured = capsys.readouterr()
            assert code == 2 and "inside torch.export programs bn-inspect reports batch norms only" in captured.err
            assert "(LayerNorm2d)" in captured.err and "--arch" in captured.err, captured.err
            return
        document = inspect_json([str(archive), "--input", str(ready.input)], ready.folder / "export.json", capsys)
    finally:
        archive.unlink()
    assert document["model"]["format"] == "torch.export"
    assert_matches_reference(document, ready.calls, exported=True)


def test_layer_norm_2d_reduces_channels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """timm's ConvNeXt normalizes NCHW maps over C with LayerNorm2d (an nn.LayerNorm that permutes
    NCHW to NHWC); the report must say dim 1, read off the layer-norm call inside its forward."""
    pytest.importorskip("timm")
    case = timm_model("convnext_atto")
    ready = prepare(case, tmp_path)
    layer_norms = [call for call in ready.calls if call.is_2d_layer_norm]
    assert layer_norms
    document = inspect_json(state_dict_argv(case, ready), tmp_path / "report.json", capsys)
    reported = {(entry["name"], entry["call"]): entry for entry in document["layers"]}
    for call in layer_norms:
        entry = reported[(call.name, call.call)]
        assert tuple(entry["reduced_axes"]) == call.reduced_axes, f"{call.name}: {entry['explanation']}"
        assert entry["axis_names"] == ["N", "C", "H", "W"], call.name
        assert f"each over C = {call.shape[1]:,} values (dim 1 reduced" in entry["explanation"], call.name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_every_layer_norm_2d_class_reduces_channels(dtype: torch.dtype) -> None:
    """torchvision's and timm's LayerNorm2d, and timm's LayerNorm2dFp32, which in bfloat16 hands
    the kernel a float32 copy rather than a view."""
    classes = _layer_norm_2d_classes()
    model = nn.Sequential(*(cls(6) for cls in classes)).to(dtype).eval()
    report = inspect_model(model, [torch.randn(2, 6, 4, 5)])
    assert [(entry.type.raw, entry.reduced_axes) for entry in report.layers] == [(c.__name__, (1,)) for c in classes]
    assert all("N×H×W = 2×4×5 = 40 means" in entry.explanation.raw for entry in report.layers)


@contextmanager
def _weights_on_meta() -> Iterator[None]:
    """Build models without allocating or initialising their weights. A torch.device("meta")
    context will not do: regnet's constructor computes its widths with tensors and reads them back."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def test_the_zoo_lists_every_torchvision_model_with_batch_norm() -> None:
    """TORCHVISION_MODELS and TORCHVISION_HEAVY stay exact as torchvision adds models."""
    with_batch_norm, heavy = set(), set()
    for name in torchvision.models.list_models(module=torchvision.models):
        with _weights_on_meta():
            model = torchvision_model(name).build()
        if any(_kind(module) == "batch" for module in model.modules()):
            with_batch_norm.add(name)
            if sum(p.numel() for p in model.parameters()) > HEAVY_PARAMETERS:
                heavy.add(name)
    assert sorted(heavy) == sorted(TORCHVISION_HEAVY)
    assert sorted(with_batch_norm - heavy) == sorted(TORCHVISION_MODELS)


def test_resnet18_batch_norm_state_loads_into_frozen_batch_norm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """torchvision's FrozenBatchNorm2d drops num_batches_tracked in its own _load_from_state_dict,
    so a state_dict saved with BatchNorm2d loads as it does in PyTorch."""
    state_path = tmp_path / "state.pt"
    torch.save(torchvision.models.resnet18().state_dict(), state_path)
    arch = tmp_path / "frozen_arch.py"
    arch.write_text(
        "import torchvision\n\n\ndef build():\n"
        "    return torchvision.models.resnet18(norm_layer=torchvision.ops.FrozenBatchNorm2d)\n"
    )
    result = invoke(capsys, ["inspect", state_path, "--arch", f"{arch}:build", "--shape", "2,3,32,32"])
    assert result.code == 0, result.err
