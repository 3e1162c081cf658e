"""The typer app the commands register with, and the exit codes they end with.

Exit codes: 0 ran and nothing failed; 1 ran and a check failed; 2 could not run (bad usage,
unreadable or untrusted model, input that does not fit); 3 internal error (a bug: please report);
130 and 143 stopped by SIGINT or SIGTERM, leaving no partial file.
"""

from __future__ import annotations

import signal

import typer

from bn_inspect.cli.options import VersionOpt

EXIT_OK, EXIT_CHECK_FAILED, EXIT_CANNOT_RUN, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_INTERRUPTED = 128 + signal.SIGINT

app = typer.Typer(
    name="bn-inspect",
    help="See what every BatchNorm layer of a saved PyTorch model computes on your data.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)


@app.callback()
def _root(version: VersionOpt = False) -> None:
    """See what every BatchNorm layer of a saved PyTorch model computes on your data."""
