"""How a result shows itself in a notebook and a Python prompt: through renderers a higher room registers.

Jupyter calls ``_repr_html_`` on the value of a cell, a prompt calls ``__repr__``, and ``.table()``
asks for the text a terminal shows. The page a result becomes is built in bn_inspect/output/html/,
its text in bn_inspect/output/, which report/ must not import; so report/ keeps only these hooks,
and bn_inspect/__init__.py registers the renderers (bn_inspect/output/html/notebook.py,
bn_inspect/output/plain.py) when the package is imported. Without a renderer a result has no HTML
form and its repr names only its type.
"""

from __future__ import annotations

from collections.abc import Callable

from bn_inspect.errors import BnInspectError

_renderers: list[Callable[[object], str]] = []
_compact: list[Callable[[object], str]] = []
_tables: list[Callable[[object, int], str]] = []


def register_html_renderer(renderer: Callable[[object], str]) -> None:
    """Make ``renderer`` (result -> HTML) the one notebooks use; registering again replaces it."""
    _renderers[:] = [renderer]


def register_text_renderers(compact: Callable[[object], str], table: Callable[[object, int], str]) -> None:
    """Make ``compact`` (result -> a repr of a few lines) and ``table`` ((result, width) -> the terminal's
    text) the ones results use; registering again replaces them."""
    _compact[:] = [compact]
    _tables[:] = [table]


class NotebookDisplay:
    """A result that a notebook draws as its HTML page and a prompt shows as a few lines."""

    def _repr_html_(self) -> str | None:
        """The result's page for Jupyter, or None (show the repr) when no renderer is registered."""
        return _renderers[0](self) if _renderers else None

    def __repr__(self) -> str:
        """The verdict and the worst layers in a few lines (under 2 KB whatever the model's size)."""
        return _compact[0](self) if _compact else f"<{type(self).__name__}>"

    def table(self, width: int = 120) -> str:
        """The result as the terminal shows it (``bn-inspect ... --format table``), laid out for ``width`` columns.

        Raises:
            BnInspectError: no text renderer is registered (bn_inspect itself was not imported).
        """
        if not _tables:
            raise BnInspectError("no text renderer is registered", "Import bn_inspect before calling .table()")
        return _tables[0](self, width)
