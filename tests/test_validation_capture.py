"""The train/eval gap at a validation run: each layer's eval-mode statistics over the run, against a float64 reference."""

from __future__ import annotations

import copy
import hashlib
import math

import numpy as np
import pytest
import torch
from torch import nn

from bn_inspect.engine.validation_capture import ValidationCapture
from bn_inspect.report.departure import allowance
from tests import models


def _state_hash(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _inputs_of(model: nn.Module, batches: list[torch.Tensor]) -> dict[tuple[str, int], list[torch.Tensor]]:
    """Each BatchNorm call's input per batch, taken by the test's own hooks (in float64)."""
    seen: dict[tuple[str, int], list[torch.Tensor]] = {}
    counts: dict[str, int] = {}

    def make(name: str):  # type: ignore[no-untyped-def]
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            call = counts.get(name, 0)
            counts[name] = call + 1
            seen.setdefault((name, call), []).append(args[0].detach().double().clone())

        return hook

    handles = [
        m.register_forward_pre_hook(make(n))
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    with torch.no_grad():
        for batch in batches:
            counts.clear()
            model(batch)
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize(
    ("model", "shape"),
    [
        (models.ConvBN2d(), (5, 3, 6, 7)),
        (models.SharedBN(), (5, 3, 4, 4)),
        (models.BN1dSequence(), (5, 6, 9)),
        (models.BN3dVolume(), (2, 3, 3, 4, 2)),
    ],
    ids=["conv-bn2d", "shared-bn", "bn1d-sequence", "bn3d"],
)
@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float32, 1e-6), (torch.float64, 1e-11)], ids=["f32", "f64"])
def test_each_calls_statistics_and_departure_match_a_float64_reference(
    model: nn.Module, shape: tuple[int, ...], dtype: torch.dtype, rtol: float
) -> None:
    model = copy.deepcopy(models.randomize_norm_state(model)).to(dtype).eval()
    generator = torch.Generator().manual_seed(3)
    # Large means and small spreads, in batches of unequal size.
    batches = [(torch.randn((n, *shape[1:]), generator=generator) * 0.05 + 40.0).to(dtype) for n in (shape[0], 3, 7)]
    reference = _inputs_of(model, batches)
    before = _state_hash(model)
    capture = ValidationCapture(model)
    with capture, torch.no_grad():
        outputs = []
        for batch in batches:
            capture.start_batch()
            outputs.append(model(batch))
    assert _state_hash(model) == before
    with torch.no_grad():
        assert all(torch.equal(out, model(batch)) for out, batch in zip(outputs, batches, strict=True))
    calls = capture.calls()
    assert [(c.layer, c.call) for c in calls] == list(reference)
    for found in calls:
        values = torch.cat(reference[found.layer, found.call])
        dims = [0, *range(2, values.dim())]
        mean = values.mean(dim=dims).numpy()
        var = values.var(dim=dims, unbiased=False).numpy()
        # The sums run in float32 on float32 input (engine/moments.py): float32 rounding there.
        np.testing.assert_allclose(found.batch_mean, mean, rtol=rtol)
        np.testing.assert_allclose(found.batch_var, var, rtol=rtol * 10)
        module = dict(model.named_modules())[found.layer]
        running_mean = module.running_mean.double().numpy()
        running_var = module.running_var.double().numpy()
        assert found.samples == sum(b.shape[0] for b in batches) and found.nonfinite == 0
        distance = np.hypot(mean - running_mean, np.sqrt(var + module.eps) - np.sqrt(running_var + module.eps))
        expected = float(np.mean(distance / np.sqrt(running_var + module.eps))) / allowance(found.samples)
        assert found.departure() == pytest.approx(expected, rel=rtol * 10)


def test_nonfinite_inputs_are_counted_and_leave_no_score() -> None:
    model = models.randomize_norm_state(models.ConvBN2d()).eval()
    batch = torch.randn(4, 3, 5, 5)
    batch[1, 0, 2, 2] = math.nan
    capture = ValidationCapture(model)
    with capture, torch.no_grad():
        capture.start_batch()
        model(batch)
    first = capture.calls()[0]
    # conv1 spreads the one NaN over its 3x3 neighbourhood in all 8 output channels.
    assert first.nonfinite == 8 * 9
    assert first.departure() is None


def test_the_hooks_are_gone_after_the_block_even_when_validation_raises() -> None:
    model = models.ConvBN2d().eval()
    with pytest.raises(RuntimeError, match="validation failed"), ValidationCapture(model):
        raise RuntimeError("validation failed")
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_a_validation_run_is_a_validation_sample_and_a_gap_per_layer_the_largest_over_its_calls() -> None:
    from bn_inspect.analyses.watch_validation import validation_records

    model = models.randomize_norm_state(models.SharedBN()).eval()
    capture = ValidationCapture(model)
    with capture, torch.no_grad():
        for seed in range(2):
            capture.start_batch()
            model(torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(seed)) * 2 + 1)
    calls = capture.calls()
    sample, gap = validation_records(40, 0, calls)
    assert sample["record"] == "sample" and sample["phase"] == "validation" and sample["step"] == 40
    entries = sample["layers"]
    assert isinstance(entries, list)
    assert [(e["layer"], e["call"], e["training"], e["params_changed"]) for e in entries] == [
        ("bn", 0, False, False),
        ("bn", 1, False, False),
    ]
    scores = [c.departure() for c in calls]
    assert gap["gap"] == {
        "layers": [{"layer": "bn", "departure": pytest.approx(max(s for s in scores if s is not None), rel=1e-5)}],
        "largest": {"layer": "bn", "departure": pytest.approx(max(s for s in scores if s is not None), rel=1e-5)},
    }
    assert validation_records(40, 0, []) == []
