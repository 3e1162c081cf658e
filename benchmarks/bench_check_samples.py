"""What check's per-sample moments (BN205) add to a captured forward.

`check` on real data in eval mode records, besides each layer's moments, the moments of each
sample's channel means (``StatisticsRecorder(sample_means=True)``): one more read of every
batch-norm input with spatial dims. This times three forwards side by side, alternating their order
in every round: plain ``model(x)``, the capture ``inspect`` makes, and the capture ``check`` makes,
and reports the median per-round ratios, on bench_capture.py's small ResNet (batch 32x3x64x64) and
bench_resnet50_cpu.py's ResNet-50 (batch 16x3x224x224).

Run from the repository root:
    python benchmarks/bench_check_samples.py [--rounds N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_capture import build_model
from benchmarks.bench_resnet50_cpu import resnet50
from bn_inspect.engine.capture import StatisticsRecorder, hooks_capture
from bn_inspect.model.layers import iter_norm_layers


def forwards(model: nn.Module, x: torch.Tensor) -> dict[str, Callable[[], None]]:
    layers = iter_norm_layers(model)

    def plain() -> None:
        with torch.no_grad():
            model(x)

    def captured(sample_means: bool) -> Callable[[], None]:
        def run() -> None:
            recorder = StatisticsRecorder(sample_means=sample_means)
            with torch.no_grad(), hooks_capture(layers, recorder):
                recorder.start_batch()
                model(x)

        return run

    return {"plain": plain, "inspect": captured(False), "check": captured(True)}


def rounds(runs: dict[str, Callable[[], None]], count: int) -> dict[str, list[float]]:
    names = list(runs)
    for name in names:  # warm-up
        runs[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(count):
        order = names[index % len(names) :] + names[: index % len(names)]
        for name in order:
            started = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - started)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    results = {}
    for name, model, shape in (
        ("small ResNet", build_model(), (32, 3, 64, 64)),
        ("ResNet-50", resnet50(), (16, 3, 224, 224)),
    ):
        times = rounds(forwards(model.eval(), torch.randn(shape)), args.rounds)
        ratio = {
            variant: statistics.median(t / p for t, p in zip(times[variant], times["plain"], strict=True))
            for variant in ("inspect", "check")
        }
        check_over_inspect = statistics.median(c / i for c, i in zip(times["check"], times["inspect"], strict=True))
        results[name] = {
            "plain_median_s": statistics.median(times["plain"]),
            "inspect_over_plain": ratio["inspect"],
            "check_over_plain": ratio["check"],
            "check_over_inspect": check_over_inspect,
            "rounds": args.rounds,
        }
        print(
            f"{name}: plain {results[name]['plain_median_s'] * 1000:.0f} ms; inspect's capture "
            f"{ratio['inspect']:.3f}x, check's {ratio['check']:.3f}x plain; check / inspect {check_over_inspect:.3f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), **results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
