"""Results drawn inline in Jupyter: the page in a sandboxed iframe, registered as report/display.py's renderer.

The page goes into the iframe's ``srcdoc`` rather than into the notebook's own document: its ids,
styles and scripts then cannot clash with the notebook's or with another output's, and its
Content-Security-Policy applies. Each output carries its own copy of Plotly.js (packed, about 2 MB).
"""

from __future__ import annotations

import html

from bn_inspect.report.display import register_html_renderer

FRAME_HEIGHT = 820


def notebook_html(result: object) -> str:
    """``result``'s page in an iframe, as a notebook cell shows it."""
    from bn_inspect.output.html.pages import html_page

    page = html_page(result)
    return (
        f'<iframe class="bn-inspect" srcdoc="{html.escape(page, quote=True)}" sandbox="allow-scripts" '
        f'style="width: 100%; height: {FRAME_HEIGHT}px; border: 1px solid #d9dde5; border-radius: 4px;" '
        'title="bn-inspect report"></iframe>'
    )


def register() -> None:
    """Let results draw themselves in notebooks."""
    register_html_renderer(notebook_html)
