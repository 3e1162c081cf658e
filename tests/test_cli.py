"""The CLI as users run it: successful runs, every output format, help, and the files it writes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import DIGITS, SAMPLES, assert_one_error_line, invoke

ARCH = "sample_models.architectures:DigitsCNN"


def test_inspect_torchscript_sample_prints_table_and_explanations(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    result = invoke(capsys, ["inspect", DIGITS / "torchscript.pt", "--input", DIGITS / "test_images.npy"])
    assert result.code == 0, result.err
    assert "features.1" in result.out and "BatchNorm2d" in result.out
    words = " ".join(result.out.split())
    assert "16 means and 16 variances, each over N×H×W = 64×8×8 = 4,096 values" in words
    # 450 samples: 8 × 4,096 would be 32,768, so the short last batch is named.
    assert "Over 8 batches (7 of 64 samples and 1 of 2): 28,800 values per channel in all." in words
    assert result.err == ""


@pytest.mark.parametrize("model_file", ["state_dict.pt", "torchscript.pt"])
def test_json_output_is_the_documented_report(capsys: pytest.CaptureFixture[str], model_file: str) -> None:
    arch = ["--arch", ARCH] if model_file == "state_dict.pt" else []
    result = invoke(
        capsys,
        [
            "inspect",
            DIGITS / model_file,
            *arch,
            "--input",
            DIGITS / "test_images.npy",
            "--batch-size",
            "100",
            "--batches",
            "3",
            "--format",
            "json",
        ],
    )
    assert result.code == 0
    document = json.loads(result.out)
    assert document["schema_version"] == 1
    assert document["model"]["format"] == ("state_dict" if arch else "torchscript")
    assert document["input"] == {
        "source": str(DIGITS / "test_images.npy"),
        "shape": [100, 1, 8, 8],
        "dtype": "float32",
        "num_batches": 3,
        "num_samples": 300,
        "num_nonfinite_values": 0,
        "first_batch_sha256": document["input"]["first_batch_sha256"],
        "preprocessing": None,
        "num_skipped_files": 0,
        "skipped_files": [],
    }
    assert [layer["name"] for layer in document["layers"]] == ["features.1", "features.4", "features.8"]
    assert document["layers"][0]["values_per_channel"] == 300 * 64


def test_json_of_state_dict_and_torchscript_agree(capsys: pytest.CaptureFixture[str]) -> None:
    documents = []
    for model_file, arch in (
        ("state_dict.pt", ["--arch", ARCH]),
        ("torchscript.pt", []),
        ("pickle.pt", ["--trust-pickle"]),
    ):
        result = invoke(
            capsys, ["inspect", DIGITS / model_file, *arch, "--input", DIGITS / "test_images.npy", "--format", "json"]
        )
        assert result.code == 0
        documents.append(json.loads(result.out))
    for other in documents[1:]:
        for a, b in zip(documents[0]["layers"], other["layers"], strict=True):
            assert a["batch_mean"] == pytest.approx(b["batch_mean"], rel=1e-6, abs=1e-9)
            assert a["running_var"] == b["running_var"]


def test_csv_table_with_dropped_label_column(capsys: pytest.CaptureFixture[str]) -> None:
    result = invoke(
        capsys,
        [
            "inspect",
            SAMPLES / "cancer_mlp" / "state_dict.pt",
            "--arch",
            "sample_models.architectures:CancerMLP",
            "--input",
            SAMPLES / "cancer_mlp" / "test.csv",
            "--drop-column",
            "label",
            "--format",
            "csv",
        ],
    )
    assert result.code == 0, result.err
    frame = pd.read_csv(StringIO(result.out))
    assert len(frame) == 30 + 32 + 16
    first = frame[(frame["layer"] == "net.0") & (frame["channel"] == 3)].iloc[0]
    table = pd.read_csv(SAMPLES / "cancer_mlp" / "test.csv")
    assert first["batch_mean"] == pytest.approx(table["mean_area"].astype("float32").astype("float64").mean(), rel=1e-7)
    assert first["batch_var"] == pytest.approx(
        table["mean_area"].astype("float32").astype("float64").var(ddof=0), rel=1e-5
    )


def test_markdown_and_layer_glob(capsys: pytest.CaptureFixture[str]) -> None:
    result = invoke(
        capsys,
        [
            "inspect",
            DIGITS / "torchscript.pt",
            "--input",
            DIGITS / "test_images.npy",
            "--format",
            "markdown",
            "--layer",
            "features.[48]",
        ],
    )
    assert result.code == 0
    assert result.out.startswith("## bn-inspect")
    assert "### `features.4` per channel" in result.out and "### `features.8` per channel" in result.out
    assert "### `features.1` per channel" not in result.out


def test_table_layer_glob_adds_per_channel_table(capsys: pytest.CaptureFixture[str]) -> None:
    result = invoke(capsys, ["inspect", DIGITS / "torchscript.pt", "--shape", "4,1,8,8", "--layer", "*.8"])
    assert result.code == 0
    assert "features.8 (BatchNorm2d), per channel" in result.out
    assert "features.1 (BatchNorm2d), per channel" not in result.out


def test_output_file_is_written_atomically(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    target.write_text("old")
    result = invoke(
        capsys,
        ["inspect", DIGITS / "torchscript.pt", "--shape", "4,1,8,8", "--format", "json", "--output", target, "--force"],
    )
    assert result.code == 0 and result.out == ""
    assert json.loads(target.read_text())["schema_version"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
    table = tmp_path / "report.txt"
    assert invoke(capsys, ["inspect", DIGITS / "torchscript.pt", "--shape", "4,1,8,8", "--output", table]).code == 0
    assert "features.1" in table.read_text()


def test_shape_is_inferred_from_the_first_layer(capsys: pytest.CaptureFixture[str]) -> None:
    result = invoke(capsys, ["inspect", SAMPLES / "cancer_mlp" / "torchscript.pt", "--format", "json"])
    assert result.code == 0
    assert json.loads(result.out)["input"]["shape"] == [8, 30]
    assert "using random normal input of shape (8, 30)" in result.err and "in_features=30" in result.err


def test_fresh_architecture_without_a_file(capsys: pytest.CaptureFixture[str]) -> None:
    result = invoke(
        capsys,
        ["inspect", "--arch", "sample_models/architectures.py:SignalCNN1d", "--shape", "4,1,64", "--format", "json"],
    )
    assert result.code == 0
    document = json.loads(result.out)
    assert document["model"] == {
        "source": "<arch>",
        "format": "arch",
        "arch": "sample_models/architectures.py:SignalCNN1d",
        "sha256": None,
    }
    assert all("untrained" in layer["flags"] for layer in document["layers"])


def test_train_mode_and_seed(capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "inspect",
        SAMPLES / "volume_cnn3d" / "torchscript.pt",
        "--shape",
        "4,1,8,8,8",
        "--mode",
        "train",
        "--format",
        "json",
    ]
    first = json.loads(invoke(capsys, [*args, "--seed", "3"]).out)
    again = json.loads(invoke(capsys, [*args, "--seed", "3"]).out)
    other = json.loads(invoke(capsys, [*args, "--seed", "4"]).out)
    assert first["mode"] == "train"
    assert all(layer["normalizes_with"] == "batch" for layer in first["layers"])
    assert first["layers"] == again["layers"]
    assert first["layers"][0]["batch_mean"] != other["layers"][0]["batch_mean"]


def test_help_lists_every_option_and_examples(capsys: pytest.CaptureFixture[str]) -> None:
    result = invoke(capsys, ["inspect", "--help"])
    assert result.code == 0
    # The names in the first column of the Options section, whole: "--arch" is not "--arch-kwargs",
    # and an option named only in an example or a description does not count.
    options = result.out.partition("\nOptions:\n")[2]
    listed = re.findall(r"^  (?:-\w, )?(--[a-z][a-z-]*)", options, flags=re.MULTILINE)
    for option in (
        "--arch",
        "--arch-kwargs",
        "--trust-pickle",
        "--shape",
        "--input",
        "--input-key",
        "--drop-column",
        "--batch-size",
        "--batches",
        "--seed",
        "--mode",
        "--device",
        "--layer",
        "--format",
        "--output",
        "--debug",
    ):
        assert option in listed, (option, listed)
    assert "Examples:" in result.out


def test_help_does_not_import_torch_or_pandas() -> None:
    code = "import sys; from bn_inspect.cli.main import run; run(['--help']); print(sorted(m for m in ('torch', 'pandas') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().endswith("[]")


_COLLECTOR_PROBE = """
import gc, sys
from bn_inspect.cli import main as cli
from bn_inspect.analyses.inspection import Batch

moved = Batch.to

def probed(batch, *args):
    # Every command moves each batch to the model through Batch.to, just before its forward.
    print("PROBE", gc.isenabled(), gc.get_freeze_count() > 0, file=sys.stderr)
    return moved(batch, *args)

Batch.to = probed
entry, argv = sys.argv[1], sys.argv[2:]
sys.argv[1:] = argv
sys.exit(cli.main() if entry == "main" else cli.run(argv))
"""


def _probe_lines(entry: str, command: list[str], cwd: Path) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", _COLLECTOR_PROBE, entry, *command], capture_output=True, text=True, cwd=cwd
    )
    assert result.returncode in (0, 1), result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("PROBE ")]


@pytest.mark.parametrize(
    "command",
    [
        ["inspect", "MODEL", "--input", "IMAGES", "--batches", "2", "--format", "json", "--quiet"],
        ["inspect", "MODEL", "--batches", "2", "--format", "json", "--quiet"],
        ["check", "MODEL", "--input", "IMAGES", "--batches", "2", "--format", "json", "--quiet"],
        ["compare-modes", "MODEL", "--input", "IMAGES", "--batches", "2", "--format", "json", "--quiet"],
        ["recalibrate", "MODEL", "--input", "IMAGES", "--batches", "2", "--output", "new.pt", "--format", "json"],
    ],
    ids=["inspect", "inspect-guessed-shape", "check", "compare-modes", "recalibrate"],
)
def test_main_turns_the_collector_back_on_before_the_batches(command: list[str], tmp_path: Path) -> None:
    paths = {"MODEL": str(DIGITS / "torchscript.pt"), "IMAGES": str(DIGITS / "test_images.npy")}
    lines = _probe_lines("main", [paths.get(word, word) for word in command], tmp_path)
    # Startup ran with the collector paused and froze what it built; the batches run with it on.
    assert lines and set(lines) == {"PROBE True True"}


def test_run_leaves_the_collector_alone(tmp_path: Path) -> None:
    command = ["inspect", str(DIGITS / "torchscript.pt"), "--input", str(DIGITS / "test_images.npy")]
    lines = _probe_lines("run", [*command, "--batches", "2", "--format", "json", "--quiet"], tmp_path)
    assert lines and set(lines) == {"PROBE True False"}


def test_json_output_does_not_import_rich() -> None:
    code = (
        "import sys, io, json, contextlib; from bn_inspect.cli.main import run\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        f"    code = run(['inspect', {str(DIGITS / 'torchscript.pt')!r}, '--shape', '2,1,8,8', '--format', 'json', '--quiet'])\n"
        "print(code, len(json.loads(out.getvalue())['layers']) > 0, 'rich' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "0 True False"


def test_python_dash_m_and_console_script_agree() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bn_inspect",
            "inspect",
            str(DIGITS / "torchscript.pt"),
            "--shape",
            "2,1,8,8",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["layers"][0]["name"] == "features.1"


@pytest.mark.parametrize("output_format", ["table", "json", "csv"])
def test_layer_glob_that_matches_nothing_names_the_closest_layers(
    capsys: pytest.CaptureFixture[str], output_format: str
) -> None:
    argv = ["inspect", DIGITS / "torchscript.pt", "--input", DIGITS / "test_images.npy", "--format", output_format]
    result = invoke(capsys, [*argv, "--layer", "features.1", "--layer", "feature.4"])
    assert result.code == 2 and result.out == ""
    assert_one_error_line(result, "--layer 'feature.4' matches no normalization layer", "features.4")


def test_a_torch_export_archive_run_writes_nothing_but_the_tools_lines_to_stderr(tmp_path: Path) -> None:
    import torch

    from sample_models.architectures import DigitsCNN

    archive = tmp_path / "digits.pt2"
    torch.export.save(torch.export.export(DigitsCNN().eval(), (torch.randn(2, 1, 8, 8),)), str(archive))
    # Loading an archive imports triton where it is installed; the collector pause of main() froze
    # its objects, and nanobind printed "leaked 4 instances!" and ~30 more lines at exit.
    for command in (
        ["layers", str(archive)],
        ["inspect", str(archive), "--shape", "2,1,8,8", "--format", "json", "-q"],
    ):
        result = subprocess.run([sys.executable, "-m", "bn_inspect", *command], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert result.stderr == "", command


@pytest.mark.parametrize("arch", [["--arch", ARCH], []], ids=["arch", "bare-state-dict"])
def test_layers_says_nothing_about_mode_a_state_dict_does_not_store(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, arch: list[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    table = invoke(capsys, ["layers", DIGITS / "state_dict.pt", *arch])
    assert table.code == 0, table.err
    # A freshly built architecture is in train mode; that is no fact about the file.
    assert "train mode" not in table.out
    document = json.loads(invoke(capsys, ["layers", DIGITS / "state_dict.pt", *arch, "--format", "json"]).out)
    assert {(layer["is_training"], layer["affine_requires_grad"]) for layer in document["layers"]} == {(None, None)}


def test_layers_reports_the_mode_a_pickled_model_stores(capsys: pytest.CaptureFixture[str]) -> None:
    document = json.loads(invoke(capsys, ["layers", DIGITS / "torchscript.pt", "--format", "json"]).out)
    assert {layer["is_training"] for layer in document["layers"]} == {False}


def test_recalibrate_takes_quiet_and_its_help_offers_no_shape(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    help_text = invoke(capsys, ["recalibrate", "--help"]).out
    assert "-q, --quiet" in help_text and "shape" not in help_text
    argv = ["recalibrate", DIGITS / "torchscript.pt", "--input", DIGITS / "train_images.npy", "--batches", "2"]
    result = invoke(capsys, [*argv, "--output", tmp_path / "new.pt", "-q"])
    assert result.code == 0 and result.err == ""


@pytest.mark.parametrize(("flag", "words"), [("--strict", "an error"), ("--no-strict", "a warning")])
def test_check_markdown_footer_says_what_strict_means(
    capsys: pytest.CaptureFixture[str], flag: str, words: str
) -> None:
    result = invoke(capsys, ["check", DIGITS / "torchscript.pt", "--no-data", flag, "--format", "markdown"])
    footer = result.out.strip().splitlines()[-1]
    assert f"untrained statistics (BN104) {words}</sub>" in footer and "strict" not in footer
