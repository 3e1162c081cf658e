"""--shape parsing, input files, batching and shape guessing (bn_inspect.data.inputs)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from bn_inspect.data.memory import check_fits_memory
from bn_inspect.data.readers import InputData, read_input
from bn_inspect.data.shapes import CANDIDATE_SIDES, guess_input_shapes, parse_shape, random_batches
from bn_inspect.errors import InputError
from sample_models.architectures import CancerMLP, DigitsCNN, SignalCNN1d, VolumeCNN3d
from tests.helpers import DIGITS, SAMPLES
from tests.malicious import ATTACKS


def esc(path: Path) -> str:
    return re.escape(str(path))


# --- parse_shape ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shape"),
    [
        ("16,3,32,32", (16, 3, 32, 32)),
        ("2,30", (2, 30)),
        (" 4 , 1 , 8 , 8 ", (4, 1, 8, 8)),
        ("4,1,8,8,", (4, 1, 8, 8)),
        ("4x1x8x8", (4, 1, 8, 8)),
        ("1,1,1,1,1,1", (1, 1, 1, 1, 1, 1)),
    ],
)
def test_parse_shape_good(text: str, shape: tuple[int, ...]) -> None:
    assert parse_shape(text) == shape


@pytest.mark.parametrize("text", ["a,b", "4,3.5", "4;3", "4,3,-", "four,3", "4,,3e2"])
def test_parse_shape_malformed(text: str) -> None:
    with pytest.raises(InputError, match=r"is not a comma-separated list of integers\. Write e\.g\. --shape"):
        parse_shape(text)


@pytest.mark.parametrize("text", ["0,3", "4,0,8,8", "-4,3", "4,-3,8,8"])
def test_parse_shape_not_positive(text: str) -> None:
    with pytest.raises(InputError, match=rf"--shape '{re.escape(text)}' has a size that is not positive"):
        parse_shape(text)


@pytest.mark.parametrize(("text", "dims"), [("4", "1 dim"), ("", "0 dims"), (",", "0 dims")])
def test_parse_shape_too_few_dims(text: str, dims: str) -> None:
    with pytest.raises(InputError, match=rf"has {dims}; the model needs at least \(N, C\)"):
        parse_shape(text)


def test_parse_shape_too_large_is_refused_before_allocating() -> None:
    start = time.perf_counter()
    with pytest.raises(InputError, match=r"one batch of shape \(100000, 100000, 1000\) needs 37,252\.9 GiB"):
        parse_shape("100000,100000,1000")
    assert time.perf_counter() - start < 1.0


def test_memory_check_uses_what_the_os_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("bn_inspect.data.memory.available_memory_bytes", lambda: 2**30)
    check_fits_memory((2**27 - 1,), 4)  # just under half of 1 GiB
    with pytest.raises(InputError, match=r"needs 0\.5 GiB, more than half of the 1\.0 GiB of memory available"):
        check_fits_memory((2**27 + 1,), 4)
    with pytest.raises(InputError, match="Use a smaller batch"):
        parse_shape("1024,1024,256")


# --- read_input: .pt / .pth -------------------------------------------------------------------


def test_pt_tensor(tmp_path: Path) -> None:
    x = torch.randn(5, 3, 4)
    torch.save(x, tmp_path / "x.pt")
    data = read_input(tmp_path / "x.pt")
    assert data.num_samples == 5
    assert data.kwargs == {}
    assert len(data.args) == 1
    assert torch.equal(data.args[0], x)


def test_pth_tuple_becomes_positional_args(tmp_path: Path) -> None:
    a, b = torch.randn(6, 2), torch.randn(6, 3, 4)
    torch.save((a, b), tmp_path / "pair.pth")
    data = read_input(tmp_path / "pair.pth")
    assert data.num_samples == 6
    assert [tuple(t.shape) for t in data.args] == [(6, 2), (6, 3, 4)]


def test_pt_list_becomes_positional_args(tmp_path: Path) -> None:
    torch.save([torch.randn(3, 2)], tmp_path / "list.pt")
    assert len(read_input(tmp_path / "list.pt").args) == 1


def test_pt_dict_becomes_keyword_args(tmp_path: Path) -> None:
    torch.save({"image": torch.randn(4, 1, 8, 8), "extra": torch.randn(4, 2)}, tmp_path / "kw.pt")
    data = read_input(tmp_path / "kw.pt")
    assert data.args == ()
    assert sorted(data.kwargs) == ["extra", "image"]
    assert data.num_samples == 4


def test_pt_dict_with_key_picks_one_entry(tmp_path: Path) -> None:
    torch.save({"image": torch.randn(4, 1, 8, 8), "label": torch.arange(4)}, tmp_path / "kw.pt")
    data = read_input(tmp_path / "kw.pt", key="image")
    assert [tuple(t.shape) for t in data.args] == [(4, 1, 8, 8)]


def test_pt_dict_with_wrong_key(tmp_path: Path) -> None:
    torch.save({"image": torch.randn(4, 2)}, tmp_path / "kw.pt")
    with pytest.raises(InputError, match=r"has no entry 'pixels' \(it has image\)\. Pick one with --input-key"):
        read_input(tmp_path / "kw.pt", key="pixels")


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool, torch.complex64])
def test_pt_non_float_tensor_refused(tmp_path: Path, dtype: torch.dtype) -> None:
    torch.save(torch.zeros(4, 3, dtype=dtype), tmp_path / "x.pt")
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(
        InputError, match=rf"holds a tensor of dtype {name}; normalization layers need floating-point input\. Convert"
    ):
        read_input(tmp_path / "x.pt")


def test_pt_images_and_labels_take_the_images_and_say_so(tmp_path: Path) -> None:
    images = torch.randn(4, 3)
    torch.save((images, torch.arange(4)), tmp_path / "x.pt")
    data = read_input(tmp_path / "x.pt")
    assert len(data.args) == 1 and torch.equal(data.args[0], images)
    assert "the first is the input, the rest are taken for labels" in data.notes[0]


def test_pt_int_tensor_first_in_a_tuple_refused(tmp_path: Path) -> None:
    torch.save((torch.arange(4), torch.randn(4, 3)), tmp_path / "x.pt")
    with pytest.raises(InputError, match=r"holds a tensor of dtype int64.*--input-key"):
        read_input(tmp_path / "x.pt")


@pytest.mark.parametrize(
    ("obj", "kind"),
    [
        ({"a": 1}, "dict"),
        ([1.0, 2.0], "list"),
        ("text", "str"),
        (3.5, "float"),
        ([], "list"),
        ({}, "dict"),
    ],
)
def test_pt_non_tensor_refused(tmp_path: Path, obj: object, kind: str) -> None:
    torch.save(obj, tmp_path / "x.pt")
    with pytest.raises(InputError, match=rf"holds an object of type {kind}, not tensors\. Save a tensor"):
        read_input(tmp_path / "x.pt")


def test_pt_one_dim_tensor_refused(tmp_path: Path) -> None:
    torch.save(torch.randn(7), tmp_path / "x.pt")
    with pytest.raises(InputError, match=r"holds a 1-D tensor of shape \(7,\); the model needs \(N, C, \.\.\.\)"):
        read_input(tmp_path / "x.pt")


def test_pt_tensors_with_different_sample_counts(tmp_path: Path) -> None:
    torch.save((torch.randn(4, 2), torch.randn(5, 2)), tmp_path / "x.pt")
    with pytest.raises(InputError, match=r"differ in their first dim: \[4, 5\]"):
        read_input(tmp_path / "x.pt")


def test_pt_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    attack = ATTACKS["builtins.exec"](tmp_path)
    torch.save(attack.payload, tmp_path / "evil.pt")
    with pytest.raises(InputError, match="needs code to unpickle; bn-inspect reads only tensors"):
        read_input(tmp_path / "evil.pt")
    assert not attack.ran()


def test_pt_corrupt(tmp_path: Path) -> None:
    (tmp_path / "x.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(InputError, match=rf"cannot read input file {esc(tmp_path / 'x.pt')} \("):
        read_input(tmp_path / "x.pt")


# --- read_input: .npy / .npz ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_npy_float(tmp_path: Path, dtype: type) -> None:
    x = np.random.default_rng(0).random((5, 1, 8, 8)).astype(dtype)
    np.save(tmp_path / "x.npy", x)
    data = read_input(tmp_path / "x.npy")
    assert data.num_samples == 5
    np.testing.assert_array_equal(np.asarray(data.args[0]), x)


def test_shipped_npy() -> None:
    data = read_input(DIGITS / "test_images.npy")
    assert data.num_samples == 450
    assert tuple(data.args[0].shape) == (450, 1, 8, 8)


@pytest.mark.parametrize(
    ("array", "described"),
    [
        (np.ones((4, 1, 8, 8), dtype=np.int64), r"integers \(int64\)"),
        (np.ones((4, 3), dtype=np.uint8), r"integers \(uint8\)"),
        (np.ones((4, 3), dtype=bool), r"booleans \(bool\)"),
        (np.ones((4, 3), dtype=np.complex64), r"complex numbers \(complex64\)"),
        (np.array([["a", "b"]] * 4), r"strings \(<U1\)"),
        (np.array([[b"a", b"b"]] * 4), r"bytes \(\|S1\)"),
    ],
    ids=["int64", "uint8", "bool", "complex", "str", "bytes"],
)
def test_npy_non_float_refused(tmp_path: Path, array: np.ndarray, described: str) -> None:
    np.save(tmp_path / "x.npy", array)
    with pytest.raises(
        InputError, match=rf"{esc(tmp_path / 'x.npy')} holds {described}; normalization layers need floating-point"
    ):
        read_input(tmp_path / "x.npy")


def test_npy_object_array_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.array([[1.0, "b"]] * 4, dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match=r"holds Python objects, not numbers\. Save a numeric array"):
        read_input(tmp_path / "x.npy")


def test_npy_one_dim_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.ones(5, dtype=np.float32))
    with pytest.raises(InputError, match=r"holds a 1-D array of shape \(5,\)"):
        read_input(tmp_path / "x.npy")


def test_npy_no_samples(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.ones((0, 3), dtype=np.float32))
    with pytest.raises(InputError, match="holds no samples"):
        read_input(tmp_path / "x.npy")


def test_npy_corrupt(tmp_path: Path) -> None:
    (tmp_path / "x.npy").write_bytes(b"not numpy at all")
    with pytest.raises(InputError, match=r"x\.npy is not a \.npy file \(no NUMPY header\)\. Save the array"):
        read_input(tmp_path / "x.npy")


def test_npy_truncated(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.ones((50, 4), np.float32))
    data = (tmp_path / "x.npy").read_bytes()
    (tmp_path / "x.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cannot read .* as a \.npy array"):
        read_input(tmp_path / "x.npy")


def test_npz_single_array_is_chosen(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", images=np.ones((3, 2), dtype=np.float32))
    data = read_input(tmp_path / "x.npz")
    assert data.num_samples == 3


def test_npz_several_arrays_need_a_key(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", images=np.ones((3, 2), np.float32), labels=np.arange(3))
    with pytest.raises(
        InputError, match=r"holds 2 arrays \(images, labels\) and none was chosen\. Pick one with --input-key NAME"
    ):
        read_input(tmp_path / "x.npz")


def test_npz_with_key(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", images=np.ones((3, 2), np.float32), labels=np.arange(3))
    data = read_input(tmp_path / "x.npz", key="images")
    assert tuple(data.args[0].shape) == (3, 2)


def test_npz_key_with_wrong_dtype(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", images=np.ones((3, 2), np.float32), labels=np.arange(3))
    with pytest.raises(InputError, match=r"holds integers"):
        read_input(tmp_path / "x.npz", key="labels")


def test_npz_wrong_key(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", images=np.ones((3, 2), np.float32), labels=np.arange(3))
    with pytest.raises(InputError, match=r"has no array 'pixels' \(it has images, labels\)"):
        read_input(tmp_path / "x.npz", key="pixels")


def test_npz_object_array_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", stuff=np.array([[1, "a"]] * 2, dtype=object))
    with pytest.raises(InputError, match=r"array 'stuff' in .* holds Python objects"):
        read_input(tmp_path / "x.npz")


# --- read_input: tables -----------------------------------------------------------------------


def test_csv_with_label_dropped() -> None:
    data = read_input(SAMPLES / "cancer_mlp" / "test.csv", drop_columns=["label"])
    assert data.num_samples == 143
    assert tuple(data.args[0].shape) == (143, 30)
    assert data.args[0].dtype == np.float32


def test_csv_values_are_kept(tmp_path: Path) -> None:
    pd.DataFrame({"a": [1.5, 2.5], "b": [3, 4], "id": [10, 11]}).to_csv(tmp_path / "t.csv", index=False)
    data = read_input(tmp_path / "t.csv", drop_columns=["id"])
    np.testing.assert_array_equal(data.args[0], np.array([[1.5, 3.0], [2.5, 4.0]], dtype=np.float32))


def test_csv_non_numeric_column_is_named(tmp_path: Path) -> None:
    pd.DataFrame({"a": [1.0, 2.0], "name": ["x", "y"], "flag": [True, False]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(
        InputError, match=r"has non-numeric columns: name, flag\. Leave them out with --drop-column NAME"
    ):
        read_input(tmp_path / "t.csv")


def test_csv_empty(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("")
    with pytest.raises(InputError, match=rf"{esc(tmp_path / 't.csv')} is empty\. Give a table with a header row"):
        read_input(tmp_path / "t.csv")


def test_csv_header_only(tmp_path: Path) -> None:
    # Without rows pandas reads every column as text; the message must say there are no rows.
    (tmp_path / "t.csv").write_text("a,b,label\n")
    with pytest.raises(InputError, match=r"has a header but no rows"):
        read_input(tmp_path / "t.csv", drop_columns=["label"])


def test_csv_unknown_drop_column(tmp_path: Path) -> None:
    pd.DataFrame({"a": [1.0], "b": [2.0]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(InputError, match=r"--drop-column labels: no such column in .*\. Its columns: a, b"):
        read_input(tmp_path / "t.csv", drop_columns=["labels"])


def test_csv_every_column_dropped(tmp_path: Path) -> None:
    pd.DataFrame({"label": [1, 0]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(InputError, match="has no columns left after --drop-column"):
        read_input(tmp_path / "t.csv", drop_columns=["label"])


def test_parquet(tmp_path: Path) -> None:
    frame = pd.DataFrame({"x": np.arange(5, dtype=np.float64), "y": np.ones(5), "label": [0, 1, 0, 1, 0]})
    frame.to_parquet(tmp_path / "t.parquet")
    data = read_input(tmp_path / "t.parquet", drop_columns=["label"])
    assert data.num_samples == 5
    np.testing.assert_array_equal(data.args[0][:, 0], np.arange(5, dtype=np.float32))


def test_parquet_corrupt(tmp_path: Path) -> None:
    (tmp_path / "t.parquet").write_bytes(b"PAR1 nonsense")
    with pytest.raises(InputError, match=r"cannot read .* as a table"):
        read_input(tmp_path / "t.parquet")


# --- read_input: the file itself --------------------------------------------------------------


@pytest.mark.parametrize("name", ["x.txt", "x.json", "x.h5", "noext"])
def test_unknown_suffix(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_text("1,2,3")
    suffix = repr(Path(name).suffix) if Path(name).suffix else "'(none)'"
    with pytest.raises(
        InputError, match=rf"has suffix {re.escape(suffix)}, which bn-inspect cannot read\. Give one of \.pt, \.pth"
    ):
        read_input(tmp_path / name)


def test_missing_input_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=rf"input file {esc(tmp_path / 'gone.npy')} does not exist\. Check the path"):
        read_input(tmp_path / "gone.npy")


def test_input_directory(tmp_path: Path) -> None:
    folder = tmp_path / "images.npy"
    folder.mkdir()
    with pytest.raises(InputError, match="is a directory"):
        read_input(folder)


# --- InputData.batches ------------------------------------------------------------------------


def _sizes(data: InputData, batch_size: int, max_batches: int | None) -> list[int]:
    return [batch.num_samples for batch in data.batches(batch_size, max_batches)]


def test_batches_split_with_uneven_last_batch() -> None:
    x = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    data = InputData("<test>", (x,), {}, 10)
    batches = list(data.batches(4, None))
    assert [b.num_samples for b in batches] == [4, 4, 2]
    assert data.num_batches(4, None) == 3
    assert torch.equal(torch.cat([b.args[0] for b in batches]), torch.from_numpy(x))
    assert all(isinstance(b.args[0], torch.Tensor) for b in batches)


@pytest.mark.parametrize(
    ("batch_size", "max_batches", "sizes"),
    [(4, 2, [4, 4]), (4, 1, [4]), (4, 10, [4, 4, 2]), (10, None, [10]), (64, None, [10]), (3, None, [3, 3, 3, 1])],
)
def test_batches_respect_max_batches(batch_size: int, max_batches: int | None, sizes: list[int]) -> None:
    data = InputData("<test>", (np.zeros((10, 2), np.float32),), {}, 10)
    assert _sizes(data, batch_size, max_batches) == sizes
    assert data.num_batches(batch_size, max_batches) == len(sizes)


def test_batches_split_kwargs_and_args_together() -> None:
    a, b = torch.arange(5.0).reshape(5, 1), torch.arange(10.0).reshape(5, 2)
    data = InputData("<test>", (a,), {"extra": b}, 5)
    batches = list(data.batches(2, None))
    assert [tuple(x.args[0].flatten().tolist()) for x in batches] == [(0.0, 1.0), (2.0, 3.0), (4.0,)]
    assert [tuple(x.kwargs["extra"].shape) for x in batches] == [(2, 2), (2, 2), (1, 2)]


def test_batches_from_a_memory_mapped_file_are_writable(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.ones((5, 2), np.float32))
    data = read_input(tmp_path / "x.npy")
    batch = next(iter(data.batches(2, None)))
    batch.args[0].add_(1)  # read-only memory would refuse this


# --- guess_input_shapes -----------------------------------------------------------------------


def test_guess_conv2d_first() -> None:
    guess = guess_input_shapes(DigitsCNN(), batch_size=8)
    assert guess is not None
    assert guess.shapes == tuple((8, 1, side, side) for side in CANDIDATE_SIDES)
    assert guess.reason == "the first Conv or Linear layer, features.0, is Conv2d with in_channels=1"


@pytest.mark.parametrize(("model", "rank"), [(SignalCNN1d(), 1), (VolumeCNN3d(), 3)], ids=["conv1d", "conv3d"])
def test_guess_conv_rank(model: nn.Module, rank: int) -> None:
    guess = guess_input_shapes(model, batch_size=2)
    assert guess is not None
    assert all(len(shape) == 2 + rank and shape[:2] == (2, 1) for shape in guess.shapes)


def test_guess_linear_first() -> None:
    # CancerMLP opens with a BatchNorm1d, which says nothing; the Linear after it fixes the shape.
    guess = guess_input_shapes(CancerMLP(), batch_size=4)
    assert guess is not None
    assert guess.shapes == ((4, 30),)
    # net.0 (the BatchNorm1d) is the model's first layer: the reason must not call net.1 that.
    assert guess.reason == "the first Conv or Linear layer, net.1, is Linear with in_features=30"


def test_guess_torchscript() -> None:
    scripted = torch.jit.load(str(DIGITS / "torchscript.pt"))
    guess = guess_input_shapes(scripted, batch_size=8)
    assert guess is not None
    assert guess.shapes[0] == (8, 1, CANDIDATE_SIDES[0], CANDIDATE_SIDES[0])


class _EmbeddingFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 8)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.embed(tokens).mean(1)))


def test_guess_embedding_first_is_none() -> None:
    assert guess_input_shapes(_EmbeddingFirst(), batch_size=4) is None


def test_guess_no_conv_or_linear_is_none() -> None:
    assert guess_input_shapes(nn.Sequential(nn.BatchNorm1d(4), nn.ReLU()), batch_size=4) is None


def test_guess_lazy_linear_is_none() -> None:
    assert guess_input_shapes(nn.Sequential(nn.LazyLinear(4), nn.BatchNorm1d(4)), batch_size=4) is None


# --- random_batches ---------------------------------------------------------------------------


def test_random_batches_are_deterministic_for_a_seed() -> None:
    first = [b.args[0] for b in random_batches((3, 2, 4), 3, seed=7)]
    again = [b.args[0] for b in random_batches((3, 2, 4), 3, seed=7)]
    other = [b.args[0] for b in random_batches((3, 2, 4), 3, seed=8)]
    assert len(first) == 3
    assert all(tuple(x.shape) == (3, 2, 4) and x.dtype == torch.float32 for x in first)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(first[0], first[1])


def test_random_batches_ignore_the_global_seed() -> None:
    torch.manual_seed(1)
    first = next(random_batches((2, 3), 1, seed=0)).args[0]
    torch.manual_seed(2)
    again = next(random_batches((2, 3), 1, seed=0)).args[0]
    assert torch.equal(first, again)
