"""What --format html costs on a ResNet-50 inspection: time to build and write the page, and its size.

Run from the repository root: ``python benchmarks/bench_html.py [--repeats N] [--json PATH]``.
The model is ResNet-50's architecture (bench_resnet50_cpu.py: 53 BatchNorm2d, 26,560 channels),
its running statistics filled by two train-mode passes on seeded random data; the report is
``inspect_model`` over 4 batches of 8x3x224x224. The report is built once; then the page is built
(``HtmlFormatter.text``) and written through ``write_result`` (atomic, synced) ``--repeats`` times.
The first build also reads Plotly.js from disk (and packs it, gzip + base64); it is reported apart.
Issue #19's targets: under 3 s beyond the run, under 6 MB. ``--browser`` also opens the page from
file:// in Debian's Chromium (Playwright) ``--repeats`` times and times it until page.js has
unpacked Plotly.js and drawn the first plots (``body[data-ready]``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))
sys.path.insert(0, str(BENCHMARKS.parent))

import bench_resnet50_cpu  # noqa: E402

from bn_inspect.analyses.inspection import inspect_model  # noqa: E402
from bn_inspect.output.formats import FORMATTERS, Rendering, write_result  # noqa: E402
from bn_inspect.report.records import Report  # noqa: E402


def resnet50_report() -> tuple[Report, float]:
    """The inspection of a ResNet-50 with trained-looking running statistics, and how long the run took."""
    torch.manual_seed(0)
    model = bench_resnet50_cpu.resnet50()
    with torch.no_grad():
        model.train()
        for _ in range(2):
            model(torch.randn(8, 3, 224, 224))
    model.eval()
    batches = [torch.randn(8, 3, 224, 224) * 1.2 + 0.1 for _ in range(4)]
    start = time.perf_counter()
    report = inspect_model(model, batches, input_source="random normal ×1.2 + 0.1")
    return report, time.perf_counter() - start


def browser_loads(page: Path, repeats: int) -> list[float]:
    """Seconds from opening ``page`` in Chromium to its first plots drawn, once per repeat (a fresh tab each)."""
    from playwright.sync_api import sync_playwright

    seconds = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        for _ in range(repeats):
            tab = browser.new_page(viewport={"width": 1280, "height": 900})
            start = time.perf_counter()
            tab.goto(page.as_uri())
            tab.wait_for_selector("body[data-ready=plots]", state="attached", timeout=60_000)
            seconds.append(time.perf_counter() - start)
            tab.close()
        browser.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--browser", action="store_true", help="also time loading the page in /usr/bin/chromium")
    args = parser.parse_args()
    report, run_seconds = resnet50_report()
    formatter = FORMATTERS["html"]
    start = time.perf_counter()
    page = formatter.text(report, Rendering())
    first = time.perf_counter() - start
    builds, writes = [], []
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "resnet50.html"
        for _ in range(args.repeats):
            start = time.perf_counter()
            formatter.text(report, Rendering())
            builds.append(time.perf_counter() - start)
            start = time.perf_counter()
            write_result(report, "html", target)
            writes.append(time.perf_counter() - start)
        size = target.stat().st_size
        loads = browser_loads(target, args.repeats) if args.browser else []
    figures = {
        "layers": len(report.layers),
        "channels": sum(layer.num_channels or 0 for layer in report.layers),
        "inspect_run_s": run_seconds,
        "first_build_s": first,
        "build_median_s": statistics.median(builds),
        "build_and_write_median_s": statistics.median(writes),
        "page_bytes": size,
        "page_chars": len(page),
    }
    if loads:
        figures["browser_load_to_plots_median_s"] = statistics.median(loads)
    for name, value in figures.items():
        print(f"{name:26} {value:,.3f}" if isinstance(value, float) else f"{name:26} {value:,}")
    print(f"targets: build and write < 3 s: {figures['build_and_write_median_s'] < 3}; page < 6 MB: {size < 6_000_000}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
