"""Registered sparse-attention methods: one module per paper (see ``base.py`` for the contract).

Every ``*.py`` module in this package other than ``base`` is imported by ``_load_all`` so that its
``@register`` decorators run; adding a method is adding one file.
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import DensityKnob, Method, PresetContext, SelectContext, get_method, list_methods, method_class, register

_LOADED = False


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for mod in pkgutil.iter_modules(__path__):
        if mod.name not in ("base",) and not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")


__all__ = ["Method", "SelectContext", "PresetContext", "DensityKnob", "register", "get_method", "list_methods", "method_class"]
