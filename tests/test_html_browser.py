"""The HTML pages in a real browser (Debian's chromium, driven by Playwright): they load with no console error,
fetch nothing, show every layer, render hostile names as text, and their table, filter and profile work.

Skipped when /usr/bin/chromium or Playwright is absent, unless BN_INSPECT_REQUIRE_BROWSER=1 (CI), which makes
their absence a failure.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bn_inspect.output.html.pages import html_page
from bn_inspect.text import inert
from tests.helpers import DIGITS
from tests.pages import HOSTILE_NAMES, hostile_results

# Left out of the quick subset (`-m "not slow"`): drives a real browser over the pages.
pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
MODEL = DIGITS / "torchscript.pt"
IMAGES = DIGITS / "test_images_unscaled.npy"
DIGITS_LAYERS = ("features.1", "features.4", "features.8")


def _unavailable(reason: str) -> None:
    if os.environ.get("BN_INSPECT_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason}, and BN_INSPECT_REQUIRE_BROWSER=1 requires the browser tests")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} is absent (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[test]')")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield launched
        launched.close()


@dataclass
class Visit:
    """A page loaded in the browser, and everything it tried that it must not."""

    page: Any
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def assert_clean(self) -> None:
        assert self.console_errors == [] and self.page_errors == []
        assert self.requests == [] and self.dialogs == []


def visit(browser: Any, path: Path, is_page: bool = True) -> Visit:
    """Open ``path`` with every request recorded and refused; a page of ours is waited for until its plots are drawn."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    seen = Visit(page)
    page.on("console", lambda message: seen.console_errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: seen.page_errors.append(str(error)))

    def dialog(opened: Any) -> None:
        seen.dialogs.append(opened.message)
        opened.dismiss()

    page.on("dialog", dialog)

    def route(handled: Any) -> None:
        if handled.request.url.startswith("file:"):
            handled.continue_()
        else:
            seen.requests.append(handled.request.url)
            handled.abort()

    context.route("**/*", route)
    page.goto(path.as_uri())
    if is_page:
        # page.js marks the body once Plotly.js is unpacked and the first plots are drawn.
        page.wait_for_selector("body[data-ready]", state="attached")
    return seen


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The digits sample's page of each command, written by the CLI."""
    from bn_inspect.cli.main import run

    folder = tmp_path_factory.mktemp("pages")
    common = [str(MODEL), "--input", str(IMAGES), "--format", "html", "--quiet"]
    run(["inspect", *common, "--output", str(folder / "inspect.html")])
    run(["check", *common, "--output", str(folder / "check.html")])
    run(["compare-modes", *common, "--output", str(folder / "compare-modes.html")])
    train = str(DIGITS / "train_images.npy")
    new = str(folder / "new.pt")
    run(
        [
            "recalibrate",
            str(MODEL),
            "--input",
            train,
            "--output",
            new,
            "--report",
            str(folder / "recalibrate.html"),
            "-q",
        ]
    )
    old = str(folder / "old.json")
    run(["inspect", str(MODEL), "--input", str(DIGITS / "test_images.npy"), "--format", "json", "--output", old, "-q"])
    run(
        [
            "diff",
            old,
            str(MODEL),
            "--input",
            str(IMAGES),
            "--format",
            "html",
            "--output",
            str(folder / "diff.html"),
            "-q",
        ]
    )
    return {path.stem: path for path in folder.glob("*.html")}


@pytest.mark.parametrize("kind", ["inspect", "check", "compare-modes", "recalibrate", "diff"])
def test_each_page_loads_clean_and_shows_every_layer(browser: Any, pages: dict[str, Path], kind: str) -> None:
    seen = visit(browser, pages[kind])
    text = seen.page.inner_text("body")
    for name in DIGITS_LAYERS:
        assert name in text
    assert seen.page.locator(".js-plotly-plot").count() >= 1
    assert seen.page.get_attribute("body", "data-ready") == "plots"
    seen.assert_clean()


def test_without_decompression_stream_the_page_says_so_and_keeps_its_tables(
    browser: Any, pages: dict[str, Path]
) -> None:
    # A browser older than Chrome 80, Firefox 113 or Safari 16.4 cannot unpack Plotly.js.
    context = browser.new_context()
    context.add_init_script("delete window.DecompressionStream")
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.goto(pages["inspect"].as_uri())
    page.wait_for_selector("body[data-ready=no-plots]", state="attached")
    assert "cannot unpack the plots" in page.inner_text("body") and page.locator(".js-plotly-plot").count() == 0
    page.fill("input.layer-filter", "features.4")
    assert page.inner_text(".filter-count") == "1 of 3 rows"
    assert errors == []
    context.close()


@pytest.mark.parametrize("kind", ["report", "check", "comparison", "recalibration", "diff"])
def test_hostile_names_render_as_text(browser: Any, tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"{kind}.html"
    path.write_text(html_page(getattr(hostile_results(), kind)), encoding="utf-8")
    seen = visit(browser, path)
    text = seen.page.evaluate("document.body.textContent")
    for name in HOSTILE_NAMES:
        assert inert(name) in text
    assert seen.page.locator("img").count() == 0
    # data, Plotly.js packed, the page script, and Plotly.js unpacked by it; none loads anything.
    assert seen.page.evaluate("document.scripts.length") == 4
    assert seen.page.evaluate("[...document.scripts].filter(s => s.src).length") == 0
    assert seen.page.get_attribute("body", "data-ready") == "plots"
    seen.assert_clean()


def test_inspect_table_links_filter_and_sort(browser: Any, pages: dict[str, Path]) -> None:
    seen = visit(browser, pages["inspect"])
    page = seen.page
    assert page.evaluate("document.getElementById('layer-2').open") is False
    page.click("#layers-table a.jump >> text=features.8")
    assert page.evaluate("document.getElementById('layer-2').open") is True
    page.wait_for_selector("#fig-2-mean .main-svg")  # its channel plots are drawn once it opens
    assert page.locator("#fig-2-mean .scatterlayer .point").count() == 32  # one dot per channel

    def visible() -> list[str]:
        return page.eval_on_selector_all(
            "#layers-table tbody tr:not([hidden])", "rows => rows.map(r => r.getAttribute('data-name'))"
        )

    page.fill("input.layer-filter", "features.[48]")
    assert visible() == ["features.4", "features.8"]
    assert page.inner_text(".filter-count") == "2 of 3 rows"
    page.fill("input.layer-filter", "nothing*")
    assert visible() == []
    page.fill("input.layer-filter", "")
    assert page.inner_text("#layers-table th:nth-child(7)").startswith("departure")
    page.click("#layers-table th:nth-child(8) button")  # max |shift z|: largest first
    assert visible() == ["features.4", "features.8", "features.1"]
    page.click("#layers-table th:nth-child(8) button")
    assert visible() == ["features.1", "features.8", "features.4"]
    seen.assert_clean()


def test_diff_table_links_filter_sort_and_profile_click(browser: Any, pages: dict[str, Path]) -> None:
    seen = visit(browser, pages["diff"])
    page = seen.page
    assert page.evaluate("document.getElementById('layer-0').open") is True  # features.1 changed first
    page.wait_for_selector("#fig-0-mean .main-svg")
    page.click("#layers-table a.jump >> text=features.8")
    page.wait_for_selector("#fig-2-var .main-svg")
    assert page.locator("#fig-2-mean .scatterlayer .point").count() == 2 * 32  # running and batch, per channel

    def visible() -> list[str]:
        return page.eval_on_selector_all(
            "#layers-table tbody tr:not([hidden])", "rows => rows.map(r => r.getAttribute('data-name'))"
        )

    assert visible() == ["features.4", "features.8", "features.1"]  # largest change first
    page.fill("input.layer-filter", "features.[18]")
    assert sorted(visible()) == ["features.1", "features.8"]
    page.fill("input.layer-filter", "")
    page.click("#layers-table th:nth-child(1) button")  # execution order
    page.click("#layers-table th:nth-child(1) button")
    assert visible() == ["features.1", "features.4", "features.8"]
    page.locator("#fig-profile").scroll_into_view_if_needed()  # opening features.8 scrolled to it
    point = page.locator("#fig-profile .scatterlayer .trace").nth(1).locator(".point").nth(1)
    box = point.bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.wait_for_selector("#fig-profile .hoverlayer .hovertext")
    assert "features.4" in (page.locator("#fig-profile .hoverlayer").text_content() or "")
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.wait_for_selector("#layer-1[open] #fig-1-mean .main-svg")
    seen.assert_clean()


def test_clicking_the_profile_opens_the_layer(browser: Any, pages: dict[str, Path]) -> None:
    seen = visit(browser, pages["inspect"])
    page = seen.page
    page.wait_for_selector("#fig-profile .scatterlayer .trace .point")
    point = page.locator("#fig-profile .scatterlayer .trace").first.locator(".point").nth(1)
    box = point.bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.wait_for_selector("#fig-profile .hoverlayer .hovertext")
    assert "features.4" in (page.locator("#fig-profile .hoverlayer").text_content() or "")
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.wait_for_function("document.getElementById('layer-1').open")
    page.wait_for_selector("#fig-1-var .main-svg")
    seen.assert_clean()


def test_a_result_draws_itself_in_a_notebook_output(browser: Any, tmp_path: Path) -> None:
    # A notebook puts _repr_html_ into its own document; the page runs inside the iframe.
    report = hostile_results().report
    host = tmp_path / "notebook.html"
    host.write_text(f"<!DOCTYPE html><html><body><div class='output'>{report._repr_html_()}</div></body></html>")
    seen = visit(browser, host, is_page=False)
    frame = seen.page.frame_locator("iframe.bn-inspect")
    frame.locator("#fig-profile .main-svg").first.wait_for()
    text = frame.locator("body").text_content() or ""
    for name in HOSTILE_NAMES:
        assert inert(name) in text
    seen.assert_clean()
