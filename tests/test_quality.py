"""The style gate runs with the tests: ruff (lint and format), mypy --strict and import-linter's room contracts."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

# Left out of the quick subset (`-m "not slow"`): ruff, mypy --strict and import-linter over the whole package (about 60 s).
pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", "bn_inspect", "tests", "sample_models", "benchmarks"],
        ["ruff", "format", "--check", "bn_inspect", "tests", "sample_models", "benchmarks"],
        ["mypy"],
        ["lint-imports"],
    ],
    ids=["ruff-check", "ruff-format", "mypy", "import-linter"],
)
def test_tool_passes(command: list[str]) -> None:
    executable = shutil.which(command[0], path=str(Path(sys.executable).parent)) or shutil.which(command[0])
    if executable is None:
        pytest.skip(f"{command[0]} is not installed (pip install -e '.[test]')")
    result = subprocess.run([executable, *command[1:]], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
