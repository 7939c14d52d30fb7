"""calibrate: model-level fitting of the calibrated methods, above ``methods/`` (it drives whole models).

A calibrated method (``sparsattn.methods.base.Calibrated``: one ``path`` field, ``fit`` from captured
tensors, ``save`` / ``load``) lives in one method file; the code that runs a whole model to produce
its file lives here, one module per method, named like the method: ``minference`` (capture + the
offline pattern search on retrieval prompts), ``razor`` (retrieval-head scores on passkey prompts, or
echo / induction scores on a repeated random-token probe), ``moa`` (gradient profiling + the span
plan), ``double_sparsity`` (outlier channels), ``seer_attention`` (AttnGate training).
``_retrieval`` builds the retrieval-style calibration prompts (training-split haystacks) and
``check`` measures passkey and needle coverage of the calibrated methods against ``oracle_topk`` on
held-out haystacks. ``methods/`` never imports ``integrations`` or ``train``.

Every module has ``OUT`` (default file name), ``PROVENANCE_KEY``, ``add_arguments(parser)`` and
``run(model_path, out, *, device, **options) -> (fitted method, provenance record)``; the command
``sparsattn calibrate <method> [--model PATH] [--out PATH] [options]`` calls it, and its defaults
regenerate the shipped calibrations of the bundled model (``shipped_dir()``).
"""
from __future__ import annotations

import importlib

__all__ = ["calibrated_methods", "calibrator", "calibrate", "shipped_dir"]


def shipped_dir():
    """shipped_dir: the folder of the bundled model's shipped calibrations."""
    from ._common import shipped_dir as _sd

    return _sd()


def calibrated_methods() -> list:
    """calibrated_methods: sorted names of the registered methods that follow the calibration contract
    (``Calibrated`` subclasses)."""
    from ..methods import list_methods, method_class
    from ..methods.base import Calibrated

    return [n for n in list_methods() if issubclass(method_class(n), Calibrated)]


def calibrator(method: str):
    """calibrator: the module ``sparsattn.calibrate.<method>`` of a calibrated method (ValueError naming
    the calibrated methods otherwise)."""
    names = calibrated_methods()
    if method not in names:
        raise ValueError(f"method: expected a calibrated method ({', '.join(names)}), got {method!r}")
    return importlib.import_module(f".{method}", __name__)


def calibrate(method: str, model=None, out=None, *, device: str = "cpu", provenance=None, **options):
    """calibrate: fit ``method`` on the local model at ``model`` (None: the bundled one) and write its
    calibration to ``out`` (None: the shipped file); ``provenance``: a provenance JSON to update
    (default: the shipped one when ``out`` is None, else none). Returns ``(fitted method, record)``."""
    from ._common import update_provenance

    mod = calibrator(method)
    opts = dict(mod.DEFAULTS)
    unknown = sorted(set(options) - set(opts) - {"candidates"})
    if unknown:
        raise ValueError(f"options: unknown option(s) {unknown} for {method!r}; valid: {sorted(opts)}")
    opts.update(options)
    if out is None:
        out = shipped_dir() / mod.OUT
        if provenance is None:
            provenance = shipped_dir() / "provenance.json"
    m, rec = mod.run(None if model is None else str(model), str(out), device=device, **opts)
    if provenance is not None:
        update_provenance(provenance, mod.PROVENANCE_KEY, rec)
    return m, rec
