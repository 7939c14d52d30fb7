"""hf.mask: the mask function registered under ``"sparsattn"`` (keeps the 2-D padding mask).

For the plain causal and the sliding-window causal masks it returns a ``MaskInfo`` (kind, window,
the original 2-D padding mask and the positions transformers computed from the cache) instead of an
O(T^2) tensor; for anything else (packed sequences, block overlays, bidirectional...) the boolean
4-D mask of transformers' ``sdpa_mask``.

Static caches (``cache_implementation="static"`` / ``"sliding_window"``): ``generate`` builds the
mask once per step *before* the model's forward (``create_masks_for_generate``) and passes the
result back as ``attention_mask``; the model's forward then hands it to the mask helpers again.
A ``MaskInfo`` is such a prepared mask: it reports ``ndim == 4`` (what transformers' helpers read to
tell a prepared mask from a 2-D padding mask) and the mask function returns it unchanged.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Optional, Union

import torch

log = logging.getLogger(__package__)


@dataclass
class MaskInfo:
    """MaskInfo: what the registered mask function hands to the attention function.

    Attributes:
        kind: "causal" or "sliding" (causal with a window).
        window: the window for "sliding" (query i sees keys j with ``0 <= i - j < window``).
        padding_mask: the 2-D bool mask ``[B, kv_seen]`` transformers received (None = no padding).
        kv_length, kv_offset: the sizes transformers computed for the mask: key slot ``j`` given to
            the attention function holds the token at absolute position ``kv_offset + j``.
        q_offset: absolute position of the first query (the tokens seen before this forward): an
            int, or a 0-d tensor (a copy taken when the mask was made: static caches keep their length
            as a tensor, updated in place). Slots past ``q_offset + Tq - 1 - kv_offset`` are unwritten
            (a static cache's free slots) and are never attended. None = not known (transformers
            versions that pass ``cache_position`` only give its first entry; without either, the last
            key is taken to be the last query, as with a dynamic cache).
    """

    kind: str
    window: Optional[int]
    padding_mask: Optional[torch.Tensor]
    kv_length: Optional[int] = None
    kv_offset: int = 0
    q_offset: Union[int, torch.Tensor, None] = None

    #: transformers' mask helpers read ``attention_mask.ndim`` (2 = a padding mask to turn into a mask);
    #: a MaskInfo is an already prepared mask, like a 4-D tensor.
    ndim = 4


def _nonlocals(fn) -> dict:
    """Closure variables of ``fn`` (cheap: no module lookups, unlike inspect.getclosurevars)."""
    code = getattr(fn, "__code__", None)
    cells = getattr(fn, "__closure__", None) or ()
    if code is None:
        return {}
    try:
        return {n: c.cell_contents for n, c in zip(code.co_freevars, cells)}
    except ValueError:  # an empty cell
        return {}


_VERIFIED: set = set()


def _classify_mask_function(fn) -> tuple[Optional[str], Optional[int]]:
    """("causal", None), ("sliding", window) or (None, None) when the mask is something else."""
    from transformers import masking_utils as mu

    if fn is mu.causal_mask_function:
        return "causal", None
    parts = _nonlocals(fn).get("mask_functions")
    if not (getattr(fn, "__qualname__", "").startswith("and_masks.") and isinstance(parts, tuple) and len(parts) == 2):
        return None, None
    other = [p for p in parts if p is not mu.causal_mask_function]
    if len(other) != 1 or not getattr(other[0], "__qualname__", "").startswith("sliding_window_overlay."):
        return None, None
    w = _nonlocals(other[0]).get("sliding_window")
    if not isinstance(w, int) or isinstance(w, bool) or w < 1:
        return None, None
    key = (fn.__code__, other[0].__code__, w)
    if key not in _VERIFIED:
        # probe once per (code, window): the function must really be "kv <= q and q - kv < w"
        n = min(3 * w, 768)
        i = torch.arange(n)[:, None]
        j = torch.arange(n)[None, :]
        try:
            got = torch.as_tensor(fn(torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long), i, j)).bool()
        except Exception:  # noqa: BLE001 - any failure means "not something we understand"
            return None, None
        want = (j <= i) & (i - j < w)
        if got.shape != want.shape or not bool((got == want).all()):
            return None, None
        _VERIFIED.add(key)
    return "sliding", w


def sparse_attention_mask(*args, **kwargs):
    """sparse_attention_mask: the mask function registered under ``"sparsattn"``.

    Returns a ``MaskInfo`` for causal / sliding-window causal masks (no O(T^2) tensor), else the
    boolean 4-D mask of transformers' ``sdpa_mask`` (the attention function then runs dense SDPA).
    """
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    am = kwargs.get("attention_mask")
    if isinstance(am, MaskInfo) and not args:
        # prepared by generate (create_masks_for_generate) for this very step: returned as is, as
        # transformers returns a prepared 4-D mask (no classification: this runs in compiled decode steps)
        fn = kwargs.get("mask_function")
        if fn is causal_mask_function:
            return am if am.kind == "causal" else dataclasses.replace(am, kind="causal", window=None)
        if am.kind == "sliding":
            return am
        kind, window = _classify_mask_function(fn)
        if kind is None:
            raise ValueError("attention_mask: a sparsattn MaskInfo (causal) was passed where transformers asks "
                             f"for another mask ({getattr(fn, '__qualname__', fn)!r})")
        return dataclasses.replace(am, kind=kind, window=window)
    kind, window = _classify_mask_function(kwargs.get("mask_function"))
    if kind is None or args:
        kw = dict(kwargs)
        kw["allow_is_causal_skip"] = False
        if "allow_is_bidirectional_skip" in kw:
            kw["allow_is_bidirectional_skip"] = False
        log.debug("sparsattn mask: mask function %r is not causal/sliding: materialising the 4-D mask",
                  getattr(kwargs.get("mask_function"), "__qualname__", kwargs.get("mask_function")))
        return sdpa_mask(*args, **kw)
    if am is not None and not (isinstance(am, torch.Tensor) and am.dim() == 2):
        kw = dict(kwargs, allow_is_causal_skip=False)
        return sdpa_mask(**kw)
    if am is not None:
        am = am.to(torch.bool)
    q_off = kwargs.get("q_offset")
    if q_off is None and isinstance(kwargs.get("cache_position"), torch.Tensor) and kwargs["cache_position"].numel():
        q_off = kwargs["cache_position"][0]  # transformers versions before q_offset
    if isinstance(q_off, torch.Tensor):
        q_off = q_off.detach().clone()  # a static cache's live counter: keep the value of this step
    return MaskInfo(kind, window, am, kwargs.get("kv_length"), int(kwargs.get("kv_offset", 0) or 0), q_off)
