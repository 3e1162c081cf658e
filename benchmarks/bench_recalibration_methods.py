"""How well each recalibration method's running statistics fit the eval-mode inputs they normalize, and what each costs.

For every model and batch size: recalibrate a copy with ``precise`` and with ``sequential`` on the
same data, then run that data through the recalibrated model in eval mode and measure, per
BatchNorm layer, in float64 (independently of bn-inspect's capture), the layer's eval-mode input
against its new running statistics:

* mean |shift z| over channels, ``|mean(x) - running_mean| / sqrt(running_var + eps)``;
* mean and worst var ratio over channels, ``var(x) / running_var`` (biased variance over all values).

A model recalibrated so that eval mode sees exactly its running statistics has shift z 0 and var
ratio (n - 1) / n, about 1. The models: the shipped ``sample_models/digits_cnn`` on its training
images, a small ResNet (``benchmarks/faults/nets.py``, width 32) and ResNet-18's layout (20
BatchNorm2d, widths 16-128), each trained here for 3 epochs on the same images; each recalibrated
model is also checked (``check_model``) on the data it was recalibrated with. Then the cost: time of one plain eval pass, ``precise`` and ``sequential`` on
ResNet-50's architecture (``bench_resnet50_cpu.py``) called through a custom forward, as
torchvision's ResNet is (the sequential passes resume from activations held at its module
boundaries), on 4 batches of 8x3x64x64. Run from the repository root:

    python benchmarks/bench_recalibration_methods.py [--json PATH] [--skip-cost]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_resnet50_cpu  # noqa: E402

from benchmarks.faults.nets import BasicBlock, DigitsResNet  # noqa: E402
from bn_inspect.analyses.checking import check_model  # noqa: E402
from bn_inspect.analyses.recalibration import recalibrate  # noqa: E402
from sample_models.architectures import DigitsCNN  # noqa: E402

DIGITS = ROOT / "sample_models" / "digits_cnn"


def eval_fit(model: nn.Module, batches: list[torch.Tensor]) -> list[dict[str, float | str]]:
    """Per BatchNorm layer: its eval-mode input over all batches against its running statistics, in float64."""
    sums: dict[str, list[torch.Tensor]] = {}
    hooks = []
    norms = {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}

    def hook(name: str):  # type: ignore[no-untyped-def]
        def record(_module, args, _output) -> None:  # type: ignore[no-untyped-def]
            x = args[0].detach().to(torch.float64)
            x = x.transpose(0, 1).reshape(x.shape[1], -1)
            entry = sums.setdefault(name, [torch.zeros(x.shape[0], dtype=torch.float64)] * 3)
            sums[name] = [entry[0] + x.shape[1], entry[1] + x.sum(1), entry[2] + (x * x).sum(1)]

        return record

    for name, module in norms.items():
        hooks.append(module.register_forward_hook(hook(name)))
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
    finally:
        for handle in hooks:
            handle.remove()
    rows: list[dict[str, float | str]] = []
    for name, (count, total, squares) in sums.items():
        module = norms[name]
        mean = total / count
        biased = squares / count - mean * mean
        running_mean = module.running_mean.to(torch.float64)  # type: ignore[union-attr]
        running_var = module.running_var.to(torch.float64)  # type: ignore[union-attr]
        z = (mean - running_mean).abs() / (running_var + module.eps).sqrt()
        ratio = biased / running_var
        rows.append(
            {
                "layer": name,
                "mean_abs_z": float(z.mean()),
                "max_abs_z": float(z.max()),
                "mean_var_ratio": float(ratio.mean()),
                "worst_var_ratio": float(ratio[(ratio.log().abs()).argmax()]),
            }
        )
    return rows


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(images).argmax(1) == labels).double().mean())


def split(images: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(images.split(batch_size))


class DigitsResNet18(nn.Module):
    """ResNet-18's layout (stem, four stages of two BasicBlocks, 20 BatchNorm2d) at widths 16-128 for 8x8 digits."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, width = [], 16
        for out, stride in ((16, 1), (32, 2), (64, 2), (128, 2)):
            stages.append(nn.Sequential(BasicBlock(width, out, stride), BasicBlock(out, out)))
            width = out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def trained_resnet(images: torch.Tensor, labels: torch.Tensor, deep: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = DigitsResNet18() if deep else DigitsResNet(width=32)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        order = torch.randperm(len(labels), generator=generator)
        for index in order.split(32):
            if len(index) < 2:
                continue
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images[index]), labels[index]).backward()
            optimizer.step()
    return model.eval()


def compare_methods(name: str, model: nn.Module, images: torch.Tensor, test: tuple[torch.Tensor, torch.Tensor]) -> dict:
    out: dict = {"model": name, "runs": []}
    for batch_size in (64, 4):
        batches = split(images, batch_size)
        for method in ("precise", "sequential"):
            work = copy.deepcopy(model)
            recalibrate(work, batches, method=method)
            rows = eval_fit(work, batches)
            checked = check_model(work, batches)
            run = {
                "batch_size": batch_size,
                "method": method,
                "test_accuracy": accuracy(work, *test),
                "check_passed": checked.passed,
                "check_findings": sorted(f"{f.code} {f.layer}" for f in checked.findings),
                "layers": rows,
            }
            out["runs"].append(run)
            print(
                f"\n{name}, batch {batch_size}, {method}: test accuracy {run['test_accuracy']:.3f}, "
                f"check on the same data {'passed' if checked.passed else 'FAILED'} {run['check_findings']}"
            )
            print(f"  {'layer':<28} {'mean|z|':>9} {'max|z|':>9} {'mean ratio':>11} {'worst ratio':>12}")
            for row in rows:
                print(
                    f"  {row['layer']:<28} {row['mean_abs_z']:9.4f} {row['max_abs_z']:9.4f}"
                    f" {row['mean_var_ratio']:11.4f} {row['worst_var_ratio']:12.4f}"
                )
    return out


class CustomForwardResNet50(nn.Module):
    """ResNet-50's stages called one by one in ``forward``: not an ``nn.Sequential``, as torchvision's ResNet."""

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleList(bench_resnet50_cpu.resnet50().children())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x


def cost() -> dict:
    torch.manual_seed(0)
    model = CustomForwardResNet50().eval()
    batches = [torch.randn(8, 3, 64, 64) for _ in range(4)]
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    plain = time.perf_counter() - start
    out = {"plain_eval_s": plain}
    for method in ("precise", "sequential"):
        work = copy.deepcopy(model)
        start = time.perf_counter()
        result = recalibrate(work, batches, method=method)
        seconds = time.perf_counter() - start
        out[method] = {"seconds": seconds, "passes": result.num_passes, "waves": result.num_waves}
        print(
            f"ResNet-50 (custom forward), {method}: {seconds:.1f} s = {seconds / plain:.1f}x a plain eval pass"
            f" ({result.num_passes} passes, {result.num_waves} waves)"
        )
    print(f"plain eval pass: {plain:.2f} s")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--skip-cost", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    images = torch.from_numpy(np.load(DIGITS / "train_images.npy"))
    labels = torch.from_numpy(np.load(DIGITS / "train_labels.npy")).long()
    test = (
        torch.from_numpy(np.load(DIGITS / "test_images.npy")),
        torch.from_numpy(np.load(DIGITS / "test_labels.npy")).long(),
    )
    cnn = DigitsCNN()
    cnn.load_state_dict(torch.load(DIGITS / "state_dict.pt", weights_only=True))
    results = {
        "fit": [
            compare_methods("digits_cnn", cnn.eval(), images, test),
            compare_methods("digits_resnet", trained_resnet(images, labels), images, test),
            compare_methods("digits_resnet18", trained_resnet(images, labels, deep=True), images, test),
        ]
    }
    if not args.skip_cost:
        results["cost"] = cost()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
