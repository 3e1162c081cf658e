"""`bn-inspect-each COMMAND [OPTIONS] -- FILE...`: one bn-inspect run per file, in one process.

pre-commit calls a hook once with every changed file, after the hook's args, and a bn-inspect
command takes one model. The files after ``--`` run one by one with the command and options before
it, in this process (torch is imported once). The exit code is the worst of the runs: 2 (could not
run) over 1 (a check failed) over 0; a run stopped by a signal stops them all.

Each file reaches the command after its own ``--``: a file named ``--arch=evil.py:net.pt`` is a
model path, never an option. The hook runs this as a console script, like ``bn-inspect``, so the
repository being checked (the working folder) is not on ``sys.path``: ``python -m`` would put it
first, and a ``typer.py`` there would run.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from bn_inspect.boundary.reading import Source, run_manifest
from bn_inspect.cli.app import EXIT_CANNOT_RUN
from bn_inspect.cli.main import prepare_process, run
from bn_inspect.text import one_line

USAGE = "bn-inspect-each COMMAND [OPTIONS] -- FILE..."
# Options that name a file each run would write.
_OUTPUT_OPTIONS = ("--output", "--report", "--write-baseline")


def run_each(argv: Sequence[str]) -> int:
    """Run ``COMMAND [OPTIONS] -- FILE`` for each FILE after ``--``; the worst exit code.

    Without ``--``, every argument after the command is a file, and one that looks like an option
    is refused rather than taken as a file name. Every file of the call is in the manifest of every
    run, so no run's output can replace a file that another run of the call reads.
    """
    arguments = list(argv)
    if not arguments or arguments[0].startswith("-"):
        return _usage_error("no bn-inspect command given")
    if "--" in arguments:
        split = arguments.index("--")
        command, files = arguments[:split], arguments[split + 1 :]
    else:
        command, files = arguments[:1], arguments[1:]
        option = next((word for word in files if word.startswith("-")), None)
        if option is not None:
            return _usage_error(
                f"{one_line(option)} would be read as a file name; put the options before -- and the files after it"
            )
    written = next((word.split("=")[0] for word in command if word.split("=")[0] in _OUTPUT_OPTIONS), None)
    if written is not None and len(files) > 1:
        return _usage_error(f"{written} would be written once per file, each run replacing the last; give one file")
    worst = 0
    with run_manifest() as manifest:
        for path in files:
            manifest.declare(Path(path), Source.MODEL)
        for path in files:
            code = run([*command, "--", path])
            if code > 128:  # 128 + a signal number: the user stopped it
                return code
            worst = max(worst, code)
    return worst


def _usage_error(what: str) -> int:
    print(f"Error: {what}. Usage: {USAGE}", file=sys.stderr)
    return EXIT_CANNOT_RUN


def main() -> None:
    """The ``bn-inspect-each`` console script (also ``python -m bn_inspect.cli.each``)."""
    prepare_process()
    sys.exit(run_each(sys.argv[1:]))


if __name__ == "__main__":
    main()
