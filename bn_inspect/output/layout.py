"""Tables that never split or cut a name, a number or a flag: the widest layout that fits, else blocks.

rich shrinks a table that is wider than the console by folding or cropping its cells, which cuts
names (``featur``/``es.1``) and numbers (``1.00e-0``/``5``). Here each column is at least as wide
as its widest unbreakable token, so rich never has to; when even the narrowest layout does not
fit, every row becomes a block of ``header: value`` lines under its name.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence
from dataclasses import dataclass

from rich import box
from rich.cells import cell_len
from rich.console import Console, Group, JustifyMethod, RenderableType
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

# Wide enough to measure any table without clamping it.
_UNBOUNDED = 100_000


@dataclass(frozen=True)
class Column:
    """One column of a layout.

    Attributes:
        header: the heading, one or more lines.
        justify: alignment of its cells.
        wraps: whether its cells may wrap between words (never inside one); otherwise each line
            of a cell stays on one line.
        ratio: share of the spare width this column takes (prose columns).
    """

    header: str
    justify: JustifyMethod = "left"
    wraps: bool = False
    ratio: int | None = None


@dataclass(frozen=True)
class Layout:
    """Columns and one row of cells per record; the first cell names the record."""

    columns: tuple[Column, ...]
    rows: tuple[tuple[Text, ...], ...]


def _narrowest(column: Column, cells: Sequence[Text]) -> int:
    """The fewest columns that show every cell without breaking a word (or a line, if it does not wrap)."""
    pieces = [part for cell in [Text(column.header), *cells] for part in cell.plain.splitlines()]
    if column.wraps:
        pieces = [word for piece in pieces for word in piece.split()]
    return max((cell_len(piece) for piece in pieces), default=1)


def as_table(layout: Layout) -> Table:
    """The layout as a rich table whose columns never shrink below their widest token."""
    table = Table(header_style="bold", show_edge=False, pad_edge=False, box=box.SIMPLE_HEAD)
    for index, column in enumerate(layout.columns):
        table.add_column(
            Text(column.header),  # a Text, so that ``[min, max]`` is not read as markup
            justify=column.justify,
            no_wrap=not column.wraps,
            min_width=_narrowest(column, [row[index] for row in layout.rows]),
            ratio=column.ratio,
        )
    for row in layout.rows:
        table.add_row(*row)
    return table


def _measure(table: Table) -> Measurement:
    """The fewest and the most console columns ``table`` takes."""
    console = Console(width=_UNBOUNDED, file=io.StringIO())
    return Measurement.get(console, console.options, table)


def minimum_width(table: Table) -> int:
    """The fewest console columns ``table`` needs."""
    return _measure(table).minimum


def _share_spare_width(table: Table, layout: Layout, spare: int) -> None:
    """Give the columns that wrap fixed widths, each its narrowest plus what spare width is left.

    rich narrows a table that is too wide by shrinking its wrapping columns evenly, below their
    minimum if need be, and then grows them back past the console's width or cuts a cell.
    """
    for index, column in enumerate(layout.columns):
        if not column.wraps:
            continue
        cells = [row[index] for row in layout.rows]
        narrowest = _narrowest(column, cells)
        widest = _narrowest(dataclasses.replace(column, wraps=False), cells)
        extra = min(spare, widest - narrowest)
        table.columns[index].width = narrowest + extra
        spare -= extra


def as_blocks(layout: Layout) -> Group:
    """One block per row: its first cell, line by line, never cut even when wider than the
    console, then one indented ``header: value`` line per other column."""
    parts: list[RenderableType] = []
    for row in layout.rows:
        for line in row[0].split("\n"):
            line.no_wrap, line.overflow = True, "ignore"
            parts.append(line)
        for column, cell in zip(layout.columns[1:], row[1:], strict=True):
            if not cell.plain.strip():
                continue
            entry = Text("  " + " ".join(column.header.split()) + ": ", style="bold")
            entry.append_text(Text(" / ").join(part for part in cell.split("\n") if part.plain.strip()))
            parts.append(entry)
    return Group(*parts)


def fitted(layouts: Sequence[Layout], width: int) -> RenderableType:
    """The first of ``layouts`` (widest first) whose table fits in ``width`` columns, else the last as blocks."""
    for layout in layouts:
        table = as_table(layout)
        measured = _measure(table)
        if measured.minimum <= width:
            if measured.maximum > width:
                _share_spare_width(table, layout, width - measured.minimum)
            return table
    return as_blocks(layouts[-1])
