"""Time ``recalibrate`` with the sequential and precise methods on chains of BatchNorm1d layers, and on ResNet-50.

A chain of L layers (BatchNorm1d, C channels) has L waves: every layer depends on the one before
it. The sequential method's wave passes resume from activations held by the passes before, so its
time per layer should stay flat as L grows; rerunning the layers upstream of every wave would make
it grow linearly with L. Two layouts: the model itself an ``nn.Sequential`` (``root``), and the
chain in an attribute called from a custom forward (``inside``, as most models hold their layers).
Precise (one train-mode pass plus the verification) is the linear reference; each figure is also
given as a multiple of one plain eval forward over the same batches.

``--resnet50`` adds ResNet-50's architecture called through a custom forward
(``bench_recalibration_methods.CustomForwardResNet50``), 4 batches of 8x3x64x64.

Each (layout, depth, method) is timed on a fresh copy of the model, in the same process, after
one warm-up run on the smallest chain. Run from the repository root:

    python benchmarks/bench_sequential.py [--depths 250 500 1000 2000] [--layouts root inside]
        [--channels 8] [--batches 4] [--batch-size 16] [--threads T] [--resnet50] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bn_inspect.analyses.recalibration import recalibrate  # noqa: E402


class Inside(nn.Module):
    """The chain in an attribute, called from a custom forward: no resuming at the model's own stages."""

    def __init__(self, layers: nn.Sequential) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # type: ignore[no-any-return]


def build_chain(depth: int, channels: int) -> nn.Sequential:
    """``depth`` BatchNorm1d layers in a row, with running statistics far from the data's."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.BatchNorm1d(channels) for _ in range(depth)])
    with torch.no_grad():
        for layer in model:
            layer.running_mean.uniform_(-1.0, 1.0)  # type: ignore[operator]
            layer.running_var.uniform_(0.5, 2.0)  # type: ignore[operator]
    return model.eval()


def make_batches(num_batches: int, batch_size: int, channels: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(batch_size, channels, generator=generator) * 3.0 + 1.0 for _ in range(num_batches)]


def build(layout: str, depth: int, channels: int) -> nn.Module:
    chain = build_chain(depth, channels)
    return chain if layout == "root" else Inside(chain).eval()


def time_method(model: nn.Module, batches: list[torch.Tensor], method: str) -> tuple[float, int]:
    work = copy.deepcopy(model)
    start = time.perf_counter()
    result = recalibrate(work, batches, method=method)
    return time.perf_counter() - start, result.num_passes


def time_plain(model: nn.Module, batches: list[torch.Tensor]) -> float:
    """One eval forward over all batches, the best of three (a short run is noisy on a shared machine)."""
    best = float("inf")
    with torch.no_grad():
        for _ in range(3):
            start = time.perf_counter()
            for batch in batches:
                model(batch)
            best = min(best, time.perf_counter() - start)
    return best


def resnet50_row() -> dict[str, float | int]:
    from bench_recalibration_methods import CustomForwardResNet50

    torch.manual_seed(0)
    model = CustomForwardResNet50().eval()
    batches = [torch.randn(8, 3, 64, 64) for _ in range(4)]
    plain = time_plain(model, batches)
    precise, _ = time_method(model, batches, "precise")
    sequential, passes = time_method(model, batches, "sequential")
    return {
        "plain_s": plain,
        "precise_s": precise,
        "sequential_s": sequential,
        "sequential_passes": passes,
        "precise_x_plain": precise / plain,
        "sequential_x_plain": sequential / plain,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[250, 500, 1000, 2000])
    parser.add_argument("--layouts", nargs="+", choices=["root", "inside"], default=["root", "inside"])
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--resnet50", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    batches = make_batches(args.batches, args.batch_size, args.channels)
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{args.batches} batches of {args.batch_size}x{args.channels}"
    )
    time_method(build(args.layouts[0], min(args.depths), args.channels), batches, "sequential")
    rows = []
    print(
        f"{'layout':>7} {'depth':>6} {'plain s':>8} {'precise s':>10} {'x plain':>8} {'sequential s':>13}"
        f" {'ms/layer':>9} {'x plain':>8} {'passes':>7} {'seq/precise':>12}"
    )
    for layout in args.layouts:
        for depth in args.depths:
            model = build(layout, depth, args.channels)
            plain = time_plain(model, batches)
            precise, _ = time_method(model, batches, "precise")
            sequential, passes = time_method(model, batches, "sequential")
            row = {
                "layout": layout,
                "depth": depth,
                "plain_s": plain,
                "precise_s": precise,
                "sequential_s": sequential,
                "precise_ms_per_layer": 1e3 * precise / depth,
                "sequential_ms_per_layer": 1e3 * sequential / depth,
                "precise_x_plain": precise / plain,
                "sequential_x_plain": sequential / plain,
                "sequential_passes": passes,
                "ratio": sequential / precise,
                "load": os.getloadavg()[0],
            }
            rows.append(row)
            print(
                f"{layout:>7} {depth:>6} {plain:>8.3f} {precise:>10.2f} {row['precise_x_plain']:>8.1f} "
                f"{sequential:>13.2f} {row['sequential_ms_per_layer']:>9.2f} {row['sequential_x_plain']:>8.1f} "
                f"{passes:>7} {row['ratio']:>12.2f}",
                flush=True,
            )
    per_layer = {
        layout: [r["sequential_ms_per_layer"] for r in rows if r["layout"] == layout] for layout in args.layouts
    }
    flatness = {layout: times[-1] / times[0] for layout, times in per_layer.items()}
    for layout, ratio in flatness.items():
        print(f"{layout}: sequential time per layer, deepest / shallowest chain: {ratio:.2f} (1 = linear)")
    resnet = None
    if args.resnet50:
        resnet = resnet50_row()
        print(
            f"ResNet-50 (custom forward): plain {resnet['plain_s']:.2f} s, precise {resnet['precise_x_plain']:.1f}x, "
            f"sequential {resnet['sequential_s']:.1f} s = {resnet['sequential_x_plain']:.1f}x "
            f"({resnet['sequential_passes']} passes)"
        )
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "flatness": flatness, "resnet50": resnet}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
