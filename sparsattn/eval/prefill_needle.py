"""prefill_needle: needle coverage of the prefill quality driver's settings on its passkey prompts, and
the per-method diagnostics that calibration modules declare.

For every scored prompt (prompt + gold answer, as in the teacher-forced passkey run), q/k/v of every
layer are captured under dense attention (``prefill_capture.capture_prompt``), every setting's method
selects its patterns on them layer by layer (``select_all``, as the fidelity step does), and
``sparsattn.eval.needle.needle_coverage`` says which heads read the needle (the answer rows put
``>= threshold`` of their dense attention on the value's tokens) and whether the pattern keeps it (at
least ``keep`` of that attention; arXiv 2404.15574's retrieval heads found by attention mass). The
unpatched baseline keeps every needle by definition and gives the number of reading heads.

The needle is the last occurrence of the gold answer's non-blank tokens in the prompt; the reading
rows are the positions that predict the answer tokens (``P - 1 .. P + len(answer) - 2`` for a
prompt of ``P`` tokens). A prompt whose value does not appear token for token in it (a tokenizer
that merges it with its neighbours) is counted in ``needle_missing`` and left out.

Diagnostics: a calibrated method whose ``sparsattn.calibrate.<method>`` module defines
``diagnostics(method, layers, scales) -> {name: [value per layer]}`` (e.g. SeerAttention's gate
block recall against the oracle) is diagnosed on the first ``DIAG_PROMPTS`` captured prompts; the
driver names no method.
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Any, Optional, Sequence

import torch

from .needle import needle_coverage
from .prefill_capture import capture_prompt, select_all

__all__ = ["needle_positions", "diagnosers", "coverage_of_settings", "DIAG_PROMPTS"]

#: prompts per (length, task) on which the declared diagnostics run
DIAG_PROMPTS = 3


def _find_last(seq: list, sub: list) -> int:
    for s in range(len(seq) - len(sub), -1, -1):
        if seq[s:s + len(sub)] == sub:
            return s
    return -1


def needle_positions(tok: Any, prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> Optional[tuple[list, list]]:
    """needle_positions: ``(needle, rows)`` of a teacher-forcing sample: the prompt positions of the
    answer's non-blank tokens (last occurrence) and the rows that predict the answer tokens; None
    when the answer's tokens do not occur in the prompt.

    Raises:
        ValueError: an empty prompt or answer.
    """
    prompt_ids, answer_ids = list(prompt_ids), list(answer_ids)
    if not prompt_ids or not answer_ids:
        raise ValueError(f"prompt_ids/answer_ids: expected non-empty token lists, got {len(prompt_ids)} and "
                         f"{len(answer_ids)} tokens")
    content = []
    for t in answer_ids:
        try:
            blank = not tok.decode([t]).strip()
        except Exception:  # noqa: BLE001 - a tokenizer without decode: every token is content
            blank = False
        if not blank:
            content.append(t)
    start = _find_last(prompt_ids, content) if content else -1
    if start < 0:
        return None
    P = len(prompt_ids)
    return list(range(start, start + len(content))), list(range(P - 1, P - 1 + len(answer_ids)))


def diagnosers(methods: Sequence[str]) -> dict:
    """diagnosers: ``{method: diagnostics}`` for the methods among ``methods`` whose ``sparsattn.calibrate``
    module defines ``diagnostics(method, layers, scales) -> {name: [value per layer]}``."""
    from ..calibrate import calibrated_methods, calibrator

    cal = set(calibrated_methods())
    out = {}
    for name in dict.fromkeys(m.partition(":")[0] for m in methods):  # "name:variant" -> name
        if name in cal:
            try:
                fn = getattr(calibrator(name), "diagnostics", None)
            except ImportError:
                continue
            if fn is not None:
                out[name] = fn
    return out


def _mean_lists(lists: list) -> list:
    out = []
    for col in zip(*lists):
        v = [x for x in col if isinstance(x, (int, float)) and math.isfinite(x)]
        out.append(round(sum(v) / len(v), 4) if v else float("nan"))
    return out


def coverage_of_settings(model, tok, samples: list, jobs: dict, *, device, threshold: float = 0.1,
                         keep: float = 0.5, diagnose: Optional[dict] = None, log=None) -> dict:
    """coverage_of_settings: needle coverage of every job on every sample (see the module docstring).

    Args:
        samples: ``PromptSample``-like objects (``prompt_ids``, ``answer_ids``, ``depth``).
        jobs: ``{key: setting}``, a setting with ``method`` and ``build()``, or None for the unpatched
            model (every reading head keeps the needle).
        threshold, keep: ``needle_coverage``'s thresholds.
        diagnose: ``{method: diagnostics}`` (``diagnosers``) run on the first ``DIAG_PROMPTS`` samples.
    Returns:
        ``{key: {"agg": {...}, "samples": [per sample], "diagnostics": {name: [per layer]}}}`` with
        ``agg`` = ``needle_reading`` / ``needle_kept`` (heads summed over samples), ``needle_coverage``
        (kept / reading), ``needle_kept_fraction`` (mean over reading heads), ``needle_missing``,
        ``needle_seconds``. An error of one job is recorded in its ``agg["needle_error"]``.
    """
    t0 = time.time()
    diagnose = diagnose or {}
    built: dict = {}
    acc = {key: {"reading": 0, "kept": 0, "fracs": [], "samples": [], "diag": {}, "error": "", "missing": 0}
           for key in jobs}
    for i, s in enumerate(samples):
        pos = needle_positions(tok, s.prompt_ids, s.answer_ids)
        if pos is None:
            for a in acc.values():
                a["missing"] += 1
            continue
        needle, rows = pos
        ids = torch.tensor([list(s.prompt_ids) + list(s.answer_ids)], device=device)
        with torch.no_grad():
            cap = capture_prompt(model, ids)
        qk = {l: t[:2] for l, t in cap.layers.items()}
        for key, setting in jobs.items():
            a = acc[key]
            if a["error"]:
                continue
            try:
                if setting is None:
                    pats = {}
                else:
                    if key not in built:
                        built[key] = setting.build()
                    with torch.no_grad():
                        pats = select_all(built[key], cap)
                nc = needle_coverage(qk, pats, rows, needle, scales=cap.scales, threshold=threshold, keep=keep)
                fn = diagnose.get(str(getattr(setting, "method", "")).partition(":")[0])
                if fn is not None and i < DIAG_PROMPTS:
                    with torch.no_grad(), warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        for name, vals in (fn(built[key], cap.layers, cap.scales) or {}).items():
                            a["diag"].setdefault(name, []).append([float(v) for v in vals])
            except Exception as e:  # noqa: BLE001 - recorded, the others go on
                a["error"] = f"needle coverage: {type(e).__name__}: {e}"[:300]
                if log:
                    log(f"needle coverage {key}: ERROR {a['error']}")
                continue
            a["reading"] += nc["n_reading"]
            a["kept"] += nc["n_kept"]
            a["fracs"] += [h["kept_fraction"] for h in nc["heads"]]
            a["samples"].append({"sample": i, "depth": round(float(s.depth), 3), "needle": needle,
                                 "needle_reading": nc["n_reading"], "needle_kept": nc["n_kept"],
                                 "heads": [[h["layer"], h["head"], h["mass"], h["kept_fraction"], int(h["kept"])]
                                           for h in nc["heads"]]})
        del cap, qk
    secs = time.time() - t0
    out = {}
    for key, a in acc.items():
        agg = {"needle_reading": a["reading"], "needle_kept": a["kept"],
               "needle_coverage": a["kept"] / a["reading"] if a["reading"] else float("nan"),
               "needle_kept_fraction": sum(a["fracs"]) / len(a["fracs"]) if a["fracs"] else float("nan"),
               "needle_missing": a["missing"], "needle_seconds": secs / max(1, len(jobs))}
        if a["error"]:
            agg["needle_error"] = a["error"]
        diag = {name: _mean_lists(v) for name, v in a["diag"].items()}
        out[key] = {"agg": agg, "samples": a["samples"], "diagnostics": diag}
    return out
