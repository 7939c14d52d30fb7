"""Registered sparse-attention methods: one module per paper (see ``base.py`` for the contract).

Every ``*.py`` module in this package other than ``base`` is imported by ``_load_all`` so that its
``@register`` decorators run; adding a method is adding one file.

Third-party packages register methods through the entry-point group ``sparsattn.methods``: each
entry point names a module (its ``@register`` decorators run when it is imported) or a ``Method``
subclass (registered under the entry point's name unless it registered itself). They are loaded
lazily, on the first ``list_methods`` / ``get_method`` / ``method_class`` call, after the built-in
methods; one that fails to load is skipped with a warning naming the entry point and its
distribution, so a broken plugin never hides the others. In ``pyproject.toml``::

    [project.entry-points."sparsattn.methods"]
    my_method = "my_package.my_method"            # a module with @register("my_method")
"""
from __future__ import annotations

import importlib
import importlib.metadata
import logging
import pkgutil
import warnings

from .base import DensityKnob, Method, PresetContext, SelectContext, get_method, list_methods, method_class, register

_LOADED = False
#: the entry-point group third-party packages register methods under
ENTRY_POINT_GROUP = "sparsattn.methods"
#: entry points that failed to load: ``{"name (distribution)": "error"}``
PLUGIN_ERRORS: dict[str, str] = {}
_log = logging.getLogger("sparsattn")


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for mod in pkgutil.iter_modules(__path__):
        if mod.name not in ("base",) and not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")
    _load_entry_points()


def _load_entry_points() -> None:
    """Import the methods of the ``sparsattn.methods`` entry-point group (see the module docstring)."""
    from .base import _REGISTRY

    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(getattr(ep, "dist", None), "name", None) or "unknown distribution"
        label = f"{ep.name} ({dist})"
        try:
            obj = ep.load()
            if isinstance(obj, type):
                if not issubclass(obj, Method):
                    raise ValueError(f"expected a module or a sparsattn.methods.Method subclass, got {obj!r}")
                if _REGISTRY.get(obj.name) is not obj:
                    register(ep.name)(obj)
        except Exception as e:  # noqa: BLE001 - a broken plugin must not hide the other methods
            PLUGIN_ERRORS[label] = f"{type(e).__name__}: {e}"
            warnings.warn(f"sparsattn: the method entry point {label} of group {ENTRY_POINT_GROUP!r} failed to "
                          f"load and is skipped: {type(e).__name__}: {e}", stacklevel=3)
            continue
        _log.debug("sparsattn: loaded method entry point %s", label)


__all__ = ["Method", "SelectContext", "PresetContext", "DensityKnob", "register", "get_method", "list_methods", "method_class"]
