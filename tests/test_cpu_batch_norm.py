"""The CPU eval batch-norm pass (bn_inspect/engine/cpu_batch_norm.py): torch's output bit for bit, exact moments.

Under ``hooks_capture`` a stock eval batch norm on the CPU normalizes its input piece by piece
inside the statistics pass. Its output and buffers must be bitwise those of the plain module,
and its moments those of the float64 reference, in every layout and piece count it accepts;
every call it does not accept takes the pre-hook path, with the same guarantees.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

import bn_inspect.engine.capture as capture
import bn_inspect.engine.moments as moments
from bn_inspect.engine.capture import StatisticsRecorder, hooks_capture
from bn_inspect.engine.cpu_batch_norm import cpu_pass_applies
from bn_inspect.model.layers import iter_norm_layers
from tests.models import make_input


def reference(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """float64 mean and biased variance over every axis but 1, computed by numpy."""
    values = np.moveaxis(x.double().numpy(), 1, 0).reshape(x.shape[1], -1)
    return values.mean(axis=1), values.var(axis=1)


def make_norm(rank: int, channels: int, *, affine: bool = True, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A batch norm with running statistics and affine terms far from their defaults, in eval mode."""
    kind = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[rank]
    module = kind(channels, affine=affine).to(dtype)
    generator = torch.Generator().manual_seed(rank)
    with torch.no_grad():
        module.running_mean.copy_(torch.randn(channels, generator=generator))
        module.running_var.copy_(torch.rand(channels, generator=generator) + 0.1)
        if affine:
            module.weight.copy_(torch.randn(channels, generator=generator))
            module.bias.copy_(torch.randn(channels, generator=generator))
    return module.eval()


def captured(module: nn.Module, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], StatisticsRecorder]:
    recorder = StatisticsRecorder()
    outputs = []
    with torch.no_grad(), hooks_capture(iter_norm_layers(module), recorder):
        for x in batches:
            recorder.start_batch()
            outputs.append(module(x))
    return outputs, recorder


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in module.state_dict().items()}


def assert_same_state(before: dict[str, torch.Tensor], module: nn.Module) -> None:
    after = module.state_dict()
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name


def assert_moments(recorder: StatisticsRecorder, x: torch.Tensor, *, rtol: float = 1e-5) -> None:
    (record,) = recorder.records.values()
    ref_mean, ref_var = reference(x)
    assert record.moments is not None
    assert record.moments.count == x.numel() // x.shape[1]
    np.testing.assert_allclose(record.moments.mean.numpy(), ref_mean, rtol=1e-7, atol=np.sqrt(ref_var).max() * 1e-6)
    np.testing.assert_allclose(record.moments.biased_var().numpy(), ref_var, rtol=rtol, atol=1e-30)


LAYOUTS = [
    ((64, 16), None),
    ((7, 5, 33), None),
    ((9, 6, 17, 19), None),
    ((9, 6, 17, 19), torch.channels_last),
    ((3, 4, 5, 6, 7), None),
    ((3, 4, 5, 6, 7), torch.channels_last_3d),
]


@pytest.mark.parametrize(("shape", "memory_format"), LAYOUTS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("piece_bytes", [1 << 22, 64], ids=["one-piece", "a-piece-per-sample"])
def test_output_and_buffers_are_bitwise_the_plain_forward(
    monkeypatch: pytest.MonkeyPatch,
    shape: tuple[int, ...],
    memory_format: torch.memory_format | None,
    dtype: torch.dtype,
    affine: bool,
    piece_bytes: int,
) -> None:
    monkeypatch.setattr(moments, "CPU_PIECE_BYTES", piece_bytes)
    module = make_norm(len(shape), shape[1], affine=affine, dtype=dtype)
    x = make_input(shape, mean=2.0, std=3.0).to(dtype)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    with torch.no_grad():
        assert cpu_pass_applies(module, x)
        expected = module(x)
    before = state(module)
    (output,), recorder = captured(module, [x])
    assert torch.equal(output, expected)
    assert output.stride() == expected.stride()
    assert_same_state(before, module)
    assert "forward" not in vars(module)
    assert_moments(recorder, x)


def test_the_pass_runs_for_stock_eval_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    original = capture.cpu_batch_norm
    monkeypatch.setattr(capture, "cpu_batch_norm", lambda *a: (calls.append(1), original(*a))[1])
    module = make_norm(4, 3)
    captured(module, [make_input((4, 3, 5, 5))])
    assert calls == [1]


def test_batches_merge_to_the_statistics_of_all_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(moments, "CPU_PIECE_BYTES", 1024)
    module = make_norm(4, 6)
    batches = [make_input((n, 6, 7, 9), mean=5.0, std=0.5, seed=n) for n in (3, 1, 8, 2)]
    with torch.no_grad():
        expected = [module(x) for x in batches]
    outputs, recorder = captured(module, batches)
    assert all(torch.equal(a, b) for a, b in zip(outputs, expected, strict=True))
    assert_moments(recorder, torch.cat(batches))


def test_an_outlier_shift_falls_back_to_the_exact_moments_and_keeps_the_output() -> None:
    # The first value of each channel is the shift; a 1e4-sigma outlier there defeats the shifted sums.
    module = make_norm(4, 3)
    x = make_input((16, 3, 8, 8), mean=5.0, std=1e-3)
    x[0, :, 0, 0] = 1e2
    with torch.no_grad():
        expected = module(x)
    (output,), recorder = captured(module, [x])
    assert torch.equal(output, expected)
    assert_moments(recorder, x)


def test_constant_and_nan_channels_keep_their_statistics() -> None:
    module = make_norm(4, 3)
    x = make_input((4, 3, 5, 5))
    x[:, 0] = 7.25
    x[:, 2] = float("nan")
    with torch.no_grad():
        expected = module(x)
    (output,), recorder = captured(module, [x])
    torch.testing.assert_close(output, expected, rtol=0, atol=0, equal_nan=True)
    (record,) = recorder.records.values()
    assert record.moments is not None
    assert record.moments.mean[0].item() == 7.25 and record.moments.biased_var()[0].item() == 0.0
    assert torch.isnan(record.moments.mean[2]) and torch.isnan(record.moments.biased_var()[2])


def _train(module: nn.Module) -> nn.Module:
    return module.train()


def _as_is(module: nn.Module) -> nn.Module:
    return module


@pytest.mark.parametrize(
    ("case", "prepare", "convert"),
    [
        ("train mode", _train, lambda x: x),
        ("bfloat16", lambda m: m.to(torch.bfloat16), lambda x: x.to(torch.bfloat16)),
        ("strided input", _as_is, lambda x: x.transpose(2, 3)),
        ("bfloat16 input, float32 layer", _as_is, lambda x: x.to(torch.bfloat16)),
    ],
)
def test_calls_the_pass_does_not_take_run_the_pre_hook_path(
    case: str, prepare: Callable[[nn.Module], nn.Module], convert: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    module = prepare(make_norm(4, 3))
    x = convert(make_input((6, 3, 5, 7), mean=1.0, std=2.0))
    with torch.no_grad():
        assert not cpu_pass_applies(module, x), case
    plain = prepare(make_norm(4, 3))
    with torch.no_grad():
        expected = plain(x)
    (output,), recorder = captured(module, [x])
    assert torch.equal(output, expected)
    assert_same_state(state(plain), module)
    assert_moments(recorder, x)


def test_autograd_through_a_trainable_layer_takes_the_pre_hook_path() -> None:
    module = make_norm(4, 3)
    x = make_input((4, 3, 5, 5)).requires_grad_()
    assert not cpu_pass_applies(module, x)
    recorder = StatisticsRecorder()
    with hooks_capture(iter_norm_layers(module), recorder):
        recorder.start_batch()
        module(x).sum().backward()
    assert x.grad is not None and module.weight.grad is not None
    assert_moments(recorder, x.detach())
