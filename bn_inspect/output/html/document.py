"""The HTML document: one file with every script, style and datum inline, and a policy that forbids any request.

Each kind of result has a page builder (``PAGE_BUILDERS``, by result type) that turns it into a
``Page``: static, escaped HTML for what a reader sees first, plus JSON data (Plotly figures)
that the page's script draws. ``html_document`` wraps a page with the stylesheet, Plotly.js
and the page script.
"""

from __future__ import annotations

import base64
import gzip
import html
import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from bn_inspect.errors import OutputError
from bn_inspect.output.html.blocks import escaped
from bn_inspect.output.html.figures import CONFIG

# No request of any kind: scripts and styles come inline, images only as data: URLs.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
    "font-src 'none'; connect-src 'none'; form-action 'none'; base-uri 'none'"
)
# The type of the script element that holds Plotly.js packed: data to the browser, never run as such.
PACKED_TYPE = "application/gzip-base64"
# Characters that could end a <script> block or a JSON string read as JavaScript.
_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_SCRIPT_END = re.compile(r"</(script)", re.IGNORECASE)


@dataclass(frozen=True)
class Page:
    """One result as a page: title, escaped HTML sections, and the data its script draws.

    Attributes:
        kind: the result kind ("inspect", "check", "compare-modes", "recalibrate").
        title: the document title (plain text from the result, model paths included; made inert and
            escaped when written).
        body: the page's HTML, every value from the result already escaped.
        figures: Plotly figures by element id: ``{"data": [...], "layout": {...}}``; a layout may be
            the name of one in ``layouts``, which many figures share.
        needs_plotly: whether the page draws any figure (a page without one leaves Plotly.js out).
        layouts: Plotly layouts by name.
    """

    kind: str
    title: str
    body: str
    figures: dict[str, Any] = field(default_factory=dict)
    needs_plotly: bool = True
    layouts: dict[str, Any] = field(default_factory=dict)


PageBuilder = Callable[[Any, str], Page]


def script_json(value: Any) -> str:
    """``value`` as JSON that can sit inside a <script> element: no <, >, & or line separators as such."""
    text = json.dumps(value, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    return re.sub("[<>&\u2028\u2029]", lambda m: _JSON_ESCAPES[m.group(0)], text)


def html_document(page: Page) -> str:
    """The whole page as one HTML document."""
    # Plotly.js travels gzip-compressed (a third of its size); page.js unpacks and runs it.
    scripts = (
        [f'<script type="{PACKED_TYPE}" id="bn-plotly">{_packed_plotly_js()}</script>'] if page.needs_plotly else []
    )
    scripts.append(_inline_script(_asset("page.js")))
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="generator" content="bn-inspect">\n'
        f"<title>{escaped(page.title)}</title>\n"
        f"<style>\n{_asset('page.css')}</style>\n</head>\n"
        f'<body data-kind="{html.escape(page.kind)}">\n{page.body}\n'
        f'<script type="application/json" id="bn-data">{script_json({"figures": page.figures, "layouts": page.layouts, "config": CONFIG})}</script>\n'
        + "\n".join(scripts)
        + "\n</body>\n</html>\n"
    )


def _inline_script(source: str) -> str:
    # "</script" inside a script's text would end the element early; "<\/" means the same to JavaScript.
    return "<script>" + _SCRIPT_END.sub(r"<\\/\1", source) + "</script>"


def _asset(name: str) -> str:
    return resources.files("bn_inspect.output.html").joinpath(name).read_text(encoding="utf-8")


@cache
def _packed_plotly_js() -> str:
    """Plotly.js gzip-compressed and base64-encoded: 1.96 MB instead of 4.8 MB in every page.

    The page's script unpacks it with the browser's DecompressionStream and runs it as an inline
    script element, which the policy's script-src 'unsafe-inline' already allows: no eval, no blob:
    URL, no request. mtime=0 keeps the bytes, and so the page, the same from run to run.
    """
    packed = gzip.compress(_plotly_js().encode("utf-8"), compresslevel=9, mtime=0)
    return base64.b64encode(packed).decode("ascii")


@cache
def _plotly_js() -> str:
    """Plotly.js as the plotly package ships it; the Python package itself is never imported."""
    spec = importlib.util.find_spec("plotly")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        bundle = Path(folder) / "package_data" / "plotly.min.js"
        if bundle.is_file():
            return bundle.read_text(encoding="utf-8")
    raise OutputError(
        "--format html needs Plotly.js, which comes with the plotly package, and it is not installed",
        "Install it: python -m pip install 'plotly>=5.22'",
    )
