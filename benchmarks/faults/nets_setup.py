"""The benchmark's nets: architecture, data, input pipeline and how each is trained."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from benchmarks.faults.data import Pipeline, Split, fitted_pipeline, load_cancer, load_digits
from benchmarks.faults.nets import DigitsResNet
from sample_models.architectures import CancerMLP, DigitsCNN


@dataclass
class Net:
    """One trained net and what the cases need to know about it."""

    name: str
    arch: str
    arch_kwargs: dict[str, Any]
    head: str
    raw: Split
    pipeline: Pipeline | None  # None: table features go in as they are
    epochs: int
    batch_size: int
    is_image: bool
    trained: nn.Module | None = field(default=None, repr=False)

    def build(self) -> nn.Module:
        attr = self.arch.rpartition(":")[2]
        return ARCHITECTURES[attr](**self.arch_kwargs)

    def prep(self, raw: np.ndarray) -> np.ndarray:
        return raw.astype(np.float32) if self.pipeline is None else self.pipeline.apply(raw)

    def cli_model_args(self) -> list[str]:
        return ["--arch", self.arch, "--arch-kwargs", json.dumps(self.arch_kwargs)]

    @property
    def x_train(self) -> np.ndarray:
        return self.prep(self.raw.x_train)

    @property
    def x_test(self) -> np.ndarray:
        return self.prep(self.raw.x_test)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "DigitsCNN": DigitsCNN,
    "DigitsResNet": DigitsResNet,
    "CancerMLP": CancerMLP,
}


def make_nets(seed: int, *, smoke: bool) -> list[Net]:
    """The nets of a run; --smoke keeps the shipped DigitsCNN architecture only, trained briefly."""
    digits = load_digits()
    cnn = Net("digits_cnn", "sample_models.architectures:DigitsCNN", {}, "classifier", digits, Pipeline(), 20, 64, True)
    if smoke:
        cnn.epochs = 4
        return [cnn]
    resnet_kwargs = {"in_channels": 1}
    colour_kwargs = {"in_channels": 3}
    arch = "benchmarks.faults.nets:DigitsResNet"
    return [
        cnn,
        Net(
            "digits_resnet",
            arch,
            resnet_kwargs,
            "fc",
            digits,
            fitted_pipeline(digits.x_train, is_colour=False),
            15,
            64,
            True,
        ),
        Net(
            "digits_rgb_resnet",
            arch,
            colour_kwargs,
            "fc",
            digits,
            fitted_pipeline(digits.x_train, is_colour=True),
            15,
            64,
            True,
        ),
        Net("cancer_mlp", "sample_models.architectures:CancerMLP", {}, "net.7", load_cancer(seed), None, 80, 16, False),
    ]
