"""The cases: a (model, evaluation data) pair each, healthy or faulty, built lazily from a trained net."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks.faults import data as d
from benchmarks.faults import training as t
from benchmarks.faults.nets_setup import Net
from benchmarks.faults.probe import bn_inspect


@dataclass
class Built:
    """A case's model, its evaluation data (model input), labels, the same samples preprocessed correctly
    (for the reference accuracy), and bn-inspect's data options (None: the evaluation data as .npy)."""

    model: nn.Module
    x_eval: np.ndarray
    y_eval: np.ndarray
    x_reference: np.ndarray
    data_args: list[str] | None = None
    model_file: Path | None = None


@dataclass(frozen=True)
class Context:
    net: Net
    workdir: Path
    seed: int


@dataclass(frozen=True)
class Requirement:
    """What a net must have for a case to make sense; ``needs`` is recorded when a net lacks it."""

    holds: Callable[[Net], bool]
    needs: str


@dataclass(frozen=True)
class CaseSpec:
    name: str
    family: str  # "healthy" or "fault"
    what: str
    make: Callable[[Context], Built]
    applies: Requirement | None = None
    # The cause bn-inspect should name when the fault is detected (report/causes.py's codes); None when healthy.
    expected_cause: str | None = None


def on_test(ctx: Context, model: nn.Module) -> Built:
    """A model evaluated on the clean test data."""
    return Built(model, ctx.net.x_test, ctx.net.raw.y_test, ctx.net.x_test)


def with_input(ctx: Context, x_eval: np.ndarray) -> Built:
    """The trained model fed ``x_eval`` instead of the correctly preprocessed test data."""
    assert ctx.net.trained is not None
    return Built(ctx.net.trained, x_eval, ctx.net.raw.y_test, ctx.net.x_test)


def other_data(net: Net, seed: int) -> np.ndarray:
    """Data from elsewhere, in model-input form: inverted digits, or the table from a shifted device."""
    if net.is_image:
        return net.prep(1.0 - net.raw.x_test)
    return shifted_table(net.raw.x_test, seed)


def shifted_table(x: np.ndarray, seed: int) -> np.ndarray:
    """Every feature read 20% high, plus 5% multiplicative noise: another site's instrument."""
    noise = np.random.default_rng(seed).normal(1.0, 0.05, size=x.shape)
    return (x * 1.2 * noise).astype(np.float32)


def image_args(folder: Path, net: Net) -> list[str]:
    """bn-inspect's options that turn a folder of grayscale images into this net's input (pixel/255 then
    (x - m) / s with m, s folded with the PNG scale)."""
    assert net.pipeline is not None
    mean = (net.pipeline.mean or (0.0,))[0] * d.PNG_SCALE
    std = (net.pipeline.std or (1.0,))[0] * d.PNG_SCALE
    return ["--input", str(folder), "--grayscale", "--normalize", f"{mean!r},{std!r}"]


def from_image_folder(ctx: Context, folder: Path) -> Built:
    """The trained model on a folder of images, decoded here the way bn-inspect's options say."""
    raw, labels = d.read_image_folder(folder)
    built = with_input(ctx, ctx.net.prep(raw / d.PNG_SCALE))
    built.y_eval, built.data_args = labels, image_args(folder, ctx.net)
    # Files sort by label, then by test row: the reference is the same rows decoded from the .npy.
    built.x_reference = ctx.net.prep(ctx.net.raw.x_test[np.argsort(ctx.net.raw.y_test, kind="stable")])
    return built


def shipped_png(ctx: Context) -> Built:
    return from_image_folder(ctx, d.DIGITS / "test_png")


def jpeg(ctx: Context) -> Built:
    folder = ctx.workdir / "data" / f"{ctx.net.name}-jpeg"
    if not folder.exists():
        d.write_image_folder(d.jpeg_roundtrip(ctx.net.raw.x_test, 50), ctx.net.raw.y_test, folder, "jpg")
    return from_image_folder(ctx, folder)


def half(ctx: Context, which: int) -> Built:
    """One half of the test set (in-distribution, fewer samples)."""
    n = len(ctx.net.raw.y_test) // 2
    index = slice(0, n) if which == 0 else slice(n, None)
    x = ctx.net.x_test[index]
    assert ctx.net.trained is not None
    return Built(ctx.net.trained, x, ctx.net.raw.y_test[index], x)


def table_csv(ctx: Context) -> Built:
    """The test table as a CSV with a label column, read by bn-inspect's table reader."""
    path = ctx.workdir / "data" / f"{ctx.net.name}-test.csv"
    header = ",".join([f"f{i}" for i in range(ctx.net.x_test.shape[1])] + ["label"])
    rows = np.column_stack([ctx.net.x_test.astype(np.float64), ctx.net.raw.y_test])
    np.savetxt(path, rows, delimiter=",", header=header, comments="", fmt="%.9g")
    built = with_input(ctx, ctx.net.x_test)
    built.data_args = ["--input", str(path), "--drop-column", "label"]
    return built


def recalibrated(ctx: Context, method: str, x: np.ndarray, tag: str) -> Built:
    """`bn-inspect recalibrate --method METHOD` on ``x``, as a user would; the written model is evaluated."""
    source = ctx.workdir / "models" / f"{ctx.net.name}-trained.pt"
    source.parent.mkdir(parents=True, exist_ok=True)
    assert ctx.net.trained is not None
    torch.save(ctx.net.trained.state_dict(), source)
    data = ctx.workdir / "data" / f"{ctx.net.name}-{tag}.npy"
    np.save(data, x)
    out = ctx.workdir / "models" / f"{ctx.net.name}-recal-{method}-{tag}.pt"
    args = ["recalibrate", str(source), *ctx.net.cli_model_args(), "--input", str(data), "--method", method]
    code, stderr = bn_inspect([*args, "--output", str(out), "--force", "-q"])
    if code != 0:
        raise RuntimeError(f"bn-inspect recalibrate failed ({code}): {stderr}")
    model = ctx.net.build()
    model.load_state_dict(torch.load(out, weights_only=True))
    built = on_test(ctx, model.eval())
    built.model_file = out
    return built


def trained(ctx: Context) -> nn.Module:
    assert ctx.net.trained is not None
    return ctx.net.trained


def retrained(ctx: Context, momentum: float) -> nn.Module:
    net = ctx.net
    return t.trained_with_momentum(
        net.build, momentum, net.x_train, net.raw.y_train, epochs=net.epochs, batch_size=net.batch_size, seed=ctx.seed
    )


def is_normalized(net: Net) -> bool:
    return net.pipeline is not None and net.pipeline.mean is not None


def is_gray_image(net: Net) -> bool:
    return net.is_image and net.pipeline is not None and not net.pipeline.is_colour


def is_table(net: Net) -> bool:
    return not net.is_image


def is_colour(net: Net) -> bool:
    return net.pipeline is not None and net.pipeline.is_colour


IMAGE = Requirement(lambda net: net.is_image, "image input")
TABLE = Requirement(is_table, "table input")
GRAY_IMAGE = Requirement(is_gray_image, "a one-channel image net, which bn-inspect can feed grayscale image files")
NORMALIZED = Requirement(
    is_normalized, "an image pipeline with (x - mean) / std (digits_cnn takes pixels / 16 as they are)"
)
COLOUR = Requirement(
    is_colour, "several input channels (the digits have one; digits_rgb_resnet is the 3-channel variant)"
)


def transformed_input(transform: Callable[[Net, Context], np.ndarray]) -> Callable[[Context], Built]:
    return lambda ctx: with_input(ctx, transform(ctx.net, ctx))


def swap_table_blocks(x: np.ndarray) -> np.ndarray:
    """The 'mean_*' and 'worst_*' blocks of 10 columns swapped: a column order that differs from training."""
    return np.concatenate([x[:, 20:30], x[:, 10:20], x[:, 0:10]], axis=1)


def area_in_other_units(x: np.ndarray) -> np.ndarray:
    """The three area columns (mean, error, worst) in units 100x smaller."""
    scaled = x.copy()
    scaled[:, [3, 13, 23]] *= 100.0
    return scaled


def standardized(x: np.ndarray) -> np.ndarray:
    """Z-scored columns fed to a model that standardizes raw units itself."""
    return ((x - x.mean(axis=0)) / x.std(axis=0)).astype(np.float32)


def input_cases() -> list[CaseSpec]:
    """The trained model fed data preprocessed another way (healthy or not)."""
    pipe = _pipeline
    return [
        CaseSpec("trained", "healthy", "the trained model on the test data", lambda c: on_test(c, trained(c))),
        CaseSpec("test_half_a", "healthy", "the first half of the test data", lambda c: half(c, 0)),
        CaseSpec("test_half_b", "healthy", "the second half of the test data", lambda c: half(c, 1)),
        CaseSpec("png_decoded", "healthy", "the shipped PNGs, decoded by bn-inspect", shipped_png, GRAY_IMAGE),
        CaseSpec("csv_decoded", "healthy", "the test table read from CSV", table_csv, TABLE),
        CaseSpec(
            "jpeg_q50",
            "fault",
            "JPEG (quality 50) copies of the test images",
            jpeg,
            GRAY_IMAGE,
            expected_cause="domain-shift",
        ),
        CaseSpec(
            "unscaled_0_16",
            "fault",
            "raw 0-16 pixel values",
            transformed_input(lambda n, c: n.prep(n.raw.x_test * 16)),
            IMAGE,
            expected_cause="input-scale",
        ),
        CaseSpec(
            "scale_0_255",
            "fault",
            "0-255 pixels (no /255)",
            transformed_input(lambda n, c: n.prep(n.raw.x_test * 255)),
            IMAGE,
            expected_cause="input-scale",
        ),
        CaseSpec(
            "missing_normalization",
            "fault",
            "no (x - mean) / std",
            transformed_input(lambda n, c: pipe(n).without_normalization().apply(n.raw.x_test)),
            NORMALIZED,
            expected_cause="input-normalization",
        ),
        CaseSpec(
            "wrong_mean_std",
            "fault",
            "ImageNet mean/std instead of the data's",
            transformed_input(lambda n, c: pipe(n).with_stats(d.IMAGENET_MEAN, d.IMAGENET_STD).apply(n.raw.x_test)),
            NORMALIZED,
            expected_cause="input-normalization",
        ),
        CaseSpec(
            "bgr_order",
            "fault",
            "channels in BGR order before normalization",
            transformed_input(bgr),
            COLOUR,
            expected_cause="channel-order",
        ),
        CaseSpec(
            "crop_zoom",
            "fault",
            "centre 6x6 crop resized to 8x8",
            transformed_input(lambda n, c: n.prep(d.zoom(n.raw.x_test))),
            IMAGE,
            expected_cause="domain-shift",
        ),
        CaseSpec(
            "resize_shrink",
            "fault",
            "resized to 6x6 and zero-padded",
            transformed_input(lambda n, c: n.prep(d.shrink(n.raw.x_test))),
            IMAGE,
            expected_cause="domain-shift",
        ),
        CaseSpec(
            "domain_noise",
            "fault",
            "another sensor: pixel noise sigma 0.2",
            transformed_input(lambda n, c: n.prep(d.add_noise(n.raw.x_test, 0.2, c.seed))),
            IMAGE,
            expected_cause="domain-shift",
        ),
        CaseSpec(
            "domain_inverted",
            "fault",
            "another domain: inverted images",
            transformed_input(lambda n, c: other_data(n, c.seed)),
            IMAGE,
            expected_cause="domain-shift",
        ),
        CaseSpec(
            "table_standardized",
            "fault",
            "z-scored features into a raw-unit model",
            transformed_input(lambda n, c: standardized(n.x_test)),
            TABLE,
            expected_cause="input-normalization",
        ),
        CaseSpec(
            "table_column_order",
            "fault",
            "mean_* and worst_* column blocks swapped",
            transformed_input(lambda n, c: swap_table_blocks(n.x_test)),
            TABLE,
            expected_cause="channel-order",
        ),
        CaseSpec(
            "table_area_units",
            "fault",
            "area columns in units 100x smaller",
            transformed_input(lambda n, c: area_in_other_units(n.x_test)),
            TABLE,
            expected_cause="input-scale",
        ),
        CaseSpec(
            "table_domain_shift",
            "fault",
            "another instrument: features 20% high, 5% noise",
            transformed_input(lambda n, c: other_data(n, c.seed)),
            TABLE,
            expected_cause="domain-shift",
        ),
    ]


def _pipeline(net: Net) -> d.Pipeline:
    assert net.pipeline is not None
    return net.pipeline


def bgr(net: Net, ctx: Context) -> np.ndarray:
    """Colour images decoded in BGR order, then normalized with the RGB statistics."""
    pipe = _pipeline(net)
    swapped = d.colourise(net.raw.x_test)[:, ::-1]
    mean = np.array(pipe.mean, dtype=np.float32)[None, :, None, None]
    std = np.array(pipe.std, dtype=np.float32)[None, :, None, None]
    return np.ascontiguousarray((swapped - mean) / std, dtype=np.float32)


def model_cases() -> list[CaseSpec]:
    """The model changed (by recalibration or by a mistake), evaluated on the clean test data."""
    tr = trained

    def net_xy(c: Context) -> tuple[np.ndarray, np.ndarray]:
        return c.net.x_train, c.net.raw.y_train

    return [
        CaseSpec(
            "recal_precise",
            "healthy",
            "bn-inspect recalibrate --method precise on the train data",
            lambda c: recalibrated(c, "precise", c.net.x_train, "train"),
        ),
        CaseSpec(
            "recal_sequential",
            "healthy",
            "bn-inspect recalibrate --method sequential on the train data",
            lambda c: recalibrated(c, "sequential", c.net.x_train, "train"),
        ),
        CaseSpec(
            "swa_update_bn",
            "healthy",
            "SWA weights with update_bn",
            lambda c: on_test(
                c, t.averaged(tr(c), *net_xy(c), ema=False, recompute_bn=True, batch_size=c.net.batch_size, seed=c.seed)
            ),
        ),
        CaseSpec(
            "no_eval_same_data",
            "fault",
            "an eval loop without eval() over the test data",
            lambda c: on_test(c, t.spoiled_without_eval(tr(c), c.net.x_test)),
            expected_cause="spoiled-statistics",
        ),
        CaseSpec(
            "no_eval_other_data",
            "fault",
            "an eval loop without eval() over other data",
            lambda c: on_test(c, t.spoiled_without_eval(tr(c), other_data(c.net, c.seed))),
            expected_cause="spoiled-statistics",
        ),
        CaseSpec(
            "recal_other_data",
            "fault",
            "bn-inspect recalibrate --method precise on other data",
            lambda c: recalibrated(c, "precise", other_data(c.net, c.seed), "other"),
            expected_cause="spoiled-statistics",
        ),
        CaseSpec(
            "finetune_bs2",
            "fault",
            "one epoch of fine-tuning with batch size 2",
            lambda c: on_test(c, t.finetuned(tr(c), *net_xy(c), batch_size=2, seed=c.seed)),
            expected_cause="small-batch-training",
        ),
        CaseSpec(
            "frozen_bn_train_mode",
            "fault",
            "head fine-tuned, BN parameters frozen but in train mode (batch 4)",
            lambda c: on_test(
                c, t.head_finetuned_bn_train_mode(tr(c), c.net.head, *net_xy(c), batch_size=4, seed=c.seed)
            ),
            expected_cause="small-batch-training",
        ),
        CaseSpec(
            "few_batches_1",
            "fault",
            "statistics from 1 batch (momentum 0.1)",
            lambda c: on_test(c, t.few_batches(tr(c), c.net.x_train, 1, c.net.batch_size)),
            expected_cause="few-batches-tracked",
        ),
        CaseSpec(
            "few_batches_3",
            "fault",
            "statistics from 3 batches (momentum 0.1)",
            lambda c: on_test(c, t.few_batches(tr(c), c.net.x_train, 3, c.net.batch_size)),
            expected_cause="few-batches-tracked",
        ),
        CaseSpec(
            "few_batches_10",
            "fault",
            "statistics from 10 batches (momentum 0.1)",
            lambda c: on_test(c, t.few_batches(tr(c), c.net.x_train, 10, c.net.batch_size)),
            expected_cause="few-batches-tracked",
        ),
        CaseSpec(
            "momentum_0",
            "fault",
            "trained with momentum 0 (statistics never move)",
            lambda c: on_test(c, retrained(c, 0.0)),
            expected_cause="momentum",
        ),
        CaseSpec(
            "momentum_1",
            "fault",
            "trained with momentum 1 (the last batch's statistics)",
            lambda c: on_test(c, retrained(c, 1.0)),
            expected_cause="momentum",
        ),
        CaseSpec(
            "partial_load",
            "fault",
            "state_dict loaded without BN buffers (strict=False)",
            lambda c: on_test(c, t.partially_loaded(tr(c), c.net.build)),
            expected_cause="partial-load",
        ),
        CaseSpec(
            "fp16_running_var",
            "fault",
            "running_var cast to float16 and back",
            lambda c: on_test(c, t.half_precision_var(tr(c))),
            expected_cause="precision",
        ),
        CaseSpec(
            "swa_no_update_bn",
            "fault",
            "SWA weights with the last iterate's statistics",
            lambda c: on_test(
                c,
                t.averaged(tr(c), *net_xy(c), ema=False, recompute_bn=False, batch_size=c.net.batch_size, seed=c.seed),
            ),
            expected_cause="stale-statistics",
        ),
        CaseSpec(
            "ema_no_update_bn",
            "fault",
            "EMA weights with the last iterate's statistics",
            lambda c: on_test(
                c, t.averaged(tr(c), *net_xy(c), ema=True, recompute_bn=False, batch_size=c.net.batch_size, seed=c.seed)
            ),
            expected_cause="stale-statistics",
        ),
        CaseSpec(
            "corrupt_layer_var",
            "fault",
            "the middle BN layer's running_var x 1/16",
            lambda c: on_test(c, t.corrupted_layer(tr(c), var_factor=1 / 16)),
            expected_cause="corrupted-layer",
        ),
        CaseSpec(
            "corrupt_layer_mean",
            "fault",
            "the middle BN layer's running_mean + 2 running std",
            lambda c: on_test(c, t.corrupted_layer(tr(c), mean_shift_std=2.0)),
            expected_cause="corrupted-layer",
        ),
    ]


SMOKE_CASES = {"trained", "png_decoded", "scale_0_255", "partial_load", "no_eval_other_data", "recal_precise"}


def all_cases(net: Net, *, smoke: bool) -> tuple[list[CaseSpec], list[dict[str, str]]]:
    """The cases that apply to ``net`` and, for those that do not, why (recorded in the results)."""
    specs = [s for s in input_cases() + model_cases() if not smoke or s.name in SMOKE_CASES]
    kept = [s for s in specs if s.applies is None or s.applies.holds(net)]
    skipped = [
        {"net": net.name, "name": s.name, "reason": f"needs {s.applies.needs}"}
        for s in specs
        if s.applies is not None and not s.applies.holds(net)
    ]
    return kept, skipped
