"""The pages read without hovering: layer names on the profiles' x axes (no tick outside the layers),
legends clear of Plotly's toolbar, and wide tables that scroll inside their box."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest

from bn_inspect.output.html.figures import LEGEND_MARGIN, MAX_LAYER_TICKS, TICK_CHARS, layer_axis
from bn_inspect.output.html.pages import html_page
from bn_inspect.report.diff import diff_reports
from bn_inspect.report.records import Report
from tests.pages import HostileResults, hostile_results, resnet50_report
from tests.test_html import Document

# Plotly's modebar: 25 px of buttons and their padding from the top of the figure.
MODEBAR_HEIGHT = 30
# A horizontal legend of one line of 12 px text, with Plotly's padding.
LEGEND_HEIGHT = 24


@pytest.fixture(scope="module")
def hostile() -> HostileResults:
    return hostile_results()


def figures(result: object) -> dict[str, Any]:
    page = Document(html_page(result))
    return page.data["figures"]  # type: ignore[return-value]


def profile_figures(results: HostileResults) -> dict[str, dict[str, Any]]:
    """Every figure with layer calls on x: each kind of page's profile, and check's findings per layer."""
    pages = {"inspect": results.report, "check": results.check, "compare-modes": results.comparison}
    pages |= {"recalibrate": results.recalibration, "diff": results.diff}
    found = {}
    for kind, result in pages.items():
        for key, figure in figures(result).items():
            layout = figure.get("layout")  # a layer's channel plots name a shared layout instead
            if isinstance(layout, dict) and layout.get("xaxis", {}).get("tickmode") == "array":
                found[f"{kind}:{key}"] = figure
    return found


def test_every_page_with_layers_on_x_names_them() -> None:
    results = hostile_results()
    found = profile_figures(results)
    assert {key.split(":")[0] for key in found} == {"inspect", "check", "compare-modes", "recalibrate", "diff"}
    assert {"inspect:fig-profile", "check:fig-findings", "diff:fig-profile", "recalibrate:fig-shift"} <= set(found)


def test_the_resnet50_profile_names_every_second_layer_and_no_tick_falls_outside() -> None:
    report = resnet50_report()
    axis = figures(report)["fig-profile"]["layout"]["xaxis"]
    labels = [layer.label.raw for layer in report.layers]
    assert len(labels) == 53 > MAX_LAYER_TICKS
    assert axis["tickvals"] == list(range(0, 53, 2))
    assert axis["ticktext"] == labels[::2]
    assert axis["range"] == [-0.5, 52.5]
    assert "dtick" not in axis


def test_a_short_model_names_every_layer() -> None:
    report = resnet50_report()
    short = dataclasses.replace(report, layers=report.layers[:12])
    axis = figures(short)["fig-profile"]["layout"]["xaxis"]
    assert axis["tickvals"] == list(range(12)) and axis["ticktext"] == [layer.label.raw for layer in short.layers]
    assert min(axis["tickvals"]) >= 0 and axis["range"][0] > -1


@pytest.mark.parametrize(("count", "step"), [(1, 1), (40, 1), (41, 2), (80, 2), (81, 3), (500, 13)])
def test_ticks_thin_to_at_most_the_budget(count: int, step: int) -> None:
    axis = layer_axis([f"l{i}" for i in range(count)], "x")
    assert axis["tickvals"] == list(range(0, count, step)) and len(axis["tickvals"]) <= MAX_LAYER_TICKS
    assert axis["range"] == [-0.5, count - 0.5]


def test_a_long_name_is_cut_in_its_middle_and_every_name_is_escaped() -> None:
    axis = layer_axis(["encoder.stages.3.blocks.11.attention_norm", "<b>x</b>&"], "x")
    cut, escaped = axis["ticktext"]
    assert cut == "encoder.sta…tention_norm" and len(cut) == TICK_CHARS
    assert escaped == "&lt;b&gt;x&lt;/b&gt;&amp;"


def test_hostile_names_on_the_axes_are_escaped(hostile: HostileResults) -> None:
    for key, figure in profile_figures(hostile).items():
        for text in figure["layout"]["xaxis"]["ticktext"]:
            assert "<" not in text and ">" not in text, (key, text)


def test_legends_sit_below_the_modebar_band(hostile: HostileResults) -> None:
    for key, figure in profile_figures(hostile).items():
        layout = figure["layout"]
        legend = layout["legend"]
        assert (legend["yanchor"], legend["y"], legend["xanchor"]) == ("bottom", 1.02, "right"), key
        # The legend's top edge is the top margin less its own height: below the modebar's bottom edge.
        assert layout["margin"]["t"] == LEGEND_MARGIN >= MODEBAR_HEIGHT + LEGEND_HEIGHT + 12, key


def test_the_marked_layer_text_points_inwards(hostile: HostileResults) -> None:
    report = resnet50_report()
    first = next(i for i, layer in enumerate(report.layers) if layer.departure and layer.departure.departs)
    (mark,) = figures(report)["fig-profile"]["layout"]["annotations"]
    assert mark["x"] == first and mark["xanchor"] == ("left" if first < 53 / 2 else "right")


def _css(result: object) -> str:
    return "".join(re.findall(r"<style>(.*?)</style>", html_page(result), re.S))


def _rule(css: str, selector: str) -> str:
    found = re.search(rf"(?m)^{re.escape(selector)} {{([^}}]*)}}", css)
    assert found is not None, selector
    return found.group(1)


def test_the_diff_table_scrolls_inside_its_box_and_its_headings_wrap() -> None:
    report: Report = resnet50_report()
    diff = diff_reports(report, dataclasses.replace(report, layers=report.layers[:-1]))
    source = html_page(diff)
    assert re.search(r'<div class="table-scroll"><table class="sortable" id="layers-table">', source)
    css = _css(diff)
    box = _rule(css, ".table-scroll")
    assert "overflow: auto" in box and "max-width: 100%" in box
    # Eleven headings as long as "running var worst ratio" kept on one line each made the table wider
    # than the page; wrapped, it fits, and what does not still scrolls within the box.
    assert "white-space: normal" in _rule(css, "thead th")
