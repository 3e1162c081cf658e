"""The typer app: options, one short function per command, errors -> exit codes."""
