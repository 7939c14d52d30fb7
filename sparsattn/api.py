"""Public attention entry points: validation, backend choice, and the packed (varlen) form."""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Optional

import torch

from . import patterns as _patterns
from .kernels import backends as _backends
from .kernels._checks import check_scale, check_sinks, check_softcap
from .patterns import BlockPattern

log = logging.getLogger("sparsattn")

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _err(name: str, expected: str, got) -> ValueError:
    return ValueError(f"{name}: expected {expected}, got {got}")


def _check_lens(name: str, t, B: int, T: int, device) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t)
    if t.dim() != 1 or t.shape[0] != B:
        raise _err(name, f"a 1-D integer tensor of length {B}", tuple(t.shape))
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise _err(name, "an integer tensor", t.dtype)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) > T):
        raise _err(name, f"lengths in [0, {T}]", f"min {int(t.min())}, max {int(t.max())}")
    return t.to(device=device, dtype=torch.int32)


def validate_inputs(q, k, v, pattern: Optional[BlockPattern], scale) -> Optional[float]:
    """Check q/k/v/pattern/scale; raise ValueError naming the argument and what was expected.
    Returns the scale as a Python float (None stays None)."""
    scale = check_scale(scale)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise _err(name, "a torch.Tensor", type(t).__name__)
        if t.dim() != 4:
            raise _err(name, "a 4-D tensor [batch, heads, tokens, head_dim]", f"{t.dim()}-D shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise _err(f"{name}.dtype", "float16, bfloat16 or float32", t.dtype)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise _err("k/v dtype", f"the same dtype as q ({q.dtype})", (k.dtype, v.dtype))
    if k.device != q.device or v.device != q.device:
        raise _err("k/v device", f"the same device as q ({q.device})", (k.device, v.device))
    B, Hq, Tq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise _err("k/v batch", f"{B} (as q)", (k.shape[0], v.shape[0]))
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise _err("v", f"heads and tokens equal to k's {tuple(k.shape[1:3])}", tuple(v.shape[1:3]))
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv:
        raise _err("k heads", f"a divisor of q's {Hq} heads (GQA/MQA)", Hkv)
    if k.shape[3] != D:
        raise _err("k head_dim", f"{D} (as q)", k.shape[3])
    if D < 1 or D > 256 or v.shape[3] > 256:
        raise _err("head_dim", "1..256", (D, v.shape[3]))
    if pattern is not None:
        if not isinstance(pattern, BlockPattern):
            raise _err("pattern", "a sparsattn.patterns.BlockPattern or None", type(pattern).__name__)
        if pattern.q_len != Tq or pattern.kv_len != k.shape[2]:
            raise _err("pattern", f"q_len={Tq}, kv_len={k.shape[2]} (the inputs' token counts)",
                       f"q_len={pattern.q_len}, kv_len={pattern.kv_len}")
        _check_pattern(pattern, B, Hq, Hkv, q.device)
    return scale


def _check_pattern(pattern: BlockPattern, B: int, Hq: int, Hkv: int, device) -> None:
    """Batch, heads, device and (once per state of the pattern) its values."""
    if pattern.batch not in (1, B):
        raise _err("pattern batch", f"1 or {B}", pattern.batch)
    if pattern.heads not in (1, Hkv, Hq):
        raise _err("pattern heads", f"1, {Hkv} (kv heads) or {Hq} (query heads)", pattern.heads)
    if pattern.device != device:
        raise _err("pattern device", f"{device} (as q)", pattern.device)
    if pattern.columns is not None:
        c = pattern.columns
        if c.batch not in (1, B) or c.heads not in (1, Hkv, Hq):
            raise _err("pattern.columns", f"batch 1 or {B}, heads 1, {Hkv} or {Hq}", (c.batch, c.heads))
        if c.device != device:
            raise _err("pattern.columns device", f"{device}", c.device)
    pattern.ensure_valid()  # value checks once per state (again after any in-place change)


# ----------------------------------------------------------------------------------------------
# backend choice: the block_sparse row of the one table in ``sparsattn.kernels.backends``
# ----------------------------------------------------------------------------------------------


def _row(pred):
    return lambda q, pattern, extra: pred(q, pattern=pattern, **extra)


#: name -> ``can_run(q, pattern, extra) -> (ok, reason)`` (kept for callers; the table lives in kernels.backends)
BACKENDS = {name: _row(pred) for name, pred in _backends.TABLE["block_sparse"].items()}
_ORDER = tuple(_backends.TABLE["block_sparse"])


def choose_backend(q, pattern, *, backend: Optional[str] = None, **extra) -> str:
    """choose_backend: the backend that will run, by the table's order; logs every refusal (DEBUG).

    With ``backend`` given, that backend is used or a ValueError says why it cannot run. The rule
    (Triton on CUDA, or on the CPU with ``TRITON_INTERPRET=1``; then flex; then the reference) is
    ``sparsattn.kernels.backends``'s, shared by every kernel family.
    """
    if backend is not None and backend not in BACKENDS:
        raise _err("backend", f"one of {sorted(BACKENDS)} or None", repr(backend))
    return _backends.choose("block_sparse", q, backend, pattern=pattern, **extra)


_DEFAULT_PATTERNS: "OrderedDict[tuple, BlockPattern]" = OrderedDict()


def _max_offset(ql: Optional[torch.Tensor], kl: Optional[torch.Tensor], Tq: int, Tk: int) -> int:
    """Largest causal diagonal offset ``kv_len - q_len`` over the sequences (one host sync)."""
    if ql is None and kl is None:
        return Tk - Tq
    qv = ql.long() if ql is not None else torch.full_like(kl, Tq, dtype=torch.long)
    kv = kl.long() if kl is not None else torch.full_like(ql, Tk, dtype=torch.long)
    return int((kv - qv).max()) if qv.numel() else Tk - Tq


def _causal_cover(Tq: int, Tk: int, bs: int, max_off: int, device) -> BlockPattern:
    """Causal pattern of shape (Tq, Tk) whose block lists also hold every key block that a sequence
    with diagonal offset up to ``max_off`` needs (per-sequence lengths with ``q_len < kv_len``
    relative to ``Tq, Tk``: the plain ``causal(Tq, Tk)`` lists would cut such rows short). Full blocks
    stay below the pattern's own diagonal; the rest are partial (masked per sequence by the kernels)."""
    r0, r1, c0, c1 = _patterns._block_grid(Tq, Tk, bs, bs, device)
    anyb = c0 <= r1 + max_off
    full = anyb & (c1 <= r0 + (Tk - Tq))
    fc, fi = _patterns._lists_from_sel(full[None, None])
    pc, pi = _patterns._lists_from_sel((anyb & ~full)[None, None])
    return BlockPattern(pc, pi, fc, fi, bs, bs, Tq, Tk, True)


def _default_pattern(Tq, Tk, causal, device, D, max_off=None):
    """The dense/causal pattern for ``pattern=None``, cached (LRU, 16 entries) so that repeated
    calls with the same shapes do not rebuild and re-validate it. ``max_off``: with per-sequence
    lengths, the largest ``kv_len - q_len`` of a sequence (causal: the lists must reach its diagonal)."""
    bs = 128 if D <= 128 else 64
    cover = causal and max_off is not None and max_off > Tk - Tq
    key = (Tq, Tk, bool(causal), str(device), bs, max_off if cover else None)
    p = _DEFAULT_PATTERNS.get(key)
    if p is None:
        if cover:
            p = _causal_cover(Tq, Tk, bs, max_off, device)
        else:
            build = _patterns.causal if causal else _patterns.dense
            p = build(Tq, Tk, block_q=bs, device=device)
        _DEFAULT_PATTERNS[key] = p
        if len(_DEFAULT_PATTERNS) > 16:
            _DEFAULT_PATTERNS.popitem(last=False)
    else:
        _DEFAULT_PATTERNS.move_to_end(key)
    return p


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Optional[BlockPattern] = None, *,
              causal: bool = False, scale: Optional[float] = None, return_lse: bool = False,
              backend: Optional[str] = None, q_lens=None, kv_lens=None, padding_side: str = "right",
              softcap: Optional[float] = None, sinks: Optional[torch.Tensor] = None):
    """attention: softmax attention of ``q`` on ``k, v`` restricted to ``pattern`` (dense when None).

    Args:
        q: ``[B, Hq, Tq, D]``; k, v: ``[B, Hkv, Tk, D]`` with ``Hkv`` dividing ``Hq`` (GQA/MQA,
            K/V are never repeated in memory). float16, bfloat16 or float32; D up to 256.
        pattern: a ``BlockPattern`` with ``q_len == Tq`` and ``kv_len == Tk``; None = dense
            (causal if ``causal``).
        causal: for ``pattern=None``, use the causal mask (bottom-right aligned when Tq != Tk, and per
            sequence with ``q_lens`` / ``kv_lens``); with a pattern, ``causal=True`` requires a causal pattern.
        scale: softmax scale, default ``1/sqrt(D)``: a positive number up to 1e6 (Python or NumPy
            scalar, or a 0-d tensor).
        return_lse: also return the natural log-sum-exp per row, float32 ``[B, Hq, Tq]``.
        backend: "triton", "flex" or "reference"; None picks the first that can run (set the
            ``sparsattn`` logger to DEBUG to see why others were refused).
        q_lens, kv_lens: optional per-sequence lengths ``[B]`` for a padded batch; pattern blocks and
            causality are relative to each sequence; rows past a sequence's length are zero.
        padding_side: "right" (sequence b occupies tokens ``[0, len)``) or "left" (``[T - len, T)``).
        softcap: logit soft-capping (Gemma 2): scores become ``softcap * tanh(q.k * scale / softcap)``
            before the mask; a positive number or None.
        sinks: learned attention-sink logits (gpt-oss): a float tensor ``[Hq]``, one per query head,
            that joins every row's softmax denominator without a value (``out`` is scaled by
            ``1 - P(sink)``); differentiable. The returned lse includes the sink term.

    Returns:
        ``out [B, Hq, Tq, D]`` in q's dtype, and ``lse`` when ``return_lse``. Query rows with no
        key get zeros (and ``lse = -inf``, or the sink logit with ``sinks``), never NaN.
    """
    scale = validate_inputs(q, k, v, pattern, scale)
    softcap = check_softcap(softcap)
    sinks = check_sinks(sinks, q.shape[1], q.device)
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    if padding_side not in ("right", "left"):
        raise _err("padding_side", "'right' or 'left'", repr(padding_side))
    ql = _check_lens("q_lens", q_lens, B, Tq, q.device)
    kl = _check_lens("kv_lens", kv_lens, B, Tk, q.device)
    if pattern is None:
        mo = _max_offset(ql, kl, Tq, Tk) if causal else None
        pattern = _default_pattern(Tq, Tk, causal, q.device, D, mo)
    elif causal and not pattern.causal:
        raise _err("causal", "False with a non-causal pattern (build the pattern with causal=True)", True)
    qo = ko = None
    if padding_side == "left":
        if ql is not None:
            qo = (Tq - ql).to(torch.int32)
        if kl is not None:
            ko = (Tk - kl).to(torch.int32)
    extra = _logit_extras(softcap, sinks)
    name = choose_backend(q, pattern, backend=backend, varlen=ql is not None or kl is not None,
                          need_lse=return_lse, **extra)
    out, lse = _run(name, q, k, v, pattern, scale, ql, kl, qo, ko, need_lse=return_lse, **extra)
    return (out, lse) if return_lse else out


def _logit_extras(softcap, sinks) -> dict:
    """``softcap`` / ``sinks`` keyword arguments, only those given (backends that predate them see none)."""
    extra = {}
    if softcap is not None:
        extra["softcap"] = softcap
    if sinks is not None:
        extra["sinks"] = sinks
    return extra


def _run(name, q, k, v, pattern, scale, ql, kl, qo, ko, need_lse: bool = True, **extra):
    if name == "reference":
        from .kernels.block_sparse.reference import block_sparse_reference

        return block_sparse_reference(q, k, v, pattern, scale=scale, q_lens=ql, kv_lens=kl, q_offsets=qo, kv_offsets=ko,
                                      **extra)
    if name == "flex":
        from .kernels.block_sparse.flex import flex_block_sparse

        return flex_block_sparse(q, k, v, pattern, scale=scale, need_lse=need_lse, **extra)
    from .kernels.block_sparse import block_sparse_attention

    return block_sparse_attention(q, k, v, pattern, scale=scale, q_lens=ql, kv_lens=kl, q_offsets=qo, kv_offsets=ko,
                                  **extra)


def _as_cu(name: str, cu, device) -> torch.Tensor:
    try:
        return torch.as_tensor(cu, device=device)
    except (TypeError, ValueError, RuntimeError) as e:
        raise _err(name, "a 1-D integer tensor [n_sequences + 1]", f"{type(cu).__name__} ({e})") from None


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q, cu_seqlens_k=None,
                     pattern: Optional[BlockPattern] = None, *, causal: bool = False, scale: Optional[float] = None,
                     return_lse: bool = False, backend: Optional[str] = None, softcap: Optional[float] = None,
                     sinks: Optional[torch.Tensor] = None):
    """attention_varlen: attention over packed sequences (flash-attention's varlen form).

    Args:
        q: ``[Hq, total_q, D]``; k, v: ``[Hkv, total_k, D]``: the tokens of all sequences concatenated.
        cu_seqlens_q: int ``[N + 1]`` cumulative query lengths starting at 0; cu_seqlens_k likewise
            (default: equal to cu_seqlens_q).
        pattern: a ``BlockPattern`` with batch 1 or N, ``q_len`` / ``kv_len`` = the longest
            sequence; block indices are relative to each sequence's start. None = dense/causal.
        softcap, sinks: as in ``attention`` (sinks ``[Hq]``).
    Returns:
        ``out [Hq, total_q, D]`` (and ``lse [Hq, total_q]`` when ``return_lse``).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise _err(name, "a 3-D tensor [heads, total_tokens, head_dim]", getattr(t, "shape", type(t)))
    cu_q = _as_cu("cu_seqlens_q", cu_seqlens_q, q.device)
    cu_k = cu_q if cu_seqlens_k is None else _as_cu("cu_seqlens_k", cu_seqlens_k, q.device)
    for name, cu, total in (("cu_seqlens_q", cu_q, q.shape[1]), ("cu_seqlens_k", cu_k, k.shape[1])):
        if cu.dim() != 1 or cu.numel() < 2 or cu.dtype.is_floating_point or cu.dtype.is_complex or cu.dtype == torch.bool:
            raise _err(name, "a 1-D integer tensor [n_sequences + 1]", (cu.dtype, tuple(cu.shape)))
        if int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu[1:] < cu[:-1]).any()):
            raise _err(name, f"non-decreasing values from 0 to {total}", cu.tolist()[:8])
    if cu_q.numel() != cu_k.numel():
        raise _err("cu_seqlens_k", f"{cu_q.numel()} entries (as cu_seqlens_q)", cu_k.numel())
    ql = (cu_q[1:] - cu_q[:-1]).to(torch.int32)
    kl = (cu_k[1:] - cu_k[:-1]).to(torch.int32)
    N = ql.numel()
    Tq, Tk = int(ql.max()), int(kl.max())
    q4, k4, v4 = q[None], k[None], v[None]
    scale = validate_inputs(q4, k4, v4, None, scale)
    extra = _logit_extras(check_softcap(softcap), check_sinks(sinks, q.shape[0], q.device))
    if pattern is None:
        mo = _max_offset(ql, kl, Tq, Tk) if causal else None
        pattern = _default_pattern(Tq, Tk, causal, q.device, q.shape[-1], mo)
    elif not isinstance(pattern, BlockPattern):
        raise _err("pattern", "a sparsattn.patterns.BlockPattern or None", type(pattern).__name__)
    elif causal and not pattern.causal:
        raise _err("causal", "False with a non-causal pattern", True)
    if pattern.q_len != Tq or pattern.kv_len != Tk:
        raise _err("pattern", f"q_len={Tq}, kv_len={Tk} (the longest sequences)", (pattern.q_len, pattern.kv_len))
    if pattern.batch not in (1, N):
        raise _err("pattern batch", f"1 or {N} (sequences)", pattern.batch)
    _check_pattern(pattern, N, q.shape[0], k.shape[0], q.device)
    name = choose_backend(q4, pattern, backend=backend, varlen=True, **extra)
    if name == "reference" or name == "flex":
        # reference over the packed layout: each sequence is a batch entry with an offset
        from .kernels.block_sparse.reference import block_sparse_reference

        if name == "flex":
            raise ValueError("backend: 'flex' does not support packed sequences")
        qq = q4.expand(N, *q.shape)
        kk = k4.expand(N, *k.shape)
        vv = v4.expand(N, *v.shape)
        out_n, lse_n = block_sparse_reference(qq, kk, vv, pattern, scale=scale,
                                              q_lens=ql, kv_lens=kl, q_offsets=cu_q[:-1], kv_offsets=cu_k[:-1], **extra)
        # each sequence wrote only its own rows: sum the disjoint parts
        out = out_n.sum(0)
        lse = torch.full((q.shape[0], q.shape[1]), float("-inf"), device=q.device)
        for b in range(N):
            a, z = int(cu_q[b]), int(cu_q[b + 1])
            lse[:, a:z] = lse_n[b, :, a:z]
    else:
        from .kernels.block_sparse import block_sparse_attention

        out, lse = block_sparse_attention(q4, k4, v4, pattern, scale=scale, q_lens=ql, kv_lens=kl,
                                          q_offsets=cu_q[:-1].to(torch.int32), kv_offsets=cu_k[:-1].to(torch.int32),
                                          packed=True, **extra)
        out, lse = out[0], lse[0]
    return (out, lse) if return_lse else out

