"""One short GPU run: checks bn-inspect's CUDA paths against float64 and times capture against a plain forward.

Run on a CUDA machine from the repository root: ``python benchmarks/gpu_check.py [--json OUT]``.
Needs torchvision for the ResNets and Triton for the fused path. Both capture paths are checked
and timed: the fused eval kernel (bn_inspect/engine/fused/dispatch.py: normalizes and reduces in one read) and
the portable one (a pre-hook with torch's batch-norm statistics kernel, one extra read). Every
timing is a median over alternating runs, measured with CUDA events in one process, and reported
as a ratio to the plain eval forward of the same model.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bn_inspect.engine.capture as capture  # noqa: E402
import bn_inspect.engine.fused.dispatch as fused  # noqa: E402
from bn_inspect.analyses.inspection import inspect_model  # noqa: E402
from bn_inspect.engine.capture import StatisticsRecorder, hooks_capture  # noqa: E402
from bn_inspect.engine.fused.tiles import TileConfig  # noqa: E402
from bn_inspect.engine.moments import ChannelMoments, two_pass_moments, welford_moments  # noqa: E402
from bn_inspect.model.layers import iter_norm_layers  # noqa: E402


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


KERNELS = fused._kernels


def use_fused(on: bool) -> None:
    """Switch the fused path on or off for the captures that follow (off: the portable path)."""
    fused._kernels = KERNELS if on else (lambda: None)  # type: ignore[assignment]


class FusedCalls:
    """Counts the fused kernel's calls, to show which path a check really took."""

    def __init__(self) -> None:
        self.count = 0
        self._original = capture.batch_norm_eval_with_moments

    def __enter__(self) -> FusedCalls:
        def counted(*args: Any) -> Any:
            self.count += 1
            return self._original(*args)

        capture.batch_norm_eval_with_moments = counted  # type: ignore[assignment]
        return self

    def __exit__(self, *_: object) -> None:
        capture.batch_norm_eval_with_moments = self._original  # type: ignore[assignment]


class ReferenceInputs:
    """Float64 host copies of every BN input, taken by plain pre-hooks while the block runs."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.seen: dict[str, list[np.ndarray]] = {}
        self.handles: list[Any] = []

    def __enter__(self) -> ReferenceInputs:
        for name, module in self.model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                self.handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            self.seen.setdefault(name, []).append(args[0].detach().double().cpu().numpy())

        return hook

    def __exit__(self, *_: object) -> None:
        for handle in self.handles:
            handle.remove()

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: np.concatenate(v) for name, v in self.seen.items()}


def errors(report_layers: Any, refs: dict[str, np.ndarray]) -> dict[str, Any]:
    """Worst errors against float64, relative to the spread and in float32 steps of the values.

    A statistic passes when it is within 1e-4 of the spread (std for the mean, var for the
    variance) or within 2 float32 steps of the values' magnitude (what rounding one input value
    can move it by: a constant channel's variance is 0 only up to that).
    """
    worst: dict[str, Any] = {"mean_err_in_std": 0.0, "var_rel_err": 0.0, "ok": True}
    for layer in report_layers:
        values = np.moveaxis(refs[layer.name], 1, 0).reshape(refs[layer.name].shape[1], -1)
        mean, var = values.mean(1), values.var(1)
        step = np.abs(values).max(1) * 2.0**-23 + 1e-45
        got_mean, got_var = np.array(layer.batch_mean), np.array(layer.batch_var)
        mean_err, var_err = np.abs(got_mean - mean), np.abs(got_var - var)
        mean_ok = (mean_err <= 1e-4 * np.sqrt(var)) | (mean_err <= 2 * step)
        var_ok = (var_err <= 1e-4 * var) | (var_err <= 2 * step * (2 * np.sqrt(var) + step))
        worst["ok"] = bool(worst["ok"] and mean_ok.all() and var_ok.all())
        relative_mean = mean_err / np.maximum(np.sqrt(var), step)
        relative_var = var_err / np.maximum(var, step**2)
        for key, err, got, want in (("mean", relative_mean, got_mean, mean), ("var", relative_var, got_var, var)):
            channel = int(np.argmax(np.where(np.isnan(err), np.inf, err)))
            label = "mean_err_in_std" if key == "mean" else "var_rel_err"
            if not float(err[channel]) <= worst[label]:
                worst[label] = float(err[channel])
                worst[f"{key}_where"] = {
                    "layer": layer.name,
                    "channel": channel,
                    "got": float(got[channel]),
                    "want": float(want[channel]),
                    "ref_std": float(np.sqrt(var[channel])),
                    "float32_step": float(step[channel]),
                }
    return worst


def correctness() -> dict[str, Any]:
    results: dict[str, Any] = {}
    torch.manual_seed(0)
    base = ConvBN().cuda().eval()
    x = torch.randn(8, 3, 12, 12, device="cuda") * 1e-2 + 50.0
    channels_last = copy.deepcopy(base).to(memory_format=torch.channels_last)
    x_last = x.to(memory_format=torch.channels_last)
    cases: list[tuple[str, nn.Module, torch.Tensor, str]] = [
        ("fp32 eval", base, x, "eval"),
        ("fp32 train", base, x, "train"),
        ("fp32 channels_last eval", channels_last, x_last, "eval"),
        ("fp32 channels_last train", channels_last, x_last, "train"),
        ("bf16 autocast eval", Autocast(base, torch.bfloat16), x, "eval"),
        ("fp16 autocast eval", Autocast(base, torch.float16), x, "eval"),
        ("bf16 autocast channels_last eval", Autocast(channels_last, torch.bfloat16), x_last, "eval"),
    ]
    try:
        import torchvision

        resnet = torchvision.models.resnet18().cuda().train()
        with torch.no_grad():
            for _ in range(3):
                resnet(torch.randn(16, 3, 64, 64, device="cuda") * 2 + 1)
        resnet = resnet.eval().to(memory_format=torch.channels_last)
        x_resnet = (torch.randn(8, 3, 64, 64, device="cuda") * 3 + 10).to(memory_format=torch.channels_last)
        cases.append(("resnet18 channels_last eval", resnet, x_resnet, "eval"))
    except ImportError:
        pass
    for path in ("fused", "portable"):
        use_fused(path == "fused")
        for label, model, inputs, mode in cases:
            model.eval()
            before = {k: v.clone() for k, v in model.state_dict().items()}
            # The reference sees the inputs of the inspected run itself: the fused kernel's output
            # differs from torch's by rounding, so later layers' inputs differ from a plain run's.
            with FusedCalls() as calls, ReferenceInputs(model) as refs:
                report = inspect_model(model, [inputs, inputs], mode=mode)
            unchanged = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
            worst = errors(report.layers, refs.arrays())
            results[f"{path}: {label}"] = {
                **worst,
                "fused_calls": calls.count,
                "state_unchanged": unchanged,
                "forward_restored": not any("forward" in vars(m) for m in model.modules()),
                "ok": worst["ok"] and unchanged,
            }
    use_fused(True)
    return results


def constant_channels() -> dict[str, Any]:
    """welford_moments on channels that are constant (dead ReLU upstream), NCHW and channels-last."""
    x = torch.randn(4, 6, 5, 5, device="cuda")
    x[:, 2] = 1000.0
    x[:, 4] = 0.0
    out: dict[str, Any] = {}
    for label, t in (("nchw", x), ("channels_last", x.to(memory_format=torch.channels_last))):
        m = welford_moments(t, t.numel() // t.shape[1])
        ref = t.double().transpose(0, 1).reshape(6, -1)
        out[label] = {
            "var": [float(v) for v in m.biased_var().cpu()],
            "mean_abs_err": float((m.mean - ref.mean(1)).abs().max()),
            # Zero up to float32 rounding of the values (1000 has steps of 2**-14).
            "ok": bool(
                m.biased_var()[2] <= 2.0**-26 and m.biased_var()[4] == 0 and (m.mean - ref.mean(1)).abs().max() < 1e-4
            ),
        }
    return out


def no_sync_inside_forward() -> dict[str, Any]:
    results: dict[str, Any] = {}
    for path in ("fused", "portable"):
        use_fused(path == "fused")
        model = ConvBN().cuda().eval()
        x = torch.randn(8, 3, 12, 12, device="cuda")
        layers = iter_norm_layers(model)
        recorder = StatisticsRecorder()
        try:
            with torch.no_grad(), hooks_capture(layers, recorder):
                model(x)  # first call: compiles the kernels, outside the checked region
                torch.cuda.set_sync_debug_mode("error")
                try:
                    recorder.start_batch()
                    model(x)
                    model(x)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
        except RuntimeError as error:
            results[path] = {"ok": False, "error": str(error).splitlines()[0]}
            continue
        results[path] = {"ok": True}
    use_fused(True)
    return results


def cli_cuda_matches_cpu() -> dict[str, Any]:
    import contextlib
    import io

    from bn_inspect.cli.main import run

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


def cuda_batches_into_cpu_model() -> dict[str, Any]:
    """A CPU model fed CUDA batches: the copy to the host must land before the CPU reads it.

    Each batch comes right after a long sleep kernel on the stream, so a non-blocking copy would
    still be queued when the capture reads the batch.
    """
    torch.manual_seed(0)
    model = ConvBN().eval()
    on_gpu = [torch.randn(64, 3, 32, 32, device="cuda") * 3 + 5 for _ in range(4)]
    on_host = [x.cpu() for x in on_gpu]

    def after_a_sleep() -> Any:
        for x in on_gpu:
            torch.cuda._sleep(200_000_000)
            yield x

    from_gpu = inspect_model(model, after_a_sleep())
    from_host = inspect_model(model, on_host)
    worst = max(
        abs(a - b)
        for la, lb in zip(from_gpu.layers, from_host.layers, strict=True)
        for a, b in zip(la.batch_mean, lb.batch_mean, strict=True)
    )
    # What the earlier non-blocking copy risked: read at once, it may still hold no data.
    torch.cuda._sleep(200_000_000)
    early = on_gpu[0].to("cpu", non_blocking=True)
    read_early = not torch.equal(early.clone(), on_host[0])
    return {
        "ok": worst == 0.0,
        "max_mean_abs_diff": worst,
        "device": from_gpu.device,
        "non_blocking_copy_read_too_early": read_early,
    }


HOST_MS: dict[str, float] = {}


def time_pairs(functions: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each function, measured round-robin with CUDA events.

    The median host time to enqueue each (without waiting for the GPU) goes to HOST_MS: where it
    nears the GPU time, the Python side, not the kernels, sets the pace.
    """
    times: dict[str, list[float]] = {name: [] for name in functions}
    host: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(3):
        for function in functions.values():
            function()
    torch.cuda.synchronize()
    for _ in range(repeats):
        for name, function in functions.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            host_start = time.perf_counter()
            function()
            host[name].append((time.perf_counter() - host_start) * 1e3)
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end))
    HOST_MS.update({name: statistics.median(values) for name, values in host.items()})
    return {name: statistics.median(values) for name, values in times.items()}


def autocast(dtype: torch.dtype | None) -> torch.autocast:
    return torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None)


def bn_inspect_capture(
    model: nn.Module, x: torch.Tensor, dtype: torch.dtype | None, fused_on: bool
) -> Callable[[], None]:
    """One forward under bn-inspect's own capture (hooks_capture and a fresh recorder)."""
    layers = iter_norm_layers(model)

    def run_once() -> None:
        use_fused(fused_on)
        recorder = StatisticsRecorder()
        with torch.no_grad(), autocast(dtype), hooks_capture(layers, recorder):
            recorder.start_batch()
            model(x)

    return run_once


def var_mean_capture(model: nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> Callable[[], None]:
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    sink: list[ChannelMoments] = []

    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        t = args[0]
        sink.append(two_pass_moments(t.float(), [0, *range(2, t.dim())], t.numel() // t.shape[1]))

    def run_once() -> None:
        handles = [m.register_forward_pre_hook(hook) for m in layers]
        sink.clear()
        with torch.no_grad(), autocast(dtype):
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
            with torch.no_grad(), autocast(dtype):
                model(x)

        functions = {
            "plain": plain,
            "fused (shipped, eval)": bn_inspect_capture(model, x, dtype, True),
            "portable (batch_norm_stats pre-hook)": bn_inspect_capture(model, x, dtype, False),
            "var_mean pre-hook (upcast)": var_mean_capture(model, x, dtype),
        }
        medians = time_pairs(functions, repeats)
        results[label] = {
            name: {"ms": ms, "ratio": ms / medians["plain"], "host_ms": HOST_MS[name]} for name, ms in medians.items()
        }
        print(label, {name: round(v["ratio"], 3) for name, v in results[label].items()}, flush=True)
        del model, x
        torch.cuda.empty_cache()
    use_fused(True)
    return results


def kernel_bandwidth(repeats: int, sweep: bool) -> dict[str, Any]:
    """The fused kernel alone against torch's eval batch norm on one large channels-last input.

    Sweeps a few tile configurations; the fastest (summed over float32 and bf16) is kept in
    ``fused.TILE`` for the sections that follow and reported.
    """
    candidates = [fused.TILE]
    candidates += [
        TileConfig(elements, tiles, block_c, warps)
        for elements in (4096, 8192)
        for tiles in (4, 8, 16)
        for block_c in (64, 128)
        for warps in (4, 8)
        if sweep and TileConfig(elements, tiles, block_c, warps) != fused.TILE
    ]
    inputs = {}
    for dtype in (torch.float32, torch.bfloat16):
        inputs[dtype] = torch.randn(128, 256, 56, 56, device="cuda").to(dtype).to(memory_format=torch.channels_last)
    bn = nn.BatchNorm2d(256).cuda().eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    results: dict[str, Any] = {"configs": {}}
    totals: dict[TileConfig, float] = {}
    with torch.no_grad():
        for dtype, x in inputs.items():
            functions: dict[str, Callable[[], Any]] = {
                "F.batch_norm eval": _torch_eval(bn, x),
                "batch_norm_stats alone": _stats_alone(x),
            }
            for config in candidates:
                functions[str(config)] = _fused_with(bn, x, config)
            medians = time_pairs(functions, max(5, repeats // 2))
            base = medians["F.batch_norm eval"]
            bytes_moved = 2 * x.numel() * x.element_size()
            results[str(dtype)] = {
                name: {"ms": ms, "ratio": ms / base, "TB/s (read+write)": bytes_moved / ms / 1e9}
                for name, ms in medians.items()
                if not name.startswith("TileConfig")
            }
            for config in candidates:
                ratio = medians[str(config)] / base
                results["configs"].setdefault(str(config), {})[str(dtype)] = ratio
                totals[config] = totals.get(config, 0.0) + ratio
            results[str(dtype)]["output_max_abs_err_vs_float64"] = {
                "fused": _output_error(fused.batch_norm_eval_with_moments(bn, x, None)[0], bn, x),
                "torch": _output_error(_torch_eval(bn, x)(), bn, x),
            }
    best = min(totals, key=totals.__getitem__)
    fused.TILE = best
    results["chosen"] = {
        "config": str(best),
        "ratio_sum": totals[best],
        "default_ratio_sum": totals.get(TileConfig()),
    }
    return results


def _output_error(y: torch.Tensor, bn: nn.BatchNorm2d, x: torch.Tensor) -> float:
    """Largest absolute difference of an eval batch norm's output from the float64 formula."""
    shape = [1, -1, 1, 1]
    expected = (x.double() - bn.running_mean.double().view(shape)) / (
        bn.running_var.double().view(shape) + bn.eps
    ).sqrt() * bn.weight.double().view(shape) + bn.bias.double().view(shape)
    return float((y.double() - expected).abs().max())


def _torch_eval(bn: nn.BatchNorm2d, x: torch.Tensor) -> Callable[[], Any]:
    return lambda: nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def _stats_alone(x: torch.Tensor) -> Callable[[], Any]:
    return lambda: torch.batch_norm_stats(x, 1e-5)


def _fused_with(bn: nn.BatchNorm2d, x: torch.Tensor, config: TileConfig) -> Callable[[], Any]:
    def run() -> Any:
        fused.TILE = config
        return fused.batch_norm_eval_with_moments(bn, x, None)

    return run


def end_to_end(repeats: int, num_batches: int) -> dict[str, Any]:
    """inspect_model (hooks, merge, report with host copies) against plain forwards, ResNet-50 b128 fp32."""
    import torchvision

    model = torchvision.models.resnet50().cuda().eval().to(memory_format=torch.channels_last)
    x = torch.randn(128, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    batches = [x] * num_batches
    samples: dict[str, list[float]] = {"plain": [], "fused": [], "portable": []}
    for index in range(repeats + 1):
        for name in samples:
            torch.cuda.synchronize()
            start = time.perf_counter()
            if name == "plain":
                with torch.no_grad():
                    for batch in batches:
                        model(batch)
            else:
                use_fused(name == "fused")
                inspect_model(model, batches)
            torch.cuda.synchronize()
            if index:
                samples[name].append(time.perf_counter() - start)
    use_fused(True)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    return {name: {"ms": ms * 1e3, "ratio": ms / medians["plain"]} for name, ms in medians.items()}


def first_call_compile_seconds() -> float:
    """Wall time of the first fused call of every kernel variant ResNet-50 needs (Triton compiles, or reads its cache)."""
    import torchvision

    model = torchvision.models.resnet50().cuda().eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    torch.cuda.synchronize()
    start = time.perf_counter()
    inspect_model(model, [x])
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="time 24 tile configurations and keep the fastest")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    results: dict[str, Any] = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0),
        "triton": getattr(KERNELS(), "triton", None) and KERNELS().triton.__version__,
    }

    def section(name: str, function: Callable[[], Any]) -> None:
        # One failing section must not cost the rest of a scarce GPU run.
        start = time.perf_counter()
        try:
            results[name] = function()
        except Exception as error:
            import traceback

            results[name] = {"error": traceback.format_exception(error)[-3:]}
        print(f"--- {name} ({time.perf_counter() - start:.1f} s)", json.dumps(results[name], indent=1), flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))

    section("first_call_compile_s", first_call_compile_seconds)
    section("correctness", correctness)
    section("constant_channels_portable", constant_channels)
    section("no_sync_inside_forward", no_sync_inside_forward)
    section("cli_cuda_matches_cpu", cli_cuda_matches_cpu)
    section("cuda_batches_into_cpu_model", cuda_batches_into_cpu_model)
    section("kernel_bandwidth", lambda: kernel_bandwidth(args.repeats, args.sweep))
    section("timings", lambda: timings(args.repeats))
    section("end_to_end_10_batches", lambda: end_to_end(max(5, args.repeats // 4), 10))
    section("end_to_end_40_batches", lambda: end_to_end(3, 40))


if __name__ == "__main__":
    main()
