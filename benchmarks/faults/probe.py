"""What bn-inspect says about a case today: `check` and `inspect --format json` run as a user would,
and candidate departure scores computed from the inspect report's per-channel statistics."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from typing import Any

from bn_inspect.cli.main import run as run_cli

SEVERITY_ORDER = ("error", "warning", "info")
# A channel counts as departing above these levels (the "share" aggregates).
SKL_LEVEL, W2_LEVEL = 1.0, 1.0
# Infinite departures (an inf running variance, a dead channel) are clipped so that JSON can hold them.
CLIP = 1e9


def bn_inspect(args: list[str]) -> tuple[int, str]:
    """Run the bn-inspect CLI in this process (the console script's own code); return exit code and stderr."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = run_cli(args)
    return code, stderr.getvalue()


def check_today(model_args: list[str], data_args: list[str], out: Path) -> dict[str, Any]:
    """`bn-inspect check --format json`: exit code, verdict (worst severity or pass), findings' codes."""
    code, stderr = bn_inspect(["check", *model_args, *data_args, "--format", "json", "--output", str(out), "-q"])
    if not out.exists():
        return {"exit_code": code, "verdict": "could-not-run", "findings": [], "stderr": stderr.strip()}
    report = json.loads(out.read_text())
    findings = [
        {"code": f["code"], "rule": f["rule"], "severity": f["severity"], "layer": f.get("layer")}
        for f in report["findings"]
    ]
    severities = {f["severity"] for f in findings}
    verdict = next((s for s in SEVERITY_ORDER[:2] if s in severities), "pass")
    return {"exit_code": code, "verdict": verdict, "passed": report["passed"], "findings": findings}


def compare_modes_today(model_args: list[str], data_args: list[str], out: Path) -> dict[str, Any]:
    """`bn-inspect compare-modes --format json`: where it says the train/eval gap opens (None: no gap headline)."""
    code, stderr = bn_inspect(
        ["compare-modes", *model_args, *data_args, "--format", "json", "--output", str(out), "-q"]
    )
    if not out.exists():
        return {"exit_code": code, "gap_opens_at": None, "batch_noise_from": None, "stderr": stderr.strip()}
    report = json.loads(out.read_text())
    return {
        "exit_code": code,
        "gap_opens_at": report["gap_opens_at"],
        "batch_noise_from": report.get("batch_noise_from"),
    }


def inspect_report(model_args: list[str], data_args: list[str], out: Path) -> tuple[int, str, list[dict[str, Any]]]:
    """`bn-inspect inspect --format json`: exit code, stderr, and the report's layers (none if it could not run)."""
    code, stderr = bn_inspect(["inspect", *model_args, *data_args, "--format", "json", "--output", str(out), "-q"])
    return code, stderr, json.loads(out.read_text())["layers"] if out.exists() else []


def inspect_today(
    model_args: list[str], data_args: list[str], out: Path, halves: tuple[Path, Path] | None = None
) -> dict[str, Any]:
    """Per layer the existing summaries and the candidate scores; with ``halves`` (the evaluation data split in
    two), also each layer's noise floor: the departure between the two halves' batch statistics."""
    code, stderr, report = inspect_report(model_args, data_args, out)
    if not report:
        return {"exit_code": code, "layers": [], "scores": {}, "stderr": stderr.strip()}
    layers = [layer_scores(layer) for layer in report]
    if halves is not None:
        parts = [
            inspect_report(model_args, ["--input", str(h)], out.with_suffix(f".half{i}.json"))
            for i, h in enumerate(halves)
        ]
        add_noise_floor(layers, parts[0][2], parts[1][2])
    return {"exit_code": code, "layers": layers, "scores": model_scores(layers)}


def add_noise_floor(layers: list[dict[str, Any]], half_a: list[dict[str, Any]], half_b: list[dict[str, Any]]) -> None:
    """Each layer's mean skl between the batch Gaussians of two halves of the data (sampling noise, heavy tails
    included), and its skl mean in units of that floor."""
    for layer, a, b in zip(layers, half_a, half_b, strict=True):
        eps = a["eps"]
        channels = zip(*(map(number, side[key]) for side in (a, b) for key in ("batch_mean", "batch_var")), strict=True)
        floor = summary([gaussian_skl(ma, va + eps, mb, vb + eps) for ma, va, mb, vb in channels])["mean"]
        layer["skl_floor"] = floor
        layer["skl_over_floor"] = {"mean": finite(layer["skl"]["mean"] / max(floor, 1e-12))}


def gaussian_skl(mean_p: float, var_p: float, mean_q: float, var_q: float) -> float:
    """KL(p||q) + KL(q||p) for 1-D Gaussians (the log terms cancel); infinite statistics count as CLIP."""
    if not all(map(math.isfinite, (mean_p, var_p, mean_q, var_q))):
        return CLIP
    d2 = (mean_p - mean_q) ** 2
    return finite(0.5 * (var_p / var_q + var_q / var_p - 2.0) + 0.5 * d2 * (1.0 / var_p + 1.0 / var_q))


def number(value: float | str | None) -> float:
    """A JSON number of bn-inspect's reports: non-finite floats are written "nan", "inf" or "-inf"."""
    return math.nan if value is None else float(value)


def finite(value: float | str | None) -> float:
    """Non-finite statistics count as the largest departure (clipped so that JSON can hold it)."""
    value = number(value)
    return CLIP if math.isnan(value) or math.isinf(value) else min(value, CLIP)


def channel_departures(layer: dict[str, Any]) -> tuple[list[float], list[float]]:
    """Per channel: symmetric KL between N(batch_mean, batch_var) and N(running_mean, running_var), and the
    2-Wasserstein distance between them in running standard deviations; eps added to both variances, as BN does."""
    eps = layer["eps"]
    skl, w2 = [], []
    columns = [map(number, layer[key]) for key in ("batch_mean", "batch_var", "running_mean", "running_var")]
    for bm, bv, rm, rv in zip(*columns, strict=True):
        if not all(map(math.isfinite, (bm, bv, rm, rv))):
            skl.append(CLIP)
            w2.append(CLIP)
            continue
        vb, vr, d2 = bv + eps, rv + eps, (bm - rm) ** 2
        skl.append(gaussian_skl(bm, vb, rm, vr))
        w2.append(finite(math.sqrt(d2 + (math.sqrt(vb) - math.sqrt(vr)) ** 2) / math.sqrt(vr)))
    return skl, w2


def summary(values: list[float], level: float | None = None) -> dict[str, float]:
    """Mean and max over channels (and the share above ``level``)."""
    result = {"mean": finite(sum(values) / len(values)), "max": finite(max(values))}
    if level is not None:
        result["share"] = sum(v > level for v in values) / len(values)
    return result


def layer_scores(layer: dict[str, Any]) -> dict[str, Any]:
    """The existing |shift z| and var-ratio summaries of one layer, and the candidate departures."""
    abs_z = [finite(abs(number(z))) for z in layer["mean_shift_z"]]
    ratios = sorted(number(r) for r in layer["var_ratio"])
    log_ratio = [abs(math.log(r)) if 0 < r < math.inf else CLIP for r in ratios]
    skl, w2 = channel_departures(layer)
    return {
        "name": layer["name"],
        "call": layer["call"],
        "num_channels": layer["num_channels"],
        "values_per_channel": layer["values_per_channel"],
        "num_batches_tracked": layer.get("num_batches_tracked"),
        "abs_shift_z": summary(abs_z),
        "var_ratio_median": finite(ratios[len(ratios) // 2]),
        "abs_log_var_ratio": summary(log_ratio),
        "skl": summary(skl, SKL_LEVEL),
        "w2": summary(w2, W2_LEVEL),
        "departure": departure_of(layer),
    }


def departure_of(layer: dict[str, Any]) -> float | None:
    """bn-inspect's own departure score of the layer, as its JSON report gives it (None where not compared)."""
    found = layer.get("departure")
    return None if found is None else finite(number(found["score"]))


def model_scores(layers: list[dict[str, Any]]) -> dict[str, float]:
    """Candidate per-model scores: the first layer's and the worst layer's aggregate of each statistic."""
    if not layers:
        return {}
    scores: dict[str, float] = {}
    departures = [layer["departure"] for layer in layers if layer.get("departure") is not None]
    if departures:
        scores["departure.worst_layer"] = max(departures)
    for stat in ("abs_shift_z", "abs_log_var_ratio", "skl", "w2", "skl_over_floor"):
        for agg in ("mean", "max", "share"):
            if stat not in layers[0] or agg not in layers[0][stat]:
                continue
            scores[f"{stat}.{agg}.worst_layer"] = max(layer[stat][agg] for layer in layers)
            scores[f"{stat}.{agg}.first_layer"] = layers[0][stat][agg]
    return scores
