"""Sequential recalibration resumed from held activations: the buffers of full passes, for any model's structure."""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook
from torch.utils._python_dispatch import TorchDispatchMode

from bn_inspect.analyses.recalibration import recalibrate
from bn_inspect.errors import ForwardError
from bn_inspect.model.modules import set_norm_layers_training
from bn_inspect.report.comparisons import RecalibrationResult
from tests import models
from tests.conftest import state_fingerprint


class CountingLinear(nn.Linear):
    """Counts the forwards that really run (a skipped call returns a held output without running)."""

    runs = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.runs += 1
        return super().forward(x)


class Inside(nn.Module):
    """A chain held in an attribute and called from a custom forward, with a head after it."""

    def __init__(self, depth: int, channels: int = 3) -> None:
        super().__init__()
        self.scale = CountingLinear(channels, channels)
        self.layers = nn.Sequential(*[nn.BatchNorm1d(channels) for _ in range(depth)])
        self.head = nn.Linear(channels, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.scale(x)) + x)  # type: ignore[no-any-return]


class Bottleneck(nn.Module):
    """As torchvision's: one ReLU module called three times, a downsample ``nn.Sequential``, ``out += identity``."""

    def __init__(self, width: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            nn.Sequential(nn.Conv2d(width, width, 1, stride=stride, bias=False), nn.BatchNorm2d(width))
            if stride > 1
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)  # type: ignore[no-any-return]


class SmallResNet(nn.Module):
    """A stem and two stages of Bottlenecks (``nn.Sequential``), called from a custom forward."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(Bottleneck(width), Bottleneck(width))
        self.layer2 = nn.Sequential(Bottleneck(width, stride=2), Bottleneck(width))
        self.fc = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(x.mean((2, 3)))  # type: ignore[no-any-return]


class SharedBlock(nn.Module):
    """One block (conv, BatchNorm) called twice per forward, between two BatchNorms called once."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.BatchNorm2d(3)
        self.block = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
        self.last = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.block(self.block(self.first(x)) + 1))  # type: ignore[no-any-return]


class Branching(nn.Module):
    """Takes a branch on a value computed from bn1's output, inside a module: data-dependent control flow."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm1d(4)
        self.inner = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        self.bn3 = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.bn1(x)
        b = self.inner(a) if bool(a.mean() > -100) else a
        return self.bn3(b * 2)  # type: ignore[no-any-return]


class InPlaceIgnored(nn.Module):
    """An in-place ReLU whose return value is dropped: its effect is on its argument alone."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm1d(3)
        self.relu = nn.ReLU(inplace=True)
        self.bn2 = nn.BatchNorm1d(3)
        self.bn3 = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(x)
        self.relu(x)
        return self.bn3(self.bn2(x) * 2)  # type: ignore[no-any-return]


class BuiltInForward(nn.Module):
    """Builds a module inside its forward, outside the model's own modules, between two BatchNorms."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm1d(3)
        self.bn2 = nn.BatchNorm1d(3)
        self.bn3 = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn3(self.bn2(nn.Tanh()(self.bn1(x))) + 1)  # type: ignore[no-any-return]


def prepared(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return models.randomize_norm_state(model, seed=seed).eval().double()


def images(num: int = 14, sizes: tuple[int, ...] = (5, 6, 3)) -> list[torch.Tensor]:
    return list(models.make_input((num, 3, 8, 8), mean=1.5, std=2.0).double().split(list(sizes)))


def features(channels: int = 3, sizes: tuple[int, ...] = (6, 9, 5)) -> list[torch.Tensor]:
    return list(models.make_input((sum(sizes), channels), mean=2.0, std=3.0).double().split(list(sizes)))


def in_full_passes(model: nn.Module, batches: list[torch.Tensor]) -> tuple[nn.Module, RecalibrationResult]:
    """A copy recalibrated with a no-op hook on every module, which nothing may skip: every pass from the data."""
    reference = copy.deepcopy(model)
    for module in reference.modules():
        module.register_forward_pre_hook(lambda *_: None)
    return reference, recalibrate(reference, batches)


def assert_same_buffers(model: nn.Module, reference: nn.Module) -> None:
    buffers, expected = dict(model.named_buffers()), dict(reference.named_buffers())
    assert buffers.keys() == expected.keys()
    for name, tensor in buffers.items():
        assert torch.equal(tensor, expected[name]), name


@contextmanager
def counted_calls() -> Iterator[Counter[int]]:
    """Every module call in the process, by module id (a global hook, which skips nothing)."""
    calls: Counter[int] = Counter()
    handle = register_module_forward_hook(lambda module, *_: calls.update([id(module)]))
    try:
        yield calls
    finally:
        handle.remove()


class ConvolutionCount(TorchDispatchMode):
    count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.count += func.overloadpacket.__name__ == "convolution"
        return func(*args, **(kwargs or {}))


@contextmanager
def counted_convolutions() -> Iterator[ConvolutionCount]:
    with ConvolutionCount() as mode:
        yield mode


def eval_population(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each BatchNorm's eval-mode input over all batches: mean and unbiased variance per channel, float64."""
    norms = {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    found: dict[str, list[torch.Tensor]] = {name: [] for name in norms}
    handles = [
        m.register_forward_pre_hook(lambda _m, args, name=name: found[name].append(args[0].transpose(0, 1).flatten(1)))
        for name, m in norms.items()
    ]
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for handle in handles:
        handle.remove()
    return {
        name: (torch.cat(v, 1).mean(1).numpy(), torch.cat(v, 1).var(1, correction=1).numpy())
        for name, v in found.items()
    }


def test_a_chain_inside_a_module_gives_the_buffers_of_full_passes_and_runs_each_layer_boundedly() -> None:
    depth = 30
    model = prepared(Inside(depth))
    batches = features()
    reference, expected = in_full_passes(model, batches)
    with counted_calls() as calls:
        result = recalibrate(model, batches)
    assert_same_buffers(model, reference)
    assert result.num_waves == expected.num_waves == depth and result.num_passes == expected.num_passes
    assert not result.notes
    # First pass, the pass after its own wave, the check pass: re-running every wave's upstream
    # layers would run the first layer depth + 1 times per batch.
    runs = [calls[id(layer)] for layer in model.layers]
    assert max(runs) <= 3 * len(batches)
    # What comes before the chain runs in the first pass, the pass that holds its output, and the check.
    assert model.scale.runs == 3 * len(batches)
    assert reference.scale.runs == expected.num_passes * len(batches)
    # The float64 statistics each layer sees in eval mode now are the ones it holds.
    for name, (mean, var) in eval_population(model, batches).items():
        layer = dict(model.named_modules())[name]
        np.testing.assert_allclose(layer.running_mean.numpy(), mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(layer.running_var.numpy(), var, rtol=1e-12)


def test_a_resnet_layout_with_custom_forwards_gives_the_buffers_of_full_passes_in_fewer_calls() -> None:
    model = prepared(SmallResNet())
    batches = images()
    with counted_convolutions() as full:
        reference, expected = in_full_passes(model, batches)
    with counted_convolutions() as resumed:
        result = recalibrate(model, batches)
    assert_same_buffers(model, reference)
    assert [(e.name.raw, e.wave) for e in result.layers] == [(e.name.raw, e.wave) for e in expected.layers]
    assert result.num_passes == expected.num_passes and not result.notes
    # 12 waves; each full pass reruns every convolution before its wave, a resumed one about one block's.
    assert resumed.count < full.count / 2


def test_a_residual_stack_in_module_dicts_gives_the_buffers_of_full_passes() -> None:
    model = prepared(models.ResidualStack(width=4, num_blocks=4))
    batches = images()
    reference, _ = in_full_passes(model, batches)
    recalibrate(model, batches)
    assert_same_buffers(model, reference)


@pytest.mark.parametrize(
    ("make", "batches"),
    [(SharedBlock, images()), (models.SharedBN, images()), (InPlaceIgnored, features()), (BuiltInForward, features())],
    ids=["block-called-twice", "layer-called-twice", "in-place-result-dropped", "built-in-forward"],
)
def test_modules_that_cannot_be_skipped_are_run_each_time_with_the_buffers_of_full_passes(
    make: type[nn.Module], batches: list[torch.Tensor]
) -> None:
    model = prepared(make())
    reference, expected = in_full_passes(model, batches)
    result = recalibrate(model, batches)
    assert_same_buffers(model, reference)
    assert result.notes == expected.notes


def test_data_dependent_control_flow_holds_nothing_and_gives_the_buffers_of_full_passes() -> None:
    model = prepared(Branching())
    batches = features(4)
    reference, _ = in_full_passes(model, batches)
    with counted_calls() as calls:
        result = recalibrate(model, batches)
    assert_same_buffers(model, reference)
    assert any("data-dependent control flow" in note for note in result.notes)
    # Every pass runs to the end from the data: the first layer runs in each of them.
    assert calls[id(model.bn1)] == result.num_passes * len(batches)


def test_over_the_memory_budget_batches_run_from_further_back_with_the_same_buffers() -> None:
    model, unbounded = prepared(SmallResNet()), prepared(SmallResNet())
    batches = images()
    result = recalibrate(model, batches, memory_budget_bytes=0)
    recalibrate(unbounded, batches)
    assert_same_buffers(model, unbounded)
    assert any("reached their memory budget (0.00 GiB;" in note for note in result.notes)


def test_torchscript_is_not_resumed_and_matches_eager() -> None:
    eager = prepared(SmallResNet()).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        script = torch.jit.script(copy.deepcopy(eager))
    batches = [x.float() for x in images()]
    recalibrate(eager, batches)
    recalibrate(script, batches)
    for (name, a), (_, b) in zip(eager.named_buffers(), script.named_buffers(), strict=True):
        np.testing.assert_allclose(a.double().numpy(), b.double().numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


def test_an_exported_program_gives_the_buffers_of_the_eager_model() -> None:
    eager = prepared(Inside(6)).float()
    batches = [x.float() for x in features(sizes=(4, 4, 4))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(copy.deepcopy(eager), (batches[0],)).module()
    recalibrate(eager, batches)
    recalibrate(program, batches)
    exported = dict(program.named_buffers())
    for name, tensor in eager.named_buffers():
        np.testing.assert_allclose(exported[name].numpy(), tensor.numpy(), rtol=1e-6, atol=1e-7, err_msg=name)


def test_recalibration_leaves_no_shadowed_forward_nor_hook_behind_and_changes_only_norm_buffers() -> None:
    model = prepared(SmallResNet())
    untouched = {name: p.clone() for name, p in model.named_parameters()}
    with counted_calls() as calls:
        recalibrate(model, images())
        model(images()[0])  # the global hooks are gone: only this forward and the ones above counted
    assert all("forward" not in module.__dict__ for module in model.modules())
    assert all(not module._forward_hooks and not module._forward_pre_hooks for module in model.modules())
    assert all(torch.equal(p, untouched[name]) for name, p in model.named_parameters())
    assert calls[id(model.fc)] == 2 * len(images()) + 1  # the first and the check pass reach the head, and this one


def test_a_failure_in_a_resumed_pass_leaves_the_model_as_it_was() -> None:
    class FailsLater(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.runs = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.runs += 1
            if self.runs > 5:  # inside the second wave pass, after the chain's start was held
                raise RuntimeError("deliberate failure")
            return x

    model = prepared(Inside(4))
    model.layers.insert(3, FailsLater())
    before = state_fingerprint(model)
    with pytest.raises(ForwardError, match="deliberate failure"):
        recalibrate(model, features())
    assert state_fingerprint(model) == before
    assert all("forward" not in module.__dict__ for module in model.modules())
    set_norm_layers_training(model, [])  # still an ordinary model
