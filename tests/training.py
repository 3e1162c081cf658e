"""Small real training runs for the watch's tests: a digits net trained on the shipped digits, faults planted by callbacks."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers import DIGITS


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The shipped training digits: (1347, 1, 8, 8) float32 in [0, 1], and their labels."""
    images = torch.from_numpy(np.load(DIGITS / "train_images.npy"))
    labels = torch.from_numpy(np.load(DIGITS / "train_labels.npy"))
    return images, labels


class DigitsNet(nn.Module):
    """Two conv blocks with BatchNorm2d (bn1, bn2) and a BatchNorm1d head (bn3)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16 * 4 * 4, 32, bias=False)
        self.bn3 = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.fc1(x.flatten(1))))
        return self.fc2(x)


class TwiceNet(nn.Module):
    """One BatchNorm2d called twice per forward, before and after a convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.lift = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = F.relu(self.bn(self.lift(x)))
        return self.fc(x.flatten(1))


Callback = Callable[[int, nn.Module, torch.Tensor], torch.Tensor]


def batches(batch_size: int, steps: int, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` batches of the digits in a seeded order, reshuffled each epoch."""
    images, labels = digits()
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=generator)
    position = 0
    for _ in range(steps):
        if position + batch_size > len(order):
            order, position = torch.randperm(len(images), generator=generator), 0
        index = order[position : position + batch_size]
        position += batch_size
        yield images[index], labels[index]


def train(
    model: nn.Module,
    steps: int,
    *,
    batch_size: int = 32,
    lr: float = 0.05,
    seed: int = 0,
    before_step: Callback | None = None,
    autocast: bool = False,
    channels_last: bool = False,
) -> None:
    """Train ``model`` with SGD on the digits for ``steps`` steps; ``before_step(step, model, x)`` may plant a fault."""
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    model.train()
    for step, (x, y) in enumerate(batches(batch_size, steps, seed)):
        if before_step is not None:
            x = before_step(step, model, x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def new_net(seed: int = 0, cls: type[nn.Module] = DigitsNet) -> nn.Module:
    torch.manual_seed(seed)
    return cls()


def records(path: Path) -> list[dict[str, Any]]:
    """Every line of a timeline, parsed."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def events(path: Path) -> list[tuple[int, str, str | None]]:
    """(step, code, layer) of every event in a timeline."""
    return [(r["step"], r["code"], r["layer"]) for r in records(path) if r["record"] == "event"]


HALF_ULP = 2.0**-24
# What the update's own roundings add to the half ulp of the stored buffers (the docstring's
# "a few times that"): the kernel rounds (1 - f) running, f batch and their sum.
ROUNDINGS = 4.0
# The layer's own float32 reduction against the float64 reference: a variance of data whose mean is
# 5e4 standard deviations from zero keeps about 4 digits (input_statistics' tolerance too).
MEAN_RTOL, VAR_RTOL = 2e-6, 2e-4


def assert_read_back(
    x: torch.Tensor,
    detail: dict[str, object],
    old: tuple[np.ndarray, np.ndarray],
    new: tuple[np.ndarray, np.ndarray],
    factor: float,
) -> None:
    """A sampled call's statistics read back from the update (``old`` and ``new`` its running buffers) against
    a float64 reference of its input ``x``, to engine/watch_statistics.py's tolerance."""
    values = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    mean, var = values.mean(1).numpy(), values.var(1, unbiased=False).numpy()
    mean_bound = ROUNDINGS * HALF_ULP * np.maximum(np.abs(old[0]), np.abs(new[0])) / factor
    var_bound = ROUNDINGS * HALF_ULP * np.maximum(np.abs(old[1]), np.abs(new[1])) / factor
    assert np.all(np.abs(np.asarray(detail["batch_mean"]) - mean) <= mean_bound + MEAN_RTOL * np.abs(mean).max())
    assert np.all(np.abs(np.asarray(detail["batch_var"]) - var) <= var_bound + VAR_RTOL * var)
    # The timeline keeps 7 significant digits.
    np.testing.assert_allclose(detail["running_mean"], new[0], rtol=1e-6)
    np.testing.assert_allclose(detail["running_var"], new[1], rtol=1e-6)
