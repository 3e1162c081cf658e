"""One short GPU run: checks bn-inspect's CUDA path against float64 and times capture against a plain forward.

Run on a CUDA machine from the repository root: ``python benchmarks/gpu_check.py [--json OUT]``.
Needs torchvision for the ResNets. Every timing is a median over alternating runs, measured with
CUDA events in one process, and reported as a ratio to the plain eval forward of the same model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bn_inspect.capture import StatisticsRecorder, hooks_capture  # noqa: E402
from bn_inspect.inspection import inspect_model  # noqa: E402
from bn_inspect.layers import iter_norm_layers  # noqa: E402
from bn_inspect.stats import ChannelMoments, two_pass_moments, welford_moments  # noqa: E402


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.bn2 = nn.BatchNorm2d(16)
        self.bn3 = nn.BatchNorm1d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(torch.relu(self.bn1(self.conv(x))) * 50 + 1e3)
        return self.bn3(y.mean((2, 3)))


class Autocast(nn.Module):
    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner = inner
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=self.dtype):
            return self.inner(x)


def reference_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Each BN input as float64 numpy, captured by a plain hook (the independent reference path)."""
    seen: dict[str, list[np.ndarray]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            handles.append(
                module.register_forward_pre_hook(
                    lambda m, a, name=name: seen.setdefault(name, []).append(a[0].detach().double().cpu().numpy())
                )
            )
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return {name: np.concatenate(v) for name, v in seen.items()}


def max_errors(report_layers: Any, refs: dict[str, np.ndarray]) -> tuple[float, float]:
    worst_mean = worst_var = 0.0
    for layer in report_layers:
        key = layer.name
        values = np.moveaxis(refs[key], 1, 0).reshape(refs[key].shape[1], -1)
        mean, var = values.mean(1), values.var(1)
        # A constant channel has variance 0: measure against the float32 resolution of its values instead.
        resolution = np.abs(mean) * 2.0**-23 + 1e-30
        std = np.maximum(np.sqrt(var), resolution)
        worst_mean = max(worst_mean, float(np.max(np.abs(np.array(layer.batch_mean) - mean) / std)))
        worst_var = max(
            worst_var, float(np.max(np.abs(np.array(layer.batch_var) - var) / np.maximum(var, resolution**2)))
        )
    return worst_mean, worst_var


def correctness() -> dict[str, Any]:
    results: dict[str, Any] = {}
    torch.manual_seed(0)
    base = ConvBN().cuda().eval()
    x = torch.randn(8, 3, 12, 12, device="cuda") * 1e-2 + 50.0
    for label, model, inputs, mode in [
        ("fp32 eval", base, x, "eval"),
        ("fp32 train", base, x, "train"),
        (
            "fp32 channels_last",
            base.to(memory_format=torch.channels_last),
            x.to(memory_format=torch.channels_last),
            "eval",
        ),
        ("bf16 autocast", Autocast(base, torch.bfloat16), x, "eval"),
        ("fp16 autocast", Autocast(base, torch.float16), x, "eval"),
    ]:
        model.train(mode == "train")
        refs = reference_inputs(model, inputs)
        model.eval()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        report = inspect_model(model, [inputs], mode=mode)
        unchanged = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        mean_err, var_err = max_errors(report.layers, refs)
        results[label] = {
            "max_mean_err_in_std": mean_err,
            "max_var_rel_err": var_err,
            "state_unchanged": unchanged,
            "ok": mean_err < 1e-4 and var_err < 1e-4 and unchanged,
        }
    return results


def no_sync_inside_forward() -> dict[str, Any]:
    model = ConvBN().cuda().eval()
    x = torch.randn(8, 3, 12, 12, device="cuda")
    layers = iter_norm_layers(model)
    recorder = StatisticsRecorder()
    try:
        with torch.no_grad(), hooks_capture(layers, recorder):
            torch.cuda.set_sync_debug_mode("error")
            try:
                recorder.start_batch()
                model(x)
                model(x)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    except RuntimeError as error:
        return {"ok": False, "error": str(error).splitlines()[0]}
    return {"ok": True}


def cli_cuda_matches_cpu() -> dict[str, Any]:
    import contextlib
    import io

    from bn_inspect.cli import run

    documents = {}
    for device in ("cpu", "cuda"):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            code = run(
                [
                    "inspect",
                    str(ROOT / "sample_models/digits_cnn/torchscript.pt"),
                    "--input",
                    str(ROOT / "sample_models/digits_cnn/test_images.npy"),
                    "--device",
                    device,
                    "--format",
                    "json",
                ]
            )
        documents[device] = json.loads(buffer.getvalue()) if code == 0 else {"exit": code}
    cpu, cuda = documents["cpu"], documents["cuda"]
    if "layers" not in cuda:
        return {"ok": False, "cuda": cuda}
    worst = max(
        abs(a - b) / max(abs(a), 1e-12)
        for la, lb in zip(cpu["layers"], cuda["layers"], strict=True)
        for a, b in zip(la["batch_var"], lb["batch_var"], strict=True)
    )
    return {
        "ok": worst < 1e-4 and cuda["device"].startswith("cuda"),
        "max_var_rel_diff_cpu_vs_cuda": worst,
        "device": cuda["device"],
    }


def time_pairs(functions: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each function, measured round-robin with CUDA events."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(3):
        for function in functions.values():
            function()
    torch.cuda.synchronize()
    for _ in range(repeats):
        for name, function in functions.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end))
    return {name: statistics.median(values) for name, values in times.items()}


def capture_with(
    model: nn.Module, x: torch.Tensor, reduce: Callable[[torch.Tensor], ChannelMoments], dtype: torch.dtype | None
) -> Callable[[], None]:
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    sink: list[ChannelMoments] = []

    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        sink.append(reduce(args[0]))

    def run_once() -> None:
        handles = [m.register_forward_pre_hook(hook) for m in layers]
        sink.clear()
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            model(x)
        for handle in handles:
            handle.remove()

    return run_once


def timings(repeats: int) -> dict[str, Any]:
    import torchvision

    results: dict[str, Any] = {}
    configs = [
        ("resnet50 b128 fp32 channels_last", torchvision.models.resnet50, 128, None),
        ("resnet50 b128 bf16 autocast channels_last", torchvision.models.resnet50, 128, torch.bfloat16),
        ("resnet18 b256 fp32 channels_last", torchvision.models.resnet18, 256, None),
        ("resnet18 b256 bf16 autocast channels_last", torchvision.models.resnet18, 256, torch.bfloat16),
    ]
    for label, builder, batch, dtype in configs:
        model = builder().cuda().eval().to(memory_format=torch.channels_last)
        x = torch.randn(batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)

        def plain(model: nn.Module = model, x: torch.Tensor = x, dtype: torch.dtype | None = dtype) -> None:
            with torch.no_grad(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
                model(x)

        def count(t: torch.Tensor) -> int:
            return t.numel() // t.shape[1]

        functions = {
            "plain": plain,
            "welford (batch_norm_stats, shipped)": capture_with(
                model, x, lambda t: welford_moments(t, count(t)), dtype
            ),
            "var_mean (upcast)": capture_with(
                model, x, lambda t: two_pass_moments(t.float(), [0, *range(2, t.dim())], count(t)), dtype
            ),
        }
        medians = time_pairs(functions, repeats)
        results[label] = {name: {"ms": ms, "ratio": ms / medians["plain"]} for name, ms in medians.items()}
        del model, x
        torch.cuda.empty_cache()
    return results


def end_to_end(repeats: int) -> dict[str, Any]:
    """inspect_model (hooks, merge, report with host copies) against plain forwards, ResNet-50 b128 fp32."""
    import time

    import torchvision

    model = torchvision.models.resnet50().cuda().eval().to(memory_format=torch.channels_last)
    x = torch.randn(128, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    batches = [x] * 10
    samples: dict[str, list[float]] = {"plain": [], "inspect_model": []}
    for index in range(repeats + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            for batch in batches:
                model(batch)
        torch.cuda.synchronize()
        plain = time.perf_counter() - start
        start = time.perf_counter()
        inspect_model(model, batches)
        torch.cuda.synchronize()
        full = time.perf_counter() - start
        if index:
            samples["plain"].append(plain)
            samples["inspect_model"].append(full)
    plain_median = statistics.median(samples["plain"])
    full_median = statistics.median(samples["inspect_model"])
    return {
        "plain_10_batches_ms": plain_median * 1e3,
        "inspect_model_10_batches_ms": full_median * 1e3,
        "ratio": full_median / plain_median,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    results: dict[str, Any] = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0),
        "correctness": correctness(),
        "no_sync_inside_forward": no_sync_inside_forward(),
        "cli_cuda_matches_cpu": cli_cuda_matches_cpu(),
    }
    print(json.dumps(results, indent=2), flush=True)
    results["timings"] = timings(args.repeats)
    results["end_to_end"] = end_to_end(max(5, args.repeats // 4))
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
