"""What every hostile test needs: bn-inspect in a child process with a deadline and a memory cap, and canaries."""

from __future__ import annotations

import hashlib
import os
import resource
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from tests.helpers import REPO, Result

# Long enough for a cold start that imports torch; a regression that blocks or reads forever is
# killed here instead of hanging the suite.
SUBPROCESS_TIMEOUT_S = 180
# Far below what a forged header or a decompression bomb asks for, far above what bn-inspect needs.
MEMORY_CAP_BYTES = 4 * 2**30


def run_bounded(
    argv: Sequence[str | Path],
    cwd: Path,
    *,
    program: Sequence[str] = ("-m", "bn_inspect"),
    timeout: float = SUBPROCESS_TIMEOUT_S,
    env: dict[str, str] | None = None,
) -> Result:
    """``python PROGRAM argv`` in ``cwd`` with a wall-clock timeout and an address-space cap.

    A hang fails the test through ``subprocess.TimeoutExpired``; a memory bomb that gets past the
    tool's budgets ends in MemoryError, which the one-line checks then catch.
    """

    def cap_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP_BYTES, MEMORY_CAP_BYTES))

    done = subprocess.run(
        [sys.executable, *program, *(str(arg) for arg in argv)],
        cwd=cwd,
        env=env if env is not None else {**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=cap_memory,
        check=False,
    )
    return Result(done.returncode, done.stdout, done.stderr)


def file_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every regular file under ``folder``, by relative path: what a run must leave as it was."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.is_symlink()
    }


def canary_code(marker: Path) -> str:
    """Python source that, if it ever runs, creates ``marker``: the proof that code ran."""
    return f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
