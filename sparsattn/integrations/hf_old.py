"""hf: Hugging Face transformers integration through transformers' ``AttentionInterface``.

Nothing happens at import. ``patch(model, method=...)``:

1. registers (once, lazily) an attention function and a mask function under the name
   ``"sparsattn"`` with ``transformers.AttentionInterface`` / ``AttentionMaskInterface`` (the same
   global tables ``ALL_ATTENTION_FUNCTIONS`` / ``ALL_MASK_ATTENTION_FUNCTIONS`` that hold "sdpa",
   "flash_attention_2"...);
2. sets ``_attn_implementation`` to ``"sparsattn"`` on the config objects held by the model's
   attention modules (transformers 5.x attention modules look up
   ``ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, ...)`` at every
   forward, and the mask helpers look up the mask function by the same name), remembering the
   previous value so that ``unpatch`` restores it exactly;
3. attaches a small per-layer binding (the chosen methods) to each attention module, and a
   forward pre-hook on the base model that opens a per-forward frame (cross-layer ``state``,
   the cache, the context-length warning).

The registered mask function does not materialise an O(T^2) mask: for the plain causal and the
sliding-window causal masks it returns a ``MaskInfo`` (kind, window and the original 2-D padding
mask); for anything else (packed sequences, block overlays, bidirectional...) it returns the
boolean 4-D mask transformers' SDPA path would use, and the attention function then falls back
to dense SDPA for that call (logged at DEBUG): never silently wrong.

Prefill: a method that computes attention itself (``Method.attend``, e.g. HyperAttention) is called
with q/k/v and its output is the layer's (dense SDPA for padded batches or sliding-window layers);
otherwise ``method.select(q, k, SelectContext(...))`` on q/k after RoPE (as HF passes them), then
``sparsattn.attention`` with the pattern (intersected with the layer's sliding window, if any) and,
for padded batches, ``q_lens/kv_lens/padding_side``. Decode (one new token with a cache): a
decode-phase method's ``select(q, k_cache, ctx)`` returns a ``TokenPattern`` and
``sparsattn.kernels.sparse_decode.sparse_decode_attention`` computes it; prefill-phase methods run
dense at decode (as MInference does).

Hooks for methods, in ``SelectContext.extras``: ``phase`` ("prefill"|"decode"), ``v`` (prefill: the
values ``[B, Hkv, Tk, D]``, aligned like k), ``q_lens``,
``kv_lens``, ``padding_side`` (q/k given to ``select`` at prefill are always right-aligned, i.e.
sequence b occupies rows ``[0, q_lens[b])``), ``position_ids`` (when the model passes them),
``sliding_window``, ``num_kv_groups``, and, for a method whose class sets
``needs_pre_rope = True``, ``q_pre_rope`` / ``k_pre_rope``: the outputs of the module's
``q_proj``/``k_proj`` for the current tokens, ``[B, H, T, D]`` (before any q/k norm and RoPE),
captured by forward hooks installed only for such methods.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F

from .. import patterns as _patterns
from ..api import attention as _attention
from ..methods.base import Method, SelectContext, get_method, method_class
from ..patterns import BlockPattern, TokenPattern
from .hf_cache import SparseCache

log = logging.getLogger("sparsattn.integrations.hf")

NAME = "sparsattn"
_ATTR = "_sparsattn_layer"
_PATCH_ATTR = "_sparsattn_patch"
_DEFAULT_BLOCK = 64

#: Backend used by patched layers whose ``patch(..., backend=None)``: None = ``sparsattn.attention``'s
#: automatic choice. Tests on the CPU set "reference" to avoid the (slow) Triton interpreter.
DEFAULT_BACKEND: Optional[str] = None

__all__ = ["patch", "unpatch", "patched", "is_patched", "SparseCache", "MaskInfo", "attention_modules", "NAME"]

MethodSpec = Union[str, Method, type, dict]


# ----------------------------------------------------------------------------------------------
# registration with transformers (lazy: first patch() call)
# ----------------------------------------------------------------------------------------------

_REGISTERED = False


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    try:
        from transformers import AttentionInterface
    except ImportError:  # pragma: no cover - older layouts
        from transformers.modeling_utils import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, sparse_attention_forward)
    AttentionMaskInterface.register(NAME, sparse_attention_mask)
    _REGISTERED = True


# ----------------------------------------------------------------------------------------------
# mask function: keeps the 2-D padding mask instead of building a 4-D one
# ----------------------------------------------------------------------------------------------


@dataclass
class MaskInfo:
    """MaskInfo: what the registered mask function hands to the attention function.

    Attributes:
        kind: "causal" or "sliding" (causal with a window).
        window: the window for "sliding" (query i sees keys j with ``0 <= i - j < window``).
        padding_mask: the 2-D bool mask ``[B, kv_seen]`` transformers received (None = no padding).
        kv_length, kv_offset: the sizes transformers computed for the mask (informative).
    """

    kind: str
    window: Optional[int]
    padding_mask: Optional[torch.Tensor]
    kv_length: Optional[int] = None
    kv_offset: int = 0


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
    from transformers.masking_utils import sdpa_mask

    kind, window = _classify_mask_function(kwargs.get("mask_function"))
    if kind is None or args:
        kw = dict(kwargs)
        kw["allow_is_causal_skip"] = False
        if "allow_is_bidirectional_skip" in kw:
            kw["allow_is_bidirectional_skip"] = False
        log.debug("sparsattn mask: mask function %r is not causal/sliding: materialising the 4-D mask",
                  getattr(kwargs.get("mask_function"), "__qualname__", kwargs.get("mask_function")))
        return sdpa_mask(*args, **kw)
    am = kwargs.get("attention_mask")
    if am is not None and not (isinstance(am, torch.Tensor) and am.dim() == 2):
        kw = dict(kwargs, allow_is_causal_skip=False)
        return sdpa_mask(**kw)
    if am is not None:
        am = am.to(torch.bool)
    return MaskInfo(kind, window, am, kwargs.get("kv_length"), int(kwargs.get("kv_offset", 0) or 0))


# ----------------------------------------------------------------------------------------------
# per-layer choice of methods (single method, or per-head composition)
# ----------------------------------------------------------------------------------------------


def _mname(m) -> str:
    return getattr(m, "name", "") or type(m).__name__


class _Choice:
    """The method(s) of one layer and phase: one method, or one method per query head."""

    def __init__(self, methods: list[Method], head_src: Optional[list[int]]):
        self.methods = methods
        self.head_src = head_src  # None = methods[0] for every head
        self._src_t: dict = {}

    def src(self, device) -> torch.Tensor:
        if device not in self._src_t:
            self._src_t[device] = torch.tensor(self.head_src, dtype=torch.long, device=device)
        return self._src_t[device]

    @property
    def dense_only(self) -> bool:
        """Only the registered "dense" method: the kernel's default causal pattern is used directly."""
        from ..methods.dense import Dense

        return all(type(m) is Dense for m in self.methods)

    @property
    def computes_output(self) -> bool:
        """One method for every head that computes attention itself (``Method.attend``)."""
        return self.head_src is None and self.methods[0].computes_output

    @property
    def needs_pre_rope(self) -> bool:
        return any(getattr(m, "needs_pre_rope", False) for m in self.methods)

    def describe(self) -> str:
        if self.head_src is None:
            return _mname(self.methods[0])
        return "heads[" + ",".join(_mname(self.methods[i]) for i in self.head_src) + "]"

    def select_block(self, q, k, ctx) -> Optional[BlockPattern]:
        pats = []
        for m in self.methods:
            if m.phase == "decode":
                pats.append(None)  # dense (causal) for this method's heads at prefill
                continue
            p = m.select(q, k, ctx)
            if not isinstance(p, BlockPattern):
                raise ValueError(f"method {_mname(m)!r}: select() returned {type(p).__name__} at prefill; "
                                 "expected a sparsattn.patterns.BlockPattern")
            if not p.causal:
                raise ValueError(f"method {_mname(m)!r}: returned a non-causal pattern for a causal decoder; "
                                 "build the pattern with causal=True")
            pats.append(p)
        if self.head_src is None:
            return pats[0]
        ref = next((p for p in pats if p is not None), None)
        if ref is None:
            return None
        pats = [p if p is not None else _patterns.causal(ref.q_len, ref.kv_len, block_q=ref.block_q,
                                                          block_k=ref.block_k, device=q.device) for p in pats]
        return _stack_block_heads(pats, [self.methods[i] for i in range(len(self.methods))], self.src(q.device),
                                  q.shape[0], q.shape[1])

    def select_token(self, q, k, ctx) -> TokenPattern:
        pats = []
        for m in self.methods:
            if m.phase != "decode":
                pats.append(None)  # every cached token for this method's heads
                continue
            p = m.select(q, k, ctx)
            if not isinstance(p, TokenPattern):
                raise ValueError(f"method {_mname(m)!r}: select() returned {type(p).__name__} at decode; "
                                 "expected a sparsattn.patterns.TokenPattern")
            pats.append(p)
        if self.head_src is None:
            return pats[0]
        Tk = k.shape[2]
        ps = next((p.page_size for p in pats if p is not None), 1)
        full = torch.ones(1, 1, -(-Tk // ps), dtype=torch.bool, device=q.device)
        pats = [p if p is not None else TokenPattern.from_mask(full, page_size=ps, kv_len=Tk) for p in pats]
        return _stack_token_heads(pats, self.methods, self.src(q.device), q.shape[0], q.shape[1])


def _to_bh(t: torch.Tensor, B: int, H: int, what: str) -> torch.Tensor:
    """Broadcast dims 0 (batch) and 1 (heads: 1, a divisor of H (GQA groups) or H) to (B, H)."""
    Hp = t.shape[1]
    if Hp != H:
        if Hp == 1:
            t = t.expand(t.shape[0], H, *t.shape[2:])
        elif H % Hp == 0:
            t = t.repeat_interleave(H // Hp, dim=1)
        else:
            raise ValueError(f"{what}: expected 1, a divisor of {H} or {H} heads, got {Hp}")
    if t.shape[0] != B:
        if t.shape[0] != 1:
            raise ValueError(f"{what}: expected batch 1 or {B}, got {t.shape[0]}")
        t = t.expand(B, *t.shape[1:])
    return t


def _pad_last(t: torch.Tensor, n: int, value=0) -> torch.Tensor:
    return F.pad(t, (0, n - t.shape[-1]), value=value) if t.shape[-1] < n else t


def _pick_heads(stacked: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """stacked [M, B, H, ...] -> [B, H, ...] taking method src[h] for head h."""
    h = torch.arange(src.numel(), device=src.device)
    return stacked[src, :, h].transpose(0, 1).contiguous()


def _stack_token_heads(pats: list[TokenPattern], methods, src, B, H) -> TokenPattern:
    ps = {p.page_size for p in pats}
    if len(ps) != 1:
        raise ValueError("heads: the methods produce token patterns of different page sizes "
                         + ", ".join(f"{_mname(m)}={p.page_size}" for m, p in zip(methods, pats)))
    w = max(p.indices.shape[-1] for p in pats)
    idx = torch.stack([_pad_last(_to_bh(p.indices, B, H, f"{_mname(m)} pattern"), w) for m, p in zip(methods, pats)])
    cnt = torch.stack([_to_bh(p.counts[..., None], B, H, f"{_mname(m)} pattern")[..., 0] for m, p in zip(methods, pats)])
    return TokenPattern(_pick_heads(idx, src), _pick_heads(cnt, src), pats[0].kv_len, pats[0].page_size)


def _stack_block_heads(pats: list[BlockPattern], methods, src, B, H) -> BlockPattern:
    """Compose per-head patterns: head h takes its blocks from ``pats[src[h]]``."""
    p0 = pats[0]
    for m, p in zip(methods, pats):
        if (p.block_q, p.block_k) != (p0.block_q, p0.block_k):
            raise ValueError("heads: the methods produce patterns of different block sizes ("
                             + ", ".join(f"{_mname(mm)}: {pp.block_q}x{pp.block_k}" for mm, pp in zip(methods, pats))
                             + "); give them the same block size")
        if (p.q_len, p.kv_len, p.causal) != (p0.q_len, p0.kv_len, p0.causal):
            raise ValueError(f"heads: method {_mname(m)!r} returned q_len/kv_len/causal "
                             f"{(p.q_len, p.kv_len, p.causal)}, expected {(p0.q_len, p0.kv_len, p0.causal)}")
    wp = max(p.kv_indices.shape[-1] for p in pats)
    wf = max(p.full_kv_indices.shape[-1] for p in pats)

    def field(get, w=None, value=0):
        ts = []
        for m, p in zip(methods, pats):
            t = _to_bh(get(p), B, H, f"{_mname(m)} pattern")
            ts.append(_pad_last(t, w, value) if w is not None else t)
        return _pick_heads(torch.stack(ts), src)

    kvn = field(lambda p: p.kv_num_blocks)
    kvi = field(lambda p: p.kv_indices, wp)
    fkn = field(lambda p: p.full_kv_num_blocks)
    fki = field(lambda p: p.full_kv_indices, wf)
    mask_ids = mask_bank = None
    if any(p.mask_bank is not None for p in pats):
        banks, offs, o = [], [], 0
        for p in pats:
            offs.append(o)
            if p.mask_bank is not None:
                banks.append(p.mask_bank)
                o += p.mask_bank.shape[0]
        mask_bank = torch.cat(banks)
        ids = []
        for p, off in zip(pats, offs):
            if p.mask_ids is None:
                ids.append(torch.full_like(p.kv_indices, -1))
            else:
                ids.append(torch.where(p.mask_ids >= 0, p.mask_ids + off, p.mask_ids))
        mask_ids = _pick_heads(torch.stack([_pad_last(_to_bh(t, B, H, "mask_ids"), wp, -1) for t in ids]), src)
    columns = None
    if any(p.columns is not None for p in pats):
        empty = TokenPattern(torch.zeros(1, 1, 1, dtype=torch.int32, device=src.device),
                             torch.zeros(1, 1, dtype=torch.int32, device=src.device), p0.kv_len)
        columns = _stack_token_heads([p.columns if p.columns is not None else empty for p in pats], methods, src, B, H)
    return BlockPattern(kvn, kvi, fkn, fki, p0.block_q, p0.block_k, p0.q_len, p0.kv_len, p0.causal,
                        mask_ids=mask_ids, mask_bank=mask_bank, columns=columns)


# ----------------------------------------------------------------------------------------------
# helpers for padded batches
# ----------------------------------------------------------------------------------------------


def _left_to_right(x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D] with sequence b in rows [T - lens[b], T) -> rows [0, lens[b]) (rest zero)."""
    B, H, T, D = x.shape
    pad = (T - lens.long())[:, None]
    idx = torch.arange(T, device=x.device)[None, :] + pad
    valid = idx < T
    idx = idx.clamp(max=T - 1)
    out = x.gather(2, idx[:, None, :, None].expand(B, H, T, D))
    return out * valid[:, None, :, None].to(x.dtype)


def _shift_left(x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Rows of ``x [B, H, T, D]`` moved ``pad[b]`` slots to the front (left padding -> right padding)."""
    T = x.shape[2]
    src = (torch.arange(T, device=x.device)[None, :] + pad[:, None]) % T  # [B, T]
    return torch.gather(x, 2, src[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


def _unshift_tokens(tp: TokenPattern, pad: torch.Tensor, Tk: int) -> TokenPattern:
    """Token picks made on right-aligned rows (``_shift_left``) -> slots of the left-padded cache."""
    m = tp.to_token_mask()  # [B or 1, H, Tk]
    m = m.expand(pad.shape[0], *m.shape[1:]) if m.shape[0] != pad.shape[0] else m
    src = (torch.arange(Tk, device=m.device)[None, :] - pad[:, None]) % Tk  # slot j held row position j - pad
    return TokenPattern.from_mask(torch.gather(m, 2, src[:, None, :].expand(-1, m.shape[1], -1)), kv_len=Tk)


def _clip_tokens(tp: TokenPattern, lo: torch.Tensor, B: int, Tk: int) -> TokenPattern:
    """Drop selected tokens below ``lo[b]`` (left padding / outside the window); page_size becomes 1."""
    m = tp.to_token_mask()
    m = m.expand(B, *m.shape[1:]) if m.shape[0] != B else m
    keep = torch.arange(Tk, device=lo.device)[None, :] >= lo[:, None]
    return TokenPattern.from_mask(m & keep[:, None, :], kv_len=Tk)


def _dense_masked(q, k, v, keep: torch.Tensor, scale) -> torch.Tensor:
    """Dense SDPA with a boolean keep-mask ``[B|1, 1|H, Tq, Tk]``; rows without any key give zeros."""
    Hq, Hkv = q.shape[1], k.shape[1]
    if Hkv != Hq:
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    if keep.dtype != torch.bool:  # additive float mask, as transformers' eager/sdpa paths accept
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep.to(q.dtype), scale=scale)
    any_row = keep.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep | ~any_row, scale=scale)
    return out * any_row.to(out.dtype)


# ----------------------------------------------------------------------------------------------
# the registered attention function
# ----------------------------------------------------------------------------------------------


def sparse_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: Optional[float] = None, **kwargs):
    """sparse_attention_forward: the attention function registered under ``"sparsattn"``.

    HF calling convention: q ``[B, Hq, Tq, D]``, k/v ``[B, Hkv, Tk, D]`` (after RoPE and the cache
    update); returns ``(out [B, Tq, Hq, D], None)``.
    """
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
        return self.backend if self.backend is not None else DEFAULT_BACKEND

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
        if kw.get("softcap") is not None:
            raise ValueError(f"attention logit softcapping (softcap={kw['softcap']}) is not supported by the "
                             "sparsattn kernels; unpatch the model or disable attn_logit_softcapping")
        for name in ("s_aux", "sinks"):
            if kw.get(name) is not None:
                raise ValueError(f"learned attention sinks ({name}) are not supported by the sparsattn kernels")
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
            out = cache.attend(self.index, q, k, v, scale=scale, backend=self._be())
            if out is not None:
                return out.transpose(1, 2).contiguous(), None
        if isinstance(mask, torch.Tensor):
            log.debug("sparsattn layer %d: 4-D mask from transformers: dense SDPA fallback", self.index)
            return _dense_masked(q, k, v, mask, scale).transpose(1, 2).contiguous(), None
        if not getattr(module, "is_causal", True):
            log.debug("sparsattn layer %d: non-causal attention: dense fallback", self.index)
            out = _attention(q, k, v, None, causal=False, scale=scale)
            return out.transpose(1, 2).contiguous(), None
        if isinstance(mask, MaskInfo):
            window = mask.window if mask.kind == "sliding" else None
        else:
            window = kw.get("sliding_window")
        lens = self._lengths(frame, mask if isinstance(mask, MaskInfo) else None, Tq, Tk, q.device)
        if isinstance(lens, tuple) and isinstance(lens[0], str):
            log.debug("sparsattn layer %d: %s: dense SDPA fallback", self.index, lens[1])
            keep = self._explicit_mask(mask, window, Tq, Tk, q.device)
            return _dense_masked(q, k, v, keep, scale).transpose(1, 2).contiguous(), None
        q_lens, kv_lens, side = lens if lens is not None else (None, None, "right")
        extras = {"q_lens": q_lens, "kv_lens": kv_lens, "padding_side": side, "sliding_window": window,
                  "num_kv_groups": Hq // k.shape[1]}
        if kw.get("position_ids") is not None:
            extras["position_ids"] = kw["position_ids"]
        if self.pre_rope:
            extras["q_pre_rope"] = self.pre_rope.pop("q", None)
            extras["k_pre_rope"] = self.pre_rope.pop("k", None)
        ctx = SelectContext(layer=self.index, causal=True, scale=scale, q_offset=Tk - Tq,
                            state=frame["state"], extras=extras)
        if Tq == 1 and Tk > 1:
            out = self._decode(q, k, v, scale, kv_lens, window, ctx)
        else:
            out = self._prefill(q, k, v, scale, q_lens, kv_lens, side, window, mask, ctx)
        return out.transpose(1, 2).contiguous(), None

    def _prefill(self, q, k, v, scale, q_lens, kv_lens, side, window, mask, ctx):
        B, Hq, Tq, D = q.shape
        Tk = k.shape[2]
        ctx.extras["phase"] = "prefill"
        if self.prefill is not None and self.prefill.computes_output:  # not a mask: the method attends
            if kv_lens is None and window is None:
                ctx.extras["v"] = v
                return self.prefill.methods[0].attend(q, k, v, ctx)[0]
            log.debug("sparsattn layer %d: %s with padding or a sliding window: dense SDPA fallback",
                      self.index, self.prefill.describe())
            keep = self._explicit_mask(mask if isinstance(mask, MaskInfo) else None, window, Tq, Tk, q.device)
            return _dense_masked(q, k, v, keep, scale)
        pattern = None
        if self.prefill is not None and not self.prefill.dense_only:
            if kv_lens is not None and Tq != Tk:
                # chunked prefill of a padded batch: per-sequence offsets differ, a pattern built
                # for the padded tensors would be misaligned -> exact dense attention instead
                log.debug("sparsattn layer %d: chunked prefill with padding: dense SDPA fallback", self.index)
                keep = self._explicit_mask(mask if isinstance(mask, MaskInfo) else None, window, Tq, Tk, q.device)
                return _dense_masked(q, k, v, keep, scale)
            qs, ks, vs = q, k, v
            if kv_lens is not None and side == "left":
                qs, ks, vs = _left_to_right(q, q_lens), _left_to_right(k, kv_lens), _left_to_right(v, kv_lens)
            ctx.extras["v"] = vs  # values aligned with ks (LongHeads builds chunk keys from them)
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
        return _attention(q, k, v, pattern, causal=True, scale=scale, q_lens=q_lens, kv_lens=kv_lens,
                          padding_side=side, backend=self._be())

    def _decode(self, q, k, v, scale, kv_lens, window, ctx):
        B, Hq, _, D = q.shape
        Tk = k.shape[2]
        ctx.extras["phase"] = "decode"
        lo = None
        if kv_lens is not None:
            lo = (Tk - kv_lens.long())
        if window is not None:
            wlo = torch.full((B,), max(Tk - int(window), 0), dtype=torch.long, device=q.device)
            lo = wlo if lo is None else torch.maximum(lo, wlo)
        if self.decode is not None:
            try:
                from ..kernels.sparse_decode import sparse_decode_attention
            except ImportError as e:
                log.debug("sparsattn layer %d: sparse decode kernel unavailable (%s): dense decode", self.index, e)
            else:
                pad = None if kv_lens is None else (Tk - kv_lens.long()).clamp(min=0)
                if pad is not None and bool((pad > 0).any()):
                    # decode methods read kv_lens as "the first n slots hold the sequence": give them
                    # the left-padded rows right-aligned, and map their picks back to cache slots
                    ctx.extras["padding_side"] = "right"
                    tp = _unshift_tokens(self.decode.select_token(q, _shift_left(k, pad), ctx), pad, Tk)
                else:
                    tp = self.decode.select_token(q, k, ctx)
                if lo is not None and bool((lo > 0).any()):
                    tp = _clip_tokens(tp, lo, B, Tk)
                be = self._be() if self._be() in ("triton", "reference") else None
                return sparse_decode_attention(q, k, v, tp, scale=scale, backend=be)[:, :, None]
        kl = None if lo is None or not bool((lo > 0).any()) else (Tk - lo).to(torch.int32)
        return _attention(q, k, v, None, causal=True, scale=scale, kv_lens=kl, padding_side="left",
                          backend=self._be())


# ----------------------------------------------------------------------------------------------
# discovery of attention modules
# ----------------------------------------------------------------------------------------------


def _dispatches_through_interface(m) -> bool:
    fwd = getattr(type(m), "forward", None)
    if fwd is None:
        return False
    try:
        code = inspect.unwrap(fwd).__code__
    except (AttributeError, ValueError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in code.co_names


def _heads(m) -> tuple[Optional[int], Optional[int]]:
    cfg = getattr(m, "config", None)
    hq = getattr(cfg, "num_attention_heads", None) or getattr(m, "num_heads", None)
    hkv = getattr(cfg, "num_key_value_heads", None) or getattr(m, "num_key_value_heads", None)
    if hkv is None and hq is not None and getattr(m, "num_key_value_groups", None):
        hkv = hq // m.num_key_value_groups
    return hq, hkv


def attention_modules(model) -> dict[int, torch.nn.Module]:
    """attention_modules: ``{layer_idx: module}`` of the decoder self-attention modules that dispatch
    through transformers' AttentionInterface; ValueError naming what is missing otherwise.

    Support is detected from the modules, not from a list of model families: a module must have
    ``config``, an int ``layer_idx``, ``scaling``, head counts (``config.num_attention_heads`` /
    ``num_key_value_heads``), look up ``ALL_ATTENTION_FUNCTIONS`` in its forward, be causal, and use
    no feature the kernels cannot honour (logit softcapping, learned sinks).
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module (a transformers model), got {type(model).__name__}")
    found: dict[int, torch.nn.Module] = {}
    rejected: list[str] = []
    for name, m in model.named_modules():
        if not (hasattr(m, "layer_idx") and hasattr(m, "config")):
            continue
        if not _dispatches_through_interface(m):
            if any(hasattr(m, a) for a in ("q_proj", "c_attn", "qkv_proj", "query")):
                rejected.append(f"{name} ({type(m).__name__}): does not dispatch through transformers' "
                                "AttentionInterface (ALL_ATTENTION_FUNCTIONS)")
            continue
        missing = []
        if not isinstance(getattr(m, "layer_idx", None), int):
            missing.append("an int layer_idx")
        if not isinstance(getattr(m, "scaling", None), (int, float)):
            missing.append("a float `scaling` attribute")
        hq, hkv = _heads(m)
        if not hq:
            missing.append("config.num_attention_heads")
        if not hkv:
            missing.append("config.num_key_value_heads (or num_key_value_groups)")
        if getattr(m, "is_cross_attention", False):
            missing.append("self-attention (this is cross-attention)")
        if missing:
            rejected.append(f"{name} ({type(m).__name__}): missing {', '.join(missing)}")
            continue
        if m.layer_idx in found:
            rejected.append(f"{name} ({type(m).__name__}): duplicate layer_idx {m.layer_idx} "
                            "(several attention stacks are not supported)")
            continue
        found[m.layer_idx] = m
    if rejected:
        raise ValueError(f"model: unsupported attention module(s) for sparsattn ({type(model).__name__}): "
                         + "; ".join(rejected[:4]) + ("; ..." if len(rejected) > 4 else ""))
    if not found:
        raise ValueError(f"model: {type(model).__name__} has no attention module that sparsattn can patch: "
                         "expected modules with config, layer_idx, scaling and head counts whose forward "
                         "dispatches through transformers' ALL_ATTENTION_FUNCTIONS")
    for idx, m in found.items():
        cap = getattr(m, "attn_logit_softcapping", None)
        if cap is None:
            cap = getattr(m.config, "attn_logit_softcapping", None)
        if cap is not None:
            raise ValueError(f"model: layer {idx} ({type(m).__name__}) uses attention logit softcapping "
                             f"(attn_logit_softcapping={cap}), which the sparsattn kernels do not implement; "
                             "set config.attn_logit_softcapping=None only if the model tolerates it")
        if isinstance(getattr(m, "sinks", None), torch.Tensor):
            raise ValueError(f"model: layer {idx} ({type(m).__name__}) uses learned attention sinks "
                             "(module.sinks), which the sparsattn kernels do not implement")
        if getattr(m, "is_causal", True) is not True:
            raise ValueError(f"model: layer {idx} ({type(m).__name__}) is not causal (is_causal=False); "
                             "sparsattn.integrations.hf supports causal decoders")
    return dict(sorted(found.items()))


def _base_model(model, modules: dict[int, torch.nn.Module]) -> torch.nn.Module:
    """The innermost module that contains every attention module and takes ``attention_mask``."""
    targets = {id(m) for m in modules.values()}
    best, best_n = model, None
    for m in model.modules():
        try:
            params = inspect.signature(m.forward).parameters
        except (TypeError, ValueError):
            continue
        if "attention_mask" not in params:
            continue
        ids = {id(x) for x in m.modules()}
        if targets <= ids and (best_n is None or len(ids) < best_n):
            best, best_n = m, len(ids)
    return best


# ----------------------------------------------------------------------------------------------
# spec resolution
# ----------------------------------------------------------------------------------------------


def _is_method_like(x) -> bool:
    return isinstance(x, (str, Method)) or (isinstance(x, type) and issubclass(x, Method))


def _resolve_layers(spec, layers: list[int], argname: str, default) -> dict[int, Any]:
    if spec is None:
        return {}
    if _is_method_like(spec):
        return {l: spec for l in layers}
    if not isinstance(spec, dict):
        raise ValueError(f"{argname}: expected a method name, a Method, or a dict {{layer: method, 'default': "
                         f"method}}, got {type(spec).__name__}")
    bad = [key for key in spec if not (key == "default" or (isinstance(key, int) and not isinstance(key, bool)))]
    if bad:
        raise ValueError(f"{argname}: keys must be layer indices (int) or 'default', got {bad}")
    unknown = sorted(key for key in spec if key != "default" and key not in layers)
    if unknown:
        raise ValueError(f"{argname}: unknown layer index(es) {unknown}; the model's attention layers are "
                         f"{layers[0]}..{layers[-1]}")
    dflt = spec.get("default", default)
    return {l: spec.get(l, dflt) for l in layers if spec.get(l, dflt) is not None}


class _Builder:
    """Turns names/classes/instances into Method objects, sharing instances and applying **config."""

    def __init__(self, config: dict):
        self.config = config
        self.used: set = set()
        self.cache: dict = {}

    def build(self, item, argname: str) -> Method:
        if isinstance(item, Method):
            m = item
        else:
            if isinstance(item, str):
                cls = method_class(item)  # ValueError listing valid names
            elif isinstance(item, type) and issubclass(item, Method):
                cls = item
            else:
                raise ValueError(f"{argname}: expected a method name, a Method instance or class, got {item!r}")
            key = id(cls)
            if key not in self.cache:
                fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
                cfg = {kk: vv for kk, vv in self.config.items() if kk in fields}
                self.used |= set(cfg)
                if isinstance(item, str):
                    self.cache[key] = get_method(item, **cfg)
                else:
                    self.cache[key] = cls(**cfg)
            m = self.cache[key]
        if not m.is_fitted:
            raise ValueError(f"{argname}: method {_mname(m)!r} needs {list(m.needs)} before use (call its fit/load)")
        return m

    def choice(self, item, argname: str, Hq: int, layer: int) -> _Choice:
        if isinstance(item, dict):
            bad = [h for h in item if not (h == "default" or (isinstance(h, int) and not isinstance(h, bool)))]
            if bad:
                raise ValueError(f"{argname}[{layer}]: a heads mapping takes query-head indices (int) or 'default', got {bad}")
            out_of = sorted(h for h in item if h != "default" and not 0 <= h < Hq)
            if out_of:
                raise ValueError(f"{argname}[{layer}]: head index(es) {out_of} out of range [0, {Hq})")
            dflt = item.get("default", "dense")
            per_head = [item.get(h, dflt) for h in range(Hq)]
            methods: list[Method] = []
            src = []
            for it in per_head:
                m = self.build(it, f"{argname}[{layer}]")
                pos = next((i for i, x in enumerate(methods) if x is m), None)
                if pos is None:
                    methods.append(m)
                    pos = len(methods) - 1
                src.append(pos)
            if len(methods) == 1:
                return _Choice(methods, None)
            return _Choice(methods, src)
        return _Choice([self.build(item, f"{argname}[{layer}]")], None)


# ----------------------------------------------------------------------------------------------
# the patch object, patch / unpatch / patched
# ----------------------------------------------------------------------------------------------


class _Patch:
    def __init__(self, model, base, modules, configs, saved):
        self.model_ref = weakref.ref(model)
        self.base = base
        self.modules = modules
        self.configs = configs
        self.saved = saved
        self.handles: list = []
        self.layers: dict = {}
        self.frames: list[dict] = []
        self.max_pos = None

    def frame(self) -> dict:
        if self.frames:
            return self.frames[-1]
        return {"state": {}}

    def pre_hook(self, module, args, kwargs):
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        am = kwargs.get("attention_mask")
        if am is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            am = args[1]
        x = kwargs.get("input_ids")
        if x is None and args and isinstance(args[0], torch.Tensor):
            x = args[0]
        if x is None:
            x = kwargs.get("inputs_embeds")
        n_new = int(x.shape[1]) if isinstance(x, torch.Tensor) and x.dim() >= 2 else 0
        past = 0
        if cache is not None and hasattr(cache, "get_seq_length"):
            try:
                past = int(cache.get_seq_length())
            except Exception:  # noqa: BLE001 - an empty/odd cache: no length
                past = 0
        if self.max_pos and past + n_new > self.max_pos:
            warnings.warn(f"sparsattn: context of {past + n_new} tokens is longer than the model's trained length "
                          f"(config.max_position_embeddings={self.max_pos}); quality may degrade", stacklevel=2)
        if isinstance(cache, SparseCache):
            cache.begin_forward(am if isinstance(am, torch.Tensor) and am.dim() == 2 else None)
            state = cache.state
        else:
            state = {}
        self.frames.append({"state": state, "cache": cache})

    def post_hook(self, module, args, kwargs, output):
        if self.frames:
            self.frames.pop()


def is_patched(model) -> bool:
    """is_patched: whether ``patch`` is active on ``model``."""
    return getattr(model, _PATCH_ATTR, None) is not None


def patch(model, method: MethodSpec = "dense", *, decode: Optional[MethodSpec] = None,
          heads: Optional[dict] = None, backend: Optional[str] = None, **config):
    """patch: route a transformers decoder's attention through sparsattn (undo with ``unpatch``).

    Args:
        model: a transformers causal LM (or its base model) whose attention modules dispatch through
            ``AttentionInterface`` (Llama, Qwen2/3, Mistral, Gemma/Gemma2(no softcap)/Gemma3...).
        method: a registered name, a ``Method`` instance or class, or ``{layer: spec, "default": spec}``
            (layers not listed and without "default" run "dense"). A spec may itself be a heads mapping
            ``{query_head: method, "default": method}``: per-head patterns are built by each method and
            stacked (all must share block sizes). Decode-phase methods given here are used at decode
            (prefill then runs dense); prefill-phase methods run dense at decode.
        decode: optional decode-phase methods, same forms as ``method`` (overrides ``method``'s
            decode choice per layer).
        heads: optional ``{query_head: method}`` applied to every layer on top of its method
            (the layer's method stays the default for the other heads).
        backend: kernel backend for ``sparsattn.attention`` ("triton", "flex", "reference"; None =
            automatic); the decode kernel gets it when it is "triton" or "reference".
        **config: hyper-parameters for the methods given by name or class; each key goes to every
            named method that has such a field (a key no method accepts is an error).
    Returns:
        ``model`` (patched in place).
    """
    if backend is not None and backend not in ("triton", "flex", "reference"):
        raise ValueError(f"backend: expected 'triton', 'flex', 'reference' or None, got {backend!r}")
    modules = attention_modules(model)
    layers = list(modules)
    Hq = {l: _heads(m)[0] for l, m in modules.items()}
    Hkv = {l: _heads(m)[1] for l, m in modules.items()}
    b = _Builder(config)
    pre_spec = _resolve_layers(method, layers, "method", "dense")
    dec_spec = _resolve_layers(decode, layers, "decode", None)
    if heads is not None:
        if not isinstance(heads, dict):
            raise ValueError(f"heads: expected a dict {{query_head: method}}, got {type(heads).__name__}")
        for l in layers:
            if isinstance(pre_spec.get(l), dict):
                raise ValueError(f"heads: layer {l} already has a heads mapping in `method`")
            pre_spec[l] = {**heads, "default": pre_spec.get(l, "dense")}
    bindings: dict[int, tuple] = {}
    for l in layers:
        pre = b.choice(pre_spec[l], "method", Hq[l], l) if l in pre_spec else None
        dec = b.choice(dec_spec[l], "decode", Hq[l], l) if l in dec_spec else None
        if pre is not None:
            phases = {m.phase == "decode" for m in pre.methods}
            if phases == {True}:  # decode methods given through `method`
                if dec is None:
                    dec = pre
                pre = None
            elif len(phases) == 2:
                raise ValueError(f"method[{l}]: a heads mapping mixes decode-phase and prefill-phase methods; "
                                 "give decode methods with decode=...")
        if dec is not None and not any(m.phase == "decode" for m in dec.methods):
            raise ValueError(f"decode[{l}]: expected decode-phase methods, got {dec.describe()} "
                             f"(valid: {', '.join(_decode_names()) or 'none registered'})")
        bindings[l] = (pre, dec)
    unused = sorted(set(config) - b.used)
    if unused:
        raise ValueError(f"config: hyper-parameter(s) {unused} are not accepted by any of the named methods")

    old = getattr(model, _PATCH_ATTR, None)
    if old is not None:  # re-patch: keep the original implementations to restore
        saved, configs = old.saved, old.configs
        _detach(model, old, restore=False)
    else:
        configs, saved = [], []
        seen = set()
        for m in modules.values():
            c = m.config
            if id(c) not in seen:
                seen.add(id(c))
                configs.append(c)
                saved.append(c.__dict__.get("_attn_implementation_internal", getattr(c, "_attn_implementation", None)))

    _register()
    base = _base_model(model, modules)
    p = _Patch(model, base, modules, configs, saved)
    p.max_pos = getattr(next(iter(modules.values())).config, "max_position_embeddings", None)
    ref = weakref.ref(p)
    p.layers = {l: _Layer(ref, l, bindings[l][0], bindings[l][1], Hkv[l], backend) for l in layers}
    for l, m in modules.items():  # check before attaching anything
        if any(c is not None and c.needs_pre_rope for c in bindings[l]):
            _check_pre_rope(m, l)
    _attach(model, p)
    log.debug("sparsattn: patched %s: %s", type(model).__name__,
              {l: (pre.describe() if pre else "dense", dec.describe() if dec else "dense")
               for l, (pre, dec) in bindings.items()})
    return model


def _attach(model, p: _Patch) -> None:
    for l, m in p.modules.items():
        lb = p.layers[l]
        setattr(m, _ATTR, lb)
        if any(c is not None and c.needs_pre_rope for c in (lb.prefill, lb.decode)):
            p.handles += _pre_rope_hooks(m, lb)
    p.handles.append(p.base.register_forward_pre_hook(p.pre_hook, with_kwargs=True))
    p.handles.append(p.base.register_forward_hook(p.post_hook, with_kwargs=True, always_call=True))
    for c in p.configs:
        _set_impl(c, NAME)
    model.__dict__[_PATCH_ATTR] = p


def _decode_names() -> list[str]:
    from ..methods import list_methods

    return list_methods("decode")


def _check_pre_rope(m, l: int) -> None:
    if not (hasattr(m, "q_proj") and hasattr(m, "k_proj") and hasattr(m, "head_dim")):
        raise ValueError(f"method: layer {l} needs pre-RoPE q/k but {type(m).__name__} has no q_proj/k_proj/head_dim")


def _pre_rope_hooks(m, lb: _Layer) -> list:

    def hook(which):
        def fn(mod, args, out):
            B, T = out.shape[0], out.shape[1]
            lb.pre_rope[which] = out.view(B, T, -1, m.head_dim).transpose(1, 2)
        return fn

    return [m.q_proj.register_forward_hook(hook("q")), m.k_proj.register_forward_hook(hook("k"))]


def _set_impl(config, value) -> None:
    if "_attn_implementation_internal" in config.__dict__ or hasattr(type(config), "_attn_implementation"):
        config.__dict__["_attn_implementation_internal"] = value
    else:  # pragma: no cover - very old configs
        config._attn_implementation = value


def _detach(model, p: _Patch, restore: bool) -> None:
    for h in p.handles:
        h.remove()
    p.handles.clear()
    for m in p.modules.values():
        if _ATTR in m.__dict__:
            del m.__dict__[_ATTR]
    if restore:
        for c, s in zip(p.configs, p.saved):
            _set_impl(c, s)
    model.__dict__.pop(_PATCH_ATTR, None)


def unpatch(model):
    """unpatch: restore the exact attention implementation the model had before ``patch``; returns model.

    A model that is not patched is returned unchanged.
    """
    p = getattr(model, _PATCH_ATTR, None)
    if p is not None:
        _detach(model, p, restore=True)
    return model


@contextlib.contextmanager
def patched(model, method: MethodSpec = "dense", **kwargs):
    """patched: context-manager form of ``patch``; restores the previous state on exit (also on error).

    If the model was already patched, that patch (methods, hooks) is restored on exit.
    """
    prev = getattr(model, _PATCH_ATTR, None)
    patch(model, method, **kwargs)
    try:
        yield model
    finally:
        cur = getattr(model, _PATCH_ATTR, None)
        if prev is None:
            unpatch(model)
        else:
            if cur is not None:
                _detach(model, cur, restore=False)
            _attach(model, prev)
