"""Warnings raised while a run executes (by torch or the model's own code) reach stderr as bn-inspect's lines."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tests.helpers import assert_one_error_line, invoke

MODEL_SOURCE = """
import warnings

from torch import nn


class Warns(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        # Built with 4 features but fed 3 channels: PyTorch warns on every call and normalizes anyway.
        self.norm = nn.InstanceNorm1d(4)

    def forward(self, x):
        warnings.warn("the model says\\nthis twice", UserWarning)
        warnings.warn("the model says\\nthis twice", UserWarning)
        return self.norm(self.bn(x)[:, :3])


def build():
    return Warns()
"""


@pytest.fixture
def warning_model(tmp_path: Path) -> tuple[Path, Path]:
    source = tmp_path / "warns.py"
    source.write_text(MODEL_SOURCE)
    weights = tmp_path / "weights.pt"
    torch.manual_seed(0)
    module = nn.Module()
    module.bn = nn.BatchNorm1d(4)
    torch.save(module.state_dict(), weights)
    return source, weights


def test_each_warning_is_one_line_with_its_count(
    capsys: pytest.CaptureFixture[str], warning_model: tuple[Path, Path]
) -> None:
    source, weights = warning_model
    result = invoke(capsys, ["inspect", weights, "--arch", f"{source}:build", "--shape", "8,4,5", "--batches", "3"])
    assert result.code == 0, result.err
    lines = result.err.splitlines()
    own = [line for line in lines if line.startswith("warning from torch or the model's code")]
    assert own, result.err
    # The model's two-line message arrives as one line, said once with how often it was raised.
    assert "(UserWarning, 6 times): the model says this twice" in result.err
    # PyTorch's own warning about the InstanceNorm, with no source path or code line after it.
    assert any("does not match num_features" in line for line in own), result.err
    assert "warnings.warn" not in result.err and ".py:" not in result.err


def test_a_failed_run_prints_only_its_error(
    capsys: pytest.CaptureFixture[str], warning_model: tuple[Path, Path]
) -> None:
    source, weights = warning_model
    # Two features where the model's BatchNorm takes four: the forward fails after nothing warned usefully.
    result = invoke(capsys, ["inspect", weights, "--arch", f"{source}:build", "--shape", "8,2,5"])
    assert result.code == 2
    assert_one_error_line(result)
