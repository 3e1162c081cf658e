"""The fused eval batch-norm kernel (bn_inspect/engine/fused/dispatch.py), run by Triton's interpreter on the CPU.

Triton comes with the test extra on Linux x86-64; elsewhere these tests skip.
benchmarks/gpu_check.py runs the same checks on the compiled kernels on a GPU.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")

CHECK = r"""
import hashlib, torch
from torch import nn
import bn_inspect.engine.capture as capture
import bn_inspect.engine.fused.dispatch as fused
from bn_inspect.analyses.inspection import inspect_model

calls = []
original = capture.batch_norm_eval_with_moments
capture.batch_norm_eval_with_moments = lambda *a: (calls.append(1), original(*a))[1]

def state_hash(model):
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode()); digest.update(tensor.detach().double().numpy().tobytes())
    return digest.hexdigest(), [m.training for m in model.modules()], [sorted(vars(m)) for m in model.modules()]

torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(3, 130, 3), nn.BatchNorm2d(130), nn.ReLU(),
    nn.Conv2d(130, 8, 3), nn.BatchNorm2d(8, affine=False),
    nn.Flatten(1), nn.Linear(8 * 6 * 6, 10), nn.BatchNorm1d(10),
)
with torch.no_grad():
    for _ in range(3):
        model(torch.randn(16, 3, 10, 10) * 3 + 5)
model.eval()
# Large means, tiny spread, uneven batches, both layouts.
batches = [torch.randn(5, 3, 10, 10) * 1e-3 + 1e3, torch.randn(1, 3, 10, 10) * 1e-3 + 1e3,
           (torch.randn(7, 3, 10, 10) * 1e-3 + 1e3).to(memory_format=torch.channels_last)]
before = state_hash(model)
seen = {}
hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, []).append(a[0].double()))
         for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
report = inspect_model(model, batches)
for h in hooks:
    h.remove()
assert state_hash(model) == before, "model changed"
assert len(calls) == 9, calls
for layer in report.layers:
    values = torch.cat([t.transpose(0, 1).reshape(t.shape[1], -1) for t in seen[layer.name.raw]], 1)
    mean, var = values.mean(1), values.var(1, unbiased=False)
    assert layer.values_per_channel == values.shape[1]
    mean_err = ((torch.tensor(layer.batch_mean, dtype=torch.float64) - mean).abs() / var.sqrt()).max().item()
    var_err = ((torch.tensor(layer.batch_var, dtype=torch.float64) - var).abs() / var).max().item()
    assert mean_err < 1e-5 and var_err < 1e-5, (layer.name, mean_err, var_err)
    unbiased = values.var(1, unbiased=True)
    assert ((torch.tensor(layer.batch_var_unbiased, dtype=torch.float64) - unbiased).abs() / unbiased).max() < 1e-5

# The output is torch's eval batch norm up to float32 rounding, in the input's memory format.
bn = model[1]
with torch.no_grad():
    x = model[0](batches[2])
with torch.no_grad():
    y, moments = fused.batch_norm_eval_with_moments(bn, x, None)
    expected = nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
assert y.stride() == x.stride()
assert (y - expected).abs().max() <= 4 * expected.abs().max() * 2**-23
# A constant channel has variance exactly 0, an infinite value gives an infinite mean and NaN var.
x = torch.randn(4, 130, 3, 3)
x[:, 5] = 7.0
x[1, 9, 0, 0] = float("inf")
with torch.no_grad():
    _, moments = fused.batch_norm_eval_with_moments(bn, x, None)
assert moments.biased_var()[5] == 0 and moments.mean[5] == 7.0
assert moments.mean[9] == float("inf") and moments.biased_var()[9].isnan()
# Train mode and autograd take the portable path.
assert not fused.fused_applies(model.train()[1], x)
model.eval()

# Sequential recalibration plans its waves from a trace of torch ops, which cannot see inside the
# kernel: it must give what the portable path gives.
import copy
from bn_inspect.analyses.recalibration import recalibrate
results = {}
compiled = fused._kernels
for use_fused in (True, False):
    fused._kernels = compiled if use_fused else (lambda: None)
    copied = copy.deepcopy(model)
    result = recalibrate(copied, batches, method="sequential")
    results[use_fused] = ([layer.wave for layer in result.layers], copied.state_dict())
fused_waves, fused_state = results[True]
plain_waves, plain_state = results[False]
assert fused_waves == plain_waves == [0, 1, 2], (fused_waves, plain_waves)
for key in plain_state:
    assert torch.allclose(fused_state[key].double(), plain_state[key].double(), rtol=1e-5, atol=1e-6), key
print("ok")
"""


def test_fused_kernel_matches_float64_and_leaves_the_model_unchanged() -> None:
    path = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", CHECK], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
