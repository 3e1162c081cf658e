"""--arch and --arch-kwargs: import the user's model code (installed packages first) and build the module."""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bn_inspect.boundary.reading import Source, current_manifest, open_checked
from bn_inspect.errors import ArchError, BnInspectError

if TYPE_CHECKING:
    from torch import nn


@contextmanager
def cwd_importable() -> Iterator[None]:
    """For the block, the current directory is importable, searched after installed packages."""
    # Let code in the current directory be found, but only for this load, and only after installed
    # packages: a folder named like one (a cloned torchvision/, a PR checkout in CI) must not shadow it.
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def parse_arch_kwargs(text: str | None) -> dict[str, Any]:
    """The --arch-kwargs JSON object as a dict."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ArchError(
            f"--arch-kwargs is not valid JSON ({error.msg} at character {error.pos})",
            """Give a JSON object, e.g. --arch-kwargs '{"num_classes": 10}'""",
        ) from error
    except RecursionError:
        raise ArchError(
            "--arch-kwargs is nested too deeply to read",
            """Give a flat JSON object, e.g. --arch-kwargs '{"num_classes": 10}'""",
        ) from None
    if not isinstance(value, dict):
        raise ArchError(
            f"--arch-kwargs must be a JSON object, not {type(value).__name__}",
            """Give a JSON object, e.g. --arch-kwargs '{"num_classes": 10}'""",
        )
    return value


def resolve_arch(spec: str) -> Callable[..., Any]:
    """The callable named by ``package.module:callable`` or ``path/to/file.py:callable``.

    This imports code the user named, which runs it: that is what --arch is for.
    """
    return resolve_callable(spec, "--arch")


def resolve_callable(spec: str, flag: str) -> Callable[..., Any]:
    """The callable named by ``spec`` for option ``flag`` (--arch, --data), imported as resolve_arch does.

    Raises:
        ArchError: naming ``flag``: no ':' in the spec, a module or file that cannot be imported,
            no such attribute, or an attribute that is not callable.
    """
    target, sep, attribute = spec.rpartition(":")
    if not sep or not target or not attribute:
        raise ArchError(
            f"{flag} {spec!r} has no ':' between module and callable",
            f"Write {flag} package.module:callable or {flag} path/to/file.py:callable",
        )
    module = _import_arch_module(target, spec, flag)
    obj: Any = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            raise ArchError(
                f"{flag} {spec!r}: {target} has no attribute {attribute!r}",
                f"Callables there: {', '.join(public[:12]) or 'none'}",
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ArchError(
            f"{flag} {spec!r} names an object of type {type(obj).__name__}, not a callable", "Name a class or function"
        )
    return obj  # type: ignore[no-any-return]


# A model or dataset definition is a few thousand lines; a "source" of many megabytes is not code
# someone wrote, and is refused before it is read.
CODE_BUDGET = 16 * 2**20
_SOURCES = {"--arch": Source.ARCH_CODE, "--data": Source.DATA_CODE}
_FILE_LOADERS = (
    importlib.machinery.SourceFileLoader,
    importlib.machinery.SourcelessFileLoader,
    importlib.machinery.ExtensionFileLoader,
)


def is_file_spec(target: str) -> bool:
    """Whether the part before ':' names a file (``path/to/file.py``) rather than a module."""
    return target.endswith(".py") or "/" in target or os.sep in target


def _import_arch_module(target: str, spec: str, flag: str) -> Any:
    if is_file_spec(target):
        return _import_file(Path(target), spec, flag)
    try:
        locate_module(target, flag)
        with cwd_importable():
            module = importlib.import_module(target)
    except ModuleNotFoundError as error:
        raise ArchError(
            f"{flag} {spec!r}: module {error.name or target!r} cannot be imported",
            "Install it, run from its project folder, or give a file path (path/to/file.py:callable)",
        ) from error
    except BnInspectError:
        raise
    except Exception as error:
        raise ArchError(
            f"{flag} {spec!r}: importing {target} raised {type(error).__name__}: {error}",
            "Fix the module or name another",
        ) from error
    origin = getattr(module, "__file__", None)
    if origin:
        # Where a package placed its module at import time (a __path__ changed on import).
        current_manifest().declare(Path(origin), _SOURCES.get(flag, Source.ARCH_CODE))
    return module


def _import_file(path: Path, spec: str, flag: str) -> Any:
    """The module of ``path/to/file.py``, its source read once through the opener and run from those bytes."""
    target = str(path)
    with_suffix = path.with_name(path.name + ".py")
    if not target.endswith(".py") and not path.exists() and with_suffix.is_file():
        raise ArchError(
            f"{flag} {spec!r}: file {target} does not exist",
            f"Did you mean {flag} {with_suffix}:{spec.rpartition(':')[2]}?",
        )
    with open_checked(
        path,
        _SOURCES.get(flag, Source.ARCH_CODE),
        noun=f"{flag} {spec!r}: file",
        error=ArchError,
        max_bytes=CODE_BUDGET,
        fix="Name a Python file",
    ) as opened:
        source = opened.read_bytes()
    name = f"bn_inspect_{flag.strip('-')}_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None:
        raise ArchError(f"{flag} {spec!r}: cannot import {target}", "Name a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        # Compiled from the bytes that were checked: the import system would open the path again.
        code = compile(source, target, "exec", dont_inherit=True)
        with cwd_importable():
            exec(code, module.__dict__)
    except Exception as error:
        sys.modules.pop(name, None)
        raise ArchError(
            f"{flag} {spec!r}: importing {target} raised {type(error).__name__}: {error}",
            "Fix the file or name another",
        ) from error
    return module


def declare_source(spec: str, flag: str) -> None:
    """Record the file that ``spec`` (``path/to/file.py:callable`` or ``package.module:callable``)
    names in the run's manifest, without importing anything: a run that is given code but ends up
    not running it (a whole-model file next to --arch) still never writes over it.

    Raises:
        ArchError: the module's file is not a regular file.
    """
    target = spec.rpartition(":")[0]
    if not target:
        return  # resolving it says what is wrong with it
    if is_file_spec(target):
        current_manifest().declare(Path(target), _SOURCES.get(flag, Source.ARCH_CODE))
    else:
        locate_module(target, flag)


def locate_module(target: str, flag: str) -> Path | None:
    """The file module ``target`` would be imported from, found without importing anything, opened
    through the opener (so a named pipe or a device is refused before the import blocks on it) and
    recorded in the run's manifest; None when it has no file or cannot be found.

    ``importlib.util.find_spec("a.b")`` imports package ``a`` to read its ``__path__``, which runs
    its code; so only the top-level name goes to ``find_spec``, and each further part is looked
    up in its parent's search locations by the path finder, which imports nothing.

    Raises:
        ArchError: the module's file is not a regular file.
    """
    parts = target.split(".")
    try:
        with cwd_importable():
            found = importlib.util.find_spec(parts[0])
        for index in range(1, len(parts)):
            locations = None if found is None else found.submodule_search_locations
            if locations is None:
                return None
            found = _child_spec(".".join(parts[: index + 1]), list(locations))
    except (ImportError, ValueError):
        return None
    # Files on disk only: a module inside a zip archive (zipimport) has an origin no open reaches.
    if found is None or not found.origin or not isinstance(found.loader, _FILE_LOADERS):
        return None
    origin = Path(found.origin)
    with open_checked(
        origin, _SOURCES.get(flag, Source.ARCH_CODE), noun=f"{flag} module {target}: file", error=ArchError
    ):
        return origin


def _child_spec(name: str, locations: list[str]) -> importlib.machinery.ModuleSpec | None:
    """``name``'s spec in its parent's search ``locations``, importing nothing.

    For a namespace package (a folder without ``__init__.py``) the path finder looks its parent up
    in ``sys.modules`` and raises KeyError when the parent was never imported; there the portions
    are gathered here instead: a package's ``__init__.py``, a module's ``.py``, or plain folders.
    """
    try:
        return importlib.machinery.PathFinder.find_spec(name, locations)
    except KeyError:
        pass
    last = name.rpartition(".")[2]
    portions = []
    for location in map(Path, locations):
        for candidate in (location / last / "__init__.py", location / f"{last}.py"):
            if candidate.is_file():
                is_package = candidate.name == "__init__.py"
                return importlib.util.spec_from_file_location(
                    name, candidate, submodule_search_locations=[str(candidate.parent)] if is_package else None
                )
        if (location / last).is_dir():
            portions.append(str(location / last))
    if not portions:
        return None
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = portions
    return spec


def build_arch(spec: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """Call the --arch callable with --arch-kwargs and check that it returns an nn.Module."""
    from torch import nn

    factory = resolve_arch(spec)
    try:
        module = factory(**kwargs)
    except Exception as error:
        raise ArchError(
            f"--arch {spec!r} raised {type(error).__name__} when called: {error}",
            "Check --arch-kwargs against its signature",
        ) from error
    if not isinstance(module, nn.Module):
        raise ArchError(
            f"--arch {spec!r} returned an object of type {type(module).__name__}, not a torch.nn.Module",
            "Name a callable that builds the model",
        )
    return module
