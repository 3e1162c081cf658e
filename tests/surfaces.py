"""The surface registry: every place untrusted input enters or output leaves, and the hostile classes that apply.

A surface is a reader (a ``Source`` of the opener), a writer (a ``Destination`` of the writer
policy), a renderer (an output format, and the error line on stderr) or an entry point (how a
person or a program starts bn-inspect). Hostile tests say which surface and which hazards they
cover with ``@pytest.mark.surface("read:diff-side", "hang", "memory")``; tests/test_surface_registry.py
fails when a surface lacks a case for a hazard that applies to it, when a mark names a surface or
a hazard that does not exist, and when the code has a surface this table does not list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

import pytest


class Hazard(str, Enum):
    """The classes of harm a hostile input may do."""

    EXECUTION = "execution"  # code runs that the user did not ask to run
    CLOBBER = "clobber"  # a file is replaced, or a message says something other than what happened
    HANG = "hang"  # the run blocks or runs on without end or sign
    MEMORY = "memory"  # a small input asks for a large allocation
    TRACEBACK = "traceback"  # a bad input ends in anything but one line and a documented exit code
    INERT = "inert"  # text from a file reaches the output able to act (escapes, markup, workflow commands)


@dataclass(frozen=True)
class Surface:
    """One surface: its name (``read:model``), what it is, and the hazards that apply to it."""

    name: str
    kind: str
    hazards: frozenset[Hazard]


def _surface(name: str, kind: str, *hazards: Hazard) -> Surface:
    return Surface(name, kind, frozenset(hazards))


H = Hazard
SURFACES: tuple[Surface, ...] = (
    # Readers: one per bn_inspect.boundary.reading.Source.
    _surface("read:model", "reader", H.EXECUTION, H.HANG, H.MEMORY, H.TRACEBACK),
    # A Hugging Face model folder's config.json: names the code that builds the model.
    _surface("read:model-config", "reader", H.EXECUTION, H.HANG, H.MEMORY, H.TRACEBACK),
    # A sharded folder's model.safetensors.index.json: names the shard files to read.
    _surface("read:model-index", "reader", H.HANG, H.MEMORY, H.TRACEBACK),
    _surface("read:input-file", "reader", H.EXECUTION, H.HANG, H.MEMORY, H.TRACEBACK),
    _surface("read:input-shard", "reader", H.HANG, H.MEMORY, H.TRACEBACK),
    _surface("read:image", "reader", H.EXECUTION, H.HANG, H.MEMORY, H.TRACEBACK),
    _surface("read:arch-code", "reader", H.EXECUTION, H.HANG, H.TRACEBACK),
    _surface("read:data-code", "reader", H.HANG, H.MEMORY, H.TRACEBACK),
    _surface("read:baseline", "reader", H.HANG, H.MEMORY, H.TRACEBACK),
    _surface("read:diff-side", "reader", H.HANG, H.MEMORY, H.TRACEBACK),
    _surface("read:merge-part", "reader", H.HANG, H.MEMORY, H.TRACEBACK),
    _surface("read:config", "reader", H.HANG, H.MEMORY, H.TRACEBACK),
    _surface("read:recalibration-record", "reader", H.HANG, H.MEMORY, H.TRACEBACK),
    _surface("read:timeline", "reader", H.HANG, H.MEMORY, H.TRACEBACK),
    _surface("read:onnx-external-data", "reader", H.HANG, H.MEMORY, H.TRACEBACK),
    # Writers: one per bn_inspect.boundary.writing.Destination.
    _surface("write:result", "writer", H.CLOBBER, H.HANG, H.TRACEBACK),
    _surface("write:page", "writer", H.CLOBBER, H.HANG, H.TRACEBACK),
    _surface("write:baseline", "writer", H.CLOBBER, H.HANG, H.TRACEBACK),
    _surface("write:model", "writer", H.CLOBBER, H.HANG, H.TRACEBACK),
    # The watch's timeline: created new and appended to while training runs (bn_inspect.watch).
    _surface("write:timeline", "writer", H.CLOBBER, H.HANG, H.TRACEBACK),
    # Inductor's cache folder for the compiled CPU kernel (bn_inspect.engine.fused.cpu): written to,
    # and the libraries built there are loaded into the process.
    _surface("cache:cpu-kernel", "cache", H.EXECUTION, H.CLOBBER, H.TRACEBACK),
    # Renderers: one per output format (bn_inspect.output.formats.FORMATTERS), the error line, the repr.
    _surface("render:table", "renderer", H.INERT),
    _surface("render:json", "renderer", H.INERT),
    _surface("render:csv", "renderer", H.INERT),
    _surface("render:markdown", "renderer", H.INERT),
    _surface("render:junit", "renderer", H.INERT),
    _surface("render:html", "renderer", H.INERT),
    _surface("render:stderr", "renderer", H.INERT),
    # The Python API's results at a prompt: their compact repr (output/plain.py).
    _surface("render:repr", "renderer", H.INERT),
    # Entry points: the console scripts of pyproject.toml, the pre-commit hook, the GitHub Action,
    # and the pytest helper.
    _surface("entry:bn-inspect", "entry point", H.EXECUTION, H.TRACEBACK, H.CLOBBER),
    _surface("entry:bn-inspect-each", "entry point", H.EXECUTION, H.TRACEBACK, H.CLOBBER),
    _surface("entry:pre-commit", "entry point", H.EXECUTION),
    _surface("entry:github-action", "entry point", H.EXECUTION),
    _surface("entry:pytest-helper", "entry point", H.TRACEBACK),
)


Test = TypeVar("Test", bound=Callable[..., object])
OUTPUT_FORMATS = ("table", "json", "csv", "markdown", "junit", "html")


def inert_in_every_format(test: Test) -> Test:
    """Mark a test that checks every output format for inert text: ``render:FORMAT`` ``inert`` for each."""
    for name in OUTPUT_FORMATS:
        test = pytest.mark.surface(f"render:{name}", H.INERT.value)(test)
    return test
