"""The surface registry holds: every surface the code has is listed, and every hazard that applies to one has a case.

The hostile tests declare what they cover with ``@pytest.mark.surface(NAME, HAZARD, ...)``; the
marks are read from the test modules themselves (not from a collection that ``-k`` could narrow),
so a new reader, writer, renderer or entry point cannot land without its hostile cases.
"""

from __future__ import annotations

import importlib
import sys
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest
from _pytest.mark.structures import Mark

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib  # type: ignore[import-not-found]

from bn_inspect.boundary.reading import Source
from bn_inspect.boundary.writing import Destination
from bn_inspect.output.formats import FORMATTERS
from tests.helpers import REPO, TESTS
from tests.surfaces import SURFACES, Hazard, Surface

BY_NAME: dict[str, Surface] = {surface.name: surface for surface in SURFACES}


def _marks_of(function: Any) -> Iterator[Mark]:
    """The marks on a test function, those on each of its ``pytest.param`` cases included."""
    for mark in getattr(function, "pytestmark", []):
        yield mark
        if mark.name == "parametrize":
            for case in mark.args[1]:
                yield from getattr(case, "marks", ())


def _surface_marks() -> list[tuple[str, tuple[str, ...], str]]:
    """(surface, hazards, where) for every ``surface`` mark of every test in tests/.

    The test modules are imported rather than collected, so that ``-k`` or a single file on the
    command line cannot narrow what the registry sees; marks built in code count as written ones.
    """
    marks = []
    for path in sorted(TESTS.glob("test_*.py")):
        if "mark.surface" not in path.read_text(encoding="utf-8"):
            continue
        module = importlib.import_module(f"tests.{path.stem}")
        for name, function in vars(module).items():
            if not (name.startswith("test_") and callable(function)):
                continue
            for mark in _marks_of(function):
                if mark.name == "surface":
                    where = f"{path.name}::{name}"
                    assert len(mark.args) >= 2, f"{where}: a surface mark takes a surface and its hazards"
                    marks.append((mark.args[0], tuple(mark.args[1:]), where))
    return marks


MARKS = _surface_marks()


def _spelled(member: str) -> str:
    return member.lower().replace("_", "-")


def test_every_mark_names_a_registered_surface_and_a_hazard_that_applies_to_it() -> None:
    for name, hazards, where in MARKS:
        assert name in BY_NAME, f"{where}: no surface {name!r} in tests/surfaces.py"
        for hazard in hazards:
            assert hazard in {h.value for h in Hazard}, f"{where}: no hazard {hazard!r}"
            assert Hazard(hazard) in BY_NAME[name].hazards, f"{where}: {hazard} is not listed for {name}"


@pytest.mark.parametrize("surface", SURFACES, ids=[surface.name for surface in SURFACES])
def test_every_hazard_of_every_surface_has_a_hostile_case(surface: Surface) -> None:
    covered: dict[Hazard, list[str]] = defaultdict(list)
    for name, hazards, where in MARKS:
        if name == surface.name:
            for hazard in hazards:
                covered[Hazard(hazard)].append(where)
    missing = sorted(hazard.value for hazard in surface.hazards if not covered[hazard])
    assert not missing, f"{surface.name} has no hostile test for: {', '.join(missing)}"


def test_every_reader_of_the_opener_is_a_surface() -> None:
    readers = {surface.name for surface in SURFACES if surface.kind == "reader"}
    assert readers == {f"read:{_spelled(source.name)}" for source in Source}


def test_every_writer_of_the_policy_is_a_surface() -> None:
    writers = {surface.name for surface in SURFACES if surface.kind == "writer"}
    assert writers == {f"write:{_spelled(destination.name)}" for destination in Destination}


def test_every_output_format_the_error_line_and_the_repr_is_a_surface() -> None:
    renderers = {surface.name for surface in SURFACES if surface.kind == "renderer"}
    assert renderers == {f"render:{name}" for name in FORMATTERS} | {"render:stderr", "render:repr"}


def test_every_way_to_start_bn_inspect_is_a_surface() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    expected = {f"entry:{script}" for script in project["scripts"]}
    if (REPO / ".pre-commit-hooks.yaml").is_file():
        expected.add("entry:pre-commit")
    if (REPO / "action.yml").is_file():
        expected.add("entry:github-action")
    if (REPO / "bn_inspect" / "testing.py").is_file():
        expected.add("entry:pytest-helper")
    assert {surface.name for surface in SURFACES if surface.kind == "entry point"} == expected
