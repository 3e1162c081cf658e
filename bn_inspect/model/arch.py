"""--arch and --arch-kwargs: import the user's model code (installed packages first) and build the module."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bn_inspect.errors import (
    ArchError,
)

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


def _import_arch_module(target: str, spec: str, flag: str) -> Any:
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = Path(target)
        if not path.is_file():
            with_suffix = path.with_name(path.name + ".py")
            if not target.endswith(".py") and with_suffix.is_file():
                callable_name = spec.rpartition(":")[2]
                raise ArchError(
                    f"{flag} {spec!r}: file {target} does not exist",
                    f"Did you mean {flag} {with_suffix}:{callable_name}?",
                )
            raise ArchError(f"{flag} {spec!r}: file {target} does not exist", "Check the path")
        name = f"bn_inspect_{flag.strip('-')}_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise ArchError(f"{flag} {spec!r}: cannot import {target}", "Name a Python file")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            with cwd_importable():
                module_spec.loader.exec_module(module)
        except Exception as error:
            sys.modules.pop(name, None)
            raise ArchError(
                f"{flag} {spec!r}: importing {target} raised {type(error).__name__}: {error}",
                "Fix the file or name another",
            ) from error
        return module
    try:
        with cwd_importable():
            return importlib.import_module(target)
    except ModuleNotFoundError as error:
        raise ArchError(
            f"{flag} {spec!r}: module {error.name or target!r} cannot be imported",
            "Install it, run from its project folder, or give a file path (path/to/file.py:callable)",
        ) from error
    except Exception as error:
        raise ArchError(
            f"{flag} {spec!r}: importing {target} raised {type(error).__name__}: {error}",
            "Fix the module or name another",
        ) from error


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
