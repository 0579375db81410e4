"""Runtime templates, installed as ``intake.templates`` (read with importlib.resources)."""
