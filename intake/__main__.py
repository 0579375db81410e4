"""``python -m intake`` is the ``intake`` command."""

from intake.cli.main import main

main()
