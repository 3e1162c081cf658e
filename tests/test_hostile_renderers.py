"""Text from a model or a report is inert in every format of every command (#25, case 12).

A layer name, a module class name, a path, a report's model format and mode carry terminal escapes,
BEL, a line break that would start a GitHub Actions workflow command (``::error::``), HTML, a
Markdown table cell's end, a Markdown link, math and a bidi override. Whatever the command and the
format, none of it may act: no raw control character, no line that starts with ``::``, no script
element from the data, Markdown tables that keep their column count, and JSON that holds the exact
original text.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest

from bn_inspect.output.export import to_csv
from bn_inspect.report.reading import load_report
from bn_inspect.text import Untrusted
from tests.helpers import GOLDEN, Result, assert_one_error_line, invoke
from tests.surfaces import inert_in_every_format

# Every hazard at once; no "." (a module name cannot hold one) and no ":" (an --arch spec splits on it).
PIECES = (
    "\x1b[31m",
    "\x07",
    "\n::error::pwned",
    "<script>alert(1)</script>",
    "|",
    "[link](javascript:x)",
    "$x$",
    "\u202e",
)
HOSTILE = "bn" + "".join(PIECES)
HOSTILE_TYPE = "Norm" + "".join(PIECES)
# Characters that must never reach an output as themselves (its own line breaks and tabs aside).
_ACTING = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029]")

ARCH_SOURCE = f"""
from torch import nn

NAME = {HOSTILE!r}
Hostile = type({HOSTILE_TYPE!r}, (nn.BatchNorm2d,), {{}})


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.add_module(NAME + "conv", nn.Conv2d(3, 4, 1))
        self.add_module(NAME, Hostile(4))

    def forward(self, x):
        return getattr(self, NAME)(getattr(self, NAME + "conv")(x))
"""


def _assert_inert(text: str, output_format: str) -> None:
    """What holds for every format: no acting character, no workflow command, no script from the data."""
    found = _ACTING.search(text)
    assert found is None, (output_format, repr(text[max(0, found.start() - 60) : found.end() + 20]))
    assert not any(line.lstrip().startswith("::") for line in text.splitlines()), output_format
    if output_format == "html":
        assert "<script>alert" not in text
    elif output_format == "markdown":
        _assert_markdown_inert(text)
    elif output_format == "json":
        _assert_holds_exactly(json.loads(text))
    elif output_format == "csv":
        rows = list(csv.reader(io.StringIO(text)))
        assert len({len(row) for row in rows}) == 1, "a CSV row has another column count"
        assert any(HOSTILE.replace("\n", "\\n") in cell or "\\x1b" in cell for row in rows for cell in row)
    elif output_format == "junit":
        ElementTree.fromstring(text)


def _assert_markdown_inert(text: str) -> None:
    table: list[int] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            table.append(len(re.findall(r"(?<!\\)\|", line)))
        elif table:
            assert len(set(table)) == 1, f"a Markdown table row has another column count: {table}"
            table = []
    # Outside code spans, nothing of the data may be read as a link, math or HTML.
    prose = re.sub(r"(`+)(?!`).*?(?<!`)\1(?!`)", "", text)
    for unescaped in (r"(?<!\\)\[link(?<!\\)\]\(", r"(?<!\\)\$x", r"(?<!\\)<script"):
        assert re.search(unescaped, prose) is None, (unescaped, prose)


def _assert_holds_exactly(document: Any) -> None:
    """JSON escapes by construction: the hostile name and type come back exactly as they were."""
    strings: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str):
            strings.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(document)
    assert any(HOSTILE in s for s in strings), "the exact name is lost in JSON"


@pytest.fixture
def arch(tmp_path: Path) -> str:
    """The --arch spec of a network with a hostile layer name and class name; its state_dict and data beside it."""
    import numpy as np
    import torch

    from bn_inspect.model.arch import build_arch

    source = tmp_path / "hostile_net.py"
    source.write_text(ARCH_SOURCE, encoding="utf-8")
    spec = f"{source}:Net"
    torch.manual_seed(0)
    torch.save(build_arch(spec, {}).state_dict(), tmp_path / "model.pt")
    np.save(tmp_path / "data.npy", np.random.default_rng(0).normal(3.0, 1.0, (4, 3, 4, 4)).astype(np.float32))
    return spec


COMMANDS = {
    "inspect": ("table", "json", "csv", "markdown", "html"),
    "check": ("table", "json", "markdown", "junit", "html"),
    "layers": ("table", "json", "markdown"),
    "compare-modes": ("table", "json", "markdown", "html"),
    "recalibrate": ("table", "json", "markdown", "html"),
}
CASES = [(command, output_format) for command, formats in COMMANDS.items() for output_format in formats]


def _run(capsys: pytest.CaptureFixture[str], command: str, output_format: str, arch: str, tmp_path: Path) -> Result:
    """``command`` on the hostile network's state_dict (and data) in ``output_format``; HTML to page.html."""
    argv = [command, tmp_path / "model.pt", "--arch", arch, "--format", output_format]
    if command != "layers":
        argv += ["--input", tmp_path / "data.npy", "--batch-size", "2"]
    if command == "recalibrate":
        argv += ["--output", str(tmp_path / "new.pt")]
    if output_format == "html":
        argv += (
            ["--output", str(tmp_path / "page.html")]
            if command != "recalibrate"
            else ["--report", str(tmp_path / "page.html")]
        )
    return invoke(capsys, argv)


@pytest.mark.parametrize(("command", "output_format"), CASES)
@inert_in_every_format
def test_every_command_renders_a_hostile_layer_inert(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, arch: str, command: str, output_format: str
) -> None:
    result = _run(capsys, command, output_format, arch, tmp_path)
    assert result.code in (0, 1), result.err
    assert "Traceback" not in result.err
    text = (tmp_path / "page.html").read_text(encoding="utf-8") if output_format == "html" else result.out
    _assert_inert(text, output_format)
    _assert_inert(result.err, "stderr")
    if output_format == "html":
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text  # shown, as text


def _report(capsys: pytest.CaptureFixture[str], arch: str, path: Path, **hostile: str) -> Path:
    assert (
        invoke(capsys, ["inspect", "--arch", arch, "--shape", "2,3,4,4", "--format", "json", "--output", path]).code
        == 0
    )
    document = json.loads(path.read_text(encoding="utf-8"))
    document["model"]["source"] = HOSTILE
    for key, value in hostile.items():
        if key == "format":
            document["model"]["format"] = value
        else:
            document[key] = value
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


@pytest.mark.parametrize("output_format", ["table", "json", "markdown", "html"])
@pytest.mark.surface("render:table", "inert")
@pytest.mark.surface("render:json", "inert")
@pytest.mark.surface("render:markdown", "inert")
@pytest.mark.surface("render:html", "inert")
def test_diff_of_hostile_reports_is_inert(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, arch: str, output_format: str
) -> None:
    old = _report(capsys, arch, tmp_path / "old.json")
    new = _report(capsys, arch, tmp_path / "new.json", format=HOSTILE, mode=HOSTILE, device=HOSTILE)
    argv = ["diff", old, new, "--format", output_format]
    page = tmp_path / "diff.html"
    result = invoke(capsys, [*argv, "--output", page] if output_format == "html" else argv)
    if result.code == 2:
        # A reader that checks format and mode against the schema refuses the report: one inert line.
        assert_one_error_line(result)
        _assert_inert(result.err, "stderr")
        return
    assert result.code in (0, 1), result.err
    text = page.read_text(encoding="utf-8") if output_format == "html" else result.out
    _assert_inert(text, output_format)


def test_diff_of_reports_with_hostile_layer_names_is_inert(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, arch: str
) -> None:
    old, new = _report(capsys, arch, tmp_path / "old.json"), _report(capsys, arch, tmp_path / "new.json")
    for output_format in ("table", "json", "markdown"):
        result = invoke(capsys, ["diff", old, new, "--format", output_format])
        assert result.code == 0, result.err
        _assert_inert(result.out, output_format)


def _results_with_hostile_text(arch: str) -> list[Any]:
    """Every kind of result of a model with hostile names, its text fields (format, mode, ...) hostile too."""
    import torch

    import bn_inspect
    from bn_inspect.model.arch import build_arch
    from bn_inspect.model.layers import iter_norm_layers
    from bn_inspect.report.diff import diff_reports
    from bn_inspect.report.records import InputInfo, LayerListing, ModelInfo, Report

    model = build_arch(arch, {}).eval()
    batches = [torch.randn(2, 3, 4, 4) + 3 for _ in range(2)]
    info = ModelInfo.of(HOSTILE, HOSTILE, HOSTILE, HOSTILE)
    report: Report = bn_inspect.inspect_model(model, batches, model_info=info, input_source=HOSTILE)
    hostile = Untrusted(HOSTILE)
    data: InputInfo = dataclasses.replace(
        report.input, dtype=hostile, preprocessing=hostile, num_skipped_files=1, skipped_files=(hostile,)
    )
    report = dataclasses.replace(report, input=data, mode=hostile, device=hostile, not_executed=(hostile,))
    check = dataclasses.replace(bn_inspect.check_model(model, batches, model_info=info), mode=hostile)
    comparison = dataclasses.replace(bn_inspect.compare_modes(model, batches), model=info, not_executed=(hostile,))
    listing = LayerListing(info, tuple(layer.state() for layer in iter_norm_layers(model)))
    other = dataclasses.replace(report, model=ModelInfo.of("old.pt", "pickle"), mode=Untrusted("eval"))
    return [report, check, comparison, listing, diff_reports(other, report)]


@inert_in_every_format
def test_every_renderer_makes_every_text_field_inert(arch: str) -> None:
    from bn_inspect.output.formats import FORMATTERS, Rendering
    from bn_inspect.report.diff import DiffReport
    from bn_inspect.report.findings import CheckReport
    from bn_inspect.report.records import LayerListing, Report

    accepts = {"csv": (Report,), "junit": (CheckReport,), "html": (Report, CheckReport, DiffReport)}
    for result in _results_with_hostile_text(arch):
        for name, formatter in FORMATTERS.items():
            kinds = accepts.get(name)
            if (kinds is not None and not isinstance(result, kinds)) or (
                name == "html" and isinstance(result, LayerListing)
            ):
                continue
            text = formatter.text(result, Rendering(channel_patterns=("*",), model_output=HOSTILE))
            _assert_inert(text, name)


@pytest.mark.surface("render:stderr", "inert")
def test_an_error_quoting_a_hostile_path_is_one_inert_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / f"{HOSTILE}.pt"
    for argv in (["inspect", missing], ["diff", missing, missing], ["check", "--no-data", "--", missing]):
        result = invoke(capsys, argv)
        assert result.code == 2
        assert_one_error_line(result, "\\x1b[31m\\x07", "::error::pwned")
        _assert_inert(result.err, "stderr")


@pytest.mark.surface("render:stderr", "inert")
def test_a_note_quoting_a_hostile_layer_is_inert(capsys: pytest.CaptureFixture[str], tmp_path: Path, arch: str) -> None:
    # Without --input the run says which layer its random input's shape was read off: the hostile conv.
    result = invoke(capsys, ["inspect", tmp_path / "model.pt", "--arch", arch])
    assert result.code == 0, result.err
    assert "\\x1b[31m\\x07\\n::error::pwned" in result.err
    _assert_inert(result.err, "stderr")
    _assert_inert(result.out, "table")


@pytest.mark.surface("render:csv", "inert")
@pytest.mark.parametrize("name", ['=HYPERLINK("http://e","x")', "+1", "-2+3", "@SUM(A1)"])
def test_a_csv_cell_from_a_name_never_starts_a_formula(name: str) -> None:
    report = load_report(GOLDEN / "reports" / "digits_older.json")
    named = dataclasses.replace(report, layers=(dataclasses.replace(report.layers[0], name=Untrusted(name)),))
    rows = list(csv.reader(io.StringIO(to_csv(named))))
    assert rows[1][rows[0].index("layer")] == "'" + name
    # The tool's own numbers are not text from a file: a negative mean stays a number.
    assert all(not cell.startswith("'") for cell in rows[1][rows[0].index("layer") + 1 :])
