"""--report PAGE on inspect, check, compare-modes and diff: the HTML page besides --format/--output, from one run.

CI wants Markdown for its job summary and the page as an artifact; one run writes both. The page's
path is checked before the run, as recalibrate's --report and every --output are.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import DIGITS, assert_one_error_line, invoke

LAYERS = ("features.1", "features.4", "features.8")
# What each command exits with on the unscaled images: check finds the layers departing, diff
# (against a report on the scaled images) finds them changed.
EXIT_CODES = {"inspect": 0, "check": 1, "compare-modes": 0, "diff": 1}


@pytest.fixture
def files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Path]:
    """Copies of the digits model and data (a broken check must not replace a shipped file) and an OLD report."""
    model, images = tmp_path / "model.pt", tmp_path / "images.npy"
    shutil.copy(DIGITS / "torchscript.pt", model)
    shutil.copy(DIGITS / "test_images_unscaled.npy", images)
    old = tmp_path / "old.json"
    argv = ["inspect", model, "--input", DIGITS / "test_images.npy", "--format", "json", "--output", old, "-q"]
    assert invoke(capsys, argv).code == 0
    return {"model": model, "images": images, "old": old}


def command_argv(command: str, files: dict[str, Path]) -> list[str | Path]:
    sides = [files["old"], files["model"]] if command == "diff" else [files["model"]]
    return [command, *sides, "--input", files["images"], "--quiet"]


@pytest.mark.parametrize("command", list(EXIT_CODES))
def test_one_run_writes_markdown_and_the_page(
    command: str, files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    markdown, page = tmp_path / "summary.md", tmp_path / "report.html"
    argv = [*command_argv(command, files), "--format", "markdown", "--output", markdown, "--report", page]
    result = invoke(capsys, argv)
    assert result.code == EXIT_CODES[command], result.err
    assert result.out == "" and result.err == ""
    summary = markdown.read_text(encoding="utf-8")
    assert summary.startswith("#") and "<!DOCTYPE html>" not in summary
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and f'data-kind="{command}"' in text
    for name in LAYERS:
        assert name in summary and name in text


def test_the_page_goes_beside_the_table_on_stdout_and_json(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = tmp_path / "report.html"
    result = invoke(capsys, [*command_argv("inspect", files), "--report", page])
    assert result.code == 0 and "features.8" in result.out and page.read_text(encoding="utf-8").endswith("</html>\n")
    result = invoke(capsys, [*command_argv("check", files), "--format", "json", "--report", page, "--force"])
    assert result.code == 1 and json.loads(result.out)["kind"] == "check"
    assert 'data-kind="check"' in page.read_text(encoding="utf-8")


# (command, --report, what the one error line says); names in capitals are the fixture's files.
REFUSED = [
    ("inspect", "-", "--report - would mix the HTML page"),
    ("inspect", "MODEL", "is the model file"),
    ("inspect", "IMAGES", "is the --input file"),
    ("inspect", "OUTPUT", "--report and --output name the same file"),
    ("inspect", "missing/report.html", "does not exist"),
    ("check", "MODEL", "is the model file"),
    ("check", "OLD", "is the --baseline file"),
    ("check", "BASELINE", "--report and --write-baseline name the same file"),
    ("compare-modes", "IMAGES", "is the --input file"),
    ("compare-modes", "-", "--report - would mix the HTML page"),
    ("diff", "OLD", "is a side of diff"),
    ("diff", "MODEL", "is a side of diff"),
    ("diff", "OUTPUT", "--report and --output name the same file"),
]


@pytest.mark.parametrize(("command", "page", "fragment"), REFUSED, ids=[f"{c}-{p}" for c, p, _ in REFUSED])
def test_the_page_path_is_refused_before_the_run(
    command: str, page: str, fragment: str, files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output, baseline = tmp_path / "out.md", tmp_path / "new-baseline.json"
    paths = {"MODEL": files["model"], "IMAGES": files["images"], "OLD": files["old"], "OUTPUT": output}
    paths["BASELINE"] = baseline
    target = paths.get(page, tmp_path / page if page != "-" else Path("-"))
    argv = [*command_argv(command, files), "--format", "markdown", "--output", output, "--report", target]
    if command == "check":
        argv += ["--baseline", files["old"], "--write-baseline", baseline]
    before = {name: path.read_bytes() for name, path in files.items()}
    result = invoke(capsys, argv)
    assert result.code == 2
    assert_one_error_line(result, "--report", fragment)
    assert {name: path.read_bytes() for name, path in files.items()} == before
    assert not output.exists() and not baseline.exists()  # refused before anything ran or was written
