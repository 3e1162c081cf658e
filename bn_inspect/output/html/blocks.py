"""Pieces every page is made of: escaped text, numbers, fact lists and the sortable, filterable layer table.

Everything from a result is user data (layer names, paths): ``escaped`` makes it inert (control
characters shown as escapes) and HTML-escaped, so it renders as the text it is.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

from bn_inspect.output.words import counted
from bn_inspect.text import Untrusted, inert


def escaped(value: object) -> str:
    """``value`` as HTML text: control characters as visible escapes, markup characters as entities."""
    return html.escape(inert(str(value)), quote=True)


def number(value: float | int | None, digits: int = 4) -> str:
    """A number for people: ``—`` for none, ``nan``/``inf`` as such, else ``digits`` significant digits."""
    if value is None:
        return "—"
    if isinstance(value, int):
        return f"{value:,}"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}g}"


def shape_text(shape: Sequence[int] | None) -> str:
    """``8×64×56×56``, or ``—``."""
    return "×".join(str(s) for s in shape) if shape else "—"


def facts(rows: Sequence[tuple[str, str]]) -> str:
    """A definition list of (label, already-escaped HTML value) pairs."""
    items = "".join(f"<dt>{html.escape(label)}</dt><dd>{value}</dd>" for label, value in rows)
    return f'<dl class="facts">{items}</dl>'


def section(title: str, body: str, section_id: str = "") -> str:
    """A titled section of the page."""
    anchor = f' id="{html.escape(section_id)}"' if section_id else ""
    return f"<section{anchor}><h2>{html.escape(title)}</h2>\n{body}\n</section>"


@dataclass(frozen=True)
class Column:
    """A table column: its heading, whether it sorts as numbers, and a tooltip."""

    title: str
    is_numeric: bool = False
    hint: str = ""


@dataclass(frozen=True)
class Cell:
    """A table cell: its escaped HTML, the value it sorts by, and a page anchor it links to."""

    content: str
    sort_key: float | str | Untrusted | None = None
    target: str = ""


@dataclass(frozen=True)
class Row:
    """A table row of one layer: the name and label a glob filter matches, and its cells."""

    name: Untrusted
    label: Untrusted
    cells: tuple[Cell, ...]
    css_class: str = ""
    element_id: str = ""


def sort_value(value: float | str | Untrusted | None) -> str:
    """A cell's sort key as the page script reads it: numbers as text, none and NaN as empty (sorted last)."""
    if isinstance(value, Untrusted):
        return value.inert()
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and math.isinf(value):
        return "1e999" if value > 0 else "-1e999"
    return str(value)


def layer_table(table_id: str, columns: Sequence[Column], rows: Sequence[Row], noun: str = "layers") -> str:
    """A table the page script sorts (click a heading) and filters (a layer-name glob)."""
    heads = "".join(
        f'<th scope="col" data-numeric="{int(column.is_numeric)}" aria-sort="none"'
        + (f' title="{html.escape(column.hint)}"' if column.hint else "")
        + f'><button type="button">{html.escape(column.title)}</button></th>'
        for column in columns
    )
    body = "\n".join(_row(row) for row in rows)
    tools = (
        f'<div class="table-tools"><label>Filter {html.escape(noun)} '
        f'<input type="search" class="layer-filter" data-table="{table_id}" placeholder="glob, e.g. layer1.*" '
        f'spellcheck="false" autocomplete="off"></label> <span class="filter-count" data-table="{table_id}">'
        f"{html.escape(counted(len(rows), noun.removesuffix('s')))}</span></div>"
    )
    return (
        f'{tools}\n<div class="table-scroll"><table class="sortable" id="{table_id}">'
        f"<thead><tr>{heads}</tr></thead>\n<tbody>\n{body}\n</tbody></table></div>"
    )


def _row(row: Row) -> str:
    cells = []
    for cell in row.cells:
        content = f'<a class="jump" href="#{cell.target}">{cell.content}</a>' if cell.target else cell.content
        cells.append(f'<td data-sort="{escaped(sort_value(cell.sort_key))}">{content}</td>')
    css = f' class="{row.css_class}"' if row.css_class else ""
    css += f' id="{html.escape(row.element_id)}"' if row.element_id else ""
    return f'<tr{css} data-name="{escaped(row.name)}" data-label="{escaped(row.label)}">' + "".join(cells) + "</tr>"
