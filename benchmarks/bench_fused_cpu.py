"""The CPU kernel of fused eval capture against the portable path, on run_all.py's capture and throughput cases.

Run from the repository root:

    python benchmarks/bench_fused_cpu.py [--rounds N] [--json PATH]

Each round times the plain work, bn-inspect on the portable path (a pre-hook and a second read
of each input) and bn-inspect with the C kernel (one read), in an order that alternates from
round to round; every figure is a median of per-round ratios, so a busy machine slows all three
alike. The cases are run_all.py's: one eval forward of the small ResNet (32x3x64x64) and of
ResNet-50's architecture (16x3x224x224) under ``hooks_capture``, and ``inspect_model`` over 10
batches against a plain loop (throughput, the inverse of the time ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))
sys.path.insert(0, str(BENCHMARKS.parent))

import bench_capture  # noqa: E402
import bench_resnet50_cpu  # noqa: E402

from bn_inspect.analyses.inspection import inspect_model  # noqa: E402
from bn_inspect.engine.capture import StatisticsRecorder, hooks_capture  # noqa: E402
from bn_inspect.engine.fused import cpu  # noqa: E402
from bn_inspect.model.layers import iter_norm_layers  # noqa: E402

BUILT = cpu.kernel


def _portable() -> None:
    return None


def with_kernel(use: bool, work: Callable[[], Any]) -> Callable[[], Any]:
    """``work`` with the kernel on, or with dispatch finding none (the portable path)."""

    def run() -> Any:
        cpu.kernel = BUILT if use else _portable  # type: ignore[assignment]
        try:
            return work()
        finally:
            cpu.kernel = BUILT

    return run


def captured(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    layers = iter_norm_layers(model)

    def run() -> None:
        recorder = StatisticsRecorder()
        with torch.no_grad(), hooks_capture(layers, recorder):
            recorder.start_batch()
            model(x)

    return run


def rounds_of(plain: Callable[[], Any], work: Callable[[], Any], rounds: int) -> dict[str, Any]:
    variants = {"plain": plain, "portable": with_kernel(False, work), "kernel": with_kernel(True, work)}
    for variant in variants.values():
        variant()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for index in range(rounds):
        order = list(variants) if index % 2 == 0 else list(reversed(variants))
        for name in order:
            began = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - began)
    ratios = {
        "portable/plain": [p / b for p, b in zip(times["portable"], times["plain"], strict=True)],
        "kernel/plain": [k / b for k, b in zip(times["kernel"], times["plain"], strict=True)],
        "kernel/portable": [k / p for k, p in zip(times["kernel"], times["portable"], strict=True)],
    }
    return {
        "median": {name: statistics.median(values) for name, values in ratios.items()},
        "ratios": ratios,
        "median_s": {name: statistics.median(values) for name, values in times.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15, help="rounds per case (ResNet-50: a third)")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    if cpu.kernel() is None:
        print(f"no CPU kernel: {cpu.fallback_reason()}", file=sys.stderr)
        return 1
    print(f"build and check on first use: {time.perf_counter() - began:.1f} s; load {os.getloadavg()[0]:.2f}")
    small = bench_capture.build_model()
    x = bench_capture.make_batches(1)[0]
    batches = bench_capture.make_batches(bench_capture.THROUGHPUT_BATCHES)
    torch.manual_seed(0)
    resnet = bench_resnet50_cpu.resnet50().eval()
    big = torch.randn(16, 3, 224, 224)
    cases = {
        "capture, small ResNet": lambda: rounds_of(
            lambda: bench_capture.plain_forward(small, x), captured(small, x), args.rounds
        ),
        "capture, ResNet-50": lambda: rounds_of(
            lambda: bench_capture.plain_forward(resnet, big), captured(resnet, big), max(3, args.rounds // 3)
        ),
        "throughput, 10 batches": lambda: rounds_of(
            lambda: bench_capture.plain_loop(small, batches),
            lambda: inspect_model(small, batches),
            max(4, args.rounds // 2),
        ),
    }
    results = {}
    for name, case in cases.items():
        results[name] = case()
        median = results[name]["median"]
        print(
            f"{name}: portable/plain {median['portable/plain']:.3f}, kernel/plain {median['kernel/plain']:.3f}, "
            f"kernel/portable {median['kernel/portable']:.3f}; plain {results[name]['median_s']['plain']:.3f} s; "
            f"load {os.getloadavg()[0]:.2f}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
