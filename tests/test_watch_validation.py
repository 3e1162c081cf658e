"""watch.validation(): a validation run's sample (phase "validation") and train/eval gap, against a float64 reference."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import bn_inspect
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

    def make(name: str) -> Any:
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
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_the_validation_sample_and_gap_match_a_float64_reference(
    model: nn.Module, shape: tuple[int, ...], dtype: torch.dtype, tmp_path: Path
) -> None:
    model = copy.deepcopy(models.randomize_norm_state(model)).to(dtype)
    generator = torch.Generator().manual_seed(3)
    path = tmp_path / "bn-watch.jsonl"
    # Large means and small spreads, in batches of unequal size.
    batches = [(torch.randn((n, *shape[1:]), generator=generator) * 0.05 + 4.0).to(dtype) for n in (shape[0], 3, 7)]
    with bn_inspect.watch(model, path, every=1) as watch:
        model.train()
        with torch.no_grad():
            model(torch.randn(shape, generator=generator).to(dtype))
        model.eval()
        reference = _inputs_of(model, batches)
        before = _state_hash(model)
        with watch.validation(), torch.no_grad():
            for batch in batches:
                model(batch)
        assert _state_hash(model) == before
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    sample = next(r for r in records if r["record"] == "sample" and r["phase"] == "validation")
    gap = next(r for r in records if r["record"] == "validation")
    assert [(e["layer"], e["call"]) for e in sample["layers"]] == list(reference)
    largest: dict[str, float] = {}
    for entry in sample["layers"]:
        values = torch.cat(reference[entry["layer"], entry["call"]])
        dims = [0, *range(2, values.dim())]
        mean, var = values.mean(dim=dims).numpy(), values.var(dim=dims, unbiased=False).numpy()
        module = dict(model.named_modules())[entry["layer"]]
        running_mean, running_var = module.running_mean.double().numpy(), module.running_var.double().numpy()
        std = np.sqrt(running_var + module.eps)
        distance = np.hypot(mean - running_mean, np.sqrt(var + module.eps) - std) / std
        expected = float(np.mean(distance)) / allowance(sum(b.shape[0] for b in batches))
        # The timeline writes six significant digits.
        assert entry["departure"] == pytest.approx(expected, rel=2e-5)
        assert entry["mean_shift_max"] == pytest.approx(float(np.max(np.abs(mean - running_mean) / std)), rel=2e-5)
        assert entry["var_ratio_max"] == pytest.approx(float(np.max(var / running_var)), rel=2e-5)
        assert entry["values_per_channel"] == values.numel() // values.shape[1]
        assert not entry["training"] and not entry["params_changed"]
        largest[entry["layer"]] = max(largest.get(entry["layer"], 0.0), expected)
    assert {layer["layer"]: layer["departure"] for layer in gap["gap"]["layers"]} == pytest.approx(largest, rel=2e-5)
    assert sample["step"] == gap["step"] == 0
