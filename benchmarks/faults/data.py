"""The shipped data, the input pipeline each net expects, and the ways a pipeline goes wrong."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "sample_models" / "digits_cnn"
CANCER_CSV = REPO / "sample_models" / "cancer_mlp" / "test.csv"
# The shipped PNGs hold each 0..16 value as value x 15, so pixel / 255 = x * 240 / 255 (sample_models/README.md).
PNG_SCALE = 240 / 255
# Three distinct channel gains and offsets make a colour version of the digits whose channels differ in
# mean and spread, so that reading them in BGR order changes what the first layer sees.
COLOUR_GAIN = (0.9, 0.6, 0.3)
COLOUR_OFFSET = (0.0, 0.2, 0.5)
IMAGENET_MEAN, IMAGENET_STD = 0.485, 0.229


@dataclass(frozen=True)
class Split:
    """Features (raw: before the net's pipeline) and int64 labels of a train and a test split."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits() -> Split:
    """The shipped digits: 1,347 train and 450 test images (N, 1, 8, 8), pixels / 16 in [0, 1]."""
    arrays = [
        np.load(DIGITS / f"{name}.npy") for name in ("train_images", "train_labels", "test_images", "test_labels")
    ]
    return Split(*arrays)


def load_cancer(seed: int) -> Split:
    """The shipped cancer table (143 rows, 30 raw features), split in two stratified halves by ``seed``.

    Only the held-out 143 rows of the sample model ship (scikit-learn made the rest), so the benchmark
    trains on one half and tests on the other.
    """
    with CANCER_CSV.open(newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    table = np.array(rows, dtype=np.float64)
    x, y = table[:, :-1].astype(np.float32), table[:, -1].astype(np.int64)
    rng = np.random.default_rng(seed)
    is_train = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):
        index = rng.permutation(np.flatnonzero(y == label))
        is_train[index[: len(index) // 2]] = True
    return Split(x[is_train], y[is_train], x[~is_train], y[~is_train])


@dataclass(frozen=True)
class Pipeline:
    """Raw digits -> model input: optional colour, then per-channel (x - mean) / std; None: no normalization."""

    is_colour: bool = False
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def apply(self, raw: np.ndarray) -> np.ndarray:
        x = colourise(raw) if self.is_colour else raw
        if self.mean is None or self.std is None:
            return x.astype(np.float32)
        mean = np.array(self.mean, dtype=np.float32)[None, :, None, None]
        std = np.array(self.std, dtype=np.float32)[None, :, None, None]
        return ((x - mean) / std).astype(np.float32)

    def without_normalization(self) -> Pipeline:
        return replace(self, mean=None, std=None)

    def with_stats(self, mean: float, std: float) -> Pipeline:
        channels = 3 if self.is_colour else 1
        return replace(self, mean=(mean,) * channels, std=(std,) * channels)


def fitted_pipeline(x_train: np.ndarray, *, is_colour: bool) -> Pipeline:
    """A pipeline normalizing with the training set's per-channel mean and std, rounded as people write them."""
    x = colourise(x_train) if is_colour else x_train
    mean = tuple(round(float(v), 3) for v in x.mean(axis=(0, 2, 3)))
    std = tuple(round(float(v), 3) for v in x.std(axis=(0, 2, 3)))
    return Pipeline(is_colour=is_colour, mean=mean, std=std)


def colourise(raw: np.ndarray) -> np.ndarray:
    """(N, 1, H, W) -> (N, 3, H, W): channel c = gain_c * x + offset_c (all within [0, 1])."""
    gain = np.array(COLOUR_GAIN, dtype=np.float32)[None, :, None, None]
    offset = np.array(COLOUR_OFFSET, dtype=np.float32)[None, :, None, None]
    return (raw * gain + offset).astype(np.float32)


def zoom(raw: np.ndarray, crop: int = 6) -> np.ndarray:
    """Centre crop ``crop`` pixels and resize back (bilinear): a crop the training pipeline did not do."""
    size, start = raw.shape[-1], (raw.shape[-1] - crop) // 2
    cropped = torch.from_numpy(raw[..., start : start + crop, start : start + crop])
    return F.interpolate(cropped, size=(size, size), mode="bilinear", align_corners=False).numpy()


def shrink(raw: np.ndarray, size: int = 6) -> np.ndarray:
    """Resize to ``size`` pixels (bilinear) and pad with zeros to the original size: a resize mismatch."""
    full = raw.shape[-1]
    small = F.interpolate(torch.from_numpy(raw), size=(size, size), mode="bilinear", align_corners=False)
    before = (full - size) // 2
    return F.pad(small, (before, full - size - before, before, full - size - before)).numpy()


def add_noise(raw: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """Gaussian pixel noise, clipped to [0, 1]: another sensor."""
    noise = np.random.default_rng(seed).normal(0.0, sigma, size=raw.shape)
    return np.clip(raw + noise, 0.0, 1.0).astype(np.float32)


def to_pixels(raw: np.ndarray) -> np.ndarray:
    """Raw digits in [0, 1] -> uint8 pixels as the shipped PNGs store them (x * 240)."""
    return np.rint(raw * 240).astype(np.uint8)


def jpeg_roundtrip(raw: np.ndarray, quality: int) -> list[bytes]:
    """Each grayscale image encoded as JPEG at ``quality`` (the bytes bn-inspect will read)."""
    encoded = []
    for image in to_pixels(raw)[:, 0]:
        buffer = io.BytesIO()
        Image.fromarray(image, mode="L").save(buffer, format="JPEG", quality=quality)
        encoded.append(buffer.getvalue())
    return encoded


def decode_gray(blob: bytes | Path) -> np.ndarray:
    """One grayscale image file -> (1, H, W) float32 pixel / 255."""
    source = io.BytesIO(blob) if isinstance(blob, bytes) else blob
    with Image.open(source) as image:
        return (np.asarray(image.convert("L"), dtype=np.float32) / 255.0)[None]


def write_image_folder(blobs: list[bytes], labels: np.ndarray, folder: Path, suffix: str) -> None:
    """ImageFolder layout: folder/<label>/<index>.<suffix>."""
    for index, (blob, label) in enumerate(zip(blobs, labels, strict=True)):
        path = folder / str(int(label)) / f"{index:04d}.{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)


def read_image_folder(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every image under folder/<label>/, decoded as grayscale pixel / 255, with its label."""
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    images = np.stack([decode_gray(p) for p in paths])
    labels = np.array([int(p.parent.name) for p in paths], dtype=np.int64)
    return images, labels
