"""python -m bn_inspect."""

from bn_inspect.cli.app import main

main()
