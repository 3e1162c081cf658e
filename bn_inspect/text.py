"""Text from a model file or a path made safe to print: every invisible or controlling character shown as an escape."""

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
