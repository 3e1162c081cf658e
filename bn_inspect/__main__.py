"""python -m bn_inspect."""

from bn_inspect.cli.main import main

main()
