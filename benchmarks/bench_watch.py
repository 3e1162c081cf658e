"""What ``bn_inspect.watch`` costs a training loop, and how large its timeline grows.

Run from the repository root: ``python benchmarks/bench_watch.py [--rounds N] [--json PATH]``.

Cost: a ResNet-18-sized network (BasicBlocks 2-2-2-2, 20 BatchNorm2d, 11.7 M parameters) built
here, so torchvision is not needed, trains with SGD on random batches on the CPU. Two copies train
side by side, one inside a watch at ``every``: each step runs on both, alternating which goes
first, and is timed alone, for ``rounds`` x ``every`` steps (one sample per round). The figures:
the mean watched step over the mean plain step, and each sampled step over the plain steps around
it (median over the samples).

Read-back A/B (``--ab-rounds N``): the same network at every=1 (every step a sample), three copies
stepped in rotating order: plain, watched with the batch statistics read back from BatchNorm's
update (the watch's way), and watched with them read from each layer's input (the way before
050378b, forced by swapping the engine's ``running_before`` for one that declines); each watched
step over the plain step of its round, median over N rounds.

Size: a ResNet-50-sized network (bench_resnet50_cpu.py's) is watched at every=1 with the default
detail_every for ``--size-steps`` steps; the bytes of a sample without and with per-channel detail
are measured from the file, and the size of 100,000 steps at every=50 (2,000 samples, one in 20
with detail, as the watch's detail budget allows) computed from them.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bn_inspect
from benchmarks.bench_resnet50_cpu import resnet50
from bn_inspect.analyses.watch import DetailBudget


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.down(x))


def resnet18(classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ]
    cin = 64
    for cout, stride in ((64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)):
        layers.append(BasicBlock(cin, cout, stride))
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes)]
    return nn.Sequential(*layers)


def timed_steps(
    model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[torch.Tensor], labels: torch.Tensor
) -> list[float]:
    times = []
    for x in batches:
        start = time.perf_counter()
        loss = F.cross_entropy(model(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times


def cost(rounds: int, every: int, batch: int, size: int, folder: Path) -> dict[str, object]:
    torch.manual_seed(0)
    plain_model = resnet18()
    watched_model = copy.deepcopy(plain_model)
    models = {
        "plain": (plain_model, torch.optim.SGD(plain_model.parameters(), lr=0.01, momentum=0.9)),
        "watched": (watched_model, torch.optim.SGD(watched_model.parameters(), lr=0.01, momentum=0.9)),
    }
    batches = [torch.randn(batch, 3, size, size) for _ in range(every)]
    labels = torch.randint(0, 10, (batch,))
    for model, optimizer in models.values():
        timed_steps(model, optimizer, batches[:3], labels)  # warm-up
    times: dict[str, list[float]] = {"plain": [], "watched": []}
    # Step by step, alternating which goes first: a load that comes and goes (a shared machine)
    # falls on both alike.
    with bn_inspect.watch(watched_model, folder / "cost.jsonl", every=every):
        for step in range(rounds * every):
            order = ("plain", "watched") if step % 2 == 0 else ("watched", "plain")
            for kind in order:
                model, optimizer = models[kind]
                times[kind] += timed_steps(model, optimizer, [batches[step % every]], labels)
    plain, watched = times["plain"], times["watched"]
    sampled = [watched[s] / statistics.fmean(plain[max(s - 2, 0) : s + 3]) for s in range(0, rounds * every, every)]
    return {
        "model": "ResNet-18-sized (20 BatchNorm2d)",
        "batch": [batch, 3, size, size],
        "every": every,
        "steps": rounds * every,
        "plain_step_ms": 1000 * statistics.fmean(plain),
        "mean_ratio": statistics.fmean(watched) / statistics.fmean(plain),
        "median_pair_ratio": statistics.median(w / p for w, p in zip(watched, plain, strict=True)),
        "sampled_ratio_median": statistics.median(sampled),
        "sampled_ratios": sampled,
    }


def read_back_ab(rounds: int, batch: int, size: int, folder: Path) -> dict[str, object]:
    from bn_inspect.engine import watching

    read_back = watching.running_before
    torch.manual_seed(0)
    base = resnet18()
    kinds = ("plain", "read back", "read from the input")
    models = {kind: copy.deepcopy(base) for kind in kinds}
    optimizers = {kind: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for kind, m in models.items()}
    x, labels = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))

    def step(kind: str) -> float:
        # The hooks look running_before up at each call: declining it sends every call to the input.
        watching.running_before = read_back if kind != "read from the input" else (lambda module: None)
        return timed_steps(models[kind], optimizers[kind], [x], labels)[0]

    for kind in kinds:
        step(kind)  # warm-up
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    try:
        with (
            bn_inspect.watch(models["read back"], folder / "ab-read-back.jsonl", every=1),
            bn_inspect.watch(models["read from the input"], folder / "ab-input.jsonl", every=1),
        ):
            for n in range(rounds):
                for kind in kinds[n % 3 :] + kinds[: n % 3]:
                    times[kind].append(step(kind))
    finally:
        watching.running_before = read_back
    plain = times["plain"]
    return {
        "rounds": rounds,
        "plain_step_ms": 1000 * statistics.median(plain),
        **{
            f"sampled_ratio_median_{kind.replace(' ', '_')}": statistics.median(
                t / p for t, p in zip(times[kind], plain, strict=True)
            )
            for kind in kinds[1:]
        },
    }


def timeline_size(steps: int, folder: Path) -> dict[str, object]:
    torch.manual_seed(0)
    model = resnet50()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    path = folder / "size.jsonl"
    x, labels = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    with bn_inspect.watch(model, path, every=1):
        for _ in range(steps):
            loss = F.cross_entropy(model(x), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    lines = path.read_bytes().splitlines(keepends=True)
    samples = [(json.loads(line), len(line)) for line in lines if b'"record":"sample"' in line]
    plain = [size for record, size in samples if "detail" not in record]
    detailed = [size for record, size in samples if "detail" in record]
    header = len(lines[0])
    total_samples = 100_000 // 50
    extra = statistics.fmean(detailed) - statistics.fmean(plain)
    # The watch's own rule for periodic detail, run over the 2,000 samples with the measured size.
    budget = DetailBudget(20)
    with_detail = sum(1 for n in range(total_samples) if n % budget.interval == 0 and budget.take(round(extra)))
    estimate = header + total_samples * statistics.fmean(plain) + with_detail * extra
    without_budget = header + total_samples * statistics.fmean(plain) + -(-total_samples // 20) * extra
    return {
        "model": "ResNet-50-sized (53 BatchNorm2d, 26,560 channels)",
        "header_bytes": header,
        "sample_bytes": statistics.fmean(plain),
        "detailed_sample_bytes": statistics.fmean(detailed),
        "samples_measured": len(samples),
        "detailed_samples_of_2000": with_detail,
        "estimate_100k_steps_every_50_bytes": estimate,
        "estimate_without_the_detail_budget_bytes": without_budget,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--size-steps", type=int, default=21)
    parser.add_argument("--ab-rounds", type=int, default=0, help="rounds of the read-back A/B (0: skip it)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        result = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}",
            "cost": cost(args.rounds, args.every, args.batch, args.size, Path(folder)),
            "size": timeline_size(args.size_steps, Path(folder)),
        }
        if args.ab_rounds:
            result["read_back_ab"] = read_back_ab(args.ab_rounds, args.batch, args.size, Path(folder))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
