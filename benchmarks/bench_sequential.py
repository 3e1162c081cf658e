"""Time ``recalibrate`` with the sequential and precise methods on chains of BatchNorm1d layers.

A chain of L layers (``nn.Sequential`` of BatchNorm1d, C channels) has L waves: every layer
depends on the one before it. The sequential method's wave passes resume from the previous wave's
stage inputs, so its time per layer should stay flat as L grows; rerunning the layers upstream of
every wave would make it grow linearly with L. Precise (one train-mode pass plus the verification)
is the linear reference: the ratio sequential / precise should stay flat too.

Each (depth, method) is timed on a fresh copy of the model, in the same process, after one
warm-up run on the smallest chain. Run from the repository root:

    python benchmarks/bench_sequential.py [--depths 250 500 1000 2000] [--channels 8]
        [--batches 4] [--batch-size 16] [--threads T] [--json PATH]
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

from bn_inspect.analyses.recalibration import recalibrate  # noqa: E402


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


def time_method(model: nn.Module, batches: list[torch.Tensor], method: str) -> tuple[float, int]:
    work = copy.deepcopy(model)
    start = time.perf_counter()
    result = recalibrate(work, batches, method=method)
    return time.perf_counter() - start, result.num_passes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[250, 500, 1000, 2000])
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
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
    time_method(build_chain(min(args.depths), args.channels), batches, "sequential")
    rows = []
    print(
        f"{'depth':>6} {'precise s':>10} {'ms/layer':>9} {'sequential s':>13} {'ms/layer':>9} {'passes':>7} {'seq/precise':>12}"
    )
    for depth in args.depths:
        model = build_chain(depth, args.channels)
        precise, _ = time_method(model, batches, "precise")
        sequential, passes = time_method(model, batches, "sequential")
        row = {
            "depth": depth,
            "precise_s": precise,
            "sequential_s": sequential,
            "precise_ms_per_layer": 1e3 * precise / depth,
            "sequential_ms_per_layer": 1e3 * sequential / depth,
            "sequential_passes": passes,
            "ratio": sequential / precise,
        }
        rows.append(row)
        print(
            f"{depth:>6} {precise:>10.2f} {row['precise_ms_per_layer']:>9.2f} {sequential:>13.2f} "
            f"{row['sequential_ms_per_layer']:>9.2f} {passes:>7} {row['ratio']:>12.2f}"
        )
    flatness = rows[-1]["sequential_ms_per_layer"] / rows[0]["sequential_ms_per_layer"]
    print(f"sequential time per layer, deepest / shallowest chain: {flatness:.2f} (1 = linear)")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "flatness": flatness}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
