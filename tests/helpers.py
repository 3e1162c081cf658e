"""Paths, the in-process CLI runner and comparisons that several test files share."""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
REPO = TESTS.parent
SAMPLES = REPO / "sample_models"
DIGITS = SAMPLES / "digits_cnn"
GOLDEN = TESTS / "golden"


@dataclass(frozen=True)
class Result:
    """How one in-process bn-inspect run ended: its exit code and what it wrote to stdout and stderr."""

    code: int
    out: str
    err: str


def invoke(capsys: pytest.CaptureFixture[str], argv: Sequence[str | Path]) -> Result:
    """Run the CLI in this process, as ``bn-inspect argv`` would, and capture what it printed."""
    # Imported here so that files and driver processes that need only the paths stay light.
    from bn_inspect.cli.main import run

    code = run([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def assert_one_error_line(result: Result, *fragments: str) -> None:
    """stderr is one ``Error: ...`` line holding every fragment, and no traceback was printed anywhere."""
    lines = result.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.err
    assert "Traceback" not in result.err + result.out
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# A printed number: digits with optional thousands commas, decimals and exponent.
_NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?(?:e[+-]?\d+)?")


def _last_place(token: str) -> Decimal:
    """One unit in the last printed place of ``token`` (``1.02`` -> 0.01, ``3.4e-05`` -> 1e-06)."""
    mantissa, _, exponent = token.partition("e")
    decimals = len(mantissa.partition(".")[2])
    return Decimal(1).scaleb(-decimals + int(exponent or 0))


def _value(token: str) -> Decimal:
    return Decimal(token.replace(",", ""))


def golden_mismatch(expected: str, actual: str) -> str | None:
    """Why ``actual`` differs from the golden ``expected``, or None when they agree.

    Everything but the numbers must match exactly (layout, names, flags). Two numbers agree when
    they differ by at most one unit in their last printed place: the last digit of a rounded float
    can differ between CPUs, and a golden file must not depend on it.
    """
    expected_parts, actual_parts = _NUMBER.split(expected), _NUMBER.split(actual)
    if expected_parts != actual_parts:
        for number, (want, got) in enumerate(zip(expected.splitlines(), actual.splitlines(), strict=False)):
            if _NUMBER.split(want) != _NUMBER.split(got):
                return f"line {number + 1} differs:\n  golden: {want!r}\n  actual: {got!r}"
        return "the texts differ in their number of lines"
    for want, got in zip(_NUMBER.findall(expected), _NUMBER.findall(actual), strict=True):
        unit = max(_last_place(want), _last_place(got))
        if abs(_value(want) - _value(got)) > unit:
            return f"number {got} differs from the golden {want} by more than {unit}"
    return None


def check_golden(name: str, text: str, update: bool) -> None:
    """Compare ``text`` with tests/golden/``name``; ``--update-golden`` rewrites the file instead."""
    path = GOLDEN / name
    if update:
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"{path} is missing; run pytest --update-golden"
    mismatch = golden_mismatch(path.read_text(encoding="utf-8"), text)
    assert mismatch is None, mismatch


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging: a call blocked past ``seconds`` (open() on a pipe) raises TimeoutError."""

    def expire(_signal: int, _frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
