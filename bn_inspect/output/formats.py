"""Results -> text: one formatter class per format, chosen by name (the --format spelling) from a registry.

A formatter sees only the result records, never the model. Neither rich nor pandas is imported
until a format that needs it is written.
"""

from __future__ import annotations

import dataclasses
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from bn_inspect.boundary.writing import Destination, write_output
from bn_inspect.errors import OutputError
from bn_inspect.options import Explain
from bn_inspect.report.comparisons import ModeComparison, RecalibrationResult
from bn_inspect.report.diff import DiffReport
from bn_inspect.report.findings import CheckReport
from bn_inspect.report.records import LayerListing, Report
from bn_inspect.report.timeline import Timeline

if TYPE_CHECKING:
    from rich.console import RenderableType

Result = Report | CheckReport | LayerListing | ModeComparison | RecalibrationResult | DiffReport | Timeline

# Columns of a report written to a file: wide enough that no table is squeezed.
FILE_WIDTH = 160


@dataclass(frozen=True)
class Rendering:
    """What a formatter needs besides the result.

    Attributes:
        channel_patterns: --layer globs: layers that get a per-channel table.
        width: columns available to a table.
        model_output: for recalibrate, where the new model was written.
        explain: inspect's table: one explanation per pattern of layers, or one per layer call.
    """

    channel_patterns: tuple[str, ...] = ()
    width: int = FILE_WIDTH
    model_output: str = ""
    explain: Explain = Explain.GROUPED


class Formatter:
    """Turns every kind of result into the text of one format."""

    name: ClassVar[str]

    def text(self, result: Result, rendering: Rendering) -> str:
        """The whole output as text."""
        raise NotImplementedError


class JsonFormatter(Formatter):
    """JSON documents with a schema_version, for machines."""

    name = "json"

    def text(self, result: Result, rendering: Rendering) -> str:
        from bn_inspect.output.export import check_to_json, dataclass_to_json, diff_to_json, listing_to_json, to_json

        if isinstance(result, DiffReport):
            return diff_to_json(result)
        if isinstance(result, Timeline):
            from bn_inspect.output.timeline_export import timeline_to_json

            return timeline_to_json(result)
        if isinstance(result, Report):
            return to_json(result)
        if isinstance(result, CheckReport):
            return check_to_json(result)
        if isinstance(result, LayerListing):
            return listing_to_json(result)
        return dataclass_to_json(result, "compare-modes" if isinstance(result, ModeComparison) else "recalibrate")


class CsvFormatter(Formatter):
    """One row per layer call and channel (inspect reports only)."""

    name = "csv"

    def text(self, result: Result, rendering: Rendering) -> str:
        from bn_inspect.output.export import to_csv

        if not isinstance(result, Report):
            raise TypeError(f"CSV holds inspection reports, not {type(result).__name__}")
        return to_csv(result)


class MarkdownFormatter(Formatter):
    """GitHub-flavoured Markdown, for job summaries and pull-request comments."""

    name = "markdown"

    def text(self, result: Result, rendering: Rendering) -> str:
        from bn_inspect.output import export

        if isinstance(result, Report):
            return export.to_markdown(result, rendering.channel_patterns)
        if isinstance(result, CheckReport):
            return export.check_to_markdown(result)
        if isinstance(result, LayerListing):
            return export.listing_to_markdown(result)
        if isinstance(result, ModeComparison):
            return export.comparison_to_markdown(result)
        if isinstance(result, DiffReport):
            return export.diff_to_markdown(result)
        if isinstance(result, Timeline):
            from bn_inspect.output.timeline_export import timeline_to_markdown

            return timeline_to_markdown(result)
        return export.recalibration_to_markdown(result, rendering.model_output)


class JunitFormatter(Formatter):
    """JUnit XML, one test case per finding (check reports only), for CI test views."""

    name = "junit"

    def text(self, result: Result, rendering: Rendering) -> str:
        from bn_inspect.output.export import check_to_junit

        if not isinstance(result, CheckReport):
            raise TypeError(f"JUnit holds check reports, not {type(result).__name__}")
        return check_to_junit(result)


class TableFormatter(Formatter):
    """rich tables for people: coloured on a terminal, plain text in a file."""

    name = "table"

    def renderable(self, result: Result, rendering: Rendering) -> RenderableType:
        """The result as a rich renderable."""
        from bn_inspect.output import render, render_runs

        width = rendering.width
        if isinstance(result, DiffReport):
            from bn_inspect.output.render_diff import render_diff

            return render_diff(result, width)
        if isinstance(result, Timeline):
            from bn_inspect.output.render_timeline import render_timeline

            return render_timeline(result, width)
        if isinstance(result, Report):
            return render.render_report(result, rendering.channel_patterns, width, rendering.explain)
        if isinstance(result, CheckReport):
            return render.render_check(result, width)
        if isinstance(result, LayerListing):
            return render_runs.render_listing(result, width)
        if isinstance(result, ModeComparison):
            return render_runs.render_mode_comparison(result, width)
        return render_runs.render_recalibration(result, rendering.model_output, width)

    def text(self, result: Result, rendering: Rendering) -> str:
        """Plain text laid out for ``rendering.width`` columns, without trailing spaces."""
        from rich.console import Console

        console = Console(record=True, width=rendering.width, no_color=True, highlight=False, file=io.StringIO())
        # crop=False: a name wider than the whole width stays whole on its own line.
        console.print(self.renderable(result, rendering), crop=False)
        return "".join(line.rstrip() + "\n" for line in console.export_text().splitlines())

    def print(self, result: Result, rendering: Rendering) -> None:
        """Print to stdout: on a terminal as wide as it is and in colour, else as text for a file.

        A pipe or a CI log has no width, and rich then assumes 80 columns, which squeezes every
        table; the file layout (FILE_WIDTH) keeps one line per row instead. A COLUMNS variable
        is a width someone chose, so it is kept, pipe or not.
        """
        from rich.console import Console

        console = Console(highlight=False)
        if not console.is_terminal:
            width = console.width if "COLUMNS" in os.environ else FILE_WIDTH
            sys.stdout.write(self.text(result, dataclasses.replace(rendering, width=width)))
            return
        console.print(self.renderable(result, dataclasses.replace(rendering, width=console.width)), crop=False)


class HtmlFormatter(Formatter):
    """One self-contained HTML page (inspect, check, compare-modes, recalibrate, diff, timeline), Plotly.js inline."""

    name = "html"

    def text(self, result: Result, rendering: Rendering) -> str:
        from bn_inspect.output.html.pages import html_page

        return html_page(result, rendering.model_output)


FORMATTERS: dict[str, Formatter] = {
    formatter.name: formatter
    for formatter in (
        TableFormatter(),
        JsonFormatter(),
        CsvFormatter(),
        MarkdownFormatter(),
        JunitFormatter(),
        HtmlFormatter(),
    )
}


def check_destination(format_name: str, output: Path | None) -> None:
    """Refuse, before the run, to write a whole HTML page onto a terminal; a file or a pipe takes it.

    Raises:
        OutputError: ``--format html`` with stdout a terminal and no ``--output`` file.
    """
    if format_name == HtmlFormatter.name and (output is None or str(output) == "-") and sys.stdout.isatty():
        raise OutputError(
            "--format html writes a whole web page (megabytes of script), not text for a terminal",
            "Give --output report.html, or redirect stdout to a file",
        )


def write_result(
    result: Result,
    format_name: str,
    output: Path | None,
    rendering: Rendering = Rendering(),
    *,
    page: Path | None = None,
    force: bool = False,
) -> None:
    """Write ``result`` in the named format to ``output``, or to stdout for None or ``-``.

    A file goes through the writer policy (``bn_inspect.boundary.writing``): written whole at the
    run's commit, never over a file the run reads, nor over an existing one unless ``force``. With
    ``page`` (--report), the result is also written there as one HTML page, from the same run: CI
    gets Markdown for its job summary and the page as an artifact at once.
    """
    write_one(result, format_name, output, rendering, Destination.RESULT, force=force)
    if page is not None:
        write_one(result, HtmlFormatter.name, page, rendering, Destination.PAGE, force=force)


def write_one(
    result: Result,
    format_name: str,
    output: Path | None,
    rendering: Rendering,
    destination: Destination,
    *,
    force: bool = False,
) -> None:
    """Write ``result`` in the named format to ``output`` as ``destination``, or to stdout for None or ``-``."""
    formatter = FORMATTERS[format_name]
    check_destination(format_name, output)
    if output is not None and str(output) != "-":
        write_output(output, formatter.text(result, rendering), destination, force=force)
    elif isinstance(formatter, TableFormatter):
        formatter.print(result, rendering)
    else:
        sys.stdout.write(formatter.text(result, rendering))
