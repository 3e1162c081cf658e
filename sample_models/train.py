"""Regenerate every shipped sample model, its weights and its held-out data."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

HERE = Path(__file__).resolve().parent
# The pickled models must reference sample_models.architectures, not a bare
# "architectures" module, so import through the package from the repo root.
sys.path.insert(0, str(HERE.parent))

from sample_models.architectures import (  # noqa: E402
    CancerMLP,
    DigitsCNN,
    SignalCNN1d,
    VolumeCNN3d,
)

SEED = 0
SIGNAL_LENGTH = 64
VOLUME_SIZE = 8


def make_signals(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Noisy sine (0), square (1) and sawtooth (2) waves, shape (n, 1, 64)."""
    labels = np.arange(n) % 3
    rng.shuffle(labels)
    t = np.arange(SIGNAL_LENGTH) / SIGNAL_LENGTH
    cycles = rng.uniform(1.5, 5.0, size=(n, 1))
    phase = rng.uniform(0.0, 1.0, size=(n, 1))
    amplitude = rng.uniform(0.5, 2.0, size=(n, 1))
    cycle_pos = (cycles * t + phase) % 1.0
    waves = np.where(
        labels[:, None] == 0,
        np.sin(2 * np.pi * cycle_pos),
        np.where(labels[:, None] == 1, np.where(cycle_pos < 0.5, 1.0, -1.0), 2 * cycle_pos - 1),
    )
    offset = rng.normal(0.0, 0.2, size=(n, 1))
    noise = rng.normal(0.0, 0.15, size=(n, SIGNAL_LENGTH)) * amplitude
    signals = amplitude * waves + offset + noise
    return signals[:, None, :].astype(np.float32), labels.astype(np.int64)


def make_volumes(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Noisy filled sphere (0) or axis-aligned cube (1) in an 8x8x8 grid, shape (n, 1, 8, 8, 8)."""
    labels = np.arange(n) % 2
    rng.shuffle(labels)
    axis = np.arange(VOLUME_SIZE, dtype=np.float64)
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1)
    volumes = np.empty((n, VOLUME_SIZE, VOLUME_SIZE, VOLUME_SIZE), dtype=np.float64)
    for i, label in enumerate(labels):
        # Size ranges overlap in voxel count, so the total intensity alone
        # cannot separate the classes; the model has to see the shape.
        half = rng.uniform(2.0, 3.0) if label == 0 else rng.uniform(1.5, 2.5)
        centre = rng.uniform(half - 0.5, VOLUME_SIZE - 0.5 - half, size=3)
        offsets = grid - centre
        inside = np.sqrt((offsets**2).sum(axis=-1)) <= half if label == 0 else np.abs(offsets).max(axis=-1) <= half
        volumes[i] = inside * rng.uniform(0.8, 1.2)
    volumes += rng.normal(0.0, 0.1, size=volumes.shape)
    return volumes[:, None].astype(np.float32), labels.astype(np.int64)


def fit(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
) -> None:
    """Train with Adam on shuffled mini-batches so BatchNorm running stats are learned."""
    dataset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    # drop_last avoids a size-1 final batch, which BatchNorm rejects in train mode.
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(SEED),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            loss_fn(model(xb), yb).backward()
            optimizer.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    predictions = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    return float((predictions == y).mean())


def save_model(model: nn.Module, folder: Path) -> None:
    """Write the same eval-mode model in all three formats bn-inspect reads."""
    folder.mkdir(parents=True, exist_ok=True)
    model.eval()
    torch.save(model.state_dict(), folder / "state_dict.pt")
    torch.jit.save(torch.jit.script(model), folder / "torchscript.pt")
    torch.save(model, folder / "pickle.pt")


def train_digits() -> float:
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=450, stratify=labels, random_state=SEED
    )
    model = DigitsCNN()
    fit(model, x_train, y_train, epochs=20, batch_size=64, lr=1e-3)
    folder = HERE / "digits_cnn"
    save_model(model, folder)
    np.save(folder / "train_images.npy", x_train)
    np.save(folder / "train_labels.npy", y_train)
    np.save(folder / "test_images.npy", x_test)
    np.save(folder / "test_labels.npy", y_test)
    return accuracy(model, x_test, y_test)


def train_cancer() -> float:
    cancer = load_breast_cancer()
    features = cancer.data.astype(np.float32)
    labels = cancer.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=143, stratify=labels, random_state=SEED
    )
    model = CancerMLP()
    fit(model, x_train, y_train, epochs=60, batch_size=32, lr=1e-3)
    folder = HERE / "cancer_mlp"
    save_model(model, folder)
    columns = [name.replace(" ", "_") for name in cancer.feature_names]
    table = pd.DataFrame(x_test, columns=columns)
    table["label"] = y_test
    table.to_csv(folder / "test.csv", index=False)
    return accuracy(model, x_test, y_test)


def train_signals() -> float:
    signals, labels = make_signals(900, np.random.default_rng(SEED))
    x_train, x_test, y_train, y_test = train_test_split(
        signals, labels, test_size=225, stratify=labels, random_state=SEED
    )
    model = SignalCNN1d()
    fit(model, x_train, y_train, epochs=30, batch_size=32, lr=3e-3)
    folder = HERE / "signal_cnn1d"
    save_model(model, folder)
    np.save(folder / "test_signals.npy", x_test)
    np.save(folder / "test_labels.npy", y_test)
    return accuracy(model, x_test, y_test)


def train_volumes() -> float:
    volumes, labels = make_volumes(600, np.random.default_rng(SEED + 1))
    x_train, x_test, y_train, y_test = train_test_split(
        volumes, labels, test_size=150, stratify=labels, random_state=SEED
    )
    model = VolumeCNN3d()
    fit(model, x_train, y_train, epochs=30, batch_size=32, lr=3e-3)
    folder = HERE / "volume_cnn3d"
    save_model(model, folder)
    np.save(folder / "test_volumes.npy", x_test)
    np.save(folder / "test_labels.npy", y_test)
    return accuracy(model, x_test, y_test)


def main() -> None:
    torch.manual_seed(SEED)
    for name, train in [
        ("digits_cnn", train_digits),
        ("cancer_mlp", train_cancer),
        ("signal_cnn1d", train_signals),
        ("volume_cnn3d", train_volumes),
    ]:
        print(f"{name}: held-out accuracy {train():.4f}", flush=True)


if __name__ == "__main__":
    main()
