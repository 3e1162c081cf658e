"""Write the digits test set as PNG files, sample_models/digits_cnn/test_png/<label>/<row>.png.

The digits are 8×8 with values 0..16 (the model saw them divided by 16, test_images.npy). Each
pixel is written as value × 15 (0..240), so that an 8-bit PNG holds it exactly, and

    bn-inspect inspect sample_models/digits_cnn/torchscript.pt --input sample_models/digits_cnn/test_png \\
        --grayscale --normalize 0,0.9411764705882353

gives the model what it was trained on: (value × 15 / 255) / (240 / 255) = value / 16.
Not run by CI; the folder is committed. Run from the repository root: python sample_models/write_digits_png.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).parent
PIXEL_PER_VALUE = 15


def main() -> None:
    folder = HERE / "digits_cnn"
    images = np.load(folder / "test_images.npy")
    labels = np.load(folder / "test_labels.npy")
    values = np.rint(images[:, 0] * 16).astype(np.uint8)
    if not np.array_equal(values / np.float32(16), images[:, 0]):
        raise SystemExit("test_images.npy is not the digits' values / 16")
    for row, (pixels, label) in enumerate(zip(values, labels, strict=True)):
        target = folder / "test_png" / str(int(label)) / f"{row:03d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels * PIXEL_PER_VALUE).save(target, optimize=True)


if __name__ == "__main__":
    main()
