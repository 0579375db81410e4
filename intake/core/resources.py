"""Runtime files that ship inside the installed package.

The repository keeps ``templates/`` and ``deploy/`` at its top level; ``pyproject.toml`` installs
them as the packages ``intake.templates`` and ``intake.examples``. Finding them through
:mod:`importlib.resources` makes a checkout, an editable install and a wheel behave alike.
(pip always unpacks wheels, so the files are on disk and a :class:`~pathlib.Path` is exact.)
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

TEMPLATES_DIR = Path(str(files("intake.templates")))
EXAMPLES_DIR = Path(str(files("intake.examples")))
EXAMPLE_POLICY = EXAMPLES_DIR / "policy.example.toml"
EXAMPLE_WORKER = EXAMPLES_DIR / "worker.example.toml"
