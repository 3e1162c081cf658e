"""python -m bn_inspect."""

from bn_inspect.cli import main

main()
