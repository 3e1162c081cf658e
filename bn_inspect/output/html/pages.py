"""Which page each kind of result gets: one builder per result type, and the document of a result.

A new kind of result adds its builder to ``PAGE_BUILDERS``; nothing else changes.
"""

from __future__ import annotations

from typing import Any

from bn_inspect.output.html.diff_page import diff_page
from bn_inspect.output.html.document import Page, PageBuilder, html_document
from bn_inspect.output.html.inspect_page import inspect_page
from bn_inspect.output.html.run_pages import check_page, comparison_page, recalibration_page
from bn_inspect.output.html.timeline_page import timeline_page
from bn_inspect.report.comparisons import ModeComparison, RecalibrationResult
from bn_inspect.report.diff import DiffReport
from bn_inspect.report.findings import CheckReport
from bn_inspect.report.records import Report
from bn_inspect.report.timeline import Timeline

PAGE_BUILDERS: dict[type, PageBuilder] = {
    Report: inspect_page,
    CheckReport: check_page,
    ModeComparison: comparison_page,
    RecalibrationResult: recalibration_page,
    DiffReport: diff_page,
    Timeline: timeline_page,
}


def result_page(result: Any, model_output: str = "") -> Page:
    """The page of ``result``; ``model_output`` is where recalibrate wrote the new model.

    Raises:
        TypeError: no page is made for this kind of result.
    """
    builder = PAGE_BUILDERS.get(type(result))
    if builder is None:
        raise TypeError(
            f"HTML holds inspect, check, compare-modes, recalibrate, diff and timeline results, not {type(result).__name__}"
        )
    return builder(result, model_output)


def html_page(result: Any, model_output: str = "") -> str:
    """The whole self-contained HTML document of ``result``."""
    return html_document(result_page(result, model_output))
