"""Runs across torch.distributed ranks: exact merge, rank divergence and shared failure, on 2 and 3 CPU processes.

The multi-process tests start real gloo process groups on the loopback interface only
(MASTER_ADDR=127.0.0.1, GLOO_SOCKET_IFNAME=lo, a port found by binding 127.0.0.1:0), one
subprocess per rank running this very file as a script (``python -m tests.test_distributed
SCENARIO DIR``), with the environment torchrun would set. Each launch is bounded: the processes
must all exit within LAUNCH_TIMEOUT_S, and collectives time out after COLLECTIVE_TIMEOUT_S. A
launch runs several phases in one process group (starting torch costs seconds per process on
two cores), writes each phase's results as JSON, and the tests compare them with a
single-process float64 reference computed here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from bn_inspect.analyses.checking import check_model
from bn_inspect.analyses.inspection import inspect_model
from bn_inspect.data.batch import Batch, RunTotals
from bn_inspect.data.inputs import DirectoryData, open_input
from bn_inspect.distributed.collectives import describe_failures, exchange_status, fail_together
from bn_inspect.distributed.context import DistributedContext, collective_timeout_s, distributed_context
from bn_inspect.distributed.divergence import divergence_findings, rank_divergence
from bn_inspect.distributed.merge import merge_run_across_ranks
from bn_inspect.distributed.sharding import shard_batches, shard_files, shard_input
from bn_inspect.distributed.syncbn import local_sync_batch_norm, sync_batch_norm_groups
from bn_inspect.engine.capture import CallRecord, StatisticsRecorder, hooks_capture
from bn_inspect.engine.moments import ChannelMoments, InstanceMoments
from bn_inspect.engine.preserve import preserved_state
from bn_inspect.errors import BnInspectError, DistributedError, InputError, RankFailure
from bn_inspect.model.layers import NormLayer, iter_norm_layers
from bn_inspect.report.records import BufferDivergence, LayerDivergence, RankDivergence, json_ready
from bn_inspect.text import Untrusted
from tests.conftest import state_fingerprint
from tests.helpers import REPO
from tests.models import ChannelLayerNorm, randomize_norm_state, uneven_batches

# Left out of the quick subset (`-m "not slow"`): starts multi-process gloo groups.
pytestmark = pytest.mark.slow

LAUNCH_TIMEOUT_S = 60.0
COLLECTIVE_TIMEOUT_S = 20.0
BATCH_SIZE = 6
# Channel means far from 0 with tiny spread: the case where a careless merge loses every digit.
CHANNEL_MEANS = (1e4, -3e3, 5e2)
CHANNEL_STD = 1e-2


# ---------------------------------------------------------------------------------------------
# Model, data and the local run, shared by the workers and the single-process reference


class ShardNet(nn.Module):
    """BatchNorm2d on the raw input, InstanceNorm2d with tracking, a SyncBatchNorm called twice, BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        self.bn_in = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.InstanceNorm2d(4, track_running_stats=True)
        self.shared = nn.SyncBatchNorm(4)
        self.head = nn.Linear(4, 6)
        self.bn_out = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.shared(self.norm(self.conv(self.bn_in(x))))
        y = self.shared(y * 2)
        return self.bn_out(self.head(y.mean((2, 3))))


def make_model() -> ShardNet:
    """The same float64 model on every rank (seeded weights, trained-looking statistics)."""
    torch.manual_seed(0)
    model = randomize_norm_state(ShardNet(), seed=1).double()
    return model.eval()


def make_samples(num_samples: int, seed: int) -> torch.Tensor:
    """(num_samples, 3, 5, 5) float64 samples around CHANNEL_MEANS with standard deviation CHANNEL_STD."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((num_samples, 3, 5, 5), generator=generator, dtype=torch.float64) * CHANNEL_STD
    return noise + torch.tensor(CHANNEL_MEANS, dtype=torch.float64).view(1, 3, 1, 1)


# With 2 ranks, rank 1 runs a single batch of one sample.
UNEVEN_SIZES = (6, 1, 7)


def write_directory(path: Path) -> Path:
    """Two .npy shards: 11 samples (batches of 6 and 5) and 1 sample. With 3 ranks, rank 2 gets no file."""
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "part0.npy", make_samples(11, 10).numpy())
    np.save(path / "part1.npy", make_samples(1, 11).numpy())
    return path


def write_bad_directory(path: Path) -> Path:
    """Three shards of which the second (rank 1's, with 3 ranks) is not a .npy file at all."""
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "part0.npy", make_samples(4, 20).numpy())
    (path / "part1.npy").write_bytes(b"this is not an array")
    np.save(path / "part2.npy", make_samples(4, 22).numpy())
    return path


@dataclass
class LocalRun:
    """One rank's layers, recorded moments and totals."""

    layers: list[NormLayer]
    records: dict[tuple[str, int], CallRecord]
    totals: RunTotals


def record_locally(model: nn.Module, batches: Iterable[torch.Tensor], *, training: bool = False) -> LocalRun:
    """What check_model does before it builds the report: hooks, recorder (per-sample moments too), model restored."""
    layers = iter_norm_layers(model)
    recorder = StatisticsRecorder(sample_means=True)
    num_batches = num_samples = 0
    first: torch.Tensor | None = None
    with preserved_state(model), hooks_capture(layers, recorder), torch.no_grad():
        model.train(training)
        for batch in batches:
            first = batch if first is None else first
            num_batches += 1
            num_samples += batch.shape[0]
            recorder.start_batch()
            model(batch)
    totals = RunTotals(
        num_batches,
        num_samples,
        0,
        None if first is None else tuple(first.shape),
        None if first is None else str(first.dtype).removeprefix("torch."),
        None if first is None else Batch((first,)).sha256(),
    )
    return LocalRun(layers, recorder.records, totals)


def describe_records(records: dict[tuple[str, int], CallRecord]) -> dict[str, dict[str, Any]]:
    """JSON-ready moments per layer call, in record order (floats round-trip exactly through JSON)."""
    described: dict[str, dict[str, Any]] = {}
    for (name, call), record in records.items():
        entry: dict[str, Any] = {"num_batches": record.num_batches, "input_shape": list(record.input_shape)}
        moments = record.moments
        if isinstance(moments, ChannelMoments):
            entry |= {"count": moments.count, "mean": moments.mean.tolist(), "var": moments.biased_var().tolist()}
        elif isinstance(moments, InstanceMoments):
            entry |= {
                "count": moments.num_instances,
                "mean": moments.mean.tolist(),
                "var": moments.biased_var().tolist(),
            }
        if record.sample_moments is not None:
            entry |= {
                "num_samples": record.sample_moments.count,
                "between_var": record.sample_moments.biased_var().tolist(),
            }
        described[f"{name}#{call}"] = entry
    return described


# ---------------------------------------------------------------------------------------------
# The worker: one rank of a launch


def _write(directory: Path, phase: str, rank: int, content: object) -> None:
    (directory / f"{phase}-rank{rank}.json").write_text(json.dumps(content))


def _merge_phase(directory: Path, ctx: DistributedContext, batches: Iterator[torch.Tensor], phase: str) -> None:
    model = make_model()
    with fail_together(ctx.group):
        run = record_locally(model, batches)
    merged = merge_run_across_ranks(run.records, run.totals, ctx.group, layers=run.layers)
    _write(
        directory,
        phase,
        ctx.rank,
        {
            "records": describe_records(merged.records),
            "totals": dataclasses.asdict(merged.totals),
            "shares": [dataclasses.asdict(share) for share in merged.shares],
            "local_batches": run.totals.num_batches,
            "local_first_sha256": run.totals.first_sha256,
        },
    )


def _sync_phase(directory: Path, ctx: DistributedContext) -> None:
    """Train mode through a SyncBatchNorm, which on CPU refuses to run while a process group exists."""
    model = nn.Sequential(nn.SyncBatchNorm(3)).double()
    batches = shard_batches(
        [*uneven_batches(UNEVEN_SIZES, draw=make_samples)[::2], make_samples(3, 5)], ctx.rank, ctx.world_size
    )
    with fail_together(ctx.group), local_sync_batch_norm(model):
        run = record_locally(model, batches, training=True)
    merged = merge_run_across_ranks(run.records, run.totals, ctx.group, layers=run.layers)
    groups = [json_ready(dataclasses.asdict(group)) for group in sync_batch_norm_groups(model)]
    _write(directory, "sync", ctx.rank, {"records": describe_records(merged.records), "groups": groups})


def _layer_norm_phase(directory: Path, ctx: DistributedContext) -> None:
    """A LayerNorm over channels: the dims its kernel was seen to reduce travel with its record."""
    model = nn.Sequential(ChannelLayerNorm(3)).double().eval()
    with fail_together(ctx.group):
        run = record_locally(
            model, shard_batches(uneven_batches(UNEVEN_SIZES, draw=make_samples), ctx.rank, ctx.world_size)
        )
    merged = merge_run_across_ranks(run.records, run.totals, ctx.group, layers=run.layers)
    reduced = {f"{name}#{call}": record.reduced_dims for (name, call), record in merged.records.items()}
    _write(directory, "layer_norm", ctx.rank, reduced)


def _divergence_phase(directory: Path, ctx: DistributedContext) -> None:
    model = make_model()
    with torch.no_grad():
        if ctx.rank == 1:
            model.bn_in.running_mean[1] += 0.5
            model.bn_out.num_batches_tracked += 3
        if ctx.rank == 2:
            model.bn_in.running_mean[1] -= 0.25
            model.shared.running_var[0] *= 2
    divergence = rank_divergence(model, ctx.group)
    findings = [json_ready(dataclasses.asdict(f)) for f in divergence_findings(divergence)]
    _write(
        directory,
        "divergence",
        ctx.rank,
        {"divergence": json_ready(dataclasses.asdict(divergence)), "findings": findings},
    )


def _api_phase(directory: Path, ctx: DistributedContext) -> None:
    """check_model and inspect_model called with no context inside the user's own group join it."""
    model = make_model()
    with torch.no_grad():
        if ctx.rank == 1:
            # The last layer's buffers: every layer's input is still as in one process.
            model.bn_out.running_mean[1] += 0.5
    before = state_fingerprint(model)
    batches = list(shard_batches(uneven_batches(UNEVEN_SIZES, draw=make_samples), ctx.rank, ctx.world_size))
    check = check_model(model, batches)
    report = inspect_model(model, batches)
    _write(
        directory,
        "api",
        ctx.rank,
        {
            "findings": [[f.code, json_ready(f.layer), f.message] for f in check.findings],
            "notes": list(check.notes),
            "report": report.to_dict(),
            "unchanged": before == state_fingerprint(model),
        },
    )


def _two_ranks(directory: Path, rank: int) -> None:
    """As at the end of a DDP job: the group exists before bn-inspect's functions are called."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    with distributed_context() as ctx:
        if ctx.owns_group or ctx.world_size != 2 or ctx.rank != rank:
            raise AssertionError(f"unexpected context {ctx}")
        _merge_phase(
            directory,
            ctx,
            shard_batches(uneven_batches(UNEVEN_SIZES, draw=make_samples), ctx.rank, ctx.world_size),
            "merge",
        )
        _sync_phase(directory, ctx)
        _layer_norm_phase(directory, ctx)
        _divergence_phase(directory, ctx)
        _api_phase(directory, ctx)
    _write(directory, "kept", rank, {"initialized": dist.is_initialized()})
    if rank == 1:
        # Rank 0 is done with every earlier collective once its file exists: crash only then.
        deadline = time.monotonic() + COLLECTIVE_TIMEOUT_S
        while not (directory / "kept-rank0.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        # A crash outside any fail_together block: rank 0 must not wait for it until the timeout.
        os._exit(5)
    started = time.monotonic()
    try:
        with fail_together():
            pass
    finally:
        _write(directory, "wait", rank, {"seconds": time.monotonic() - started})


def _three_ranks(directory: Path, rank: int) -> None:
    """As under torchrun: bn-inspect forms the group from the environment and destroys it."""
    with distributed_context(timeout_s=COLLECTIVE_TIMEOUT_S) as ctx:
        if not ctx.owns_group or ctx.world_size != 3 or ctx.rank != rank:
            raise AssertionError(f"unexpected context {ctx}")
        sharded = shard_input(open_input(directory / "shards"), ctx.rank, ctx.world_size)
        _merge_phase(directory, ctx, (b.args[0] for b in sharded.batches(BATCH_SIZE, None)), "merge")
        _divergence_phase(directory, ctx)
        with fail_together(ctx.group):
            bad = shard_input(open_input(directory / "bad_shards"), ctx.rank, ctx.world_size)
            record_locally(make_model(), (b.args[0] for b in bad.batches(4, None)))


def worker_main(argv: list[str]) -> int:
    """Run one rank of a launch; errors end as the CLI ends them: one line on stderr, exit code."""
    scenario, directory = argv[0], Path(argv[1])
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    try:
        {"two": _two_ranks, "three": _three_ranks}[scenario](directory, rank)
    except BnInspectError as error:
        print(f"Error: {error.line()}", file=sys.stderr)
        return error.exit_code
    except Exception:
        traceback.print_exc()
        return 3
    return 0


# ---------------------------------------------------------------------------------------------
# Launching


@dataclass(frozen=True)
class Outcome:
    """How one rank's process ended."""

    rank: int
    returncode: int
    stderr: str
    seconds: float


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def launch(scenario: str, world_size: int, directory: Path) -> list[Outcome]:
    """Start one process per rank with torchrun's environment; all must exit within LAUNCH_TIMEOUT_S."""
    port = _free_port()
    start = time.monotonic()
    processes = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "GLOO_SOCKET_IFNAME": "lo",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO),
        }
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.test_distributed", scenario, str(directory)],
                cwd=REPO,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outcomes = []
    try:
        for rank, process in enumerate(processes):
            _, stderr = process.communicate(timeout=max(0.1, start + LAUNCH_TIMEOUT_S - time.monotonic()))
            outcomes.append(Outcome(rank, process.returncode, stderr, time.monotonic() - start))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the {world_size} ranks of {scenario!r} did not all exit within {LAUNCH_TIMEOUT_S:g} s (a hang)")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return outcomes


def read_phase(directory: Path, phase: str, world_size: int) -> list[dict[str, Any]]:
    """Every rank's JSON for one phase."""
    return [json.loads((directory / f"{phase}-rank{rank}.json").read_text()) for rank in range(world_size)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Outcome]]:
    directory = tmp_path_factory.mktemp("two_ranks")
    return directory, launch("two", 2, directory)


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Outcome]]:
    directory = tmp_path_factory.mktemp("three_ranks")
    write_directory(directory / "shards")
    write_bad_directory(directory / "bad_shards")
    return directory, launch("three", 3, directory)


# ---------------------------------------------------------------------------------------------
# The float64 reference


def same_tensors(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Same number of tensors, each equal in shape and every value."""
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def reference_statistics(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per layer call, numpy float64 mean and biased variance of every input value it received.

    BatchNorm: over all values of a channel in all batches. InstanceNorm: the average over
    samples of each sample's own mean and variance, what its running statistics track.
    """
    inputs: dict[str, list[np.ndarray]] = {}
    calls: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):

            def keep(_module: nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
                call = calls.get(name, 0)
                calls[name] = call + 1
                inputs.setdefault(f"{name}#{call}", []).append(args[0].detach().double().numpy().copy())

            handles.append(module.register_forward_pre_hook(keep))
    with torch.no_grad():
        for batch in batches:
            calls.clear()
            model(batch)
    for handle in handles:
        handle.remove()
    reference = {}
    for key, arrays in inputs.items():
        values = np.concatenate(arrays)
        if key.startswith("norm#"):
            flat = values.reshape(values.shape[0], values.shape[1], -1)
            reference[key] = (flat.mean(axis=2).mean(axis=0), flat.var(axis=2).mean(axis=0))
        else:
            per_channel = np.moveaxis(values, 1, 0).reshape(values.shape[1], -1)
            reference[key] = (per_channel.mean(axis=1), per_channel.var(axis=1))
    return reference


def assert_matches_references(merged: dict[str, dict[str, Any]], batches: list[torch.Tensor]) -> None:
    """Equal to one process over the same batches to float64 rounding, and to numpy's float64 figures."""
    single = describe_records(record_locally(make_model(), batches).records)
    assert list(merged) == list(single), "layer calls in another order than in one process"
    assert any("between_var" in entry for entry in merged.values())
    reference = reference_statistics(make_model(), batches)
    for key, entry in merged.items():
        one = single[key]
        assert (entry["count"], entry["num_batches"], entry["input_shape"]) == (
            one["count"],
            one["num_batches"],
            one["input_shape"],
        )
        mean, var = np.array(entry["mean"]), np.array(entry["var"])
        scale = np.abs(np.array(one["mean"])) + np.sqrt(np.array(one["var"]))
        # Only the order of the exact float64 merges differs from one process: a few ulps of the
        # mean's magnitude, relayed to var through Chan's delta term.
        np.testing.assert_allclose(mean, one["mean"], rtol=0, atol=1e-14 * scale.max())
        np.testing.assert_allclose(var, one["var"], rtol=1e-9, atol=0)
        # Check's per-sample moments (BN205) travel too, for the batch norms with spatial dims.
        assert ("between_var" in entry) == ("between_var" in one)
        if "between_var" in one:
            assert entry["num_samples"] == one["num_samples"]
            np.testing.assert_allclose(entry["between_var"], one["between_var"], rtol=1e-9, atol=0)
        ref_mean, ref_var = reference[key]
        np.testing.assert_allclose(mean, ref_mean, rtol=0, atol=1e-13 * scale.max())
        np.testing.assert_allclose(var, ref_var, rtol=1e-8, atol=0)


# ---------------------------------------------------------------------------------------------
# (a) merged statistics equal the single-process float64 reference


def test_two_ranks_merge_uneven_shards_with_a_single_sample_batch_exactly(
    two_ranks: tuple[Path, list[Outcome]],
) -> None:
    directory, _ = two_ranks
    results = read_phase(directory, "merge", 2)
    assert [r.pop("local_batches") for r in results] == [2, 1]  # rank 1: one batch of one sample
    rank_zero_first, rank_one_first = (r.pop("local_first_sha256") for r in results)
    assert results[0] == results[1], "ranks hold different merged statistics"
    # The merged run's data fingerprint is that of the first batch of the lowest rank that ran one.
    assert rank_zero_first != rank_one_first
    assert results[0]["totals"] == {
        "num_batches": 3,
        "num_samples": 14,
        "num_nonfinite_values": 0,
        "first_shape": [6, 3, 5, 5],
        "first_dtype": "float64",
        "first_sha256": rank_zero_first,
    }
    assert results[0]["shares"] == [
        {"rank": 0, "num_batches": 2, "num_samples": 13},
        {"rank": 1, "num_batches": 1, "num_samples": 1},
    ]
    assert_matches_references(results[0]["records"], uneven_batches(UNEVEN_SIZES, draw=make_samples))


def test_three_ranks_merge_file_shards_including_a_rank_without_data(
    three_ranks: tuple[Path, list[Outcome]],
) -> None:
    directory, _ = three_ranks
    results = read_phase(directory, "merge", 3)
    assert [r.pop("local_batches") for r in results] == [2, 1, 0]
    local_first = [r.pop("local_first_sha256") for r in results]
    assert results[0] == results[1] == results[2]
    assert [s["num_samples"] for s in results[0]["shares"]] == [11, 1, 0]
    batches = [b.args[0] for b in open_input(directory / "shards").batches(BATCH_SIZE, None)]
    assert local_first[2] is None and results[0]["totals"]["first_sha256"] == local_first[0]
    assert local_first[0] == Batch((batches[0],)).sha256()
    assert_matches_references(results[0]["records"], batches)


def test_sync_batch_norm_trains_locally_and_reports_its_group(two_ranks: tuple[Path, list[Outcome]]) -> None:
    directory, _ = two_ranks
    results = read_phase(directory, "sync", 2)
    assert results[0] == results[1]
    assert results[0]["groups"] == [{"name": "0", "ranks": [0, 1], "is_world": True}]
    batches = [*uneven_batches(UNEVEN_SIZES, draw=make_samples)[::2], make_samples(3, 5)]
    values = np.concatenate([b.numpy() for b in batches])
    per_channel = np.moveaxis(values, 1, 0).reshape(3, -1)
    entry = results[0]["records"]["0#0"]
    assert entry["num_batches"] == 3
    np.testing.assert_allclose(entry["mean"], per_channel.mean(axis=1), rtol=1e-15, atol=0)
    np.testing.assert_allclose(entry["var"], per_channel.var(axis=1), rtol=1e-8)


# ---------------------------------------------------------------------------------------------
# (b) diverged buffers are reported by name with the right difference


def test_the_dims_a_layer_norm_reduces_are_the_same_on_every_rank(two_ranks: tuple[Path, list[Outcome]]) -> None:
    directory, _ = two_ranks
    assert read_phase(directory, "layer_norm", 2) == [{"0#0": [1]}, {"0#0": [1]}]


def test_the_python_api_joins_the_users_group_and_reports_divergence_as_bn111(
    two_ranks: tuple[Path, list[Outcome]],
) -> None:
    directory, _ = two_ranks
    results = read_phase(directory, "api", 2)
    result, other = results
    assert result["notes"] == other["notes"]
    # Batch statistics are global, identical on both; running statistics are each rank's own.
    for mine, theirs in zip(result["report"]["layers"], other["report"]["layers"], strict=True):
        assert (mine["batch_mean"], mine["batch_var"]) == (theirs["batch_mean"], theirs["batch_var"])
        assert (mine["running_mean"] == theirs["running_mean"]) == (mine["name"] != "bn_out")
    assert result["unchanged"]
    divergent = [f for f in result["findings"] if f[0] == "BN111"]
    assert [f[1] for f in divergent] == ["bn_out"]
    assert "running_mean by up to 0.5" in divergent[0][2] and "rank 1 of 2" in divergent[0][2]
    assert any("2 ranks" in note and "differ between ranks in 1 layer" in note for note in result["notes"])
    # Rank 0's data rules saw all ranks' data: the same findings as one process over every batch.
    single = check_model(
        make_model(), uneven_batches(UNEVEN_SIZES, draw=make_samples), distributed=DistributedContext()
    )
    assert [[f.code, json_ready(f.layer)] for f in single.findings] == [
        f[:2] for f in result["findings"] if f[0] != "BN111"
    ]
    section = result["report"]["distributed"]
    assert [s["num_samples"] for s in section["shares"]] == [13, 1]
    assert section["sync_batch_norm"] == [{"name": "shared", "ranks": [0, 1], "is_world": True}]
    spread = {layer["name"]: layer for layer in section["divergence"]["layers"]}
    assert spread["bn_out"]["buffers"][0]["differing_ranks"] == [1]
    reference = reference_statistics(make_model(), uneven_batches(UNEVEN_SIZES, draw=make_samples))
    for layer in result["report"]["layers"]:
        mean, var = reference[f"{layer['name']}#{layer['call']}"]
        np.testing.assert_allclose(layer["batch_mean"], mean, rtol=1e-12)
        np.testing.assert_allclose(layer["batch_var"], var, rtol=1e-8)


def _divergent(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        f"{layer['name']}.{b['buffer']}": b
        for layer in result["divergence"]["layers"]
        for b in layer["buffers"]
        if b["differing_ranks"]
    }


def test_two_ranks_report_diverged_buffers_by_name(two_ranks: tuple[Path, list[Outcome]]) -> None:
    directory, _ = two_ranks
    results = read_phase(directory, "divergence", 2)
    assert results[0] == results[1]
    divergent = _divergent(results[0])
    assert sorted(divergent) == ["bn_in.running_mean", "bn_out.num_batches_tracked"]
    assert divergent["bn_in.running_mean"]["max_abs_difference"] == pytest.approx(0.5, rel=1e-15)
    assert divergent["bn_in.running_mean"]["differing_ranks"] == [1]
    assert divergent["bn_in.running_mean"]["elements"] == [1]
    assert divergent["bn_out.num_batches_tracked"]["max_abs_difference"] == 3.0
    findings = results[0]["findings"]
    assert [(f["code"], f["layer"]) for f in findings] == [("BN111", "bn_in"), ("BN111", "bn_out")]
    assert "running_mean by up to 0.5" in findings[0]["message"]
    assert findings[0]["channels"] == [1]


def test_three_ranks_report_the_spread_between_any_two_ranks(three_ranks: tuple[Path, list[Outcome]]) -> None:
    directory, _ = three_ranks
    results = read_phase(directory, "divergence", 3)
    assert results[0] == results[1] == results[2]
    divergent = _divergent(results[0])
    assert sorted(divergent) == ["bn_in.running_mean", "bn_out.num_batches_tracked", "shared.running_var"]
    # +0.5 on rank 1 and -0.25 on rank 2: the largest difference is between those two.
    assert divergent["bn_in.running_mean"]["max_abs_difference"] == pytest.approx(0.75, rel=1e-15)
    assert divergent["bn_in.running_mean"]["differing_ranks"] == [1, 2]
    assert divergent["shared.running_var"]["differing_ranks"] == [2]


# ---------------------------------------------------------------------------------------------
# (c) a failing rank stops every rank with a clear error, never a hang


def test_a_bad_shard_on_one_rank_stops_every_rank_naming_it(three_ranks: tuple[Path, list[Outcome]]) -> None:
    _, outcomes = three_ranks
    for outcome in outcomes:
        assert outcome.returncode == 2, outcome.stderr
        assert outcome.seconds < LAUNCH_TIMEOUT_S
        last = outcome.stderr.strip().splitlines()[-1]
        assert last.startswith("Error: rank 1 of 3 failed: ")
        assert "part1.npy is not a .npy file (no NUMPY header)" in last


def test_a_crashed_rank_is_noticed_without_waiting_for_the_timeout(two_ranks: tuple[Path, list[Outcome]]) -> None:
    directory, outcomes = two_ranks
    assert read_phase(directory, "kept", 2) == [{"initialized": True}] * 2  # a group it did not create stays
    crashed, survivor = outcomes[1], outcomes[0]
    assert crashed.returncode == 5
    # The caller's gloo group outlives bn-inspect here; once its peer is gone, torch may abort in
    # that group's destructor while the process exits with bn-inspect's code 2 (about 1 run in 15
    # on 2 cores), after the error line above. Any other ending is a failure.
    aborted_at_exit = survivor.returncode == -signal.SIGABRT and survivor.stderr.rstrip().endswith(
        "terminate called without an active exception"
    )
    assert survivor.returncode == 2 or aborted_at_exit, survivor.stderr
    assert "Error: rank 0 of 2 lost contact with the other ranks while exchanging each rank's status" in (
        survivor.stderr
    )
    # The gloo connection closes with the process: no waiting for the 20 s collective timeout.
    assert read_phase(directory, "wait", 1)[0]["seconds"] < COLLECTIVE_TIMEOUT_S / 2


# ---------------------------------------------------------------------------------------------
# Single process: sharding, fallbacks and messages (no process group needed)


def test_shard_input_of_one_file_gives_every_batch_to_exactly_one_rank(tmp_path: Path) -> None:
    np.save(tmp_path / "data.npy", make_samples(23, 0).numpy())
    data = open_input(tmp_path / "data.npy")
    for max_batches in (None, 4):
        expected = [b.args[0] for b in data.batches(4, max_batches)]
        for world in (1, 2, 3, 7):
            for rank in range(world):
                shard = [b.args[0] for b in shard_input(data, rank, world).batches(4, max_batches)]
                assert same_tensors(shard, expected[rank::world])
                assert shard_input(data, rank, world).num_batches(4, max_batches) == len(shard)


def test_shard_input_of_a_directory_splits_files_or_capped_batches(tmp_path: Path) -> None:
    for index, size in enumerate((5, 1, 9)):
        np.save(tmp_path / f"part{index}.npy", make_samples(size, index).numpy())
    data = open_input(tmp_path)
    assert isinstance(data, DirectoryData)
    assert shard_files(data.files, 1, 2) == (tmp_path / "part1.npy",)
    by_file = [[b.args[0] for b in shard_input(data, rank, 2).batches(4, None)] for rank in range(2)]
    assert [len(b) for b in by_file] == [2 + 3, 1]  # files 0 and 2 on rank 0
    everything = [b.args[0] for b in data.batches(4, None)]
    assert same_tensors(by_file[0], everything[:2] + everything[3:])
    capped = [[b.args[0] for b in shard_input(data, rank, 2).batches(4, 4)] for rank in range(2)]
    assert same_tensors(capped[0], everything[0:4:2])
    assert same_tensors(capped[1], everything[1:4:2])
    assert shard_input(data, 2, 3).num_batches(4, None) == 3
    assert list(shard_batches(range(10), 2, 4)) == [2, 6]


def test_a_single_process_needs_no_group_and_changes_nothing() -> None:
    with distributed_context(environ={}) as ctx:
        assert (ctx.is_distributed, ctx.is_main, ctx.owns_group) == (False, True, False)
        run = record_locally(make_model(), uneven_batches(UNEVEN_SIZES, draw=make_samples))
        merged = merge_run_across_ranks(run.records, run.totals, ctx.group, layers=run.layers)
        assert merged.records == run.records
        assert merged.totals == run.totals
        assert rank_divergence(make_model()).divergent == ()
        exchange_status(None)
        with pytest.raises(InputError, match="bad shard"), fail_together():
            raise InputError("bad shard", "Fix it")


def test_an_incomplete_torchrun_environment_is_refused_clearly() -> None:
    with (
        pytest.raises(DistributedError, match="MASTER_ADDR is not, so the ranks cannot find each other"),
        distributed_context(environ={"WORLD_SIZE": "2", "RANK": "0", "MASTER_PORT": "1"}),
    ):
        pass
    with pytest.raises(DistributedError, match="RANK is not"), distributed_context(environ={"WORLD_SIZE": "2"}):
        pass
    assert collective_timeout_s(None, {"BN_INSPECT_DIST_TIMEOUT": "7.5"}) == 7.5
    assert collective_timeout_s(None, {}) == 1800.0
    with pytest.raises(DistributedError, match="is not a positive number"):
        collective_timeout_s(None, {"BN_INSPECT_DIST_TIMEOUT": "soon"})


def test_failures_of_several_ranks_are_named_in_one_line() -> None:
    failures = (
        RankFailure(1, "InputError", "input file a.npy does not exist", "Check the path", False, 2),
        RankFailure(2, "KeyError", "'x'", "", True, 3),
    )
    error = describe_failures(failures, 4)
    assert error.line() == (
        "ranks 1 and 2 of 4 failed: rank 1: input file a.npy does not exist; rank 2: internal error KeyError: "
        "'x' (a bug: see that rank's traceback). Check the path"
    )
    assert error.exit_code == 2


def test_divergence_findings_respect_the_tolerance_and_nan() -> None:
    def divergence(difference: float) -> RankDivergence:
        buffer = BufferDivergence("running_var", difference, (1,), (0,))
        return RankDivergence(2, (LayerDivergence(Untrusted("bn"), Untrusted("BatchNorm2d"), (buffer,)),))

    assert divergence_findings(divergence(1e-9), tolerance=1e-6) == []
    assert [f.code for f in divergence_findings(divergence(1e-3), tolerance=1e-6)] == ["BN111"]
    assert [f.layer for f in divergence_findings(divergence(math.nan), tolerance=1.0)] == [Untrusted("bn")]


def test_local_sync_batch_norm_is_undone_even_when_the_block_raises() -> None:
    model = nn.Sequential(nn.SyncBatchNorm(3))
    before = state_fingerprint(model)
    with pytest.raises(RuntimeError, match="boom"), local_sync_batch_norm(model):
        assert "forward" in model[0].__dict__
        raise RuntimeError("boom")
    assert "forward" not in model[0].__dict__
    assert state_fingerprint(model) == before


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
