"""Test-only fits of calibrated prefill methods on small synthetic q/k/v (used by the conformance tests).

A calibrated method (non-empty ``needs``) cannot be built from a configuration alone; the
conformance tests call ``example_fit(cls, q, k, v, full)`` here, which fits it on the given tensors
as layer 0 (``full=True``: a fit that keeps every causal pair, or None). This lives in tests/ because
nothing in the library needs it; a calibrated method without an entry is fitted through its own presets
(``calibrate_from_qk``, ``random_calibration``) when it declares one, else skipped with the reason.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from sparsattn.calibration import ModelShape
from sparsattn.methods.base import Calibrated, declares
from sparsattn.methods.seer_attention import SeerGate


def _fit_minference(cls, q, k, v, full: bool = False) -> "MInference":
    T = q.shape[2]
    if full:
        cands = [{"type": "a_shape", "n_init": 0, "n_local": T}]
    else:
        cands = [{"type": "a_shape", "n_init": 16, "n_local": 64},
                 {"type": "vertical_slash", "v_size": 40, "s_size": 50},
                 {"type": "block_sparse", "top_k": 3}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.fit({0: (q, k, v)}, cands, block_size=32, last_q=16)


def _fit_seer_attention(cls, q: Tensor, k: Tensor, v: Tensor, full: bool = False) -> "SeerAttention":
    """A randomly initialised gate (layer 0) for q/k's shape; ``full=True`` keeps every causal block."""
    gate = SeerGate(q.shape[1], k.shape[1], q.shape[3], [0], seed=0).to(q.device)
    return (cls(nz_ratio=1.0) if full else cls()).set_gate(gate)


def _fit_razor(cls, q, k, v, full: bool = False) -> "RazorAttention":
    frac = 1.0 if full else 0.25
    return cls.fit({0: (q, k)}, q.shape[2] // 3, echo_fraction=frac, induction_fraction=frac, min_window=32,
                   compression=16.0, n_sink=4, block_size=32)


def _fit_moa(cls, q: Tensor, k: Tensor, v: Tensor, full: bool = False) -> "MoA":
    """A plan for one layer with varied per-head spans (``full``: spans covering every key)."""
    Hq, N = q.shape[1], k.shape[2]
    shape = ModelShape(1, Hq, k.shape[1], q.shape[3])
    if full:
        alpha, beta = [[float(N)] * Hq], [[0.0] * Hq]
    else:
        g = torch.Generator().manual_seed(0)
        alpha = [(torch.randint(0, 96, (Hq,), generator=g).double()).tolist()]
        beta = [(torch.rand(Hq, generator=g).double() * 0.5).tolist()]
    return cls().set_plan(shape, alpha, beta, sink=16, min_span=8)


FITS = {"minference": _fit_minference, "seer_attention": _fit_seer_attention, "razor": _fit_razor, "moa": _fit_moa}


def _fit_from_presets(cls, q: Tensor, k: Tensor, full: bool) -> Optional[object]:
    """A calibrated method without a fit here, through its own presets: ``calibrate_from_qk`` on q/k
    (layer 0), else a ``random_calibration`` of q/k's shape (not for ``full``: random values keep no
    guarantee). None: it declares neither."""
    import tempfile

    cfg = dict(cls.full_config(q.shape[2]) or {}) if full else dict(cls.small_config())
    if full and not cfg:
        return None
    fitted = cls.calibrate_from_qk([q], [k], cfg)
    if fitted is not None:
        return cls(**{**cfg, **fitted})
    if full or not issubclass(cls, Calibrated):
        return None
    path = cls.random_calibration(f"{tempfile.mkdtemp(prefix='sparsattn_fit_')}/{cls.name}", q_heads=q.shape[1],
                                  kv_heads=k.shape[1], head_dim=q.shape[3])
    return None if path is None else cls(**{**cfg, "path": path})


def example_fit(cls, q: Tensor, k: Tensor, v: Tensor, full: bool = False) -> Optional[object]:
    """example_fit: a fitted instance of the calibrated method class ``cls`` on q/k/v (layer 0): the
    fit written here for it, else its own presets (``calibrate_from_qk``, ``random_calibration``).

    Raises:
        LookupError: neither a test fit nor a preset for ``cls.name`` (the caller skips the method).
    """
    fit = FITS.get(cls.name)
    if fit is not None:
        return fit(cls, q, k, v, full=full)
    has_random = issubclass(cls, Calibrated) and \
        cls.random_calibration.__func__ is not Calibrated.random_calibration.__func__
    if not (declares(cls, "calibrate_from_qk") or has_random):
        raise LookupError(f"{cls.name} needs {cls.needs} and declares no calibrate_from_qk / random_calibration "
                          f"preset, and tests/methods/_fits.py has no fit for it")
    return _fit_from_presets(cls, q, k, full)
