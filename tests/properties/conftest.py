"""Registers and loads the Hypothesis profiles (see ``_settings.py``)."""
from . import _settings  # noqa: F401
