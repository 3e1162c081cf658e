"""The BatchNorm fault benchmark: train small nets, build healthy and faulty cases, measure each case's
accuracy damage, and record what bn-inspect says about it today without a baseline.

    python benchmarks/faults/run.py [--seed N] [--smoke] [--output PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
# benchmarks.faults.* and sample_models.* import from the repository root, as bn-inspect's --arch does.
sys.path.insert(0, str(REPO))

from benchmarks.faults import tables  # noqa: E402
from benchmarks.faults.cases import Built, CaseSpec, Context, all_cases  # noqa: E402
from benchmarks.faults.nets_setup import Net, make_nets  # noqa: E402
from benchmarks.faults.probe import check_today, compare_modes_today, inspect_today  # noqa: E402
from benchmarks.faults.training import correct, fit  # noqa: E402

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results.json"
# The scores printed at fixed thresholds (every score is in the JSON).
SHOWN_SCORES = [
    "departure.worst_layer",
    "abs_shift_z.mean.worst_layer",
    "skl.mean.worst_layer",
    "skl.mean.first_layer",
    "w2.mean.worst_layer",
    "w2.share.worst_layer",
    "skl_over_floor.mean.worst_layer",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="seed for training, data splits and the case split")
    parser.add_argument("--smoke", action="store_true", help="one net, few epochs, six cases (under 2 minutes)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where to write the results JSON")
    # Intra-op threads cost far more than they give on nets this small, and wreck timings on a shared machine.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument(
        "--summarize",
        type=Path,
        nargs="+",
        default=None,
        help="print existing results JSON files as markdown tables (several: pooled over their seeds); run nothing",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep models and data here (default: a temp dir)")
    return parser.parse_args(argv)


def train(net: Net, seed: int) -> None:
    torch.manual_seed(seed)
    model = net.build()
    fit(model, net.x_train, net.raw.y_train, epochs=net.epochs, batch_size=net.batch_size, seed=seed, lr=1e-3)
    net.trained = model


def model_file(ctx: Context, spec: CaseSpec, built: Built) -> Path:
    if built.model_file is not None:
        return built.model_file
    path = ctx.workdir / "models" / f"{ctx.net.name}-{spec.name}.pt"
    torch.save(built.model.state_dict(), path)
    return path


def data_args(ctx: Context, spec: CaseSpec, built: Built) -> list[str]:
    if built.data_args is not None:
        return built.data_args
    path = ctx.workdir / "data" / f"{ctx.net.name}-{spec.name}.npy"
    np.save(path, np.ascontiguousarray(built.x_eval))
    return ["--input", str(path)]


def split_halves(ctx: Context, spec: CaseSpec, built: Built) -> tuple[Path, Path]:
    """The evaluation data split at random (by seed) into two .npy files, for the split-half noise floor.

    Random, not even/odd: data sorted by label (an image folder) would give stratified halves that agree
    better than two samples do, and a floor that is too low.
    """
    order = np.random.default_rng(ctx.seed).permutation(len(built.x_eval))
    paths = []
    for index, part in enumerate(np.array_split(order, 2)):
        path = ctx.workdir / "data" / f"{ctx.net.name}-{spec.name}-half{index}.npy"
        np.save(path, np.ascontiguousarray(built.x_eval[part]))
        paths.append(path)
    return paths[0], paths[1]


def run_case(ctx: Context, spec: CaseSpec) -> dict[str, Any]:
    """Build one case, measure its accuracy against the healthy model on the same samples, ask bn-inspect."""
    started = time.monotonic()
    built = spec.make(ctx)
    assert ctx.net.trained is not None
    case_correct = correct(built.model, built.x_eval, built.y_eval)
    reference_correct = correct(ctx.net.trained, built.x_reference, built.y_eval)
    case_accuracy, reference = float(case_correct.mean()), float(reference_correct.mean())
    damage = round(100.0 * (reference - case_accuracy), 2)
    # Paired on the same samples: a damage of 1 sample in 72 is not a measured cost (tables.damage_p).
    lost = int((reference_correct & ~case_correct).sum())
    gained = int((case_correct & ~reference_correct).sum())
    model_args = [str(model_file(ctx, spec, built)), *ctx.net.cli_model_args()]
    inputs = data_args(ctx, spec, built)
    stem = ctx.workdir / "reports" / f"{ctx.net.name}-{spec.name}"
    halves = split_halves(ctx, spec, built)
    modes = stem.with_suffix(".compare-modes.json")
    return {
        "id": f"{ctx.net.name}/{spec.name}",
        "net": ctx.net.name,
        "name": spec.name,
        "family": spec.family,
        "what": spec.what,
        "num_samples": len(built.y_eval),
        "accuracy": round(case_accuracy, 4),
        "reference_accuracy": round(reference, 4),
        "damage_points": damage,
        "samples_lost": lost,
        "samples_gained": gained,
        "damage_p": tables.damage_p(lost, gained),
        "bucket": tables.bucket(spec.family, damage),
        "check": check_today(model_args, inputs, stem.with_suffix(".check.json")),
        "inspect": inspect_today(model_args, inputs, stem.with_suffix(".inspect.json"), halves),
        # Issue 26: compare-modes must not headline a gap on a healthy model.
        "compare_modes": compare_modes_today(model_args, inputs, modes) if spec.family == "healthy" else None,
        "seconds": round(time.monotonic() - started, 2),
    }


def run_all(seed: int, smoke: bool, workdir: Path) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Every case of every net, and the cases skipped with their reasons."""
    for folder in ("models", "data", "reports"):
        (workdir / folder).mkdir(parents=True, exist_ok=True)
    results, skipped = [], []
    for net in make_nets(seed, smoke=smoke):
        train(net, seed)
        ctx = Context(net, workdir, seed)
        specs, net_skipped = all_cases(net, smoke=smoke)
        skipped += net_skipped
        for spec in specs:
            case = run_case(ctx, spec)
            print(
                f"{case['id']:<42} damage {case['damage_points']:>6.2f}  check {case['check']['verdict']}", flush=True
            )
            results.append(case)
    return results, skipped


def document(
    cases: list[dict[str, Any]], skipped: list[dict[str, str]], args: argparse.Namespace, seconds: float
) -> dict[str, Any]:
    tables.assign_split(cases, args.seed)
    held_out = [c for c in cases if c["split"] == "held-out"]
    healthy = [c for c in cases if c["compare_modes"] is not None]
    return {
        "benchmark": "bn-inspect fault benchmark",
        "seed": args.seed,
        "smoke": args.smoke,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "num_threads": torch.get_num_threads(),
        "seconds": round(seconds, 1),
        "buckets": "fault damage in accuracy points: >=3, 1-3, <1; healthy cases are their own bucket",
        "confusion": {
            "all": tables.confusion(cases),
            "held-out": tables.confusion(held_out),
            "held-out, damage measured": tables.confusion(tables.measured(held_out)),
        },
        "trade_offs": tables.trade_offs(cases),
        "compare_modes_healthy": {
            "cases": len(healthy),
            "gap_headlines": sorted(c["id"] for c in healthy if c["compare_modes"]["gap_opens_at"] is not None),
        },
        "cases": cases,
        "skipped": skipped,
    }


def summarize(paths: list[Path]) -> None:
    """The markdown tables of benchmarks/faults/README.md, from one results file, or pooled over several seeds."""
    docs = [json.loads(path.read_text()) for path in paths]
    if len(docs) > 1:
        cases = [case for doc in docs for case in doc["cases"]]
        held_out = [case for case in cases if case["split"] == "held-out"]
        seeds = ", ".join(str(doc["seed"]) for doc in docs)
        for title, table in [
            ("all cases", tables.confusion(cases)),
            ("held-out half", tables.confusion(held_out)),
            (f"held-out half, damage measured ({tables.MEASURED})", tables.confusion(tables.measured(held_out))),
        ]:
            print(f"### check's verdict, seeds {seeds} pooled, {title}\n\n{tables.markdown_confusion(table)}\n")
        healthy = [case for case in cases if case.get("compare_modes") is not None]
        gaps = [case["id"] for case in healthy if case["compare_modes"]["gap_opens_at"] is not None]
        print(f"compare-modes on healthy cases: {len(gaps)} gap headlines in {len(healthy)} cases {gaps}\n")
        return
    doc = docs[0]
    for title, text in [
        ("check's verdict, all cases", tables.markdown_confusion(doc["confusion"]["all"])),
        ("check's verdict, held-out half", tables.markdown_confusion(doc["confusion"]["held-out"])),
        (
            f"check's verdict, held-out half, damage measured ({tables.MEASURED})",
            tables.markdown_confusion(
                tables.confusion(tables.measured([c for c in doc["cases"] if c["split"] == "held-out"]))
            ),
        ),
        ("Candidate scores", tables.markdown_tuned(doc["trade_offs"])),
        ("Cases", tables.markdown_cases(doc["cases"])),
    ]:
        print(f"### {title}\n\n{text}\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.summarize is not None:
        summarize(args.summarize)
        return
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bn-faults-") as tmp:
        cases, skipped = run_all(args.seed, args.smoke, args.workdir or Path(tmp))
    doc = document(cases, skipped, args, time.monotonic() - started)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=1) + "\n")
    print()
    print(tables.format_confusion(doc["confusion"]["all"], "check's verdict (no baseline), all cases"))
    print()
    print(tables.format_confusion(doc["confusion"]["held-out"], "check's verdict, held-out half"))
    print()
    print(tables.format_tuned(doc["trade_offs"]))
    print()
    print(tables.format_per_net(doc["trade_offs"], SHOWN_SCORES))
    print()
    print(tables.format_fixed(doc["trade_offs"], SHOWN_SCORES))
    gaps = doc["compare_modes_healthy"]
    print(f"\ncompare-modes on healthy cases: {len(gaps['gap_headlines'])} gap headlines in {gaps['cases']} cases")
    print(f"\n{len(cases)} cases in {doc['seconds']} s; results in {args.output}")


if __name__ == "__main__":
    main()
