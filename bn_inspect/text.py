"""Text from a model file or a path made safe to print: every invisible or controlling character shown as an escape; Untrusted, the type such text travels as."""

from __future__ import annotations


def inert(text: str) -> str:
    """``text`` with every character Python does not call printable written as its escape.

    That covers C0 and C1 controls and DEL (terminal escape sequences, BEL, NUL), line and tab
    characters, format characters such as the bidi overrides (U+202E) and zero-width spaces, lone
    surrogates (a file name that is not UTF-8, decoded with surrogateescape) and unassigned code
    points. They are shown as ``\\x1b``, ``\\n``, ``\\u202e``, ``\\udcff``: a name can then neither
    move the cursor, change the terminal, reorder the line nor make the output invalid UTF-8 or
    XML, and every other character, backslash included, stays exactly as it was.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def one_line(text: str) -> str:
    """``inert`` text with every run of whitespace, line breaks included, made one space.

    For error messages: they may quote a hostile file's bytes (entry names, parser errors), which
    must neither break the line nor reach the terminal.
    """
    return " ".join(inert(word) for word in text.split())


# Characters that start emphasis, code, links, HTML, table cells, strikethrough or math in GitHub's Markdown.
_MARKDOWN_SPECIAL = frozenset("\\`*_[]<>|&~$")


class Untrusted:
    """A string that came from a file or a report (a layer name, a path, a format, a message): never shown raw.

    It is not a ``str``, so handing one to anything that expects text (a rich ``Text``, a Markdown
    cell, an HTML template, ``+``) fails the type check rather than reaching a user. Each renderer
    asks for the form its format needs: ``inert()`` for a terminal, plain text and CSV, ``markdown()``,
    ``html()``; ``raw`` only where the format escapes by construction (JSON). Formatting one in an
    f-string gives the inert form.
    """

    __slots__ = ("raw",)

    def __init__(self, raw: str) -> None:
        self.raw = raw

    def inert(self) -> str:
        """For a terminal, plain text or CSV: every invisible or controlling character escaped."""
        return inert(self.raw)

    def markdown(self) -> str:
        """For Markdown (a table cell included): inert, and every character Markdown or HTML reads backslash-escaped."""
        return "".join("\\" + c if c in _MARKDOWN_SPECIAL else c for c in inert(self.raw))

    def html(self) -> str:
        """For HTML text and attribute values: inert, with ``& < > " '`` as entities."""
        from html import escape

        return escape(inert(self.raw), quote=True)

    def __str__(self) -> str:
        return self.inert()

    def __bool__(self) -> bool:
        # As a str: an empty name or version is false (``if old.torch_version and ...``).
        return bool(self.raw)

    def __format__(self, spec: str) -> str:
        return format(self.inert(), spec)

    def __repr__(self) -> str:
        return f"Untrusted({self.raw!r})"

    def __eq__(self, other: object) -> bool:
        # Equal to the str it holds, so that API code written as ``layer.name == "bn1"`` and dicts
        # keyed by names keep working; only showing one needs the type's methods.
        if isinstance(other, Untrusted):
            return other.raw == self.raw
        if isinstance(other, str):
            return other == self.raw
        return NotImplemented

    def __lt__(self, other: Untrusted) -> bool:
        return self.raw < other.raw

    def __hash__(self) -> int:
        return hash(self.raw)
