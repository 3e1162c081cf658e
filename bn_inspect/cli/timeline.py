"""`bn-inspect timeline`: a watched training run's events and each layer's departure over the steps."""

from __future__ import annotations

import typer

from bn_inspect.cli.app import EXIT_CHECK_FAILED, app
from bn_inspect.cli.options import DebugOpt, ForceOpt, OutputOpt, RunFormatOpt, TimelineFailOnOpt, TimelineFilesArg
from bn_inspect.options import RunFormat, TimelineFailOn


@app.command("timeline")
def timeline_command(
    files: TimelineFilesArg,
    output_format: RunFormatOpt = RunFormat.TABLE,
    output: OutputOpt = None,
    fail_on: TimelineFailOnOpt = TimelineFailOn.ERROR,
    force: ForceOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Show what a watched training run recorded: its events, the first bad step, each layer's departure over the steps.

    FILES are timeline files written by bn_inspect.watch or the Lightning callback BNWatch; under
    torchrun give every rank's file (runs/bn-watch.jsonl runs/bn-watch.rank1.jsonl ...). A file without
    its end record (a run killed or still running) is read up to its last whole line. Exit 1 when an
    event reaches --fail-on.

    Examples:

      bn-inspect timeline runs/bn-watch.jsonl

      bn-inspect timeline runs/bn-watch*.jsonl --fail-on warning

      bn-inspect timeline runs/bn-watch.jsonl --format html --output watch.html
    """
    from bn_inspect.output.formats import check_destination, write_result
    from bn_inspect.report.timeline_reading import read_timelines

    check_destination(output_format.value, output)
    timeline = read_timelines(files, fail_on)
    write_result(timeline, output_format.value, output, force=force)
    if not timeline.passed:
        raise typer.Exit(EXIT_CHECK_FAILED)
