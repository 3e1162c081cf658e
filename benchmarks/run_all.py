"""Every CPU measurement of bn-inspect's cost, in one run, as ratios against the targets.

Run from the repository root on an idle machine (about 6 minutes on 2 cores):

    python benchmarks/run_all.py [--pairs N] [--json PATH]

Each ratio compares bn-inspect with the plain work it observes, measured side by side in this
run (alternating which goes first), never with a figure from another day or machine:

* capture overhead, small ResNet-style CNN (22 BatchNorm2d, batch 32x3x64x64) and ResNet-50's
  architecture (53 BatchNorm2d, batch 16x3x224x224): one eval forward under bn-inspect's hooks
  against the plain eval forward, median of the per-pair ratios;
* a training step under the hooks: the small ResNet in train mode, forward and backward, against
  the same step without them;
* throughput: ``inspect_model`` over 10 batches against a plain eval loop over the same batches,
  in samples per second (issue targets: >= 0.8 for datasets, >= 0.9 to leave it on);
* the two captures and the throughput again with the opt-in compiled CPU kernel
  (``BN_INSPECT_CPU_KERNEL=compiled``, engine/fused/cpu.py; issue 30's targets), its compile in
  the warm-up rounds;
* peak memory: peak RSS (VmHWM) of a child process running ``inspect_model`` over 5 batches against
  one running the plain loop (a peak cannot be reset, so one child per figure), and the peak
  RSS of ``bn-inspect inspect --batches 1000`` against ``--batches 10`` (flat memory);
* startup: ``bn-inspect --help``, and ``bn-inspect inspect`` on the shipped digits sample against
  a bare script that imports torch, loads the same TorchScript file and runs the same batches;
* a peer: the same statistics gathered with torchlens (see bench_torchlens.py), time and memory;
* across ranks: samples per second with 1 and 2 processes (see bench_distributed.py).

Wall-clock figures are printed for context only. Another process on the same cores makes every
ratio noisy: the load average is printed at the start and the end so a disturbed run can be told.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
sys.path.insert(0, str(BENCHMARKS))
sys.path.insert(0, str(ROOT))

import bench_capture  # noqa: E402
import bench_resnet50_cpu  # noqa: E402

from bn_inspect.analyses.inspection import inspect_model  # noqa: E402
from bn_inspect.engine.capture import StatisticsRecorder, hooks_capture  # noqa: E402
from bn_inspect.engine.fused import cpu as cpu_kernel  # noqa: E402
from bn_inspect.model.layers import iter_norm_layers  # noqa: E402

DIGITS = ROOT / "sample_models" / "digits_cnn"
STARTUP_RUNS = 6
FLAT_BATCHES = (10, 1000)
# Small batches, so that 1000 of them take seconds and the moments, not activations, dominate growth.
FLAT_SHAPE = "16,1,8,8"
# Peak RSS of identical children varies by tens of MiB with the allocator's luck: more than 2 each.
MEMORY_PAIRS = 4


@dataclass(frozen=True)
class Row:
    """One line of the summary table."""

    measure: str
    value: float | None
    target: str
    passed: bool | None
    context: str = ""


def _median_ratio(baseline: Callable[[], Any], variant: Callable[[], Any], pairs: int, warmup: int = 2) -> dict:
    result = bench_capture.paired("ratio", baseline, variant, pairs, warmup)
    ratios = result.ratios
    return {
        "median": statistics.median(ratios),
        "min": min(ratios),
        "ratios": ratios,
        "baseline_median_s": statistics.median(result.baseline_s),
        "variant_median_s": statistics.median(result.variant_s),
    }


def capture_small(pairs: int) -> dict:
    model = bench_capture.build_model()
    layers = iter_norm_layers(model)
    x = bench_capture.make_batches(1)[0]
    return _median_ratio(
        lambda: bench_capture.plain_forward(model, x),
        lambda: bench_capture.captured_forward(model, layers, x),
        pairs,
    )


def capture_resnet50(pairs: int) -> dict:
    torch.manual_seed(0)
    model = bench_resnet50_cpu.resnet50().eval()
    layers = iter_norm_layers(model)
    x = torch.randn(16, 3, 224, 224)
    return _median_ratio(
        lambda: bench_capture.plain_forward(model, x),
        lambda: bench_capture.captured_forward(model, layers, x),
        pairs,
        warmup=1,
    )


def compiled(step: Callable[[], dict]) -> Callable[[], dict | None]:
    """``step`` run with the opt-in compiled CPU kernel (its warm-up rounds include the compile); None where it cannot run."""

    def run() -> dict | None:
        before = os.environ.get(cpu_kernel.CPU_KERNEL_VARIABLE)
        os.environ[cpu_kernel.CPU_KERNEL_VARIABLE] = "compiled"
        try:
            reason = cpu_kernel.prepare()
            if reason is not None:
                print(f"compiled CPU kernel skipped: {reason}", flush=True)
                return None
            return step()
        finally:
            if before is None:
                del os.environ[cpu_kernel.CPU_KERNEL_VARIABLE]
            else:
                os.environ[cpu_kernel.CPU_KERNEL_VARIABLE] = before

    return run


def _train_step(model: torch.nn.Module, x: torch.Tensor, layers: list | None) -> None:
    """One training step's forward and backward, under bn-inspect's hooks where ``layers`` are given."""
    if layers is None:
        model(x).sum().backward()
    else:
        recorder = StatisticsRecorder()
        with hooks_capture(layers, recorder):
            recorder.start_batch()
            model(x).sum().backward()
    model.zero_grad(set_to_none=True)


def capture_train(pairs: int) -> dict:
    """The small ResNet in train mode: a forward and backward under the hooks against a plain one."""
    model = bench_capture.build_model().train()
    layers = iter_norm_layers(model)
    x = bench_capture.make_batches(1)[0]
    return _median_ratio(lambda: _train_step(model, x, None), lambda: _train_step(model, x, layers), pairs)


def throughput(pairs: int) -> dict:
    model = bench_capture.build_model()
    batches = bench_capture.make_batches(bench_capture.THROUGHPUT_BATCHES)
    result = _median_ratio(
        lambda: bench_capture.plain_loop(model, batches), lambda: inspect_model(model, batches), pairs, warmup=0
    )
    samples = sum(b.shape[0] for b in batches)
    # samples/s ratio = plain time / inspect time over the same samples.
    return {
        **result,
        "samples_per_s_ratio": 1 / result["median"],
        "plain_samples_per_s": samples / result["baseline_median_s"],
        "inspect_samples_per_s": samples / result["variant_median_s"],
    }


def _peak_rss_of(argv: list[str]) -> int:
    """Peak RSS in bytes of one child running the bn-inspect CLI with ``argv``."""
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(BENCHMARKS)!r})\n"
        "import bench_capture\n"
        "from bn_inspect.cli.main import run\n"
        f"code = run({argv!r})\n"
        "print(bench_capture._peak_rss_bytes(), file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env=bench_capture.FIXED_MALLOC_ENV,
    )
    return int(done.stderr.strip().splitlines()[-1])


def memory_flat() -> dict:
    peaks: dict[int, list[int]] = {count: [] for count in FLAT_BATCHES}
    for order in (FLAT_BATCHES, FLAT_BATCHES[::-1]):
        for count in order:
            argv = ["inspect", str(DIGITS / "torchscript.pt"), "--shape", FLAT_SHAPE, "--batches", str(count)]
            peaks[count].append(_peak_rss_of([*argv, "--format", "json", "--quiet"]))
    few, many = (statistics.median(peaks[count]) for count in FLAT_BATCHES)
    return {"peak_bytes": {str(k): v for k, v in peaks.items()}, "ratio": many / few}


_BARE_SCRIPT = """
import gc
import sys

paused = sys.argv[3] == "paused"
if paused:
    gc.disable()
import numpy as np
import torch

model = torch.jit.load(sys.argv[1], map_location="cpu").eval()
if paused:
    gc.freeze()
    gc.enable()
images = np.load(sys.argv[2], mmap_mode="r")
with torch.no_grad():
    for start in range(0, len(images), 64):
        model(torch.from_numpy(np.ascontiguousarray(images[start : start + 64])).float())
"""


def startup() -> dict:
    """Times the CLI against a bare script; ``bare_paused`` is that script with the CLI's garbage-collector pause.

    The target compares with the plain script, what a user would write. The paused one shows what
    bn-inspect itself adds (typer, its own imports, the capture), apart from the collector's share.
    """
    model, data = DIGITS / "torchscript.pt", DIGITS / "test_images_unscaled.npy"
    executable = Path(sys.executable).parent / "bn-inspect"
    cli = [str(executable)] if executable.exists() else [sys.executable, "-m", "bn_inspect"]
    inspect = [*cli, "inspect", str(model), "--input", str(data), "--quiet", "--format", "json"]
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
        script.write(_BARE_SCRIPT)
    bare = [sys.executable, "-W", "ignore", script.name, str(model), str(data)]
    times: dict[str, list[float]] = {"inspect": [], "bare": [], "bare_paused": [], "help": []}
    try:
        for index in range(STARTUP_RUNS):
            commands = [("inspect", inspect), ("bare", [*bare, "plain"]), ("bare_paused", [*bare, "paused"])]
            # Rotate the order so that no command always runs first after the machine idled.
            commands = commands[index % 3 :] + commands[: index % 3]
            for name, command in (*commands, ("help", [*cli, "--help"])):
                start = time.perf_counter()
                subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
                times[name].append(time.perf_counter() - start)
    finally:
        os.unlink(script.name)

    def ratios(baseline: str) -> list[float]:
        return [i / b for i, b in zip(times["inspect"], times[baseline], strict=True)]

    return {
        "ratio": statistics.median(ratios("bare")),
        "ratios": ratios("bare"),
        "ratio_vs_paused": statistics.median(ratios("bare_paused")),
        "help_s": statistics.median(times["help"]),
        "times_s": times,
    }


def peer(pairs: int) -> dict | None:
    try:
        import bench_torchlens
    except ImportError as error:
        print(f"torchlens comparison skipped: {error}", flush=True)
        return None
    return bench_torchlens.measure(pairs, None)


def distributed() -> dict:
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "distributed.json"
        command = [sys.executable, str(BENCHMARKS / "bench_distributed.py"), "--repeats", "2", "--json", str(output)]
        subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
        document = json.loads(output.read_text())
    rates = {m["name"]: statistics.median(m["steady_samples_per_s"]) for m in document["measurements"]}
    return {"samples_per_s": rates, "document": document}


def _ratio_row(measure: str, value: float, target: float, at_most: bool, context: str = "") -> Row:
    sign = "<=" if at_most else ">="
    passed = value <= target if at_most else value >= target
    return Row(measure, value, f"{sign} {target}", passed, context)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=15, help="alternating pairs for the small-model ratios")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args(argv)
    bench_capture.MEMORY_PAIRS = MEMORY_PAIRS
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    print(
        f"bn_inspect {bench_capture.source_revision()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
        flush=True,
    )
    results: dict[str, Any] = {}
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("capture_small", lambda: capture_small(args.pairs)),
        ("capture_resnet50", lambda: capture_resnet50(args.pairs)),
        ("capture_train", lambda: capture_train(args.pairs)),
        ("throughput", lambda: throughput(max(8, args.pairs // 2))),
        ("capture_small_compiled", compiled(lambda: capture_small(args.pairs))),
        ("capture_resnet50_compiled", compiled(lambda: capture_resnet50(args.pairs))),
        ("throughput_compiled", compiled(lambda: throughput(max(8, args.pairs // 2)))),
        ("memory", lambda: bench_capture.measure_memory(None)),
        ("memory_flat", memory_flat),
        ("startup", startup),
        ("peer", lambda: peer(max(4, args.pairs // 3))),
        ("distributed", distributed),
    ]
    for name, step in steps:
        began = time.perf_counter()
        results[name] = step()
        print(f"  {name}: {time.perf_counter() - began:.0f} s", flush=True)

    small, big, flow = results["capture_small"], results["capture_resnet50"], results["throughput"]
    train = results["capture_train"]
    mib = 1024 * 1024
    rows = [
        _ratio_row(
            "capture, small ResNet 32x3x64x64",
            small["median"],
            1.25,
            True,
            f"plain {small['baseline_median_s'] * 1e3:.0f} ms",
        ),
        _ratio_row(
            "capture, ResNet-50 16x3x224x224", big["median"], 1.10, True, f"plain {big['baseline_median_s']:.2f} s"
        ),
        _ratio_row(
            "throughput, 10 batches (issue 7)",
            flow["samples_per_s_ratio"],
            0.9,
            False,
            f"{flow['inspect_samples_per_s']:.0f} vs {flow['plain_samples_per_s']:.0f} samples/s",
        ),
        _ratio_row("throughput, 10 batches (issue 4)", flow["samples_per_s_ratio"], 0.8, False),
        _ratio_row("capture, small ResNet (issue 30)", small["median"], 1.03, True),
        _ratio_row("capture, ResNet-50 (issue 30)", big["median"], 1.03, True),
        _ratio_row("throughput, 10 batches (issue 30)", flow["samples_per_s_ratio"], 0.95, False),
        _ratio_row(
            "train step, small ResNet (issue 30)",
            train["median"],
            1.02,
            True,
            f"forward + backward, plain {train['baseline_median_s'] * 1e3:.0f} ms",
        ),
        _ratio_row(
            "peak RSS, inspect vs plain loop",
            results["memory"]["ratio"],
            1.05,
            True,
            f"{results['memory']['peak_bytes']['inspect'] / mib:.0f} vs "
            f"{results['memory']['peak_bytes']['plain'] / mib:.0f} MiB",
        ),
        _ratio_row("peak RSS, --batches 1000 vs 10", results["memory_flat"]["ratio"], 1.05, True),
        _ratio_row("bn-inspect --help (s)", results["startup"]["help_s"], 0.3, True, "seconds, not a ratio"),
        _ratio_row(
            "inspect on digits sample vs bare script",
            results["startup"]["ratio"],
            1.2,
            True,
            f"{statistics.median(results['startup']['times_s']['bare']):.2f} s bare",
        ),
        Row(
            "  same, bare script with the CLI's GC pause",
            results["startup"]["ratio_vs_paused"],
            "(info)",
            None,
            f"{statistics.median(results['startup']['times_s']['bare_paused']):.2f} s paused bare",
        ),
    ]
    if results["capture_small_compiled"] is not None:
        rows += [
            _ratio_row(
                "compiled kernel: capture, small ResNet", results["capture_small_compiled"]["median"], 1.03, True
            ),
            _ratio_row(
                "compiled kernel: capture, ResNet-50", results["capture_resnet50_compiled"]["median"], 1.03, True
            ),
            _ratio_row(
                "compiled kernel: throughput", results["throughput_compiled"]["samples_per_s_ratio"], 0.95, False
            ),
        ]
    if results["peer"] is not None:
        lens = results["peer"]
        rows += [
            Row("torchlens / bn-inspect, time", lens["time_ratio_torchlens_vs_bn_inspect"], "(peer)", None),
            _ratio_row("  same, against the issue 30 target", lens["time_ratio_torchlens_vs_bn_inspect"], 5.0, False),
            Row("torchlens / bn-inspect, peak RSS", lens["memory_ratio_torchlens_vs_bn_inspect"], "(peer)", None),
        ]
    rates = results["distributed"]["samples_per_s"]
    one, two = rates["1 process, default threads"], rates["2 processes, 1 thread each"]
    rows.append(Row("2 processes vs 1, samples/s", two / one, "(info)", None, f"{two:.0f} vs {one:.0f} samples/s"))

    width = max(len(row.measure) for row in rows)
    print(f"\n{'measure':<{width}}  {'value':>7}  {'target':<8}  result  context")
    for row in rows:
        verdict = "-" if row.passed is None else ("pass" if row.passed else "MISS")
        value = "-" if row.value is None else f"{row.value:.3f}"
        print(f"{row.measure:<{width}}  {value:>7}  {row.target:<8}  {verdict:<6}  {row.context}")
    load_end = os.getloadavg()[0]
    print(
        f"\n1-min load average {load_start:.2f} at start, {load_end:.2f} at end; {time.perf_counter() - started:.0f} s"
    )
    if args.json:
        document = {
            "date": time.strftime("%Y-%m-%d"),
            "revision": bench_capture.source_revision(),
            "torch": torch.__version__,
            "machine": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average": [load_start, load_end],
            "rows": [row.__dict__ for row in rows],
            "results": results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
