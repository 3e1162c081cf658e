"""Results of every kind to draw as HTML pages: from a model whose layer names are hostile, and a ResNet-50-sized report.

Shared by tests/test_html.py, tests/test_html_browser.py and the HTML benchmark.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from dataclasses import dataclass

import torch
from torch import nn

import bn_inspect
from bn_inspect.report.comparisons import ModeComparison, RecalibrationResult
from bn_inspect.report.diff import DiffReport, diff_reports
from bn_inspect.report.findings import CheckReport
from bn_inspect.report.records import InputInfo, LayerReport, ModelInfo, Report
from bn_inspect.text import Untrusted

# Layer names are user data: each tries to become markup, end a script block, or move the terminal.
HOSTILE_NAMES = (
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(2)>',
    "</script><script>alert(3)</script>",
    "a&amp;b\u2028'\x1b[2J<!--",
)


class HostileNet(nn.Module):
    """BatchNorm2d layers registered under hostile names, applied in order."""

    def __init__(self) -> None:
        super().__init__()
        for name in HOSTILE_NAMES:
            self._modules[name] = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in HOSTILE_NAMES:
            x = self._modules[name](x)  # type: ignore[misc]
        return x


@dataclass(frozen=True)
class HostileResults:
    """One result of each kind that has a page, all from HostileNet."""

    report: Report
    check: CheckReport
    comparison: ModeComparison
    recalibration: RecalibrationResult
    diff: DiffReport


def hostile_results() -> HostileResults:
    """Inspect, check, compare-modes and recalibrate HostileNet on shifted data (its layers depart)."""
    torch.manual_seed(0)
    model = HostileNet().eval()
    batches = [torch.randn(8, 4, 5, 5) * 3 + 2 for _ in range(3)]
    info = ModelInfo.of("<b>hostile</b>.pt", "pickle")
    report = bn_inspect.inspect_model(model, batches, model_info=info, input_source="<i>data</i>.npy")
    check = bn_inspect.check_model(model, batches, model_info=info)
    comparison = bn_inspect.compare_modes(model, batches)
    recalibration = bn_inspect.recalibrate(copy.deepcopy(model), batches)
    # Against the model on other data and without its last layer: changed layers and a removed one.
    other = bn_inspect.inspect_model(model, [b * 2 for b in batches], model_info=info, input_source="<i>other</i>.npy")
    diff = diff_reports(report, dataclasses.replace(other, layers=other.layers[:-1]))
    return HostileResults(report, check, comparison, recalibration, diff)


def resnet50_channels() -> list[tuple[int, int, int]]:
    """(channels, height, width) of every BatchNorm2d of a ResNet-50 on 224×224 input, in execution order."""
    layers = [(64, 112, 112)]
    size = 56
    for stage, (width, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3))):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append((width, size, size))
            size_after = size // stride
            layers.append((width, size_after, size_after))
            layers.append((width * 4, size_after, size_after))
            if block == 0:
                layers.append((width * 4, size_after, size_after))
            size = size_after
    return layers


def resnet50_report(batch: int = 8) -> Report:
    """A report shaped as a ResNet-50 inspection (53 BatchNorm2d, 26,560 channels), with seeded values."""
    draw = random.Random(0)
    layers = []
    for index, (channels, height, width) in enumerate(resnet50_channels()):
        values = batch * height * width

        def floats(low: float, high: float, count: int = channels) -> tuple[float, ...]:
            return tuple(draw.uniform(low, high) for _ in range(count))

        layers.append(
            LayerReport(
                name=Untrusted(f"layer{index // 10}.{index % 10}.bn{index % 3 + 1}"),
                call=0,
                type=Untrusted("BatchNorm2d"),
                family="batch",
                num_channels=channels,
                input_shape=(batch, channels, height, width),
                axis_names=("N", "C", "H", "W"),
                reduced_axes=(0, 2, 3),
                values_per_channel=values,
                eps=1e-5,
                momentum=0.1,
                affine=True,
                track_running_stats=True,
                num_batches_tracked=1000,
                normalizes_with="running",
                batch_mean=floats(-2, 2),
                batch_var=floats(0.01, 4),
                batch_var_unbiased=floats(0.01, 4),
                running_mean=floats(-1, 1),
                running_var=floats(0.05, 2),
                weight=floats(0.5, 1.5),
                bias=floats(-0.5, 0.5),
                explanation=Untrusted(
                    f"layer{index} (BatchNorm2d) got ({batch}, {channels}, {height}, {width}) = (N, C, H, W): "
                    f"{channels} means and {channels} variances, each over N×H×W = {values:,} values."
                ),
            )
        )
    data = InputInfo(Untrusted("val.npy"), (batch, 3, 224, 224), Untrusted("float32"), 4, 4 * batch)
    return Report(
        ModelInfo.of("resnet50.pt", "pickle"),
        data,
        Untrusted("eval"),
        Untrusted("cpu"),
        tuple(layers),
        torch_version=Untrusted("2.13.0"),
    )
