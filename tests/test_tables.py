"""Every command's tables at 60, 80, 120 and 200 columns and piped: golden files, and no token ever split or cut."""

from __future__ import annotations

import dataclasses
import io
import re
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn

from bn_inspect.analyses.checking import check_model
from bn_inspect.analyses.inspection import inspect_model
from bn_inspect.output.formats import FILE_WIDTH, Rendering, TableFormatter
from bn_inspect.output.render import header
from bn_inspect.report.findings import Thresholds
from bn_inspect.report.records import InputInfo, ModelInfo
from bn_inspect.text import Untrusted
from tests import models
from tests.helpers import DIGITS, GOLDEN, check_golden, invoke

ARCH = ("--arch", "sample_models.architectures:DigitsCNN")
COMMANDS = {
    "inspect": ["inspect", "digits/state_dict.pt", *ARCH, "--input", "digits/test_images.npy", "--layer", "features.1"],
    "check": ["check", "digits/state_dict.pt", *ARCH, "--input", "digits/test_images_unscaled.npy"],
    # Two rules on the same three layers: one grouped row each, naming the layers.
    "check-baseline": [
        "check",
        "digits/state_dict.pt",
        *ARCH,
        "--input",
        "digits/test_images_unscaled.npy",
        "--baseline",
        "old.json",
    ],
    "layers": ["layers", "digits/state_dict.pt", *ARCH],
    "compare-modes": ["compare-modes", "digits/state_dict.pt", *ARCH, "--input", "digits/test_images.npy"],
    "diff": ["diff", "old.json", "digits/state_dict.pt", *ARCH, "--input", "digits/test_images_unscaled.npy"],
    # One layer's stored statistics corrupted: the change column and the headline tell cause from consequence.
    "diff-stored": ["diff", "digits/state_dict.pt", "corrupted.pt", *ARCH, "--input", "digits/test_images.npy"],
    "recalibrate": [
        "recalibrate",
        "digits/state_dict.pt",
        *ARCH,
        "--input",
        "digits/test_images.npy",
        "--output",
        "recalibrated.pt",
    ],
}
WIDTHS = ("60", "80", "120", "200", "piped")
LAYER_NAMES = ("features.1", "features.4", "features.8")

_EDGE_PUNCTUATION = ":;,.()[]"


@pytest.fixture
def digits_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder holding the digits sample as ``digits/``, so that printed paths do not depend on the machine."""
    (tmp_path / "digits").mkdir()
    for name in ("state_dict.pt", "test_images.npy", "test_images_unscaled.npy"):
        shutil.copy(DIGITS / name, tmp_path / "digits" / name)
    # diff's OLD side: a report of the digits model on its test images, written before the fingerprints.
    shutil.copy(GOLDEN / "reports" / "digits_older.json", tmp_path / "old.json")
    state = torch.load(DIGITS / "state_dict.pt")
    state["features.4.running_var"] = state["features.4.running_var"] * 4
    torch.save(state, tmp_path / "corrupted.pt")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# Each command's output per width, run once: the golden and the token tests read the same runs.
_OUTPUTS: dict[tuple[str, str], str] = {}


def cli_output(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, command: str, width: str) -> str:
    """What the command prints with COLUMNS set to ``width``, or piped (no COLUMNS; capsys is no terminal)."""
    if (command, width) in _OUTPUTS:
        return _OUTPUTS[command, width]
    if width == "piped":
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", width)
    result = invoke(capsys, COMMANDS[command])
    assert result.code in (0, 1), result.err
    _OUTPUTS[command, width] = result.out
    return result.out


def tokens(text: str) -> set[str]:
    """Words (between spaces or slashes) that hold a letter or a digit, without the punctuation that prose
    or brackets put around them (rules, bars and separators are as wide as the layout makes them)."""
    words = {word.strip(_EDGE_PUNCTUATION) for word in re.split(r"[\s/]+", text)}
    return {word for word in words if any(char.isalnum() for char in word)}


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_command_table_matches_golden(
    command: str,
    width: str,
    digits_folder: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    update_golden: bool,
) -> None:
    text = cli_output(capsys, monkeypatch, command, width)
    check_golden(f"tables/{command}_{width}.txt", text, update_golden)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_no_width_splits_or_cuts_a_name_a_number_or_a_flag(
    command: str, digits_folder: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    piped = cli_output(capsys, monkeypatch, command, "piped")
    whole = tokens(piped)
    assert set(LAYER_NAMES) <= whole
    for width in WIDTHS[:-1]:
        text = cli_output(capsys, monkeypatch, command, width)
        found = tokens(text)
        # A fragment (``featur``, ``1.00e-0``, ``Batch…``) is no word of the piped layout.
        assert found <= whole, (width, sorted(found - whole))
        assert set(LAYER_NAMES) <= found, width
        assert all(line == line.rstrip() for line in text.splitlines()), width
        assert all(len(line) <= int(width) for line in text.splitlines()), width


def test_piped_output_is_laid_out_for_a_file_not_for_80_columns(
    digits_folder: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    piped = cli_output(capsys, monkeypatch, "layers", "piped")
    rows = [line for line in piped.splitlines() if line.startswith("features.")]
    assert len(rows) == 3 and all(80 < len(row) <= FILE_WIDTH for row in rows)


@pytest.mark.parametrize("width", [60, 80, 120, 200])
def test_an_untrained_model_says_so_at_every_width(width: int) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    report = inspect_model(model, [models.make_input((4, 3, 5, 5))], model_info=ModelInfo.of("fresh", "module"))
    assert "untrained" in report.layers[0].flags
    text = TableFormatter().text(report, Rendering(width=width))
    assert "untrained" in tokens(text)


@pytest.mark.parametrize("width", [40, 60, 200])
def test_a_name_wider_than_the_console_stays_whole(width: int) -> None:
    long_name = "encoder_stage_" + "very_long_block_name_" * 6 + "norm"
    model = nn.Sequential()
    model.add_module(long_name, nn.BatchNorm2d(3))
    models.randomize_norm_state(model).eval()
    report = inspect_model(model, [models.make_input((4, 3, 5, 5))], model_info=ModelInfo.of("long", "module"))
    text = TableFormatter().text(report, Rendering(width=width, channel_patterns=("*",)))
    # On a line of its own, whole, where the layer table becomes one block per layer.
    assert long_name in [line.strip() for line in text.splitlines()]


def test_printing_to_a_pipe_ignores_rich_80_column_default(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    model = models.randomize_norm_state(models.ConvBN2d()).eval()
    report = inspect_model(model, [models.make_input((4, 3, 6, 6))], model_info=ModelInfo.of("ConvBN2d", "module"))
    TableFormatter().print(report, Rendering())
    assert capsys.readouterr().out == TableFormatter().text(report, Rendering(width=FILE_WIDTH))


@pytest.mark.parametrize(
    ("num_nonfinite", "line"),
    [(1, "1 input value is NaN or infinite"), (4096, "4,096 input values are NaN or infinite")],
)
def test_header_counts_are_separated_and_singular_for_one(num_nonfinite: int, line: str) -> None:
    model = models.randomize_norm_state(models.ConvBN2d()).eval()
    report = inspect_model(model, [models.make_input((4, 3, 6, 6))], model_info=ModelInfo.of("ConvBN2d", "module"))
    data = InputInfo(Untrusted("x.npy"), (1, 3, 6, 6), Untrusted("float32"), 1, 1, num_nonfinite)
    console = Console(file=io.StringIO(), width=200, record=True)
    console.print(header(dataclasses.replace(report, input=data)))
    text = console.export_text()
    assert line in text and "1 sample in 1 batch of" in text
    assert re.search(r"\b1 (samples|batches)\b", text) is None


def test_counts_in_findings_are_thousands_separated() -> None:
    model = models.randomize_norm_state(models.ConvBN2d()).eval()
    checked = check_model(
        model, [models.make_input((64, 3, 8, 8))], mode="train", thresholds=Thresholds(min_values=10_000)
    )
    messages = [finding.message for finding in checked.findings if finding.code == "BN203"]
    assert messages and "only 4,096 values per channel per batch (fewer than 10,000)" in messages[0]
