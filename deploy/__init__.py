"""Example configuration files, installed as ``intake.examples`` (read with importlib.resources)."""
