"""--input DIR of images: decoding (formats, modes, EXIF), preprocessing, skipped files, streaming, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from bn_inspect.data.decode import Preprocessing, decode_image
from bn_inspect.data.images import ImageFiles, open_images
from bn_inspect.errors import InputError
from tests.helpers import DIGITS, assert_one_error_line, invoke

RNG = np.random.default_rng(0)


def rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth, non-symmetric RGB picture (gradients plus noise), so rotations and crops show."""
    rows, cols = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(seed).integers(0, 40, (height, width, 3))
    picture = np.stack([rows * 200 // max(height, 1), cols * 200 // max(width, 1), (rows + 2 * cols) % 200], -1)
    return (picture + noise).astype(np.uint8)


@pytest.fixture(scope="module")
def bn_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TorchScript model whose first layer is BatchNorm2d(3): its batch statistics are the pixels'."""
    path = tmp_path_factory.mktemp("model") / "bn.pt"
    torch.jit.save(torch.jit.script(nn.Sequential(nn.BatchNorm2d(3)).eval()), path)
    return path


@pytest.fixture(scope="module")
def gray_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "bn1.pt"
    torch.jit.save(torch.jit.script(nn.Sequential(nn.BatchNorm2d(1)).eval()), path)
    return path


def inspect_json(capsys: pytest.CaptureFixture[str], model: Path, *args: str | Path) -> dict:
    result = invoke(capsys, ["inspect", model, *args, "--format", "json"])
    assert result.code == 0, result.err
    return json.loads(result.out)


def reference_moments(tensors: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance of all values, in float64."""
    values = np.concatenate([t.double().numpy().reshape(t.shape[0], -1) for t in tensors], axis=1)
    return values.mean(axis=1), values.var(axis=1)


def write_class_folder(root: Path, count: int = 12) -> list[Path]:
    """ImageFolder layout with one file per format, all 24×32."""
    suffixes = [".jpg", ".png", ".bmp", ".webp", ".tiff", ".jpeg"]
    paths = []
    for index in range(count):
        path = root / f"class_{index % 3}" / f"img_{index:02d}{suffixes[index % len(suffixes)]}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb(24, 32, seed=index)).save(path)
        paths.append(path)
    return paths


def test_every_format_in_an_imagefolder_layout_gives_exact_statistics(
    tmp_path: Path, bn_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = write_class_folder(tmp_path / "images")
    (tmp_path / "images" / "labels.txt").write_text("not an image: ignored")
    (tmp_path / "images" / "class_0" / "._img_00.jpg").write_bytes(b"macOS resource fork: hidden, ignored")
    document = inspect_json(capsys, bn_model, "--input", tmp_path / "images", "--batch-size", "5", "--workers", "2")
    assert document["input"]["num_samples"] == 12 and document["input"]["num_batches"] == 3
    assert document["input"]["preprocessing"] == "normalize none"
    assert document["input"]["num_skipped_files"] == 0
    # The reference decodes each file independently with Pillow: RGB bytes / 255.
    tensors = [torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) / 255 for p in paths]
    mean, var = reference_moments(tensors)
    layer = document["layers"][0]
    np.testing.assert_allclose(layer["batch_mean"], mean, rtol=1e-6)
    np.testing.assert_allclose(layer["batch_var"], var, rtol=1e-5)


def test_resize_crop_and_normalize_follow_the_torchvision_recipe(tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    Image.fromarray(rgb(40, 60)).save(path)
    prep = Preprocessing(resize=20, crop=16, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    tensor = decode_image(path, prep)
    # Reference: shorter side 40 -> 20, longer 60 -> int(20 * 60 / 40) = 30; centre 16×16 at (2, 7).
    resized = Image.open(path).convert("RGB").resize((30, 20), Image.Resampling.BILINEAR)
    expected = np.asarray(resized.crop((7, 2, 23, 18)), dtype=np.float32) / 255
    expected = (expected - np.array(prep.mean, np.float32)) / np.array(prep.std, np.float32)
    assert tensor.shape == (3, 16, 16)
    np.testing.assert_allclose(tensor.permute(1, 2, 0).numpy(), expected, rtol=1e-6, atol=1e-6)


def test_equals_torchvision_imagefolder_with_its_transforms(tmp_path: Path) -> None:
    datasets = pytest.importorskip("torchvision.datasets")
    transforms = pytest.importorskip("torchvision.transforms")
    write_class_folder(tmp_path / "images", count=6)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    recipe = transforms.Compose(
        [transforms.Resize(20), transforms.CenterCrop(18), transforms.ToTensor(), transforms.Normalize(mean, std)]
    )
    theirs = torch.stack([image for image, _ in datasets.ImageFolder(str(tmp_path / "images"), transform=recipe)])
    files = open_images(tmp_path / "images", Preprocessing(resize=20, crop=18, mean=mean, std=std), workers=0)
    ours = torch.cat([batch.args[0] for batch in files.batches(4, None)])
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize(
    ("mode", "save"),
    [
        ("P", {"transparency": 0}),
        ("RGBA", {}),
        ("LA", {}),
        ("CMYK", {}),
        ("L", {}),
        ("1", {}),
    ],
)
def test_image_modes_become_rgb_as_pillow_converts_them(tmp_path: Path, mode: str, save: dict) -> None:
    base = Image.fromarray(rgb(10, 12))
    image = base.convert(mode) if mode != "P" else base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    path = tmp_path / ("image.jpg" if mode == "CMYK" else "image.png")
    image.save(path, **save)
    tensor = decode_image(path, Preprocessing())
    expected = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255  # alpha dropped, as ImageFolder does
    assert tensor.shape == (3, 10, 12)
    np.testing.assert_array_equal(tensor.permute(1, 2, 0).numpy(), expected)


def test_sixteen_bit_png_keeps_its_depth(tmp_path: Path) -> None:
    values = (np.arange(6 * 7, dtype=np.uint16).reshape(6, 7) * 1531).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    gray = decode_image(tmp_path / "deep.png", Preprocessing(grayscale=True))
    np.testing.assert_allclose(gray[0].numpy(), values / 65535.0, rtol=1e-6)
    color = decode_image(tmp_path / "deep.png", Preprocessing())
    assert color.shape == (3, 6, 7) and torch.equal(color[0], color[2])


def test_grayscale_uses_the_luma_of_rgb(tmp_path: Path) -> None:
    Image.fromarray(rgb(8, 9)).save(tmp_path / "c.png")
    tensor = decode_image(tmp_path / "c.png", Preprocessing(grayscale=True))
    expected = np.asarray(Image.open(tmp_path / "c.png").convert("L"), dtype=np.float32) / 255
    assert tensor.shape == (1, 8, 9)
    np.testing.assert_array_equal(tensor[0].numpy(), expected)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_exif_orientation_is_applied(tmp_path: Path, suffix: str) -> None:
    picture = rgb(12, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: show the picture rotated 90° clockwise
    Image.fromarray(picture).save(tmp_path / f"turned{suffix}", exif=exif, quality=100)
    Image.fromarray(np.rot90(picture, k=-1).copy()).save(tmp_path / f"upright{suffix}", quality=100)
    turned = decode_image(tmp_path / f"turned{suffix}", Preprocessing())
    upright = decode_image(tmp_path / f"upright{suffix}", Preprocessing())
    assert turned.shape == upright.shape == (3, 20, 12)
    tolerance = 0 if suffix == ".png" else 0.05  # JPEG blocks differ between the two orientations
    assert (turned - upright).abs().mean() <= tolerance


def test_a_corrupt_file_is_skipped_counted_and_named(
    tmp_path: Path, bn_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_class_folder(tmp_path / "images", count=6)
    good = (tmp_path / "images" / "class_0" / "img_00.jpg").read_bytes()
    broken = tmp_path / "images" / "class_1" / "broken.jpg"
    broken.write_bytes(good[: len(good) // 2])
    (tmp_path / "images" / "class_2" / "text.png").write_text("not a png at all")
    result = invoke(capsys, ["inspect", bn_model, "--input", tmp_path / "images", "--format", "json"])
    assert result.code == 0, result.err
    data = json.loads(result.out)["input"]
    assert data["num_samples"] == 6 and data["num_skipped_files"] == 2
    assert data["skipped_files"] == [str(broken), str(tmp_path / "images" / "class_2" / "text.png")]
    assert result.err.startswith("warning: 2 files skipped as not decodable, e.g. ") and "broken.jpg" in result.err
    table = invoke(capsys, ["inspect", bn_model, "--input", tmp_path / "images", "-q"])
    assert f"2 files skipped (not decodable), e.g. {broken}" in table.out


def test_strict_data_stops_at_a_corrupt_file(
    tmp_path: Path, bn_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_class_folder(tmp_path / "images", count=4)
    (tmp_path / "images" / "class_1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    result = invoke(capsys, ["inspect", bn_model, "--input", tmp_path / "images", "--strict-data"])
    assert result.code == 2
    assert_one_error_line(result, f"image {tmp_path / 'images' / 'class_1' / 'broken.png'} cannot be decoded")


def test_mixed_sizes_need_resize_and_crop(tmp_path: Path, bn_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "images").mkdir()
    Image.fromarray(rgb(20, 30)).save(tmp_path / "images" / "a.png")
    Image.fromarray(rgb(31, 25)).save(tmp_path / "images" / "b.png")
    result = invoke(capsys, ["inspect", bn_model, "--input", tmp_path / "images"])
    assert result.code == 2
    assert_one_error_line(result, "images have different sizes", "is 20×30", "is 31×25", "Pass --resize N --crop N")
    # Apart in separate batches too.
    apart = invoke(capsys, ["inspect", bn_model, "--input", tmp_path / "images", "--batch-size", "1", "--workers", "0"])
    assert_one_error_line(apart, "images have different sizes")
    fine = inspect_json(capsys, bn_model, "--input", tmp_path / "images", "--resize", "16", "--crop", "14")
    assert fine["input"]["shape"] == [2, 3, 14, 14]
    assert fine["input"]["preprocessing"] == "resize 16, crop 14, normalize none"


def test_one_image_file_is_an_input(tmp_path: Path, bn_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Image.fromarray(rgb(9, 9)).save(tmp_path / "one.webp", lossless=True)
    document = inspect_json(capsys, bn_model, "--input", tmp_path / "one.webp", "--normalize", "imagenet")
    assert document["input"]["num_samples"] == 1 and document["input"]["preprocessing"] == "normalize imagenet"


def test_workers_do_not_change_the_numbers(tmp_path: Path, bn_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_class_folder(tmp_path / "images", count=9)
    alone = inspect_json(capsys, bn_model, "--input", tmp_path / "images", "--batch-size", "2", "--workers", "0")
    helped = inspect_json(capsys, bn_model, "--input", tmp_path / "images", "--batch-size", "2", "--workers", "2")
    assert alone["layers"] == helped["layers"]


def test_channels_last_batches(tmp_path: Path) -> None:
    write_class_folder(tmp_path / "images", count=3)
    files = open_images(tmp_path / "images", Preprocessing(channels_last=True), workers=0)
    batch = next(iter(files.batches(3, None))).args[0]
    assert batch.is_contiguous(memory_format=torch.channels_last) and not batch.is_contiguous()


def test_images_are_decoded_while_the_model_runs_not_before(tmp_path: Path) -> None:
    """Streaming: files of later batches are opened only a few batches ahead of the one in use."""
    (tmp_path / "images").mkdir()
    for index in range(60):
        Image.fromarray(rgb(4, 4, seed=index)).save(tmp_path / "images" / f"{index:03d}.png")
    files = open_images(tmp_path / "images", Preprocessing(), workers=1)
    batches = files.batches(2, None)
    next(batches)
    # The DataLoader prefetches 2 batches per worker; everything past batch 10 is still unread.
    for index in range(20, 60):
        (tmp_path / "images" / f"{index:03d}.png").unlink()
    with pytest.raises(InputError, match=r"image .*020\.png does not exist"):
        list(batches)


def test_ranks_share_the_batches_of_one_process(tmp_path: Path) -> None:
    write_class_folder(tmp_path / "images", count=11)
    whole = open_images(tmp_path / "images", Preprocessing(), workers=0)
    one = [batch.args[0] for batch in whole.batches(3, None)]
    shares = [[batch.args[0] for batch in whole.share(rank, 3).batches(3, None)] for rank in range(3)]
    assert [whole.share(rank, 3).num_batches(3, None) for rank in range(3)] == [2, 1, 1]
    interleaved = [shares[b % 3][b // 3] for b in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(one, interleaved, strict=True))
    capped = [whole.share(rank, 2).num_batches(3, 3) for rank in range(2)]
    assert capped == [2, 1]


def test_the_shipped_digit_pngs_reproduce_test_images_npy(
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = DIGITS / "torchscript.pt"
    from_png = inspect_json(
        capsys, model, "--input", DIGITS / "test_png", "--grayscale", "--normalize", "0,0.9411764705882353"
    )
    from_npy = inspect_json(capsys, model, "--input", DIGITS / "test_images.npy")
    assert from_png["input"]["num_samples"] == from_npy["input"]["num_samples"] == 450
    for png_layer, npy_layer in zip(from_png["layers"], from_npy["layers"], strict=True):
        for key in ("batch_mean", "batch_var"):
            np.testing.assert_allclose(png_layer[key], npy_layer[key], rtol=1e-5, atol=1e-6)
    files = open_images(DIGITS / "test_png", Preprocessing(grayscale=True, mean=(0.0,), std=(240 / 255,)), workers=0)
    decoded = {
        path: tensor
        for path, tensor in zip(files.files, torch.cat(list(b.args[0] for b in files.batches(450, None))), strict=True)
    }
    expected = np.load(DIGITS / "test_images.npy")
    for path, tensor in decoded.items():
        np.testing.assert_allclose(tensor.numpy(), expected[int(Path(path).stem)], atol=1e-6)


def test_the_digits_model_reads_its_png_folder_with_grayscale(
    gray_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    document = inspect_json(capsys, gray_model, "--input", DIGITS / "test_png", "--grayscale", "--batches", "1")
    assert document["input"]["shape"] == [64, 1, 8, 8]


# --- errors: one line, exit 2 -------------------------------------------------------------------


def test_empty_folder(tmp_path: Path, bn_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    result = invoke(capsys, ["inspect", bn_model, "--input", tmp_path / "empty"])
    assert result.code == 2
    assert_one_error_line(result, "holds no .pt, .pth, .npy, .npz files and no images: it is empty")


def test_folder_without_a_known_image_type(tmp_path: Path, bn_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "gifs" / "a").mkdir(parents=True)
    Image.fromarray(rgb(4, 4)).save(tmp_path / "gifs" / "a" / "anim.gif")
    result = invoke(capsys, ["inspect", bn_model, "--input", tmp_path / "gifs"])
    assert result.code == 2
    assert_one_error_line(result, "no image of a known type (.jpg, .jpeg, .png", "anim.gif")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path: Path, bn_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_class_folder(tmp_path / "images", count=3)
    locked = tmp_path / "images" / "class_1" / "img_01.png"
    locked.chmod(0)
    try:
        result = invoke(capsys, ["inspect", bn_model, "--input", tmp_path / "images"])
    finally:
        locked.chmod(0o644)
    assert result.code == 2
    assert_one_error_line(result, f"cannot read image {locked}: Permission denied")


def test_a_named_pipe_among_the_images_is_refused_before_it_blocks(
    tmp_path: Path, bn_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_class_folder(tmp_path / "images", count=2)
    os.mkfifo(tmp_path / "images" / "class_1" / "pipe.png")
    result = invoke(capsys, ["inspect", bn_model, "--input", tmp_path / "images"])
    assert result.code == 2
    assert_one_error_line(
        result, f"{tmp_path / 'images' / 'class_1' / 'pipe.png'} in input directory", "not a regular file"
    )


def test_a_missing_image_file(tmp_path: Path, bn_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = invoke(capsys, ["inspect", bn_model, "--input", tmp_path / "missing.jpg"])
    assert result.code == 2
    assert_one_error_line(result, f"input image {tmp_path / 'missing.jpg'} does not exist. Check the path")


def test_a_file_that_vanishes_is_unreadable_not_corrupt(tmp_path: Path) -> None:
    files = ImageFiles("gone", (str(tmp_path / "gone.png"),), workers=0)
    with pytest.raises(InputError, match=r"image .*gone\.png does not exist"):
        list(files.batches(1, None))


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--resize", "16", "--crop", "20"], ["--crop 20 is larger than --resize 16", "Pass --crop 16 or less"]),
        (["--normalize", "imagenet", "--grayscale"], ["--normalize gives 3 channel means", "with --grayscale"]),
        (["--normalize", "half"], ["--normalize 'half' is not imagenet, none or a list of numbers"]),
        (["--normalize", "0.5,0.2,0.1"], ["does not give as many finite means as stds"]),
        (["--normalize", "0.5,0"], ["has a std that is not positive"]),
        (["--crop", "30"], ["is 24×32, smaller than --crop 30; pass --resize N with N ≥ 30"]),
        (["--input-key", "x"], ["--input-key and --drop-column apply to tensor files, not to images"]),
    ],
)
def test_bad_image_options(
    tmp_path: Path, bn_model: Path, capsys: pytest.CaptureFixture[str], args: list[str], fragments: list[str]
) -> None:
    write_class_folder(tmp_path / "images", count=2)
    result = invoke(capsys, ["inspect", bn_model, "--input", tmp_path / "images", *args])
    assert result.code == 2
    assert_one_error_line(result, *fragments)


def test_image_options_are_refused_for_tensor_input(capsys: pytest.CaptureFixture[str]) -> None:
    result = invoke(
        capsys, ["inspect", DIGITS / "torchscript.pt", "--input", DIGITS / "test_images.npy", "--resize", "8"]
    )
    assert result.code == 2
    assert_one_error_line(result, "--resize applies to images, and --input", "is not a folder of images")


def test_a_folder_with_shards_and_images_says_which(
    tmp_path: Path, bn_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_class_folder(tmp_path, count=1)
    np.save(tmp_path / "a.npy", np.zeros((2, 3, 4, 4), np.float32))
    Image.fromarray(rgb(4, 4)).save(tmp_path / "b.png")
    result = invoke(capsys, ["inspect", bn_model, "--input", tmp_path])
    assert result.code == 2
    assert_one_error_line(result, "holds both tensor files (a.npy) and images (b.png)")


def test_the_header_labels_the_preprocessing(capsys: pytest.CaptureFixture[str]) -> None:
    folder = DIGITS / "test_png"
    result = invoke(
        capsys,
        ["inspect", DIGITS / "torchscript.pt", "--input", folder, "--grayscale", "--normalize", "0,0.9411764705882353"],
    )
    assert result.code == 0, result.err
    assert "preprocessing: normalize mean 0 std 0.941176, grayscale" in result.out


def test_the_html_page_says_how_images_were_read(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "png"
    shutil.copytree(DIGITS / "test_png", folder)
    (folder / "3" / "<i>broken.png").write_bytes(b"not a png")
    page = tmp_path / "page.html"
    args = ["--grayscale", "--normalize", "0,0.9411764705882353", "--format", "html", "--output", page]
    result = invoke(capsys, ["inspect", DIGITS / "torchscript.pt", "--input", folder, *args])
    assert result.code == 0, result.err
    text = page.read_text()
    assert "preprocessing: normalize mean 0 std 0.941176, grayscale" in text
    assert "1 file skipped (not decodable)" in text and "&lt;i&gt;broken.png" in text
    assert "<i>broken" not in text


@pytest.mark.parametrize("model_file", ["torchscript.pt", "pickle.pt"])
def test_rgb_images_into_a_one_channel_model_suggest_grayscale(
    capsys: pytest.CaptureFixture[str], model_file: str
) -> None:
    trust = ["--trust-pickle"] if model_file == "pickle.pt" else []
    result = invoke(capsys, ["inspect", DIGITS / model_file, *trust, "--input", DIGITS / "test_png"])
    assert result.code == 2
    # TorchScript keeps the kernel's words out of its own message; the hint must not depend on them.
    assert_one_error_line(result, "so the model takes (N, 1, *, *)", "--grayscale for an image folder")
