"""The [tool.bn-inspect] table of the project's pyproject.toml: a repository's pinned check gate."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bn_inspect.boundary.reading import Source, open_checked
from bn_inspect.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[import-not-found]


@dataclass(frozen=True)
class CheckConfig:
    """Settings for `bn-inspect check` read from pyproject.toml; None where the file sets nothing."""

    source: Path | None = None
    departure_warning: float | None = None
    departure_error: float | None = None
    min_values: int | None = None
    fail_on: str | None = None
    strict: bool | None = None
    ignore: tuple[str, ...] = field(default_factory=tuple)
    max_drift: float | None = None
    max_drift_var_ratio: float | None = None


_KEYS: dict[str, tuple[type, ...]] = {
    "departure-warning": (int, float),
    "departure-error": (int, float),
    "min-values": (int,),
    "fail-on": (str,),
    "strict": (bool,),
    "ignore": (list,),
    "max-drift": (int, float),
    "max-drift-var-ratio": (int, float),
}

# The least and the most each number may be, as the flags of the same names allow: a NaN or an
# out-of-range gate would turn a failing check into a pass (or divide by zero).
_BOUNDS: dict[str, tuple[float, float | None]] = {
    "departure-warning": (0, None),
    "departure-error": (0, None),
    "min-values": (1, None),
    "max-drift": (0, None),
    "max-drift-var-ratio": (1, None),
}


# A project's settings file is a few kilobytes; a larger one is not read.
CONFIG_BUDGET = 2**20


def find_pyproject(start: Path) -> Path | None:
    """The nearest pyproject.toml in ``start`` or one of its parents (a folder of that name does not count).

    Which file it is, not whether it can be read: the opener judges that (a named pipe is an error,
    not a reason to look further up).
    """
    for folder in (start, *start.parents):
        candidate = folder / "pyproject.toml"
        if candidate.exists() and not candidate.is_dir():
            return candidate
    return None


def load_check_config(start: Path) -> CheckConfig:
    """Read [tool.bn-inspect] from the nearest pyproject.toml, validating every key.

    Raises:
        ConfigError: the file is not valid TOML, or a key is unknown or of the wrong type.
    """
    path = find_pyproject(start)
    if path is None:
        return CheckConfig()
    with open_checked(
        path,
        Source.CONFIG,
        noun="settings file",
        error=ConfigError,
        max_bytes=CONFIG_BUDGET,
        fix="Make pyproject.toml a regular file, or run from another folder",
    ) as opened:
        content = opened.read_bytes()
    try:
        document = tomllib.loads(content.decode("utf-8"))
    except RecursionError:
        raise ConfigError(f"cannot read {path}: it is nested too deeply", "Flatten its arrays and tables") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read {path} ({error})", "Fix the TOML syntax") from error
    table: Any = document.get("tool", {}).get("bn-inspect", {})
    if not isinstance(table, dict):
        raise ConfigError(f"[tool.bn-inspect] in {path} is not a table", "Write it as a TOML table")
    values: dict[str, Any] = {}
    for key, value in table.items():
        expected = _KEYS.get(key)
        if expected is None:
            raise ConfigError(
                f"[tool.bn-inspect] in {path} has unknown key {key!r}", f"Known keys: {', '.join(sorted(_KEYS))}"
            )
        if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
            raise ConfigError(
                f"[tool.bn-inspect] {key} in {path} must be {' or '.join(t.__name__ for t in expected)}, "
                f"not {type(value).__name__}",
                "Fix the value",
            )
        if key in _BOUNDS and isinstance(value, int | float):
            _check_range(key, value, path)
        values[key.replace("-", "_")] = tuple(str(v) for v in value) if isinstance(value, list) else value
    return CheckConfig(source=path, **values)


def _check_range(key: str, value: float, path: Path) -> None:
    low, high = _BOUNDS[key]
    is_finite = not isinstance(value, float) or math.isfinite(value)
    if is_finite and low <= value and (high is None or value <= high):
        return
    allowed = f"from {low:g} to {high:g}" if high is not None else f"of at least {low:g}"
    raise ConfigError(
        f"[tool.bn-inspect] {key} = {value!r} in {path} is out of range", f"Use a finite number {allowed}"
    )
