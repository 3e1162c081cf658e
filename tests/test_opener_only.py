"""No file is read around the boundary: outside bn_inspect/boundary/, the calls that open or load a
file take what the one opener opened (its stream, its /proc path, its bytes), never a path.

This is a check of the source, so that a new reader that calls ``np.load(path)`` or
``path.read_bytes()`` fails here before a hostile file finds it.
"""

from __future__ import annotations

import ast

import pytest

from tests.helpers import REPO

PACKAGE = REPO / "bn_inspect"

# Calls that open or load a file when handed a path.
LOADERS = {
    "open",
    "io.open",
    "os.open",
    "np.load",
    "torch.load",
    "torch.jit.load",
    "torch.export.load",
    "zipfile.ZipFile",
    "pd.read_csv",
    "pd.read_parquet",
    "Image.open",
    "load_file",
    "safe_open",
    "tomllib.load",
    "json.load",
    "runpy.run_path",
}
# What a loader may be handed: the opener's descriptor as a path or a stream, bytes it read, a
# stream made from either, or an in-memory archive being written.
OPENED = {
    "opened.library_path()",
    "opened.stream()",
    "stream",
    "whole",
    "archive",
    "copy",
}
# Methods that read a file through a path object; only an OpenedInput (``opened``), a zip member of
# an archive the opener opened, and the package's own resources may call them.
PATH_READS = {"read_bytes", "read_text", "open"}
PATH_READERS = {"opened", "archive", "watch"}


def _calls() -> list[tuple[str, ast.Call]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "boundary":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                found.append((f"{path.relative_to(REPO)}:{node.lineno}", node))
    return found


CALLS = _calls()


def test_every_loader_is_handed_what_the_opener_opened() -> None:
    for where, call in CALLS:
        name = ast.unparse(call.func)
        if name not in LOADERS:
            continue
        first = ast.unparse(call.args[0]) if call.args else ""
        in_memory = first.startswith("io.BytesIO(")
        assert first in OPENED or in_memory or _is_system_file(call), (
            f"{where}: {ast.unparse(call)} reads a file around the opener"
        )


def _is_system_file(call: ast.Call) -> bool:
    """``open("/proc/...")``: the kernel's own files (memory available, limits), named by a constant."""
    first = call.args[0] if call.args else None
    return isinstance(first, ast.Constant) and str(first.value).startswith(("/proc/", "/sys/"))


def test_no_path_is_read_directly() -> None:
    for where, call in CALLS:
        if not (isinstance(call.func, ast.Attribute) and call.func.attr in PATH_READS):
            continue
        owner = ast.unparse(call.func.value)
        if owner in PATH_READERS or owner.startswith(("resources.files(", "bundle", "Image")):
            continue
        pytest.fail(f"{where}: {ast.unparse(call)} reads a file around the opener")


def test_the_check_sees_the_loaders_it_guards() -> None:
    # A rename of the modules (say, numpy imported as numpy) would make the checks above pass vacuously.
    names = {ast.unparse(call.func) for _, call in CALLS}
    assert {"torch.load", "zipfile.ZipFile", "Image.open", "pd.read_csv", "np.load"} <= names
