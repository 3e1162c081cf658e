"""Image folders: bn-inspect's image loading + inspection against a plain ImageFolder + DataLoader loop.

Run from the repository root where torchvision is installed (the baseline is torchvision's):

    python benchmarks/bench_images.py [--images 2000] [--workers 2] [--pairs 3] [--threads T] [--memory] [--json PATH]

Both sides decode the same folder of 224×224 JPEGs (ImageFolder layout, 10 classes), resize and
centre-crop to 224, normalize with the ImageNet mean and std, and run a ResNet-18
(``torchvision.models.resnet18(weights=None)``, eval, no_grad) over batches of 64 with the same
number of DataLoader workers. bn-inspect's side is ``run_inspect``, what ``bn-inspect inspect
--arch torchvision.models:resnet18 --input DIR --resize 224 --crop 224 --normalize imagenet``
calls (hooks, exact statistics, report). Runs alternate (plain first in even pairs); the figure
is the median ratio of images per second, bn-inspect / plain (target ≥ 0.9).

``--memory`` adds flat memory: peak RSS (VmHWM) of a child process that streams 2,000 and then
20,000 tiny PNGs through bn-inspect's loader; the ratio should stay near 1.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BATCH_SIZE = 64
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def write_jpegs(root: Path, count: int, size: int = 224) -> None:
    """Smooth pictures with some texture (so JPEG sizes and decode times are those of photos)."""
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:size, 0:size] / size
    for index in range(count):
        a, b, c = rng.uniform(0, 6, 3)
        base = np.stack([np.sin(a * rows + b * cols), np.cos(b * rows - c * cols), np.sin(c * (rows + cols))], -1)
        picture = (base * 90 + 128 + rng.normal(0, 12, (size, size, 3))).clip(0, 255).astype(np.uint8)
        folder = root / f"class_{index % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).save(folder / f"{index:06d}.jpg", quality=90)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the DataLoader workers, joined after each run)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def plain_loop(root: Path, workers: int) -> tuple[float, int]:
    """torchvision's ImageFolder + DataLoader + model forward: seconds and images."""
    from torchvision import datasets, models, transforms

    recipe = transforms.Compose(
        [transforms.Resize(224), transforms.CenterCrop(224), transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    )
    start = time.perf_counter()
    model = models.resnet18(weights=None).eval()
    loader = torch.utils.data.DataLoader(
        datasets.ImageFolder(str(root), transform=recipe), batch_size=BATCH_SIZE, num_workers=workers
    )
    count = 0
    with torch.no_grad():
        for images, _ in loader:
            model(images)
            count += len(images)
    return time.perf_counter() - start, count


def bn_inspect_run(root: Path, workers: int) -> tuple[float, int]:
    """What `bn-inspect inspect --arch torchvision.models:resnet18 --input DIR ...` runs: seconds and images."""
    from bn_inspect.analyses.runs import run_inspect
    from bn_inspect.analyses.session import SilentObserver
    from bn_inspect.options import RunOptions

    options = RunOptions(
        arch="torchvision.models:resnet18",
        arch_kwargs='{"weights": null}',
        input_file=root,
        resize=224,
        crop=224,
        normalize="imagenet",
        workers=workers,
        batch_size=BATCH_SIZE,
    )
    start = time.perf_counter()
    report = run_inspect(options, SilentObserver())
    elapsed = time.perf_counter() - start
    assert report is not None
    return elapsed, report.input.num_samples


def throughput(root: Path, workers: int, pairs: int) -> dict[str, object]:
    runs: list[dict[str, float]] = []
    for pair in range(pairs):
        order = [("plain", plain_loop), ("bn_inspect", bn_inspect_run)]
        timings: dict[str, float] = {}
        for name, function in order if pair % 2 == 0 else order[::-1]:
            cpu_before = cpu_seconds()
            seconds, count = function(root, workers)
            cpu = cpu_seconds() - cpu_before
            timings[name] = count / seconds
            timings[f"{name}_cpu"] = count / cpu
            print(
                f"pair {pair}: {name:10s} {count} images in {seconds:6.1f} s = {count / seconds:6.1f} images/s "
                f"({count / cpu:5.1f} per CPU second); load {os.getloadavg()[0]:.2f}",
                flush=True,
            )
        timings["ratio"] = timings["bn_inspect"] / timings["plain"]
        timings["cpu_ratio"] = timings["bn_inspect_cpu"] / timings["plain_cpu"]
        runs.append(timings)
    ratios = [run["ratio"] for run in runs]
    cpu_ratios = [run["cpu_ratio"] for run in runs]
    return {
        "pairs": runs,
        "median_ratio": statistics.median(ratios),
        "min_ratio": min(ratios),
        "max_ratio": max(ratios),
        "median_cpu_ratio": statistics.median(cpu_ratios),
    }


CHILD = """
import resource, sys
from pathlib import Path
from bn_inspect.data.decode import Preprocessing
from bn_inspect.data.images import open_images
files = open_images(Path(sys.argv[1]), Preprocessing(), workers=int(sys.argv[2]))
count = sum(batch.num_samples for batch in files.batches(64, None))
print(count, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss(root: Path, workers: int) -> tuple[int, int]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(root), str(workers)], capture_output=True, text=True, check=True, env=env
    ).stdout.split()
    return int(out[0]), int(out[1])


def flat_memory(workers: int) -> dict[str, object]:
    found = {}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for count in (2_000, 20_000):
            for index in range(len(list(root.rglob("*.png"))), count):
                Image.new("L", (8, 8), color=index % 256).save(root / f"{index:06d}.png")
            images, kib = peak_rss(root, workers)
            found[str(count)] = {"images": images, "peak_rss_kib": kib}
            print(f"{images} tiny images streamed: peak RSS {kib / 1024:.1f} MiB", flush=True)
    found["ratio"] = found["20000"]["peak_rss_kib"] / found["2000"]["peak_rss_kib"]  # type: ignore[index]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch intra-op threads of the main process (default: torch's)")
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import PIL
    import torchvision

    result: dict[str, object] = {
        "images": args.images,
        "workers": args.workers,
        "batch_size": BATCH_SIZE,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_start": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory() as folder:
        write_jpegs(Path(folder), args.images)
        result["throughput"] = throughput(Path(folder), args.workers, args.pairs)
    if args.memory:
        result["memory"] = flat_memory(args.workers)
    result["load_end"] = os.getloadavg()
    summary = result["throughput"]
    print(
        f"images/s ratio bn-inspect / plain: median {summary['median_ratio']:.3f} (target ≥ 0.9); "  # type: ignore[index]
        f"per CPU second: {summary['median_cpu_ratio']:.3f}"  # type: ignore[index]
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
