"""Shared fixtures: the golden-file and README switches and a hash of everything inspection must not change."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden", action="store_true", default=False, help="Rewrite tests/golden/*.txt from current output."
    )
    parser.addoption(
        "--update-readme",
        action="store_true",
        default=False,
        help="Rewrite the README's $ bn-inspect console blocks from current output (tests/test_readme_outputs.py).",
    )


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-golden"))


@pytest.fixture
def update_readme(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-readme"))


def state_fingerprint(model: nn.Module) -> str:
    """Hash of every parameter and buffer (bytes, dtype, shape), every training flag and hook count."""
    digest = hashlib.sha256()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        digest.update(f"{name}:{type(tensor).__name__}".encode())
        if isinstance(tensor, (nn.parameter.UninitializedParameter, nn.parameter.UninitializedBuffer)):
            continue
        digest.update(str((tensor.dtype, tuple(tensor.shape))).encode())
        if tensor.numel():
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    for name, module in model.named_modules():
        digest.update(f"{name}:{type(module).__name__}:{module.training}".encode())
        if not isinstance(module, torch.jit.ScriptModule):
            hooks = len(module._forward_pre_hooks) + len(module._forward_hooks)
            digest.update(f"hooks={hooks}".encode())
    return digest.hexdigest()
