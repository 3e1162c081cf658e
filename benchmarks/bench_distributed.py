"""Throughput of statistics capture with 1 process against N torch.distributed processes (gloo, CPU).

Every configuration runs the same work: a small CNN (7 normalization layers, eval mode) over the
same seeded batches, each rank taking every N-th batch (``shard_batches``), recording per-layer
moments with the hooks ``inspect_model`` uses, and merging them across ranks
(``merge_run_across_ranks``). Two figures per configuration:

* steady samples/s: all samples divided by the slowest rank's time from a barrier after start-up
  to the end of the merge (what more processes buy once they run);
* end-to-end seconds: from launching the processes to the last one exiting (start-up included:
  importing torch takes seconds per process, and N processes share the same cores).

Configurations: 1 process with torch's default threads, 1 process with 1 thread, and N processes
with 1 thread each (torchrun's default OMP_NUM_THREADS=1). The processes talk over 127.0.0.1 only.

Run from the repository root:
    python benchmarks/bench_distributed.py [--batches B] [--batch-size S] [--repeats R] [--ranks N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

ROOT = Path(__file__).parent.parent


def build_model() -> nn.Module:
    """Conv/BN/ReLU x4 with downsampling, global pool, Linear, BatchNorm1d: 7 normalization calls."""
    import torch
    from torch import nn

    torch.manual_seed(0)

    def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(
        *block(3, 32, 1),
        *block(32, 64, 2),
        *block(64, 64, 1),
        *block(64, 128, 2),
        *block(128, 128, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 64),
        nn.BatchNorm1d(64),
        nn.Linear(64, 32),
        nn.BatchNorm1d(32),
    ).eval()


def worker(num_batches: int, batch_size: int) -> None:
    """One rank: sharded capture and merge; prints one JSON line with its timings."""
    import torch
    import torch.distributed as dist

    from bn_inspect.data.batch import RunTotals
    from bn_inspect.distributed.context import distributed_context
    from bn_inspect.distributed.merge import merge_run_across_ranks
    from bn_inspect.distributed.sharding import shard_batches
    from bn_inspect.engine.capture import StatisticsRecorder, hooks_capture
    from bn_inspect.engine.preserve import preserved_state
    from bn_inspect.model.layers import iter_norm_layers

    model = build_model()
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn((batch_size, 3, 32, 32), generator=generator) for _ in range(num_batches)]
    with distributed_context(timeout_s=120) as ctx:
        if ctx.is_distributed:
            dist.barrier()
        start = time.perf_counter()
        layers = iter_norm_layers(model)
        recorder = StatisticsRecorder()
        own = list(shard_batches(batches, ctx.rank, ctx.world_size))
        with preserved_state(model), hooks_capture(layers, recorder), torch.no_grad():
            for batch in own:
                recorder.start_batch()
                model(batch)
        totals = RunTotals(len(own), sum(b.shape[0] for b in own))
        merged = merge_run_across_ranks(recorder.records, totals, ctx.group, layers=layers)
        seconds = time.perf_counter() - start
    print(json.dumps({"rank": ctx.rank, "seconds": seconds, "samples": merged.totals.num_samples}), flush=True)


def cuda_worker(num_batches: int, batch_size: int) -> None:
    """One rank of the CUDA check: CUDA moments merged over a "cpu:gloo,cuda:nccl" group, against one process.

    Every rank shares one GPU (nccl needs a GPU per rank, gloo does not); the collectives run on
    gloo, the batch-norm statistics kernel on the GPU. Rank 0 also runs all batches alone and
    prints the largest differences between the merged and the single-process statistics.
    """
    import datetime

    import torch
    import torch.distributed as dist

    from bn_inspect.data.batch import RunTotals
    from bn_inspect.distributed.merge import merge_run_across_ranks
    from bn_inspect.distributed.sharding import shard_batches
    from bn_inspect.engine.capture import CallRecord, StatisticsRecorder, hooks_capture
    from bn_inspect.engine.moments import ChannelMoments
    from bn_inspect.model.layers import iter_norm_layers

    dist.init_process_group("cpu:gloo,cuda:nccl", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model().cuda()
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn((batch_size, 3, 32, 32), generator=generator).cuda() * 3 + 100 for _ in range(num_batches)]

    def record(own: list[torch.Tensor]) -> dict[tuple[str, int], CallRecord]:
        recorder = StatisticsRecorder()
        with hooks_capture(iter_norm_layers(model), recorder), torch.no_grad():
            for batch in own:
                recorder.start_batch()
                model(batch)
        return recorder.records

    own = list(shard_batches(batches, rank, world))
    merged = merge_run_across_ranks(record(own), RunTotals(len(own)), None)
    if rank == 0:
        single = record(batches)
        worst_mean = worst_var = 0.0
        for key, one in single.items():
            a, b = merged.records[key].moments, one.moments
            assert isinstance(a, ChannelMoments) and isinstance(b, ChannelMoments) and a.count == b.count
            scale = float(b.mean.abs().max() + b.biased_var().sqrt().max())
            worst_mean = max(worst_mean, float((a.mean - b.mean.cpu()).abs().max()) / scale)
            worst_var = max(worst_var, float(((a.m2 - b.m2.cpu()).abs() / b.m2.cpu()).max()))
        print(
            json.dumps(
                {"layers": len(single), "batches": merged.totals.num_batches, "mean": worst_mean, "var": worst_var}
            )
        )
    dist.destroy_process_group()


def nccl_exchange_check() -> None:
    """The byte and float64 exchange on CUDA tensors through nccl (one rank: one GPU)."""
    import datetime

    import torch
    import torch.distributed as dist

    from bn_inspect.distributed.collectives import exchange

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
    values = torch.arange(5, dtype=torch.float64, device="cuda") / 3
    ((header, floats),) = exchange(b"header", values, None, "checking nccl")
    print(json.dumps({"nccl_header": header.decode(), "nccl_floats_equal": bool(torch.equal(floats, values.cpu()))}))
    dist.destroy_process_group()


def cuda_check(args: argparse.Namespace) -> None:
    """Both CUDA checks: 2 ranks on one GPU (gloo collectives), then nccl with one rank."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    command = [sys.executable, __file__, "--batches", str(args.batches), "--batch-size", str(args.batch_size)]
    children = [
        subprocess.Popen(
            [*command, "--cuda-worker"], env=env | {"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r)}
        )
        for r in range(2)
    ]
    for child in children:
        child.wait(timeout=300)
    env |= {"MASTER_PORT": str(_free_port())}
    subprocess.run([*command, "--nccl-check"], env=env, timeout=300, check=True)


@dataclass
class Measurement:
    """One configuration, over several repeats."""

    name: str
    processes: int
    threads: int | None
    steady_samples_per_s: list[float]
    end_to_end_s: list[float]

    def summary(self) -> str:
        steady = statistics.median(self.steady_samples_per_s)
        wall = statistics.median(self.end_to_end_s)
        return f"{self.name:<34} {steady:>10,.0f} samples/s   end-to-end {wall:6.2f} s"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def launch(processes: int, threads: int | None, args: argparse.Namespace) -> tuple[float, float]:
    """(steady samples/s, end-to-end seconds) of one run with ``processes`` ranks."""
    port = _free_port()
    started = time.perf_counter()
    children = []
    for rank in range(processes):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo"}
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        if processes > 1:
            env |= {
                "RANK": str(rank),
                "WORLD_SIZE": str(processes),
                "LOCAL_RANK": str(rank),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            }
        command = [sys.executable, __file__, "--worker", "--batches", str(args.batches)]
        command += ["--batch-size", str(args.batch_size)]
        children.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True))
    reports = []
    for child in children:
        stdout, _ = child.communicate(timeout=600)
        if child.returncode != 0:
            raise SystemExit(f"a worker failed with exit code {child.returncode}")
        reports.append(json.loads(stdout.strip().splitlines()[-1]))
    end_to_end = time.perf_counter() - started
    slowest = max(r["seconds"] for r in reports)
    return reports[0]["samples"] / slowest, end_to_end


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--cuda-check", action="store_true", help="check the merge of CUDA statistics instead")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cuda-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--nccl-check", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.batches, args.batch_size)
        return
    if args.cuda_worker:
        cuda_worker(args.batches, args.batch_size)
        return
    if args.nccl_check:
        nccl_exchange_check()
        return
    if args.cuda_check:
        cuda_check(args)
        return
    configurations = [
        ("1 process, default threads", 1, None),
        ("1 process, 1 thread", 1, 1),
        (f"{args.ranks} processes, 1 thread each", args.ranks, 1),
    ]
    measurements = [Measurement(name, p, t, [], []) for name, p, t in configurations]
    # Interleaved, so that drift of a shared machine spreads over every configuration alike.
    for _ in range(args.repeats):
        for measurement in measurements:
            steady, wall = launch(measurement.processes, measurement.threads, args)
            measurement.steady_samples_per_s.append(steady)
            measurement.end_to_end_s.append(wall)
    print(f"{args.batches} batches of {args.batch_size}x3x32x32, {os.cpu_count()} CPUs, median of {args.repeats}")
    for measurement in measurements:
        print(measurement.summary())
    if args.json:
        document = {
            "machine": platform.platform(),
            "cpus": os.cpu_count(),
            "batches": args.batches,
            "batch_size": args.batch_size,
            "measurements": [asdict(m) for m in measurements],
        }
        args.json.write_text(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
