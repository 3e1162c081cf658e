"""bn-inspect against a peer: the same statistics job done with torchlens, timed and sized side by side.

The job: for every normalization layer, the per-channel mean and biased variance of the layer's
input over the batch. bn-inspect does it with forward pre-hooks that reduce each input on the fly
(``bench_capture.captured_forward``). torchlens does it by tracing the forward while saving only
the tensors that feed a ``batch_norm`` op, then reducing those saved tensors
(``torchlens_statistics`` below). Both run on the same model (``bench_capture.build_model``, 22
BatchNorm2d), the same batch (``bench_capture.BATCH_SHAPE``), in eval mode under ``torch.no_grad()``.

How torchlens is asked for the normalization inputs: ``save=candidate & tl.followed_by(tl.func("batch_norm"))``
is torchlens's own retroactive "save what feeds X" selector. torchlens copies every op output that
matches ``candidate`` into a window of the last ``lookback`` events, and when a ``batch_norm`` op
runs it promotes the parents still in the window to saved activations. The candidate is any op,
because the input of a normalization layer may come from any op (conv, linear, add, cat); the
window must also cover the running-mean and running-variance buffers, which torchlens records as
events between the input and the ``batch_norm``, hence ``lookback=3``. Capture options are the
ones torchlens documents for forward-only analysis (detached saves, ``inference_only``), with
recurrence detection off as the job needs no loop structure. torchlens wraps torch's functions on
its first trace and leaves them wrapped (its default), so in-process plain and bn-inspect runs
after the first trace pay that wrapper too; it costs a check per torch call, not per element.

Measures:

* time: rounds of the three configurations (plain ``model(x)``, bn-inspect capture, torchlens job)
  back to back, the order cycling through all six permutations so that no configuration always
  follows the same neighbour. Ratios are formed within a round and the median over rounds is
  reported with its interquartile range: on a shared machine absolute times can change
  several-fold within seconds, but runs of one round usually share the same conditions.
* peak memory: peak RSS of one child process per configuration, rotated over ``MEMORY_ROUNDS``
  rounds. A process's peak covers everything it ran before, hence a fresh process per figure; it
  is read from VmHWM, not ``ru_maxrss``, which on Linux starts a child at its parent's peak (see
  ``bench_capture._peak_rss_bytes``). Each child builds the model and runs its job once on a small batch first, so lazy
  imports (torchlens imports most of itself on the first trace) and one-off allocations happen
  before the RSS baseline; the growth during the measured run is reported next to the peak.

Before timing, the statistics of both tools are checked against a float64 reference (pre-hooks
reducing each input in float64) on the same model with a small batch.

Run from the repository root:
    python benchmarks/bench_torchlens.py [--pairs N] [--threads T] [--json PATH]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchlens as tl
from torch import nn

# bench_capture sits next to this file; importing it also puts the repository root on sys.path,
# which the bn_inspect import below relies on.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_capture
from bench_capture import PairedResult

from bn_inspect.engine.moments import ChannelMoments
from bn_inspect.model.layers import NormLayer, iter_norm_layers

# Events between a normalization input and its batch_norm op: the input itself, then the
# running-mean and running-variance buffers (see the module docstring).
TORCHLENS_LOOKBACK = 3
# A torchlens trace of this model takes several plain forwards, so fewer rounds than
# bench_capture's pairs keep the default run near two minutes on 2 cores.
DEFAULT_ROUNDS = 9
WARMUP_ROUNDS = 1
MEMORY_ROUNDS = 2
# Small enough to keep the agreement check to a few seconds (most of it torchlens's one-off
# wrapping of torch on its first trace), large enough that every layer, strided shortcuts
# included, sees several values per channel.
CHECK_SHAPE = (4, 3, 16, 16)
WARMUP_SHAPE = (2, 3, 16, 16)
# The float32 reductions of both tools against a float64 reference of the same inputs.
AGREEMENT_TOLERANCE = 1e-5

Statistics = dict[str, tuple[torch.Tensor, torch.Tensor]]

CONFIGS = ("plain", "bn_inspect", "torchlens")


def _any_op(_event: Any) -> bool:
    return True


def torchlens_statistics(model: nn.Module, x: torch.Tensor, candidate: Any = None) -> Statistics:
    """Per-channel (mean, biased variance) of every batch_norm input, keyed by module address.

    ``candidate`` narrows which op outputs torchlens copies into its lookback window (e.g.
    ``tl.func("conv2d")`` where every normalization input is a convolution); the default copies
    every op's output, the only choice that holds for any architecture. A module called more
    than once gets ``address#k`` keys for its later calls, as bn-inspect names them.
    """
    if candidate is None:
        candidate = tl.where(_any_op, name_hint="any op")
    with torch.no_grad():
        trace = tl.trace(
            model,
            x,
            save=candidate & tl.followed_by(tl.func("batch_norm")),
            lookback=TORCHLENS_LOOKBACK,
            lookback_payload_policy="detached_raw",
            capture=tl.options.CaptureOptions(
                detach_saved_activations=True, inference_only=True, recurrence_detection=False
            ),
        )
        results: Statistics = {}
        for layer in trace.layer_list:
            if layer.func_name != "batch_norm":
                continue
            source = trace[layer.parent_arg_positions["args"][0]]
            if not source.has_saved_activation:
                raise RuntimeError(
                    f"torchlens kept no input for {layer.label}; raise TORCHLENS_LOOKBACK "
                    "(torchlens warns which parent fell out of its window)"
                )
            inputs = source.out
            var, mean = torch.var_mean(inputs, dim=[0, *range(2, inputs.dim())], correction=0)
            name = layer.address
            if name in results:
                name = f"{name}#{sum(key.split('#')[0] == name for key in results)}"
            results[name] = (mean.double(), var.double())
    return results


def bn_inspect_statistics(model: nn.Module, layers: list[NormLayer], x: torch.Tensor) -> Statistics:
    """The same statistics read from bn-inspect's recorder after ``captured_forward``."""
    recorder = bench_capture.captured_forward(model, layers, x)
    results: Statistics = {}
    for (name, call), record in recorder.records.items():
        assert isinstance(record.moments, ChannelMoments)
        results[name if call == 0 else f"{name}#{call}"] = (record.moments.mean, record.moments.biased_var())
    return results


def reference_statistics(model: nn.Module, layers: list[NormLayer], x: torch.Tensor) -> Statistics:
    """float64 statistics of each normalization input, from plain pre-hooks."""
    results: Statistics = {}

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            inputs = args[0].double()
            var, mean = torch.var_mean(inputs, dim=[0, *range(2, inputs.dim())], correction=0)
            results[name] = (mean, var)

        return hook

    handles = [layer.module.register_forward_pre_hook(make_hook(layer.name)) for layer in layers]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return results


def max_relative_error(actual: Statistics, reference: Statistics) -> float:
    """Largest error over layers and channels, relative to the reference's scale.

    A channel mean near zero has no meaningful relative error, so mean errors are scaled by
    ``|mean| + std`` instead; variance errors by the variance.
    """
    if actual.keys() != reference.keys():
        raise AssertionError(f"layers differ: {sorted(actual.keys() ^ reference.keys())}")
    worst = 0.0
    for name, (ref_mean, ref_var) in reference.items():
        mean, var = (t.to(torch.float64) for t in actual[name])
        mean_scale = ref_mean.abs() + ref_var.sqrt()
        worst = max(
            worst,
            ((mean - ref_mean).abs() / mean_scale).max().item(),
            ((var - ref_var).abs() / ref_var).max().item(),
        )
    return worst


def check_agreement(model: nn.Module, layers: list[NormLayer]) -> dict[str, Any]:
    """Both tools against the float64 reference on a small batch; raises when either is off."""
    x = torch.randn(CHECK_SHAPE, generator=torch.Generator().manual_seed(2))
    reference = reference_statistics(model, layers, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torchlens_stats = torchlens_statistics(model, x)
    result: dict[str, Any] = {
        "layers": len(reference),
        "torchlens_error": max_relative_error(torchlens_stats, reference),
        "bn_inspect_error": max_relative_error(bn_inspect_statistics(model, layers, x), reference),
        "torchlens_warnings": sorted({f"{w.category.__name__}: {w.message}" for w in caught}),
    }
    for tool in ("torchlens", "bn_inspect"):
        if not result[f"{tool}_error"] <= AGREEMENT_TOLERANCE:
            raise AssertionError(f"{tool} statistics are off by {result[f'{tool}_error']:.2e} (relative)")
    return result


def timed_rounds(jobs: dict[str, Callable[[], Any]], rounds: int, warmup_rounds: int) -> dict[str, list[float]]:
    """Seconds per job per round, each round running every job once in a cycling permutation order."""
    orders = list(itertools.permutations(jobs))
    for index in range(warmup_rounds):
        for name in orders[index % len(orders)]:
            jobs[name]()
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for index in range(rounds):
        for name in orders[index % len(orders)]:
            times[name].append(bench_capture._time(jobs[name]))
    return times


def memory_child(kind: str) -> None:
    """Child process: run one configuration on the benchmark batch and print its peak RSS as JSON."""
    model = bench_capture.build_model()
    layers = iter_norm_layers(model)
    jobs: dict[str, Callable[[torch.Tensor], Any]] = {
        "plain": lambda x: bench_capture.plain_forward(model, x),
        "bn_inspect": lambda x: bench_capture.captured_forward(model, layers, x),
        "torchlens": lambda x: torchlens_statistics(model, x),
    }
    jobs[kind](torch.randn(WARMUP_SHAPE))
    x = bench_capture.make_batches(1)[0]
    before = bench_capture._current_rss_bytes()
    jobs[kind](x)
    print(json.dumps({"kind": kind, "rss_before_run": before, "peak": bench_capture._peak_rss_bytes()}))


def measure_memory(threads: int | None) -> dict[str, Any]:
    """Median peak RSS and in-run growth per configuration over ``MEMORY_ROUNDS`` rotated rounds."""
    samples: dict[str, list[dict[str, int]]] = {kind: [] for kind in CONFIGS}
    for index in range(MEMORY_ROUNDS):
        shift = index % len(CONFIGS)
        for kind in CONFIGS[shift:] + CONFIGS[:shift]:
            command = [sys.executable, __file__, "--memory-child", kind]
            if threads is not None:
                command += ["--threads", str(threads)]
            output = subprocess.run(
                command, check=True, capture_output=True, text=True, env=bench_capture.FIXED_MALLOC_ENV
            ).stdout
            samples[kind].append(json.loads(output.strip().splitlines()[-1]))
    peak = {kind: statistics.median(s["peak"] for s in values) for kind, values in samples.items()}
    growth = {
        kind: statistics.median(s["peak"] - s["rss_before_run"] for s in values) for kind, values in samples.items()
    }

    def ratio(values: dict[str, float], variant: str, baseline: str) -> float:
        return values[variant] / values[baseline] if values[baseline] else float("nan")

    pairs = (("bn_inspect", "plain"), ("torchlens", "plain"), ("torchlens", "bn_inspect"))
    return {
        "peak_bytes": peak,
        "growth_bytes": growth,
        "peak_ratio": {f"{v}/{b}": ratio(peak, v, b) for v, b in pairs},
        "growth_ratio": {f"{v}/{b}": ratio(growth, v, b) for v, b in pairs},
        "samples": samples,
    }


def _paired_summary(result: PairedResult) -> dict[str, Any]:
    return {
        "baseline_s": result.baseline_s,
        "variant_s": result.variant_s,
        "ratios": result.ratios,
        "summary": result.summary(),
        "best_ratio": result.best_ratio(),
    }


def measure(pairs: int = DEFAULT_ROUNDS, threads: int | None = None) -> dict[str, Any]:
    """Agreement check, then time ratios over ``pairs`` rounds, then peak-RSS ratios from child processes."""
    if threads is not None:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    model = bench_capture.build_model()
    layers = iter_norm_layers(model)
    agreement = check_agreement(model, layers)
    x = bench_capture.make_batches(1)[0]
    times = timed_rounds(
        {
            "plain": lambda: bench_capture.plain_forward(model, x),
            "bn_inspect": lambda: bench_capture.captured_forward(model, layers, x),
            "torchlens": lambda: torchlens_statistics(model, x),
        },
        pairs,
        WARMUP_ROUNDS,
    )
    comparisons = {
        "bn_inspect/plain": PairedResult("bn_inspect/plain", times["plain"], times["bn_inspect"]),
        "torchlens/plain": PairedResult("torchlens/plain", times["plain"], times["torchlens"]),
        "torchlens/bn_inspect": PairedResult("torchlens/bn_inspect", times["bn_inspect"], times["torchlens"]),
    }
    memory = measure_memory(threads)
    return {
        # Headline figures (run_all.py reads the *_vs_bn_inspect pair): median time ratios, peak-RSS ratios.
        "time_ratio_bn_inspect_vs_plain": comparisons["bn_inspect/plain"].summary()["median"],
        "time_ratio_torchlens_vs_plain": comparisons["torchlens/plain"].summary()["median"],
        "time_ratio_torchlens_vs_bn_inspect": comparisons["torchlens/bn_inspect"].summary()["median"],
        "memory_ratio_bn_inspect_vs_plain": memory["peak_ratio"]["bn_inspect/plain"],
        "memory_ratio_torchlens_vs_plain": memory["peak_ratio"]["torchlens/plain"],
        "memory_ratio_torchlens_vs_bn_inspect": memory["peak_ratio"]["torchlens/bn_inspect"],
        "bn_inspect_revision": bench_capture.source_revision(),
        "torch_version": torch.__version__,
        "torchlens_version": tl.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "norm_layers": len(layers),
        "batch_shape": list(bench_capture.BATCH_SHAPE),
        "rounds": pairs,
        "agreement": agreement,
        "time": {name: _paired_summary(result) for name, result in comparisons.items()},
        "median_s": {name: statistics.median(values) for name, values in times.items()},
        "memory": memory,
        "elapsed_s": time.perf_counter() - started,
    }


def _fmt(summary: dict[str, float]) -> str:
    return f"{summary['median']:.2f} (IQR {summary['q1']:.2f}–{summary['q3']:.2f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--pairs", type=int, default=DEFAULT_ROUNDS, help="timed rounds of the three runs (default %(default)s)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="also write all results and raw samples here")
    parser.add_argument("--memory-child", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        memory_child(args.memory_child)
        return 0
    if args.pairs < 2:
        parser.error("--pairs must be at least 2")

    print(
        f"torch {torch.__version__}, torchlens {tl.__version__}, batch {bench_capture.BATCH_SHAPE}, "
        f"{args.pairs} rounds",
        flush=True,
    )
    results = measure(args.pairs, args.threads)
    agreement = results["agreement"]
    print(
        f"agreement with float64 reference over {agreement['layers']} layers: torchlens "
        f"{agreement['torchlens_error']:.1e}, bn-inspect {agreement['bn_inspect_error']:.1e} (max relative error)"
    )
    for message in agreement["torchlens_warnings"]:
        print(f"torchlens warned: {message}")
    mib = 1024 * 1024
    memory = results["memory"]
    median_s = results["median_s"]
    rows = [
        ("time, bn-inspect / plain", _fmt(results["time"]["bn_inspect/plain"]["summary"])),
        ("time, torchlens / plain", _fmt(results["time"]["torchlens/plain"]["summary"])),
        ("time, torchlens / bn-inspect", _fmt(results["time"]["torchlens/bn_inspect"]["summary"])),
    ]
    for ratio in memory["peak_ratio"]:
        variant, baseline = ratio.split("/")
        rows.append(
            (
                f"peak RSS, {ratio.replace('_', '-')} "
                f"({memory['peak_bytes'][variant] / mib:.0f} / {memory['peak_bytes'][baseline] / mib:.0f} MiB)",
                f"{memory['peak_ratio'][ratio]:.2f}",
            )
        )
    for ratio in memory["growth_ratio"]:
        variant, baseline = ratio.split("/")
        rows.append(
            (
                f"RSS growth in run, {ratio.replace('_', '-')} "
                f"({memory['growth_bytes'][variant] / mib:.0f} / {memory['growth_bytes'][baseline] / mib:.0f} MiB)",
                f"{memory['growth_ratio'][ratio]:.2f}",
            )
        )
    width = max(len(row[0]) for row in rows)
    print()
    print(f"{'measure':<{width}}  ratio")
    for measure_name, value in rows:
        print(f"{measure_name:<{width}}  {value}")
    print(
        f"\nmedian seconds: plain {median_s['plain']:.3f}, bn-inspect {median_s['bn_inspect']:.3f}, "
        f"torchlens {median_s['torchlens']:.3f}; 1-min load {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs); "
        f"total {results['elapsed_s']:.0f} s"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
