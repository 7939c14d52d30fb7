"""hf.forward: the attention function registered under ``"sparsattn"`` and the per-layer binding.

See the package docstring (``sparsattn.integrations.hf``) for what a method receives in
``SelectContext`` (its typed fields) at prefill and decode.
"""
from __future__ import annotations

import logging
import sys
from typing import Optional

import torch

from ... import patterns as _patterns
from ...api import attention as _attention
from ...methods.base import SelectContext
from .cache import SparseCache
from .heads import _Choice
from .mask import MaskInfo
from ...patterns import TokenPattern
from .static import decode_select_inputs, dense_decode, positional_keep, static_layout, trailing_slots
from .padding import _clip_tokens, _dense_masked, _left_to_right, _shift_left, _unshift_tokens
from .report import note_fallback, note_selection, selection_clock

log = logging.getLogger(__package__)

NAME = "sparsattn"
_ATTR = "_sparsattn_layer"
_DEFAULT_BLOCK = 64


def _compiling() -> bool:
    """Whether torch.compile (dynamo) is tracing this call."""
    return bool(torch.compiler.is_compiling())


def _logit_extras(kw: dict) -> dict:
    """``softcap`` (Gemma 2's attn_logit_softcapping) and ``sinks`` (gpt-oss passes its learned sink
    logits as ``s_aux``) from transformers' attention keywords: only those given."""
    extra = {}
    if kw.get("softcap") is not None:
        extra["softcap"] = kw["softcap"]
    sinks = kw.get("s_aux", kw.get("sinks"))
    if sinks is not None:
        extra["sinks"] = sinks
    return extra


def default_backend() -> Optional[str]:
    """default_backend: ``sparsattn.integrations.hf.DEFAULT_BACKEND`` (read at call time, so setting the
    package attribute takes effect)."""
    return getattr(sys.modules[__package__], "DEFAULT_BACKEND", None)


def sparse_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: Optional[float] = None, **kwargs):
    """sparse_attention_forward: the attention function registered under ``"sparsattn"``.

    HF calling convention: q ``[B, Hq, Tq, D]``, k/v ``[B, Hkv, Tk, D]`` (after RoPE and the cache
    update); returns ``(out [B, Tq, Hq, D], None)``.
    """
    binding = getattr(module, _ATTR, None)
    if binding is None:  # loaded with attn_implementation="sparsattn": bind to the config's methods (hf.auto)
        from .auto import bind_running

        bind_running(module)
        binding = getattr(module, _ATTR, None)
    if binding is None:
        raise RuntimeError(f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) uses "
                           f"attn_implementation {NAME!r} but was not patched by sparsattn.integrations.hf.patch")
    return binding.forward(module, query, key, value, attention_mask, dropout, scaling, kwargs)


class _Layer:
    """Binding of one attention module: methods for prefill and decode, and the owning patch."""

    def __init__(self, patch_ref, index: int, prefill: Optional[_Choice], decode: Optional[_Choice], hkv: int,
                 backend: Optional[str] = None):
        self.patch_ref = patch_ref
        self.backend = backend
        self.index = index
        self.prefill = prefill
        self.decode = decode
        self.hkv = hkv
        self.pre_rope: dict = {}

    def _be(self) -> Optional[str]:
        return self.backend if self.backend is not None else default_backend()

    # -- padding ---------------------------------------------------------------------------------
    def _lengths(self, frame, mask: Optional[MaskInfo], Tq: int, Tk: int, device):
        """None (no padding) | (q_lens, kv_lens, side) | ("fallback", reason)."""
        cache = frame.get("cache")
        if isinstance(cache, SparseCache) and cache.is_compressed(self.index):
            pad = cache.attention_pad(self.index)
            if pad is None or pad.shape[0] == 0:
                return None
            kl = (Tk - pad.to(device)).clamp(min=0)
            if bool((kl == Tk).all()):
                return None
            return torch.clamp(kl, max=Tq).to(torch.int32), kl.to(torch.int32), "left"
        pm = None if mask is None else mask.padding_mask
        if pm is None:
            return None
        key = (id(pm), Tq, Tk)
        memo = frame.setdefault("lens", {})
        if key in memo:
            return memo[key]
        if pm.shape[1] < Tk:
            res = ("fallback", f"2-D padding mask has {pm.shape[1]} columns for {Tk} keys")
        else:
            sl = pm[:, pm.shape[1] - Tk:].to(device)
            lens = sl.sum(-1)
            ar = torch.arange(Tk, device=device)[None, :]
            if bool((lens == Tk).all()):
                res = None
            elif bool((sl == (ar >= Tk - lens[:, None])).all()):
                kl = lens.to(torch.int32)
                res = (torch.clamp(kl, max=Tq), kl, "left")
            elif Tq == Tk and bool((sl == (ar < lens[:, None])).all()):
                kl = lens.to(torch.int32)
                res = (kl, kl, "right")
            else:
                res = ("fallback", "padding mask has holes (neither left nor right padding)")
        memo[key] = res
        return res

    def _explicit_mask(self, mask: Optional[MaskInfo], window, Tq, Tk, device) -> torch.Tensor:
        i = torch.arange(Tq, device=device)[:, None] + (Tk - Tq)
        j = torch.arange(Tk, device=device)[None, :]
        keep = j <= i
        if window is not None:
            keep = keep & (i - j < window)
        keep = keep[None, None]
        if mask is not None and mask.padding_mask is not None and mask.padding_mask.shape[1] >= Tk:
            pm = mask.padding_mask
            keep = keep & pm[:, pm.shape[1] - Tk:].to(device)[:, None, None, :]
        return keep

    # -- main --------------------------------------------------------------------------------------
    def forward(self, module, q, k, v, mask, dropout, scaling, kw):
        extra = _logit_extras(kw)  # Gemma 2's softcap, gpt-oss's sinks (s_aux): passed to every path below
        if dropout and module.training:
            raise ValueError(f"dropout: attention dropout ({dropout}) is not supported by sparsattn; "
                             "call model.eval() or set attention_dropout=0")
        patch = self.patch_ref()
        frame = patch.frame() if patch is not None else {"state": {}}
        B, Hq, Tq, D = q.shape
        Tk = k.shape[2]
        scale = float(scaling) if scaling is not None else getattr(module, "scaling", None)
        cache = frame.get("cache")
        if isinstance(cache, SparseCache):  # a KV policy left per-head lengths or merged-slot weights
            out = cache.attend(self.index, q, k, v, scale=scale, backend=self._be(), **extra)
            if out is not None:
                return out.transpose(1, 2).contiguous(), None
        if isinstance(mask, torch.Tensor):
            note_fallback(self, "4-D mask from transformers (packed sequences or a custom mask)", (Tq, Tk))
            return _dense_masked(q, k, v, mask, scale, **extra).transpose(1, 2).contiguous(), None
        if not getattr(module, "is_causal", True):
            note_fallback(self, "non-causal attention", (Tq, Tk))
            out = _attention(q, k, v, None, causal=False, scale=scale, **extra)
            return out.transpose(1, 2).contiguous(), None
        if isinstance(mask, MaskInfo):
            window = mask.window if mask.kind == "sliding" else None
        else:
            window = kw.get("sliding_window")
        if static_layout(mask):  # slots placed by position (static caches): see hf.static
            if Tq == 1 and self.decode is None and (isinstance(mask.q_offset, torch.Tensor) or _compiling()):
                out = dense_decode(q, k, v, positional_keep(mask, B, Tk, window, q.device), scale, **extra)
                return out.transpose(1, 2).contiguous(), None
            if Tq == 1 and _compiling():  # a decode method in a compiled step: no sync, static shapes
                out = self._compiled_decode(q, k, v, mask, window, scale, frame, kw, extra)
                return out.transpose(1, 2).contiguous(), None
            trail = trailing_slots(frame, mask, Tq, Tk)
            if trail:  # unwritten slots of a static cache: drop them, the last key is then the last query
                k, v, Tk = k[:, :, :Tk - trail], v[:, :, :Tk - trail], Tk - trail
        lens = self._lengths(frame, mask if isinstance(mask, MaskInfo) else None, Tq, Tk, q.device)
        if isinstance(lens, tuple) and isinstance(lens[0], str):
            note_fallback(self, lens[1], (Tq, Tk))
            keep = self._explicit_mask(mask, window, Tq, Tk, q.device)
            return _dense_masked(q, k, v, keep, scale, **extra).transpose(1, 2).contiguous(), None
        q_lens, kv_lens, side = lens if lens is not None else (None, None, "right")
        pre = self.pre_rope or {}
        ctx = SelectContext(layer=self.index, causal=True, scale=scale, q_offset=Tk - Tq, state=frame["state"],
                            q_lens=q_lens, kv_lens=kv_lens, padding_side=side, sliding_window=window,
                            num_kv_groups=Hq // k.shape[1], position_ids=kw.get("position_ids"),
                            q_pre_rope=pre.pop("q", None), k_pre_rope=pre.pop("k", None))
        if Tq == 1 and Tk > 1:
            out = self._decode(q, k, v, scale, kv_lens, window, ctx, extra)
        else:
            out = self._prefill(q, k, v, scale, q_lens, kv_lens, side, window, mask, ctx, extra)
        return out.transpose(1, 2).contiguous(), None

    def _prefill(self, q, k, v, scale, q_lens, kv_lens, side, window, mask, ctx, extra=None):
        extra = extra or {}
        B, Hq, Tq, D = q.shape
        Tk = k.shape[2]
        ctx.phase = "prefill"
        if self.prefill is not None and self.prefill.computes_output:  # not a mask: the method attends
            if kv_lens is None and window is None and not extra:  # (its own output: no softcap/sinks)
                ctx.v = v
                return self.prefill.methods[0].attend(q, k, v, ctx)[0]
            why = [w for w, on in (("padding", kv_lens is not None), ("a sliding window", window is not None),
                                   (" and ".join(extra), bool(extra))) if on]
            note_fallback(self, f"{self.prefill.describe()} computes its own output: not with {' or '.join(why)}",
                          (Tq, Tk))
            keep = self._explicit_mask(mask if isinstance(mask, MaskInfo) else None, window, Tq, Tk, q.device)
            return _dense_masked(q, k, v, keep, scale, **extra)
        pattern = t0 = None
        if self.prefill is not None and not self.prefill.dense_only:
            if kv_lens is not None and Tq != Tk:
                # chunked prefill of a padded batch: per-sequence offsets differ, a pattern built
                # for the padded tensors would be misaligned -> exact dense attention instead
                note_fallback(self, "chunked prefill of a padded batch", (Tq, Tk))
                keep = self._explicit_mask(mask if isinstance(mask, MaskInfo) else None, window, Tq, Tk, q.device)
                return _dense_masked(q, k, v, keep, scale, **extra)
            qs, ks, vs = q, k, v
            if kv_lens is not None and side == "left":
                qs, ks, vs = _left_to_right(q, q_lens), _left_to_right(k, kv_lens), _left_to_right(v, kv_lens)
            ctx.v = vs  # values aligned with ks (LongHeads builds chunk keys from them)
            t0 = selection_clock(self, q)
            pattern = self.prefill.select_block(qs, ks, ctx)
        if window is not None:
            bq = pattern.block_q if pattern is not None else _DEFAULT_BLOCK
            bk = pattern.block_k if pattern is not None else _DEFAULT_BLOCK
            win = _patterns.sliding_window(Tq, int(window), Tk, block_q=bq, block_k=bk, device=q.device)
            if pattern is None:
                pattern = win
            else:
                if pattern.columns is not None:
                    raise ValueError(f"layer {self.index}: method {self.prefill.describe()} returned a pattern with "
                                     f"columns on a sliding-window layer (window {window}); columns cannot be "
                                     "intersected with the window")
                pattern = pattern & win
        note_selection(self, "prefill", pattern, t0, q, (Tq, Tk), q_lens=q_lens, kv_lens=kv_lens)
        return _attention(q, k, v, pattern, causal=True, scale=scale, q_lens=q_lens, kv_lens=kv_lens,
                          padding_side=side, backend=self._be(), **extra)

    def _compiled_decode(self, q, k, v, mask, window, scale, frame, kw, extra):
        """Decode method on a static cache inside torch.compile: the method sees the rows shifted to
        the front with ``kv_lens`` (``hf.static.decode_select_inputs``), its picks are mapped back to
        slots and clipped to the positional mask (causal, window, padding); validation is skipped
        (it would read values back to the host)."""
        from ...kernels.sparse_decode import sparse_decode_attention

        B, Hq, _, D = q.shape
        Tk = k.shape[2]
        keep = positional_keep(mask, B, Tk, window, q.device)
        pad, kl = decode_select_inputs(mask, keep, Tk)
        pre = self.pre_rope or {}
        ctx = SelectContext(layer=self.index, causal=True, scale=scale, q_offset=Tk - 1, state=frame["state"],
                            kv_lens=kl, padding_side="right", sliding_window=window, phase="decode",
                            num_kv_groups=Hq // k.shape[1], position_ids=kw.get("position_ids"),
                            q_pre_rope=pre.pop("q", None), k_pre_rope=pre.pop("k", None))
        tp = _unshift_tokens(self.decode.select_token(q, _shift_left(k, pad), ctx), pad, Tk)
        m = tp.to_token_mask()
        m = m.expand(B, *m.shape[1:]) if m.shape[0] != B else m
        tp = TokenPattern.from_mask(m & keep[:, None, :], kv_len=Tk)
        be = self._be() if self._be() in ("triton", "reference") else None
        return sparse_decode_attention(q, k, v, tp, scale=scale, backend=be, validate=False, **extra)[:, :, None]

    def _decode(self, q, k, v, scale, kv_lens, window, ctx, extra=None):
        extra = extra or {}
        B, Hq, _, D = q.shape
        Tk = k.shape[2]
        ctx.phase = "decode"
        lo = None
        if kv_lens is not None:
            lo = (Tk - kv_lens.long())
        if window is not None:
            wlo = torch.full((B,), max(Tk - int(window), 0), dtype=torch.long, device=q.device)
            lo = wlo if lo is None else torch.maximum(lo, wlo)
        if self.decode is not None:
            try:
                from ...kernels.sparse_decode import sparse_decode_attention
            except ImportError as e:
                note_fallback(self, f"sparse decode kernel unavailable ({e})", (1, Tk))
            else:
                pad = None if kv_lens is None else (Tk - kv_lens.long()).clamp(min=0)
                t0 = selection_clock(self, q)
                if pad is not None and bool((pad > 0).any()):
                    # decode methods read kv_lens as "the first n slots hold the sequence": give them
                    # the left-padded rows right-aligned, and map their picks back to cache slots
                    ctx.padding_side = "right"
                    tp = _unshift_tokens(self.decode.select_token(q, _shift_left(k, pad), ctx), pad, Tk)
                else:
                    tp = self.decode.select_token(q, k, ctx)
                if lo is not None and bool((lo > 0).any()):
                    tp = _clip_tokens(tp, lo, B, Tk)
                note_selection(self, "decode", tp, t0, q, (1, Tk))
                be = self._be() if self._be() in ("triton", "reference") else None
                return sparse_decode_attention(q, k, v, tp, scale=scale, backend=be, **extra)[:, :, None]
        kl = None if lo is None or not bool((lo > 0).any()) else (Tk - lo).to(torch.int32)
        return _attention(q, k, v, None, causal=True, scale=scale, kv_lens=kl, padding_side="left",
                          backend=self._be(), **extra)
