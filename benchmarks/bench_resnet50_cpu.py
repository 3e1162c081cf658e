"""Capture overhead on a ResNet-50-sized network (53 BatchNorm2d) at batch 16x3x224x224 on the CPU.

Run from the repository root: ``python benchmarks/bench_resnet50_cpu.py [--pairs N]``. The model is
ResNet-50's architecture (bottleneck blocks 3-4-6-3) built here, so torchvision is not needed.
Each pair runs a plain eval forward and the same forward under bn-inspect's hooks back to back,
alternating the order; the figure is the median ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bn_inspect.engine.capture import StatisticsRecorder, hooks_capture
from bn_inspect.model.layers import iter_norm_layers


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.down(x))


def resnet50() -> nn.Module:
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    ]
    cin = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for index in range(blocks):
            layers.append(Bottleneck(cin, width, stride if index == 0 else 1))
            cin = width * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1000)]
    return nn.Sequential(*layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = resnet50().eval()
    x = torch.randn(16, 3, 224, 224)
    layers = iter_norm_layers(model)

    def plain() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model(x)
        return time.perf_counter() - start

    def captured() -> float:
        recorder = StatisticsRecorder()
        start = time.perf_counter()
        with torch.no_grad(), hooks_capture(layers, recorder):
            recorder.start_batch()
            model(x)
        return time.perf_counter() - start

    plain(), captured()
    ratios, plains = [], []
    for index in range(args.pairs):
        if index % 2:
            base, hooked = plain(), captured()
        else:
            hooked, base = captured(), plain()
        ratios.append(hooked / base)
        plains.append(base)
    quartiles = statistics.quantiles(ratios, n=4)
    print(
        f"{len(layers)} BatchNorm2d, batch 16x3x224x224, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"plain forward median {statistics.median(plains) * 1e3:.0f} ms")
    print(
        f"capture / plain: median {statistics.median(ratios):.3f} (IQR {quartiles[0]:.3f}-{quartiles[2]:.3f}), "
        f"min {min(ratios):.3f}, over {args.pairs} alternating pairs"
    )


if __name__ == "__main__":
    main()
