"""How a result shows itself in a notebook: through a renderer that a higher room registers.

Jupyter calls ``_repr_html_`` on the value of a cell. The page a result becomes is built in
bn_inspect/output/html/, which report/ must not import; so report/ keeps only this hook, and
bn_inspect/__init__.py registers the HTML renderer (bn_inspect/output/html/notebook.py) when the
package is imported. Without a renderer a result has no HTML form and the notebook shows its repr.
"""

from __future__ import annotations

from collections.abc import Callable

_renderers: list[Callable[[object], str]] = []


def register_html_renderer(renderer: Callable[[object], str]) -> None:
    """Make ``renderer`` (result -> HTML) the one notebooks use; registering again replaces it."""
    _renderers[:] = [renderer]


class NotebookDisplay:
    """A result that a notebook draws as its HTML page."""

    def _repr_html_(self) -> str | None:
        """The result's page for Jupyter, or None (show the repr) when no renderer is registered."""
        return _renderers[0](self) if _renderers else None
