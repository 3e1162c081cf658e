"""The timeline page in a real browser: it loads clean and offline, draws the heatmap, and its selector switches the layer.

Skipped like tests/test_html_browser.py when chromium or Playwright is absent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bn_inspect.text import inert
from tests.helpers import invoke
from tests.test_html_browser import browser, visit  # noqa: F401 (the module's browser fixture)
from tests.timelines import LAG_EVENT, LAYERS, NAN_EVENT, event, write_timeline

# Left out of the quick subset (`-m "not slow"`): drives a real browser over the timeline page.
pytestmark = pytest.mark.slow


def test_the_page_draws_both_figures_and_the_selector_shows_the_chosen_layer(
    browser: Any,  # noqa: F811
    tmp_path: Path,
    capsys: Any,
) -> None:
    run = write_timeline(tmp_path / "run.jsonl", events=[LAG_EVENT, NAN_EVENT], validate_every=50)
    page_path = tmp_path / "timeline.html"
    assert invoke(capsys, ["timeline", run, "--format", "html", "--output", page_path]).code == 1
    seen = visit(browser, page_path)
    page = seen.page
    assert page.get_attribute("body", "data-ready") == "plots"
    assert page.locator("#fig-heatmap .js-plotly-plot, #fig-heatmap.js-plotly-plot").count() == 1
    assert page.locator("#fig-running.js-plotly-plot").count() == 1
    visible = "document.getElementById('fig-running').data.map(t => t.visible)"
    assert page.evaluate(visible) == [True, True, False, False, False, False]
    page.locator("#fig-running .updatemenu-header-group").click()
    page.locator("#fig-running .updatemenu-dropdown-button", has_text=LAYERS[1]).click()
    assert page.evaluate(visible) == [False, False, True, True, False, False]
    shapes = page.evaluate("document.getElementById('fig-running').layout.shapes.map(s => s.x0)")
    assert shapes == [70]
    for name in LAYERS:
        assert name in page.inner_text("body")
    seen.assert_clean()


HOSTILE = "<img src=x onerror=alert(1)>.bn\x1b[31m"


def test_hostile_names_and_messages_render_as_text(browser: Any, tmp_path: Path, capsys: Any) -> None:  # noqa: F811
    hostile = event(20, "BN506", "warning", HOSTILE, "lags <script>alert(2)</script>", departure=1.0)
    run = write_timeline(tmp_path / "run.jsonl", layers=(HOSTILE, "features.8"), events=[hostile])
    page_path = tmp_path / "timeline.html"
    assert invoke(capsys, ["timeline", run, "--format", "html", "--output", page_path]).code == 0
    seen = visit(browser, page_path)
    text = seen.page.evaluate("document.body.textContent")
    assert inert(HOSTILE) in text and "lags <script>alert(2)</script>" in text
    assert seen.page.locator("img").count() == 0
    seen.page.locator("#fig-running .updatemenu-header-group").click()
    assert seen.page.locator("#fig-running .updatemenu-dropdown-button", has_text="<img src=x").count() >= 1
    assert seen.page.locator("img").count() == 0
    seen.assert_clean()
