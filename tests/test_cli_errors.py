"""Every way `bn-inspect inspect` can be given bad input: exit code 2 and one line that says what and how to fix."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from string import Template

import numpy as np
import pandas as pd
import pytest
import torch

from bn_inspect.cli.main import run
from sample_models.architectures import DigitsCNN
from tests.helpers import REPO, SAMPLES, assert_one_error_line, invoke

DIGITS_ARCH = "sample_models.architectures:DigitsCNN"
CANCER_ARCH = "sample_models.architectures:CancerMLP"

ARCH_SOURCE = """
import torch
from torch import nn

NOT_CALLABLE = 3


def broken():
    raise RuntimeError("cannot build today")


def returns_dict():
    return {"layers": 3}


class RaisesAfterNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.bn(self.conv(x))
        raise RuntimeError("boom after the norm layer")


class NoNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x)


class ReturnsNone(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        self.bn(x)
        return None


class EmbeddingFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, tokens):
        return self.bn(self.embed(tokens).mean(1))
"""


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned > /dev/null",))


def _payload_offset(path: Path, entry_suffix: str) -> int:
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(entry_suffix))
    header = path.read_bytes()[info.header_offset : info.header_offset + 30]
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_length + extra_length


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Every bad file the table needs, written once; returns the placeholders of the table."""
    folder = tmp_path_factory.mktemp("cli_errors")
    digits = folder / "digits.pt"
    shutil.copy(SAMPLES / "digits_cnn" / "state_dict.pt", digits)
    real = digits.read_bytes()
    state_dict = torch.load(digits, weights_only=True)

    (folder / "empty.pt").write_bytes(b"")
    (folder / "random.pt").write_bytes(b"\x13\x37" + random.Random(0).randbytes(2048))
    (folder / "truncated.pt").write_bytes(real[: len(real) // 2])
    flipped = bytearray(real)
    flipped[_payload_offset(digits, "/data/0") + 5] ^= 0xFF
    (folder / "flipped.pt").write_bytes(bytes(flipped))
    (folder / "notes.pt").write_text("these are my notes, not a model\n")
    (folder / "config.pt").write_text(json.dumps({"state_dict": {"w": [1, 2]}}))
    with zipfile.ZipFile(folder / "foreign.zip", "w") as archive:
        archive.writestr("readme.txt", "hello")
    with zipfile.ZipFile(folder / "junkpkl.pt", "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02junk that is no pickle")
        archive.writestr("archive/version", "3\n")
    torch.save(_Evil(), folder / "evil.pt")
    model = DigitsCNN().eval()
    torch.export.save(torch.export.export(model.train(), (torch.randn(2, 1, 8, 8),)), str(folder / "model.pt2"))

    missing = dict(state_dict)
    del missing["classifier.bias"]
    torch.save(missing, folder / "missing_key.pt")
    torch.save({**state_dict, "head.weight": torch.zeros(2)}, folder / "extra_key.pt")

    (folder / "arch.py").write_text(ARCH_SOURCE)
    (folder / "bad_arch.py").write_text("import no_such_module_for_bn_inspect\n")

    np.save(folder / "int.npy", np.ones((4, 1, 8, 8), dtype=np.int64))
    np.save(folder / "complex.npy", np.ones((4, 1, 8, 8), dtype=np.complex64))
    np.save(folder / "strings.npy", np.array([["a", "b"]] * 4))
    np.save(folder / "objects.npy", np.array([[1.0, "b"]] * 4, dtype=object), allow_pickle=True)
    np.save(folder / "flat.npy", np.ones(8, dtype=np.float32))
    np.savez(folder / "multi.npz", images=np.ones((4, 1, 8, 8), np.float32), labels=np.arange(4))
    (folder / "empty.csv").write_text("")
    (folder / "header.csv").write_text("a,b,label\n")
    pd.DataFrame({"size": [1.0, 2.0], "name": ["x", "y"]}).to_csv(folder / "text.csv", index=False)
    (folder / "data.txt").write_text("1 2 3\n")
    nan_images = np.random.default_rng(0).random((4, 1, 8, 8)).astype(np.float32)
    nan_images[0, 0, 0, 0] = np.nan
    np.save(folder / "nan.npy", nan_images)
    return {
        "dir": str(folder),
        "digits": str(digits),
        "cancer": str(SAMPLES / "cancer_mlp" / "state_dict.pt"),
        "pickle": str(SAMPLES / "digits_cnn" / "pickle.pt"),
        "A": DIGITS_ARCH,
        "CA": CANCER_ARCH,
    }


@dataclass(frozen=True)
class Case:
    argv: str  # a Template, split on spaces; $dir, $digits... are filled in from ``files``
    start: str  # the exact start of the one stderr line, also a Template
    contains: tuple[str, ...] = ()


def _argv(case: Case, files: dict[str, str]) -> list[str]:
    # Split before substituting, so that paths and JSON given as one word stay one argument.
    return [Template(word).substitute(files).replace("\x00", " ") for word in case.argv.split(" ")]


S = "--shape 2,1,8,8"
ON_DIGITS = "$digits --arch $A"

CASES = {
    # the model file
    "missing-file": Case(f"$dir/missing.pt {S}", "Error: model file $dir/missing.pt does not exist. Check the path"),
    "directory": Case(
        f"$dir {S}",
        "Error: model file $dir is a directory without a config.json. Give the path of a saved model file, "
        "or a folder written by save_pretrained (config.json and model.safetensors)",
    ),
    "empty-file": Case(f"$dir/empty.pt {S}", "Error: model file $dir/empty.pt is empty. Re-save or re-download it"),
    "random-bytes": Case(
        f"$dir/random.pt {S}",
        "Error: $dir/random.pt is not a PyTorch or ONNX model file (no zip archive, pickle, safetensors or ONNX header)",
    ),
    "truncated-zip": Case(
        f"$dir/truncated.pt --arch $A {S}", "Error: model file $dir/truncated.pt is a damaged or truncated zip archive"
    ),
    "flipped-byte": Case(
        f"$dir/flipped.pt --arch $A {S}",
        "Error: model file $dir/flipped.pt is corrupt: entry state_dict/data/0 fails its CRC check",
    ),
    "text-file": Case(f"$dir/notes.pt {S}", "Error: $dir/notes.pt is not a PyTorch or ONNX model file"),
    "json-file": Case(f"$dir/config.pt {S}", "Error: $dir/config.pt is not a PyTorch or ONNX model file"),
    "foreign-zip": Case(
        f"$dir/foreign.zip {S}",
        "Error: $dir/foreign.zip is a zip archive but not a PyTorch checkpoint (no data.pkl, code/ or archive_format)",
    ),
    "zip-with-junk-pickle": Case(
        f"$dir/junkpkl.pt --arch $A {S}", "Error: model file $dir/junkpkl.pt is corrupt or not a PyTorch checkpoint ("
    ),
    "untrusted-pickle": Case(
        f"$pickle {S}",
        "Error: $pickle is a pickle that imports sample_models.architectures.DigitsCNN, "
        "torch.nn.modules.activation.ReLU",
        ("If you trust the file, pass --trust-pickle",),
    ),
    "malicious-pickle": Case(
        f"$dir/evil.pt {S}", f"Error: $dir/evil.pt is a pickle that imports {os.system.__module__}.system when loaded"
    ),
    "torch-export-mode-mismatch": Case(
        f"$dir/model.pt2 {S}",
        "Error: this torch.export archive was exported in train mode, which is fixed in its graph, so it cannot "
        "run in --mode eval. Use --mode train",
    ),
    "weights-without-arch": Case(
        f"$digits {S}",
        "Error: $digits holds only weights (state_dict), not the model's code. Pass --arch package.module:callable",
    ),
    "no-model": Case(S, "Error: no model given. Give a MODEL file, or --arch to inspect a fresh architecture"),
    # --arch and --arch-kwargs
    "arch-no-colon": Case(
        f"$digits --arch sample_models.architectures.DigitsCNN {S}",
        "Error: --arch 'sample_models.architectures.DigitsCNN' has no ':' between module and callable. "
        "Write --arch package.module:callable",
    ),
    "arch-missing-module": Case(
        f"$digits --arch no_such_pkg_bn.models:Net {S}",
        "Error: --arch 'no_such_pkg_bn.models:Net': module 'no_such_pkg_bn' cannot be imported. Install it",
    ),
    "arch-missing-file": Case(
        f"$digits --arch $dir/nowhere.py:Net {S}",
        "Error: --arch '$dir/nowhere.py:Net': file $dir/nowhere.py does not exist. Check the path",
    ),
    "arch-missing-attribute": Case(
        f"$digits --arch sample_models.architectures:DigitsCnn {S}",
        "Error: --arch 'sample_models.architectures:DigitsCnn': sample_models.architectures has no attribute "
        "'DigitsCnn'. Callables there: CancerMLP, DigitsCNN",
    ),
    "arch-not-callable": Case(
        f"--arch $dir/arch.py:NOT_CALLABLE {S}",
        "Error: --arch '$dir/arch.py:NOT_CALLABLE' names an object of type int, not a callable. Name a class or function",
    ),
    "arch-raises": Case(
        f"--arch $dir/arch.py:broken {S}",
        "Error: --arch '$dir/arch.py:broken' raised RuntimeError when called: cannot build today. "
        "Check --arch-kwargs against its signature",
    ),
    "arch-returns-non-module": Case(
        f"--arch $dir/arch.py:returns_dict {S}",
        "Error: --arch '$dir/arch.py:returns_dict' returned an object of type dict, not a torch.nn.Module",
    ),
    "arch-file-import-fails": Case(
        f"--arch $dir/bad_arch.py:Net {S}",
        "Error: --arch '$dir/bad_arch.py:Net': importing $dir/bad_arch.py raised ModuleNotFoundError",
    ),
    "arch-kwargs-bad-json": Case(
        f"{ON_DIGITS} {S} --arch-kwargs {{bad",
        "Error: --arch-kwargs is not valid JSON (Expecting property name enclosed in double quotes at character 1). "
        "Give a JSON object",
    ),
    "arch-kwargs-not-object": Case(
        f"{ON_DIGITS} {S} --arch-kwargs [10]", "Error: --arch-kwargs must be a JSON object, not list"
    ),
    "arch-kwargs-unknown-name": Case(
        f'{ON_DIGITS} {S} --arch-kwargs {{"bogus":\x005}}',
        "Error: --arch 'sample_models.architectures:DigitsCNN' raised TypeError when called: "
        "DigitsCNN.__init__() got an unexpected keyword argument 'bogus'",
    ),
    # the state_dict against the architecture
    "state-dict-missing-key": Case(
        f"$dir/missing_key.pt --arch $A {S}",
        "Error: the state_dict does not fit --arch sample_models.architectures:DigitsCNN: "
        "missing keys: classifier.bias. Check --arch and --arch-kwargs",
    ),
    "state-dict-unexpected-key": Case(
        f"$dir/extra_key.pt --arch $A {S}",
        "Error: the state_dict does not fit --arch sample_models.architectures:DigitsCNN: "
        "unexpected keys: head.weight. Check",
    ),
    "state-dict-wrong-shape": Case(
        f'{ON_DIGITS} {S} --arch-kwargs {{"num_classes":\x005}}',
        "Error: the state_dict does not fit --arch sample_models.architectures:DigitsCNN: wrong shapes "
        "(file vs model): classifier.weight (10, 128) vs (5, 128), classifier.bias (10,) vs (5,)",
    ),
    # --shape
    "shape-malformed": Case(
        f"{ON_DIGITS} --shape 2,one,8,8",
        "Error: --shape '2,one,8,8' is not a comma-separated list of integers. Write e.g. --shape 16,3,32,32",
    ),
    "shape-zero": Case(
        f"{ON_DIGITS} --shape 0,1,8,8",
        "Error: --shape '0,1,8,8' has a size that is not positive. Every size must be at least 1",
    ),
    "shape-negative": Case(
        f"{ON_DIGITS} --shape 2,-1,8,8", "Error: --shape '2,-1,8,8' has a size that is not positive"
    ),
    "shape-one-dim": Case(f"{ON_DIGITS} --shape 4", "Error: --shape '4' has 1 dim; the model needs at least (N, C)"),
    "shape-too-large": Case(
        f"{ON_DIGITS} --shape 100000,100000,1000",
        "Error: one batch of shape (100000, 100000, 1000) needs 37,252.9 GiB, more than half of the ",
        ("Use a smaller batch",),
    ),
    "shape-and-input": Case(
        f"{ON_DIGITS} {S} --input $dir/nan.npy", "Error: --shape and --input were both given. Use one of them"
    ),
    "batch-size-with-shape": Case(
        f"{ON_DIGITS} {S} --batch-size 4",
        "Error: --batch-size does not apply to --shape. Set the batch size as the first dim of --shape",
    ),
    "batch-size-zero": Case(
        f"{ON_DIGITS} --input $dir/nan.npy --batch-size 0", "Error: Invalid value for '--batch-size'"
    ),
    # input that does not fit the model
    "channel-mismatch": Case(
        f"{ON_DIGITS} --shape 4,3,8,8",
        "Error: the data has shape (4, 3, 8, 8), but the first Conv or Linear layer, features.0, is Conv2d with in_channels=1, "
        "so the model takes (N, 1, *, *). Give one-channel data: --grayscale for an image folder, x.mean(1, keepdim=True) "
        "for tensors, or --shape N,1,...",
    ),
    "rank-mismatch": Case(
        f"{ON_DIGITS} --shape 4,30",
        "Error: the data has shape (4, 30), but the first Conv or Linear layer, features.0, is Conv2d with in_channels=1, "
        "so the model takes (N, 1, *, *). Give data of shape (N, 1, *, *) (--shape, --input)",
    ),
    "forward-raises-after-norm": Case(
        f"--arch $dir/arch.py:RaisesAfterNorm {S}",
        "Error: the model's forward raised RuntimeError after layer bn ran: boom after the norm layer",
    ),
    "no-norm-layers": Case(
        "--arch $dir/arch.py:NoNorm --shape 2,4",
        "Error: the model has no normalization layer (BatchNorm, InstanceNorm, GroupNorm, LayerNorm, RMSNorm",
    ),
    "train-one-value-per-channel": Case(
        "$cancer --arch $CA --mode train --shape 1,30",
        "Error: layer net.0 got 1 value per channel in train mode",
        ("a batch variance needs at least 2 values per channel", "--mode eval"),
    ),
    "shape-cannot-be-guessed": Case(
        "--arch $dir/arch.py:EmbeddingFirst",
        "Error: cannot tell which input shape the model takes. Pass --shape N,C,... or --input FILE",
    ),
    # --input files
    "input-missing": Case(
        f"{ON_DIGITS} --input $dir/nope.npy", "Error: input file $dir/nope.npy does not exist. Check the path"
    ),
    "input-unknown-suffix": Case(
        f"{ON_DIGITS} --input $dir/data.txt",
        "Error: input file $dir/data.txt has suffix '.txt', which bn-inspect cannot read. Give one of .pt, .pth",
    ),
    "input-int-npy": Case(
        f"{ON_DIGITS} --input $dir/int.npy",
        "Error: $dir/int.npy holds integers (int64); normalization layers need floating-point input. "
        "Convert it to float32 first",
    ),
    "input-complex-npy": Case(
        f"{ON_DIGITS} --input $dir/complex.npy",
        "Error: $dir/complex.npy holds complex numbers (complex64); normalization layers need floating-point input",
    ),
    "input-string-npy": Case(
        f"{ON_DIGITS} --input $dir/strings.npy",
        "Error: $dir/strings.npy holds strings (<U1); normalization layers need floating-point input",
    ),
    "input-object-npy": Case(
        f"{ON_DIGITS} --input $dir/objects.npy",
        "Error: $dir/objects.npy holds Python objects, not numbers. Save a numeric array",
    ),
    "input-one-dim-npy": Case(
        f"{ON_DIGITS} --input $dir/flat.npy",
        "Error: $dir/flat.npy holds a 1-D array of shape (8,); the model needs (N, C, ...)",
    ),
    "input-npz-several-arrays": Case(
        f"{ON_DIGITS} --input $dir/multi.npz",
        "Error: $dir/multi.npz holds 2 arrays (images, labels) and none was chosen. Pick one with --input-key NAME",
    ),
    "input-npz-wrong-key": Case(
        f"{ON_DIGITS} --input $dir/multi.npz --input-key pixels",
        "Error: $dir/multi.npz has no array 'pixels' (it has images, labels). Pick one with --input-key NAME",
    ),
    "input-empty-csv": Case(
        "$cancer --arch $CA --input $dir/empty.csv",
        "Error: $dir/empty.csv is empty. Give a table with a header row and at least one row",
    ),
    "input-header-only-csv": Case(
        "$cancer --arch $CA --input $dir/header.csv --drop-column label",
        "Error: $dir/header.csv has a header but no rows",
    ),
    "input-csv-non-numeric": Case(
        "$cancer --arch $CA --input $dir/text.csv",
        "Error: $dir/text.csv has non-numeric columns: name. Leave them out with --drop-column NAME (repeatable)",
    ),
    "input-csv-unknown-drop-column": Case(
        "$cancer --arch $CA --input $dir/text.csv --drop-column labels",
        "Error: --drop-column labels: no such column in $dir/text.csv. Its columns: size, name",
    ),
    "input-csv-label-left-in": Case(
        f"$cancer --arch $CA --input {SAMPLES / 'cancer_mlp' / 'test.csv'}",
        "Error: layer net.0 (BatchNorm1d) expects 30 channels in dim 1 but received 31 in an input of shape (64, 31)",
    ),
    # options
    "format-unknown": Case(f"{ON_DIGITS} {S} --format xml", "Error: Invalid value for '--format'", ("'xml'",)),
    "mode-unknown": Case(f"{ON_DIGITS} {S} --mode bogus", "Error: Invalid value for '--mode'", ("'bogus'",)),
    "device-unknown": Case(f"{ON_DIGITS} {S} --device tpu", "Error: Invalid value for '--device'"),
    "option-unknown": Case(f"{ON_DIGITS} {S} --bogus", "Error: No such option: --bogus"),
    "option-without-value": Case(f"{ON_DIGITS} --shape", "Error: Option '--shape' requires an argument"),
    "output-in-missing-folder": Case(
        f"{ON_DIGITS} {S} --output $dir/no/such/report.json",
        "Error: --output $dir/no/such/report.json: folder $dir/no/such does not exist. Create it or choose another",
    ),
    "output-is-the-model": Case(
        f"{ON_DIGITS} {S} --output $digits",
        "Error: --output $digits is the model file $digits, which this run reads. Choose another path for the output",
    ),
    "output-is-the-input": Case(
        f"{ON_DIGITS} --input $dir/nan.npy --output $dir/nan.npy",
        "Error: --output $dir/nan.npy is the --input file $dir/nan.npy, which this run reads",
    ),
    "output-is-a-directory": Case(
        f"{ON_DIGITS} {S} --output $dir", "Error: --output $dir is a directory. Give a file path"
    ),
}

CUDA_CASE = Case(
    f"{ON_DIGITS} {S} --device cuda",
    "Error: --device cuda was asked for, but this torch build sees no CUDA device. Use --device cpu or auto",
)

PARAMS = [pytest.param(case, id=name) for name, case in CASES.items()] + [
    pytest.param(
        CUDA_CASE,
        id="device-cuda-without-cuda",
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here"),
    )
]


def test_the_table_is_large_enough() -> None:
    assert len(PARAMS) >= 40


@pytest.mark.parametrize("case", PARAMS)
def test_bad_input_is_one_line_and_exit_2(
    case: Case, files: dict[str, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)  # sample_models must be importable the way a user runs it, from the repo root
    code = run(["inspect", *_argv(case, files)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith(Template(case.start).substitute(files)), captured.err
    for part in case.contains:
        assert part in captured.err
    assert "weights_only" not in captured.err
    assert code == 2


def test_output_file_is_not_written_on_error(files: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    target = Path(files["dir"]) / "never.json"
    code = run(["inspect", files["digits"], "--arch", DIGITS_ARCH, "--shape", "4,3,8,8", "--output", str(target)])
    assert code == 2
    assert not target.exists()
    assert not list(Path(files["dir"]).glob(".never.json.*"))
    capsys.readouterr()


def test_model_returning_none_runs(files: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    code = run(["inspect", "--arch", f"{files['dir']}/arch.py:ReturnsNone", "--shape", "3,4", "--format", "json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert [layer["name"] for layer in report["layers"]] == ["bn"]


def test_nan_input_runs_and_warns(files: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    code = run(
        ["inspect", files["digits"], "--arch", DIGITS_ARCH, "--input", f"{files['dir']}/nan.npy", "--format", "json"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    warning = " ".join(captured.err.split())
    assert warning.startswith("warning: 1 input values are NaN or infinite")
    assert "Traceback" not in captured.err
    json.loads(captured.out)


def test_nan_warning_is_one_line(
    files: dict[str, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    result = invoke(
        capsys,
        ["inspect", files["digits"], "--arch", DIGITS_ARCH, "--input", f"{files['dir']}/nan.npy", "--format", "json"],
    )
    assert result.code == 0
    # Longer than the 80 columns, and still not folded over two lines.
    assert result.err == (
        "warning: 1 input values are NaN or infinite; the statistics of the layers they reach are NaN\n"
    )


def test_debug_shows_the_traceback(files: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    code = run(["inspect", f"{files['dir']}/missing.pt", "--shape", "2,1,8,8", "--debug"])
    captured = capsys.readouterr()
    assert code == 2
    assert "Traceback (most recent call last)" in captured.err
    assert "ModelFileError" in captured.err
    assert captured.err.splitlines()[-1].startswith(f"Error: model file {files['dir']}/missing.pt does not exist")


def test_debug_shows_the_traceback_of_a_forward_error(
    files: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    code = run(["inspect", "--arch", f"{files['dir']}/arch.py:RaisesAfterNorm", "--shape", "2,1,8,8", "--debug"])
    captured = capsys.readouterr()
    assert code == 2
    assert "boom after the norm layer" in captured.err
    assert "Traceback (most recent call last)" in captured.err


def test_trusted_pickle_runs(files: dict[str, str], capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    code = run(["inspect", files["pickle"], "--trust-pickle", "--shape", "2,1,8,8", "--format", "json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["model"]["format"] == "pickle"


def test_pickle_is_not_loaded_before_the_input_is_checked(files: dict[str, str], capsys) -> None:
    # Cheap argument checks come first: a bad --shape is reported even for an untrusted model.
    code = run(["inspect", f"{files['dir']}/evil.pt", "--shape", "0,1"])
    assert code == 2
    assert capsys.readouterr().err.startswith("Error: --shape '0,1' has a size that is not positive")


def test_legacy_pickle_of_a_model_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "old.pt"
    path.write_bytes(pickle.dumps(DigitsCNN(), protocol=2))
    code = run(["inspect", str(path), "--shape", "2,1,8,8"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith(f"Error: {path} is a pickle that imports sample_models.architectures.DigitsCNN")
    assert captured.err.count("\n") == 1


# --- the command line itself --------------------------------------------------------------------


def test_bare_bn_inspect_prints_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    result = invoke(capsys, [])
    assert result.code == 0 and result.err == ""
    assert result.out.startswith("Usage: bn-inspect") and "\nCommands:\n" in result.out


def test_version_names_bn_inspect_and_torch(capsys: pytest.CaptureFixture[str]) -> None:
    import bn_inspect

    result = invoke(capsys, ["--version"])
    assert result.code == 0 and result.err == ""
    assert result.out.splitlines() == [f"bn-inspect {bn_inspect.__version__}", f"torch {torch.__version__}"]


def test_a_misspelt_command_ends_each_sentence_once(capsys: pytest.CaptureFixture[str]) -> None:
    result = invoke(capsys, ["inspec"])
    assert result.code == 2
    assert result.err == "Error: No such command 'inspec'. Did you mean 'inspect'? See bn-inspect --help.\n"


@pytest.mark.parametrize(
    ("data", "named"),
    [(["--input", "test_images.npy"], "--input"), (["--shape", "2,1,8,8", "--batches", "2"], "--shape, --batches")],
)
def test_check_no_data_refuses_data_options_it_would_ignore(
    capsys: pytest.CaptureFixture[str], data: list[str], named: str
) -> None:
    digits = SAMPLES / "digits_cnn"
    argv = [
        "check",
        digits / "torchscript.pt",
        "--no-data",
        *(str(digits / a) if a.endswith(".npy") else a for a in data),
    ]
    result = invoke(capsys, argv)
    assert result.code == 2 and result.out == ""
    assert_one_error_line(result, f"--no-data runs no data, so {named} would be ignored", "Drop --no-data")


def test_arch_path_without_py_suggests_the_python_file(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    argv = ["layers", "sample_models/digits_cnn/state_dict.pt", "--arch", "sample_models/architectures:DigitsCNN"]
    result = invoke(capsys, argv)
    assert result.code == 2
    assert_one_error_line(result, "Did you mean --arch sample_models/architectures.py:DigitsCNN?")
