"""The reduction as a picture: a layer's input drawn as a grid, the values behind one statistic shaded.

Rows are the input's first dim (N), columns its second (C, or T / D for LayerNorm), and each
block stands for the remaining dims (H×W, L, D×H×W), drawn as a small grid. A value is shaded
when it feeds the same statistic as the first shaded one: along every reduced dim all values are,
along every kept dim only one index. GroupNorm reduces a group of C/G channels, not all of them:
its first group is shaded and every group boundary among the drawn channels is marked. Sizes come
from the recorded input shape and group count; the sentence beside the drawing is the report's own.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

MAX_ROWS, MAX_COLUMNS = 4, 8
BLOCK, GAP, MARGIN_LEFT, MARGIN_TOP = 26, 5, 34, 30
SHADED, PLAIN, EDGE = "#e8a33d", "#eef1f6", "#6b7280"
# GroupNorm's group in a report that predates the recorded group count: this many columns
# (the sentence beside the picture gives its true size).
UNKNOWN_GROUP_COLUMNS = 2
_SPATIAL_NAMES = {0: (), 1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}


@dataclass(frozen=True)
class Reduction:
    """What the drawing needs: the input shape, a name per dim, the reduced dims, the layer's family
    and, for GroupNorm, its number of groups (None where the report does not say)."""

    shape: tuple[int, ...]
    axis_names: tuple[str, ...]
    reduced_axes: tuple[int, ...]
    family: str
    num_groups: int | None = None

    @property
    def group_size(self) -> int:
        """Channels per GroupNorm group, C/G; a count from a report file that does not fit C is not trusted."""
        channels = self.shape[1] if len(self.shape) > 1 else 1
        if self.num_groups is None or not 1 <= self.num_groups <= channels or channels % self.num_groups:
            return UNKNOWN_GROUP_COLUMNS
        return channels // self.num_groups

    @property
    def grid(self) -> tuple[int, int, int]:
        """Rows, columns and block dims (the trailing ones) of the drawing."""
        rank = len(self.shape)
        if rank == 1:
            return -1, 0, 0
        return 0, 1, rank - 2


def _drawn(size: int, limit: int) -> tuple[int, bool]:
    """How many indices of a dim are drawn, and whether an ellipsis stands for the rest."""
    return (size, False) if size <= limit else (limit - 1, True)


def _is_shaded_index(reduction: Reduction, dim: int, index: int, chosen: int) -> bool:
    if reduction.family == "group" and dim == 1:
        return index < reduction.group_size
    return dim in reduction.reduced_axes or index == chosen


def _block_parts(reduction: Reduction) -> tuple[int, int, bool, bool]:
    """Sub-grid rows and columns of a block, and whether each sub-axis is wholly reduced."""
    trailing = list(range(2, len(reduction.shape)))
    if not trailing:
        return 1, 1, True, True
    if len(trailing) == 1:
        return 1, 4, True, trailing[0] in reduction.reduced_axes
    rows_reduced = all(d in reduction.reduced_axes for d in trailing[:-1])
    return 3, 3, rows_reduced, trailing[-1] in reduction.reduced_axes


def _block(prefix: str, sub_rows: int, sub_columns: int, shading: tuple[bool, bool] | None) -> str:
    """One block as an SVG group: its sub-grid, shaded whole, in one sub-cell, one row or one column."""
    cell_w, cell_h = BLOCK / sub_columns, BLOCK / sub_rows
    parts = [f'<rect width="{BLOCK}" height="{BLOCK}" fill="{PLAIN}"/>']
    if shading is not None:
        all_rows, all_columns = shading
        width = BLOCK if all_columns else cell_w
        height = BLOCK if all_rows else cell_h
        parts.append(f'<rect width="{width:g}" height="{height:g}" fill="{SHADED}"/>')
    lines = [f"M{cell_w * i:g} 0V{BLOCK}" for i in range(1, sub_columns)]
    lines += [f"M0 {cell_h * i:g}H{BLOCK}" for i in range(1, sub_rows)]
    if lines:
        parts.append(f'<path d="{"".join(lines)}" stroke="#ffffff" stroke-width="1"/>')
    parts.append(f'<rect width="{BLOCK}" height="{BLOCK}" fill="none" stroke="{EDGE}" stroke-width="0.6"/>')
    return f'<g id="{prefix}">{"".join(parts)}</g>'


def reduction_svg(reduction: Reduction, element_id: str) -> str:
    """The drawing as inline SVG (empty for an input without dims); ``element_id`` makes its ids unique."""
    shape, names = reduction.shape, reduction.axis_names
    if not shape or len(names) != len(shape):
        return ""
    row_dim, column_dim, _ = reduction.grid
    num_rows, rows_cut = _drawn(shape[row_dim], MAX_ROWS) if row_dim >= 0 else (1, False)
    num_columns, columns_cut = _drawn(shape[column_dim], MAX_COLUMNS)
    chosen_column = 1 if num_columns > 1 else 0
    sub_rows, sub_columns, rows_reduced, columns_reduced = _block_parts(reduction)
    on, off = f"{element_id}-on", f"{element_id}-off"
    blocks = []
    for row in range(num_rows):
        for column in range(num_columns):
            is_shaded = _is_shaded_index(reduction, column_dim, column, chosen_column) and (
                row_dim < 0 or _is_shaded_index(reduction, row_dim, row, 0)
            )
            x, y = MARGIN_LEFT + column * (BLOCK + GAP), MARGIN_TOP + row * (BLOCK + GAP)
            blocks.append(f'<use href="#{on if is_shaded else off}" x="{x}" y="{y}"/>')
    grid_w = num_columns * (BLOCK + GAP) + (18 if columns_cut else 0)
    grid_h = num_rows * (BLOCK + GAP) + (14 if rows_cut else 0)
    texts = _labels(reduction, num_columns, num_rows, (grid_w, grid_h), (columns_cut, rows_cut))
    texts += _group_edges(reduction, num_columns, num_rows)
    # The key below the grid is the widest line where the grid is narrow (11px text: ~6.2px a character).
    key_w = 14 + round(6.2 * len(_shaded_words(reduction)))
    width, height = MARGIN_LEFT + max(grid_w, key_w) + 8, MARGIN_TOP + grid_h + 40
    defs = _block(on, sub_rows, sub_columns, (rows_reduced, columns_reduced)) + _block(off, sub_rows, sub_columns, None)
    title = html.escape(f"input {'×'.join(str(s) for s in shape)}: the values behind one statistic, shaded")
    return (
        f'<svg class="reduction" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{title}"><title>{title}</title>'
        f"<defs>{defs}</defs>{''.join(blocks)}{texts}</svg>"
    )


def _labels(
    reduction: Reduction, num_columns: int, num_rows: int, size: tuple[int, int], cut: tuple[bool, bool]
) -> str:
    """Axis names with sizes along the top and the left, what a block holds below, ellipses where dims are cut."""
    shape, names = reduction.shape, reduction.axis_names
    row_dim, column_dim, _ = reduction.grid
    grid_w, grid_h = size
    texts = [_text(MARGIN_LEFT + grid_w / 2, MARGIN_TOP - 10, f"{names[column_dim]} = {shape[column_dim]:,}", "middle")]
    if row_dim >= 0:
        middle = MARGIN_TOP + grid_h / 2
        texts.append(
            f'<text x="14" y="{middle:g}" text-anchor="middle" transform="rotate(-90 14 {middle:g})">'
            f"{html.escape(f'{names[row_dim]} = {shape[row_dim]:,}')}</text>"
        )
    if cut[0]:
        texts.append(_text(MARGIN_LEFT + num_columns * (BLOCK + GAP) + 6, MARGIN_TOP + BLOCK / 2 + 4, "…", "start"))
    if cut[1]:
        texts.append(_text(MARGIN_LEFT + BLOCK / 2, MARGIN_TOP + num_rows * (BLOCK + GAP) + 8, "⋮", "middle"))
    trailing = range(2, len(shape))
    if trailing:
        block = f"each block: {'×'.join(names[d] for d in trailing)} = {'×'.join(str(shape[d]) for d in trailing)}"
        texts.append(_text(MARGIN_LEFT, MARGIN_TOP + grid_h + 14, block, "start"))
    texts.append(
        f'<rect x="{MARGIN_LEFT}" y="{MARGIN_TOP + grid_h + 24}" width="10" height="10" fill="{SHADED}"/>'
        + _text(MARGIN_LEFT + 14, MARGIN_TOP + grid_h + 33, _shaded_words(reduction), "start")
    )
    return "".join(texts)


def _group_edges(reduction: Reduction, num_columns: int, num_rows: int) -> str:
    """A dashed line between two drawn channels of different GroupNorm groups."""
    if reduction.family != "group" or reduction.num_groups is None:
        return ""
    size = reduction.group_size
    top, bottom = MARGIN_TOP - 4, MARGIN_TOP + num_rows * (BLOCK + GAP) - GAP + 4
    edges = [MARGIN_LEFT + column * (BLOCK + GAP) - GAP / 2 for column in range(size, num_columns, size)]
    return "".join(
        f'<path class="group-edge" d="M{x:g} {top}V{bottom}" stroke="{EDGE}" stroke-dasharray="3 2"/>' for x in edges
    )


def _shaded_words(reduction: Reduction) -> str:
    statistic = "root mean square" if reduction.family == "rms" else "mean and variance"
    if reduction.family == "group" and reduction.num_groups is not None:
        size = reduction.group_size
        return f"the values behind one {statistic}: a group of {size:,} channel{'s' if size != 1 else ''}"
    return f"the values behind one {statistic}"


def _text(x: float, y: float, words: str, anchor: str) -> str:
    return f'<text x="{x:g}" y="{y:g}" text-anchor="{anchor}">{html.escape(words)}</text>'


def family_reductions(shape: Sequence[int]) -> list[tuple[str, Reduction]]:
    """How each normalization family would reduce an (N, C, *spatial) input, for the page's key to the pictures."""
    rank = len(shape)
    spatial = tuple(range(2, rank))
    names = ("N", "C", *_SPATIAL_NAMES.get(rank - 2, tuple(f"S{d - 1}" for d in spatial)))
    every = (1, *spatial)
    return [
        (
            "BatchNorm: one per channel, over N and every spatial position",
            Reduction(tuple(shape), names, (0, *spatial), "batch"),
        ),
        (
            "InstanceNorm: one per sample and channel, over the spatial positions",
            Reduction(tuple(shape), names, spatial, "instance"),
        ),
        (
            "GroupNorm: one per sample and group of channels",
            Reduction(tuple(shape), names, every, "group", _two_channel_groups(shape[1])),
        ),
        ("LayerNorm over (C, …): one per sample, over all its values", Reduction(tuple(shape), names, every, "layer")),
        (
            "RMSNorm: as LayerNorm, a root mean square (no mean subtracted)",
            Reduction(tuple(shape), names, every, "rms"),
        ),
    ]


def _two_channel_groups(channels: int) -> int | None:
    """A group count that makes groups of two channels, for the key's GroupNorm picture (None for odd C)."""
    return channels // 2 if channels >= 2 and channels % 2 == 0 else None
