"""Names from a model file, and the file's own path, reach every output exactly and harmlessly.

A layer name, a state_dict key or a path can hold terminal escape sequences, rich markup, Markdown
and XML syntax, and bytes that are not UTF-8. Every command and every format must show it as
text: control characters as visible escapes (``bn_inspect.text.inert``), markup as written, tables
with their columns, well-formed XML, JSON that gives the name back as it was. Also here: the
other ways a bad value used to end in a traceback or a false pass (config ranges, exit() from
--arch, --arch-kwargs nesting, --seed size).
"""

from __future__ import annotations

import csv
import html
import io
import json
import os
import re
import unicodedata
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bn_inspect.text import inert
from tests.helpers import invoke
from tests.surfaces import inert_in_every_format

# ESC sequences (clear screen, window title), BEL, DEL, a C1 CSI, a bidi override, rich markup
# (a valid pair and a closing tag that opens nothing), Markdown and XML syntax, a backtick.
NAME = 'mk[red]R[/red]\x1b[2J\x1b]0;title\x07|<script>"&[/x]`\u202e\x7f\x9b'
SHOWN = inert(NAME)
# TorchScript names cannot hold '/', '"' or non-ASCII; these can.
TS_NAME = "ts\x1b[2J\x07mk[red]R[red]|`"
TS_SHOWN = inert(TS_NAME)
# A folder whose name starts rich markup that the file name closes, and a file name that is not UTF-8.
HOSTILE_FILE = ("a[", os.fsdecode(b"x]\xff\x1b[2J.pt"))

ARCH_SOURCE = f"""
from torch import nn

NAME = {NAME!r}


class Hostile(nn.Module):
    def __init__(self):
        super().__init__()
        self._modules[NAME] = nn.BatchNorm1d(4)

    def forward(self, x):
        return self._modules[NAME](x)


def build():
    return Hostile()
"""


class TsHostile(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self._modules[TS_NAME] = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._modules[TS_NAME](x)  # type: ignore[no-any-return]


def raw_controls(text: str) -> list[str]:
    """Characters that act on a terminal, reorder text or are not UTF-8; line breaks aside."""
    return [c for c in text if c != "\n" and unicodedata.category(c) in ("Cc", "Cf", "Cs")]


def strings_in(document: object) -> Iterator[str]:
    if isinstance(document, str):
        yield document
    elif isinstance(document, dict):
        for key, value in document.items():
            yield from strings_in(key)
            yield from strings_in(value)
    elif isinstance(document, list):
        for item in document:
            yield from strings_in(item)


def markdown_cells(row: str) -> list[str]:
    """A GitHub table row's cells: it ends a cell at every '|' without a backslash before it."""
    return re.split(r"(?<!\\)\|", row.strip())[1:-1]


def assert_markdown_tables_keep_columns(text: str) -> None:
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert rows
    widths = {len(markdown_cells(row)) for row in rows}
    assert len(widths) == 1, rows


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A state_dict with the hostile layer name at a hostile path, its --arch file, data, a TorchScript model."""
    folder = tmp_path_factory.mktemp("hostile")
    arch = folder / "hostile_arch.py"
    arch.write_text(ARCH_SOURCE, encoding="utf-8")
    (folder / HOSTILE_FILE[0]).mkdir()
    model = folder / HOSTILE_FILE[0] / HOSTILE_FILE[1]
    namespace: dict[str, object] = {}
    exec(compile(ARCH_SOURCE, str(arch), "exec"), namespace)
    module = namespace["build"]()  # type: ignore[operator]
    torch.save(module.state_dict(), model)
    data = folder / "data.npy"
    np.save(data, np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32))
    torchscript = folder / "ts.pt"
    torch.jit.save(torch.jit.trace(TsHostile().eval(), torch.randn(8, 4)), str(torchscript))
    return {"folder": folder, "arch": arch, "model": model, "data": data, "torchscript": torchscript}


def command_argv(command: str, paths: dict[str, Path], output: Path | None) -> list[str]:
    arch = ["--arch", f"{paths['arch']}:build"]
    if command == "layers":
        # A bare state_dict: its keys are the names, no --arch involved.
        return ["layers", str(paths["model"])]
    if command == "recalibrate":
        assert output is not None
        return ["recalibrate", str(paths["model"]), *arch, "--input", str(paths["data"]), "--output", str(output)]
    if command == "diff":
        # The model against itself: every layer compared, none changed.
        return ["diff", str(paths["model"]), str(paths["model"]), *arch, "--shape", "8,4"]
    return [command, str(paths["model"]), *arch, "--shape", "8,4"]


CASES = [
    ("layers", "table"),
    ("layers", "json"),
    ("layers", "markdown"),
    ("inspect", "table"),
    ("inspect", "json"),
    ("inspect", "csv"),
    ("inspect", "markdown"),
    ("check", "table"),
    ("check", "json"),
    ("check", "markdown"),
    ("check", "junit"),
    ("compare-modes", "table"),
    ("compare-modes", "json"),
    ("compare-modes", "markdown"),
    ("recalibrate", "table"),
    ("recalibrate", "json"),
    ("recalibrate", "markdown"),
    ("diff", "table"),
    ("diff", "json"),
    ("diff", "markdown"),
    ("inspect", "html"),
    ("check", "html"),
    ("compare-modes", "html"),
    ("recalibrate", "html"),
    ("diff", "html"),
]
# The commands whose table and Markdown name the model file.
SHOW_THE_PATH = ("layers", "inspect", "check", "diff")


def assert_shows_name(fmt: str, text: str, name: str = NAME) -> None:
    """``name`` appears in ``text`` exactly as the format shows it, and the format is intact."""
    if fmt == "html":
        # Plotly.js and the page script are the page's own code (Plotly.js holds control characters).
        text = re.sub(r"<script>.*?</script>", "", text, flags=re.DOTALL)
    assert not raw_controls(text), raw_controls(text)
    text.encode("utf-8")
    shown = inert(name)
    if fmt == "json":
        assert name in set(strings_in(json.loads(text)))
    elif fmt == "csv":
        rows = list(csv.reader(io.StringIO(text)))
        assert {len(row) for row in rows} == {len(rows[0])}
        assert shown in {row[0] for row in rows[1:]}
    elif fmt == "junit":
        names = {case.get("name") for case in ElementTree.fromstring(text).iter("testcase")}
        assert shown in names
    elif fmt == "html":
        # Shown as text: HTML-escaped wherever it is, never as markup.
        assert html.escape(shown, quote=True) in text
        assert shown not in text
    elif fmt == "markdown":
        # In a code span only '|' is escaped, for the table.
        assert shown.replace("|", "\\|") in text
        assert_markdown_tables_keep_columns(text)
    else:
        assert shown in text


@inert_in_every_format
@pytest.mark.parametrize(("command", "fmt"), CASES, ids=[f"{c}-{f}" for c, f in CASES])
def test_every_format_shows_hostile_names_as_text(
    hostile: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    fmt: str,
) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    recalibrated = tmp_path / HOSTILE_FILE[1]
    result = invoke(capsys, [*command_argv(command, hostile, recalibrated), "--format", fmt])
    assert result.code == 0, result.err
    assert "Traceback" not in result.err
    assert not raw_controls(result.err), raw_controls(result.err)
    assert_shows_name(fmt, result.out)
    if command in SHOW_THE_PATH and fmt in ("table", "markdown"):
        assert inert(str(hostile["model"])) in result.out
    if command in SHOW_THE_PATH and fmt == "html":
        assert html.escape(inert(str(hostile["model"])), quote=True) in result.out


@pytest.mark.parametrize(("command", "fmt"), [c for c in CASES if c[0] != "recalibrate"])
def test_output_file_of_a_model_whose_name_is_not_utf8(
    hostile: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, fmt: str
) -> None:
    report = tmp_path / os.fsdecode(b"report\xfe[x]\x1b.txt")
    result = invoke(capsys, [*command_argv(command, hostile, None), "--format", fmt, "--output", str(report)])
    assert result.code == 0, result.err
    assert result.out == "" and "Traceback" not in result.err
    text = report.read_bytes().decode("utf-8")
    if fmt == "table":
        # Laid out for 160 columns, the long name folds over lines: its start shows it unstyled.
        assert not raw_controls(text) and inert(NAME)[:12] in text
    else:
        assert_shows_name(fmt, text)
    if command in SHOW_THE_PATH and fmt in ("table", "markdown"):
        assert inert(str(hostile["model"])) in text


@pytest.mark.parametrize("fmt", ["table", "json", "markdown"])
def test_torchscript_names_with_escape_sequences(
    hostile: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    for command in (["layers"], ["inspect", "--shape", "8,4"]):
        result = invoke(capsys, [command[0], str(hostile["torchscript"]), *command[1:], "--format", fmt])
        assert result.code == 0, result.err
        assert not raw_controls(result.err)
        assert_shows_name(fmt, result.out, TS_NAME)


def test_torchscript_names_in_junit_and_csv(hostile: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    result = invoke(capsys, ["check", str(hostile["torchscript"]), "--shape", "8,4", "--format", "junit"])
    assert result.code == 0, result.err
    assert_shows_name("junit", result.out, TS_NAME)
    result = invoke(capsys, ["inspect", str(hostile["torchscript"]), "--shape", "8,4", "--format", "csv"])
    assert result.code == 0, result.err
    assert_shows_name("csv", result.out, TS_NAME)


def test_safetensors_keys_are_listed_as_text(
    hostile: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import save_file

    monkeypatch.setenv("COLUMNS", "400")
    path = tmp_path / "model.safetensors"
    save_file(torch.load(hostile["model"], weights_only=True), str(path))
    for fmt in ("table", "json", "markdown"):
        result = invoke(capsys, ["layers", str(path), "--format", fmt])
        assert result.code == 0, result.err
        assert_shows_name(fmt, result.out)


def test_rich_markup_in_a_name_is_shown_not_applied(
    hostile: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    result = invoke(capsys, ["layers", str(hostile["model"])])
    assert result.code == 0
    assert "mk[red]R[/red]" in result.out and "mkR" not in result.out


@pytest.mark.surface("render:stderr", "inert")
def test_note_quoting_a_hostile_path_is_text(
    hostile: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # --arch is not used for a TorchScript file, and the note saying so quotes its path.
    # (torch.jit.load takes only UTF-8 paths.)
    model = tmp_path / HOSTILE_FILE[0] / "x]\x1b[2J.pt"
    model.parent.mkdir()
    model.write_bytes(hostile["torchscript"].read_bytes())
    result = invoke(
        capsys, ["inspect", str(model), "--arch", f"{hostile['arch']}:build", "--shape", "8,4", "--format", "json"]
    )
    assert result.code == 0, result.err
    assert not raw_controls(result.err)
    assert f"note: --arch is not used: {inert(str(model))}" in " ".join(result.err.split())


def test_inert_escapes_controls_and_keeps_the_rest() -> None:
    assert inert("a\x1b[2J\x07\x00\x7f\x85\x9b\u202e\u2066\udcff\t\n") == (
        "a\\x1b[2J\\x07\\x00\\x7f\\x85\\x9b\\u202e\\u2066\\udcff\\t\\n"
    )
    assert inert('layer1.0.bn1 [red]|<&>"` é 日本 \\') == 'layer1.0.bn1 [red]|<&>"` é 日本 \\'


# --- values that used to end in a traceback or a false pass ------------------------------------


def first_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("departure-warning = nan", "departure-warning = nan"),
        ("departure-warning = -0.1", "departure-warning = -0.1"),
        ("departure-error = -1", "departure-error = -1"),
        ("departure-error = inf", "departure-error = inf"),
        ("min-values = 0", "min-values = 0"),
    ],
)
@pytest.mark.surface("read:config", "traceback")
def test_config_values_out_of_range_are_refused(
    hostile: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    setting: str,
    message: str,
) -> None:
    (tmp_path / "pyproject.toml").write_text(f"[tool.bn-inspect]\n{setting}\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    result = invoke(capsys, ["check", str(hostile["torchscript"]), "--no-data"])
    assert result.code == 2
    assert first_error_line(result.err).startswith(
        f"Error: [tool.bn-inspect] {message} in {tmp_path / 'pyproject.toml'} is out of range. Use a finite number"
    )


def test_config_in_range_is_used(
    hostile: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "pyproject.toml").write_text(
        "[tool.bn-inspect]\ndeparture-warning = 0\ndeparture-error = 0.5\nmin-values = 1\n", encoding="utf-8"
    )
    monkeypatch.chdir(tmp_path)
    result = invoke(capsys, ["check", str(hostile["torchscript"]), "--no-data", "--format", "json"])
    assert result.code == 0, result.err
    assert json.loads(result.out)["thresholds"]["error"] == 0.5


@pytest.mark.parametrize("arch", ["builtins:exit", "sys:exit"])
def test_exit_called_by_arch_is_an_error(capsys: pytest.CaptureFixture[str], arch: str) -> None:
    result = invoke(capsys, ["check", "--arch", arch, "--no-data"])
    assert result.code == 2
    assert first_error_line(result.err) == (
        "Error: code run for the model (--arch, or a pickle under --trust-pickle) called exit(None) before "
        "bn-inspect finished. Check what that code runs when imported and called."
    )
    assert result.out == ""


@pytest.mark.surface("read:arch-code", "traceback")
def test_exit_at_import_of_an_arch_file_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    arch = tmp_path / "exits.py"
    arch.write_text("import sys\nsys.exit('\\x1b[2Jbye')\n", encoding="utf-8")
    result = invoke(capsys, ["check", "--arch", f"{arch}:build", "--no-data"])
    assert result.code == 2
    assert first_error_line(result.err).startswith(
        "Error: code run for the model (--arch, or a pickle under --trust-pickle) called exit('\\x1b[2Jbye')"
    )


@pytest.mark.surface("entry:bn-inspect", "traceback")
def test_deeply_nested_arch_kwargs_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    nested = "[" * 50_000 + "]" * 50_000
    result = invoke(capsys, ["check", "--arch", "torch.nn:Identity", "--arch-kwargs", nested, "--no-data"])
    assert result.code == 2
    assert first_error_line(result.err) == (
        "Error: --arch-kwargs is nested too deeply to read. "
        """Give a flat JSON object, e.g. --arch-kwargs '{"num_classes": 10}'"""
    )


@pytest.mark.parametrize("seed", [str(2**64), str(-(2**63) - 1)])
def test_seed_beyond_64_bits_is_one_line(
    hostile: dict[str, Path], capsys: pytest.CaptureFixture[str], seed: str
) -> None:
    result = invoke(capsys, ["inspect", str(hostile["torchscript"]), "--shape", "8,4", "--seed", seed])
    assert result.code == 2
    assert first_error_line(result.err).startswith("Error: Invalid value for '--seed': ")


@pytest.mark.parametrize("seed", [str(2**64 - 1), str(-(2**63))])
def test_seed_at_the_64_bit_limits_runs(
    hostile: dict[str, Path], capsys: pytest.CaptureFixture[str], seed: str
) -> None:
    result = invoke(capsys, ["inspect", str(hostile["torchscript"]), "--shape", "8,4", "--seed", seed])
    assert result.code == 0, result.err


@pytest.mark.parametrize("fmt", ["table", "markdown"])
def test_per_channel_table_titles_show_hostile_names(
    hostile: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    argv = [*command_argv("inspect", hostile, None), "--layer", "*", "--format", fmt]
    result = invoke(capsys, argv)
    assert result.code == 0, result.err
    assert not raw_controls(result.out)
    title = f"{SHOWN} (BatchNorm1d), per channel" if fmt == "table" else f"### `` {SHOWN} `` per channel"
    assert title in [line.rstrip() for line in result.out.splitlines()]
