"""Sparse decode: attention of one new query token on selected tokens/pages of a KV cache.

``sparse_decode_attention`` is the public entry point (validation + backend choice); the Triton
kernel is in ``triton.py`` and the plain torch reference in ``reference.py``.
"""
from __future__ import annotations

import importlib.util
import math
import os
from typing import Optional

import torch

from ...patterns import TokenPattern
from .. import backends as _backends
from .._checks import check_scale, check_sinks, check_softcap
from .reference import paged_to_contiguous, row_lens, sparse_decode_reference

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _err(name: str, expected: str, got) -> ValueError:
    return ValueError(f"{name}: expected {expected}, got {got}")


_HAS_TRITON = importlib.util.find_spec("triton") is not None
_TRI = None
if _HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1"):
    # imported now (not inside the call) so that torch.compile never traces an import
    from . import triton as _TRI  # noqa: F811


def _impl():
    global _TRI
    if _TRI is None:
        from . import triton as _t

        _TRI = _t
    return _TRI


def _triton_ok(q) -> tuple[bool, str]:
    """(ok, reason) for the Triton kernel on ``q`` (the shared rule of ``kernels.backends``)."""
    return _backends.triton_can_run(q)


def sparse_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            pattern: Optional[TokenPattern] = None, *, scale: Optional[float] = None,
                            kv_lens=None, return_lse: bool = False, backend: Optional[str] = None,
                            log_weight: Optional[torch.Tensor] = None, block_table: Optional[torch.Tensor] = None,
                            validate: bool = True, num_splits: Optional[int] = None,
                            softcap: Optional[float] = None, sinks: Optional[torch.Tensor] = None):
    """sparse_decode_attention: decode attention of one query token on selected KV-cache tokens/pages.

    Args:
        q: ``[B, Hq, D]`` (or ``[B, Hq, 1, D]``), float16/bfloat16/float32.
        k_cache, v_cache: contiguous layout ``[B, Hkv, T, D]``; or paged layout
            ``[n_pages, Hkv, P_cache, D]`` together with ``block_table`` (then ``T = max_pages * P_cache``).
            ``Hkv`` divides ``Hq`` (GQA); same dtype and device as q.
        pattern: ``TokenPattern`` with batch 1 or B, heads 1, Hkv (one selection shared by the
            query heads of a KV group: each K/V row is read once for the whole group) or Hq, and
            ``kv_len == T``. With ``page_size = P > 1`` index ``i`` selects tokens ``[i*P, (i+1)*P)``.
            None = dense attention over the first ``kv_lens[b]`` tokens.
        scale: softmax scale, default ``1/sqrt(D)``.
        kv_lens: int ``[B]`` valid cache length of each sequence (default T), or ``[B, Hkv]`` per KV
            head (rows of different lengths in one tensor: each head reads only its first
            ``kv_lens[b, h]`` slots, with ``pattern=None`` too); selected tokens at or beyond the
            length are an error (``validate=True``) and are never read.
        return_lse: also return the natural-log log-sum-exp, float32 ``[B, Hq]``.
        backend: "triton" or "reference"; None = triton on CUDA (or CPU with TRITON_INTERPRET=1),
            else the reference.
        log_weight: optional float ``[B or 1, pattern.heads, max_n]`` added to the logit of each
            selected entry (``e^{s + w}``: an entry standing for ``n`` merged tokens gets ``log n``,
            RazorAttention's compensation token). Requires a pattern.
        block_table: int32 ``[B, max_pages]`` for the paged layout.
        validate: run the O(selection) checks (indices in range of ``kv_lens``, sorted, counts
            within the cache); benchmarks may turn it off. Cheap shape checks always run.
        num_splits: split-K slices per (batch, row); None chooses from the GPU size.
        softcap: logit soft-capping (Gemma 2): scores ``softcap * tanh(q.k * scale / softcap)``, applied
            before ``log_weight``; a positive number or None.
        sinks: float ``[Hq]`` learned sink logits (gpt-oss): one softmax term per query head with no
            value; the lse includes it. Decode is forward-only (no gradient).

    Returns:
        ``out [B, Hq, D]`` in q's dtype (and ``lse`` when ``return_lse``). Rows with no selected
        token give zeros and ``lse = -inf``.
    """
    if not isinstance(q, torch.Tensor):
        raise _err("q", "a torch.Tensor", type(q).__name__)
    if q.dim() == 4 and q.shape[2] == 1:
        q = q[:, :, 0]
    if q.dim() != 3:
        raise _err("q", "[B, Hq, D] or [B, Hq, 1, D]", tuple(q.shape))
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise _err(name, "a 4-D tensor", getattr(t, "shape", type(t).__name__))
        if t.dtype != q.dtype:
            raise _err(f"{name}.dtype", f"{q.dtype} (as q)", t.dtype)
        if t.device != q.device:
            raise _err(f"{name}.device", f"{q.device} (as q)", t.device)
    if q.dtype not in _DTYPES:
        raise _err("q.dtype", "float16, bfloat16 or float32", q.dtype)
    if tuple(v_cache.shape[:3]) != tuple(k_cache.shape[:3]) or v_cache.shape[3] != q.shape[2]:
        raise _err("v_cache", f"shape {tuple(k_cache.shape[:3]) + (q.shape[2],)}", tuple(v_cache.shape))
    B, Hq, D = q.shape
    if k_cache.shape[3] != D:
        raise _err("k_cache", f"head_dim {D} (as q)", k_cache.shape[3])
    if D < 1 or D > 256:
        raise _err("head_dim", "1..256", D)
    Hkv = k_cache.shape[1]
    if Hkv == 0 or Hq % Hkv:
        raise _err("k_cache heads", f"a divisor of q's {Hq} heads", Hkv)
    if block_table is not None:
        if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 or block_table.shape[0] != B:
            raise _err("block_table", f"an int tensor [B={B}, max_pages]", getattr(block_table, "shape", None))
        if block_table.dtype not in (torch.int32, torch.int64) or block_table.device != q.device:
            raise _err("block_table", f"int32/int64 on {q.device}", (block_table.dtype, block_table.device))
        block_table = block_table.to(torch.int32)
        T = block_table.shape[1] * k_cache.shape[2]
        if validate and block_table.numel() and (int(block_table.min()) < 0 or int(block_table.max()) >= k_cache.shape[0]):
            raise _err("block_table", f"page ids in [0, {k_cache.shape[0]})", "an id out of range")
    else:
        if k_cache.shape[0] != B:
            raise _err("k_cache batch", f"{B} (as q)", k_cache.shape[0])
        T = k_cache.shape[2]
    scale = check_scale(scale)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    softcap = check_softcap(softcap)
    sinks = check_sinks(sinks, Hq, q.device, values=validate)
    if kv_lens is None:
        kl = torch.full((B,), T, dtype=torch.int32, device=q.device)
    else:
        kl = kv_lens if isinstance(kv_lens, torch.Tensor) and kv_lens.device == q.device else torch.as_tensor(kv_lens, device=q.device)
        if (kl.dim() not in (1, 2) or kl.shape[0] != B or (kl.dim() == 2 and kl.shape[1] != Hkv)
                or kl.dtype.is_floating_point or kl.dtype == torch.bool):
            raise _err("kv_lens", f"an integer tensor [{B}] or [{B}, {Hkv}] (per KV head)", (kl.dtype, tuple(kl.shape)))
        if kl.dtype != torch.int32:
            kl = kl.to(torch.int32)
        if validate and kl.numel() and pattern is None:  # with a pattern: checked in _deep_check's one sync
            _check_lens(kl, T)
    if pattern is not None:
        if not isinstance(pattern, TokenPattern):
            raise _err("pattern", "a sparsattn.patterns.TokenPattern or None", type(pattern).__name__)
        if pattern.batch not in (1, B):
            raise _err("pattern batch", f"1 or {B}", pattern.batch)
        if pattern.heads not in (1, Hkv, Hq):
            raise _err("pattern heads", f"1, {Hkv} (kv heads) or {Hq} (query heads)", pattern.heads)
        if pattern.kv_len != T:
            raise _err("pattern.kv_len", f"{T} (the cache's token capacity)", pattern.kv_len)
        if pattern.device != q.device:
            raise _err("pattern device", f"{q.device}", pattern.device)
        if validate:
            _deep_check(pattern, kl, T)
    if log_weight is not None:
        if pattern is None:
            raise _err("log_weight", "None when pattern is None (it is per selected entry)", "a tensor")
        if (not isinstance(log_weight, torch.Tensor) or log_weight.dim() != 3
                or log_weight.shape[0] not in (1, B) or log_weight.shape[1] != pattern.heads
                or log_weight.shape[2] != pattern.indices.shape[2] or not log_weight.dtype.is_floating_point):
            raise _err("log_weight", f"a float tensor [1 or {B}, {pattern.heads}, {pattern.indices.shape[2]}]",
                       getattr(log_weight, "shape", type(log_weight).__name__))
        if validate and bool(torch.isnan(log_weight).any() | torch.isposinf(log_weight).any()):
            raise _err("log_weight", "finite values or -inf", "NaN or +inf")
    if backend not in (None, "triton", "reference"):
        raise _err("backend", "'triton', 'reference' or None", repr(backend))
    use_triton = _backends.choose("sparse_decode", q, backend) == "triton"
    if use_triton:
        idx = cnt = None
        P = 1
        if pattern is not None:
            idx, cnt, P = pattern.indices, pattern.counts, pattern.page_size
            if pattern.heads == 1 and Hkv > 1:
                # one shared selection: still a row per KV head (broadcast by a zero stride)
                idx, cnt = idx.expand(-1, Hkv, -1), cnt.expand(-1, Hkv)
                if log_weight is not None:
                    log_weight = log_weight.expand(-1, Hkv, -1)
        impl = _impl()
        if impl.sparse_decode_op is not None and _compiling():
            out, lse = impl.sparse_decode_op(q, k_cache, v_cache, idx, cnt, kl, log_weight, block_table, scale, P,
                                        int(num_splits or 0), softcap or 0.0, sinks)
        else:
            out, lse = impl.sparse_decode_triton(q, k_cache, v_cache, idx, cnt, kl, scale=scale, page_size=P,
                                            log_weight=log_weight, block_table=block_table, num_splits=num_splits,
                                            softcap=softcap, sinks=sinks)
    else:
        out, lse = sparse_decode_reference(q, k_cache, v_cache, pattern, scale=scale, kv_lens=kl,
                                           log_weight=log_weight, block_table=block_table, softcap=softcap, sinks=sinks)
    return (out, lse) if return_lse else out


def _compiling() -> bool:
    try:
        return bool(torch.compiler.is_compiling())
    except Exception:  # pragma: no cover
        return False


def _check_lens(kv_lens: torch.Tensor, T: int) -> None:
    if bool(((kv_lens < 0) | (kv_lens > T)).any()):
        raise _err("kv_lens", f"lengths in [0, {T}]", f"min {int(kv_lens.min())}, max {int(kv_lens.max())}")


def _deep_check(pattern: TokenPattern, kv_lens: torch.Tensor, T: Optional[int] = None) -> None:
    """O(selection) checks: lengths in ``[0, T]`` (when ``T`` is given), counts within the cache of
    each row, indices in range and sorted. Every condition is reduced on the device and read back
    in one host sync; the details of a failure are computed only then."""
    P = pattern.page_size
    idx, cnt = pattern.indices, pattern.counts
    B = kv_lens.shape[0]
    if pattern.batch == 1 and B > 1:
        idx, cnt = idx.expand(B, -1, -1), cnt.expand(B, -1)
    if kv_lens.dim() == 2 and idx.shape[1] == 1:
        idx, cnt = idx.expand(-1, kv_lens.shape[1], -1), cnt.expand(-1, kv_lens.shape[1])
    units = (row_lens(kv_lens, idx.shape[1]) + P - 1) // P  # [B, rows]
    no = torch.zeros((), dtype=torch.bool, device=idx.device)
    valid = torch.arange(idx.shape[-1], device=idx.device) < cnt[..., None]
    flags = [
        ((kv_lens < 0) | (kv_lens > T)).any() if T is not None and kv_lens.numel() else no,
        (cnt < 0).any() if cnt.numel() else no,
        (cnt.long() > idx.shape[-1]).any() if cnt.numel() else no,
        (cnt.long() > units).any() if cnt.numel() else no,
        (((idx < 0) | (idx.long() >= units[..., None])) & valid).any() if idx.numel() else no,
        (~(idx[..., 1:] > idx[..., :-1]) & valid[..., 1:]).any() if idx.numel() and idx.shape[-1] > 1 else no,
    ]
    lens_bad, neg, over_n, over_units, out_of_range, unsorted = torch.stack(flags).tolist()  # one host sync
    if lens_bad:
        _check_lens(kv_lens, T)
    if neg:
        raise _err("pattern.counts", "values >= 0", f"min {int(cnt.min())}")
    if over_n:
        raise _err("pattern.counts", f"values <= {idx.shape[-1]} (indices per row)", f"max {int(cnt.max())}")
    if over_units:
        raise _err("pattern.counts", "a budget no larger than the cache (kv_lens / page_size per row)",
                   f"max {int(cnt.max())} with kv_lens {kv_lens.tolist()[:8]}")
    if out_of_range:
        raise _err("pattern.indices", "values in [0, ceil(kv_lens[b] / page_size)) within counts", "an index out of range")
    if unsorted:
        raise _err("pattern.indices", "strictly increasing values within counts", "unsorted or repeated indices")


__all__ = ["sparse_decode_attention", "sparse_decode_reference", "paged_to_contiguous"]
