"""Block-sparse attention kernels: Triton forward/backward (``triton.py``) and a torch reference
(``reference.py``), wrapped as ``torch.library`` custom ops so they work under ``torch.compile``.

``block_sparse_attention(q, k, v, pattern, ...)`` is the differentiable entry point; most users
call ``sparsattn.attention`` which validates inputs and picks a backend.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

from ...patterns import BlockPattern
from .reference import block_sparse_reference, dense_reference

__all__ = ["block_sparse_attention", "block_sparse_reference", "dense_reference", "kernel_config"]

#: Testing aid: fill freshly allocated outputs with NaN before the kernels run, so that any
#: element a kernel fails to write shows up as NaN (set by the test-suite, never in production).
POISON_OUTPUTS = False


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _log_len(n: int) -> int:
    return max(1, (n + 1).bit_length())


#: block lists up to this long are tested for membership by comparison (columns path); longer by bisection
LIST_COMPARE_MAX = 512


def _list_len(n: int, has_cols: bool) -> int:
    """LIST constexpr of the column path: the list width rounded up to 32, or 0 (binary search)."""
    if not has_cols or n > LIST_COMPARE_MAX:
        return 0
    return max(32, -(-n // 32) * 32)


def kernel_config(D: int, block_q: int, block_k: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Launch configuration (tile sizes, warps, stages) for the forward and backward kernels.

    ``SPARSATTN_FWD_CONFIG="BLOCK_N,warps,stages"`` and ``SPARSATTN_BWD_CONFIG="BLOCK_M,BLOCK_N,warps,stages"``
    override the defaults (used by the benchmark's tuning sweep); semantics never depend on them.
    """
    BD = max(16, _next_pow2(D))
    big = BD > 64
    # measured on the H200 (bf16, D=128, 32K, causal and 10%-random masks; see docs/kernels.md):
    # fwd BLOCK_N=128/8 warps/3 stages and bwd (BLOCK_M=64, BLOCK_N=128, 8 warps, 2 stages) were best
    cfg = {
        "fwd_bn": min(block_k, 128),
        "fwd_warps": 8 if block_q >= 128 else 4,
        "fwd_stages": 3,
        "bwd_bm": min(block_q, 64),
        "bwd_bn": min(block_k, 128),
        "bwd_warps": 8 if big else 4,
        "bwd_stages": 2,
    }
    if BD > 128:  # large head dims: smaller tiles to fit shared memory
        cfg.update(fwd_bn=min(block_k, 32), fwd_stages=2, bwd_bm=min(block_q, 32), bwd_bn=min(block_k, 64), bwd_stages=1)
    if device.type != "cuda":  # the CPU interpreter: fewer, larger steps run much faster
        cfg.update(fwd_bn=block_k, bwd_bm=block_q, bwd_bn=block_k)
    elif dtype == torch.float32:
        cfg["fwd_bn"] = min(cfg["fwd_bn"], 32 if big else 64)
        cfg["bwd_bm"] = min(cfg["bwd_bm"], 32)
        cfg["bwd_bn"] = min(cfg["bwd_bn"], 32)
    env = os.environ.get("SPARSATTN_FWD_CONFIG")
    if env:
        bn, w, s = (int(x) for x in env.split(","))
        cfg.update(fwd_bn=min(bn, block_k), fwd_warps=w, fwd_stages=s)
    env = os.environ.get("SPARSATTN_BWD_CONFIG")
    if env:
        bm, bn, w, s = (int(x) for x in env.split(","))
        cfg.update(bwd_bm=min(bm, block_q), bwd_bn=min(bn, block_k), bwd_warps=w, bwd_stages=s)
    return cfg


def _upcast(q: torch.Tensor) -> bool:
    """bf16 tiles are computed in fp32 under the CPU interpreter, whose bf16 dot is wrong
    (triton 3.9: it multiplies the raw bit patterns). On the GPU bf16 runs natively."""
    return q.dtype == torch.bfloat16 and q.device.type != "cuda"


def _bh_strides(t: torch.Tensor):
    """(batch stride, head stride) with 0 for broadcast (size-1) dims."""
    return (t.stride(0) if t.shape[0] > 1 else 0), (t.stride(1) if t.shape[1] > 1 else 0)


def _lens(x: Optional[torch.Tensor], B: int, T: int, device) -> torch.Tensor:
    if x is None:
        return torch.full((B,), T, dtype=torch.int32, device=device)
    return x.to(device=device, dtype=torch.int32).contiguous()


def _offs(x: Optional[torch.Tensor], B: int, device) -> torch.Tensor:
    if x is None:
        return torch.zeros(B, dtype=torch.int32, device=device)
    return x.to(device=device, dtype=torch.int32).contiguous()


#: "no causal offset" for the kernels' full-block test (``off < P_OFF`` is then never true)
_NO_OFFSET = -(1 << 30)


def _pattern_offset(p: BlockPattern) -> int:
    """The pattern's causal diagonal offset ``kv_len - q_len`` (``_NO_OFFSET`` when not causal).

    ``validate()`` guarantees full blocks lie on or below this diagonal. A sequence whose own offset
    ``kv_lens[b] - q_lens[b]`` is smaller (fewer keys than the pattern's shape relative to its
    queries) has its diagonal further left, so its full blocks can cross it: the kernels then mask
    full blocks too (issue 10: rows past the first query block were wrong for q_len > kv_len).
    """
    return int(p.kv_len - p.q_len) if p.causal else _NO_OFFSET


# ----------------------------------------------------------------------------------------------
# raw launchers (no autograd)
# ----------------------------------------------------------------------------------------------


def _pattern_args(fcnt, fidx, pcnt, pidx):
    s_fcb, s_fch = _bh_strides(fcnt)
    s_fib, s_fih = _bh_strides(fidx)
    s_pcb, s_pch = _bh_strides(pcnt)
    s_pib, s_pih = _bh_strides(pidx)
    return (s_fcb, s_fch, s_fib, s_fih, fidx.stride(2), s_pcb, s_pch, s_pib, s_pih, pidx.stride(2))


def _cap2(softcap: float) -> float:
    """The cap in the kernels' log2 units (1.0 when there is none: the argument is then unused)."""
    from . import triton as K

    return float(softcap) * K.LOG2E if softcap > 0 else 1.0


def _fwd(q, k, v, fcnt, fidx, pcnt, pidx, mids, bank, cidx, ccnt, q_len, kv_len, q_off, k_off,
         block_q, block_k, causal, scale, packed, even, p_off, sinks=None, softcap=0.0):
    from . import triton as K

    B = q_len.shape[0]
    _, Hq, Tq, D = q.shape
    Hkv = k.shape[1]
    Hp = fcnt.shape[1]
    cfg = kernel_config(D, block_q, block_k, q.dtype, q.device)
    BD = max(16, _next_pow2(D))
    if not even:
        o = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.full((q.shape[0], Hq, Tq), float("-inf"), dtype=torch.float32, device=q.device)
    else:
        o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty((q.shape[0], Hq, Tq), dtype=torch.float32, device=q.device)
        if POISON_OUTPUTS:
            o.fill_(float("nan"))
            lse.fill_(float("nan"))
    has_bank = mids is not None
    has_cols = cidx is not None
    if not has_bank:
        mids, bank = pidx, pidx  # unused placeholders
    if not has_cols:
        cidx, ccnt = fcnt, fcnt
    s_ccb, s_cch = _bh_strides(ccnt) if has_cols else (0, 0)
    s_cib, s_cih = _bh_strides(cidx) if has_cols else (0, 0)
    sb = lambda t: 0 if packed else t.stride(0)  # noqa: E731
    grid = (fcnt.shape[2], Hq, B)  # the pattern's query blocks (the longest sequence)
    K._bs_fwd_kernel[grid](
        q, k, v, o, lse,
        sb(q), q.stride(1), q.stride(2), sb(k), k.stride(1), k.stride(2), sb(v), v.stride(1), v.stride(2),
        sb(o), o.stride(1), o.stride(2), sb(lse), lse.stride(1),
        q_off, q_len, k_off, kv_len,
        fcnt, fidx, pcnt, pidx, mids, bank, cidx, ccnt, sinks if sinks is not None else lse,
        *_pattern_args(fcnt, fidx, pcnt, pidx), s_ccb, s_cch, s_cib, s_cih,
        scale * K.LOG2E, _cap2(softcap), Hq // Hkv, Hq // Hp, Hq // (ccnt.shape[1] if has_cols else 1), p_off,
        D=D, BLOCK_D=BD, BLOCK_M=block_q, BLOCK_N=cfg["fwd_bn"], BLOCK_KP=block_k, CAUSAL=causal,
        HAS_BANK=has_bank, HAS_COLS=has_cols, EVEN=even,
        LOG_F=_log_len(fidx.shape[-1]), LOG_P=_log_len(pidx.shape[-1]),
        LIST_F=_list_len(fidx.shape[-1], has_cols), LIST_P=_list_len(pidx.shape[-1], has_cols),
        PREC="ieee" if q.dtype == torch.float32 else "tf32", UPCAST=_upcast(q),
        SOFTCAP=softcap > 0, HAS_SINKS=sinks is not None,
        num_warps=cfg["fwd_warps"], num_stages=cfg["fwd_stages"],
    )
    return o, lse


def _bwd(do, q, k, v, o, lse, fcnt, fidx, pcnt, pidx, mids, bank, cidx, ccnt, tcnt, tidx, tslot,
         q_len, kv_len, q_off, k_off, block_q, block_k, causal, scale, packed, even, p_off, sinks=None, softcap=0.0):
    """dq, dk, dv (and d sinks: an empty tensor without sinks). The lse saved by the forward already
    includes the sink term, so the kernels' ``p = exp(s - lse)`` are the probabilities of the keys and
    the sink is one more softmax column with no value: ``d sink_h = -sum_rows P(sink) * delta``."""
    from . import triton as K

    B = q_len.shape[0]
    _, Hq, Tq, D = q.shape
    Hkv = k.shape[1]
    Hp = fcnt.shape[1]
    cfg = kernel_config(D, block_q, block_k, q.dtype, q.device)
    BD = max(16, _next_pow2(D))
    do = do.contiguous() if do.stride(-1) != 1 else do
    # dq/dk/dv are written with q/k/v's strides: views (e.g. slices of a fused qkv projection) are
    # copied, since zeros_like gives a non-dense view contiguous strides (out-of-bounds writes)
    q, k, v = (t if t.is_contiguous() else t.contiguous() for t in (q, k, v))
    delta = (do.float() * o.float()).sum(-1)  # [B, Hq, Tq]
    lse = lse.contiguous()
    delta = delta.contiguous()
    dq = torch.zeros_like(q)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    if POISON_OUTPUTS and even:  # every element must then be written by the kernels
        for t in (dq, dk, dv):
            t.fill_(float("nan"))
    has_bank = mids is not None
    has_cols = cidx is not None
    if not has_bank:
        mids, bank = pidx, pidx
    if has_cols:
        dkc = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dvc = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    else:
        dkc = dvc = delta
        cidx, ccnt = fcnt, fcnt
    s_ccb, s_cch = _bh_strides(ccnt) if has_cols else (0, 0)
    s_cib, s_cih = _bh_strides(cidx) if has_cols else (0, 0)
    sb = lambda t: 0 if packed else t.stride(0)  # noqa: E731
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    K._bwd_dq_kernel[(fcnt.shape[2], Hq, B)](
        q, k, v, do, lse, delta, dq, dkc, dvc,
        sb(q), q.stride(1), q.stride(2), sb(k), k.stride(1), k.stride(2), sb(v), v.stride(1), v.stride(2),
        sb(do), do.stride(1), do.stride(2), sb(lse), lse.stride(1),
        (0 if packed else dkc.stride(0)) if has_cols else 0, dkc.stride(1) if has_cols else 0,
        dkc.stride(2) if has_cols else 0,
        q_off, q_len, k_off, kv_len,
        fcnt, fidx, pcnt, pidx, mids, bank, cidx, ccnt,
        *_pattern_args(fcnt, fidx, pcnt, pidx), s_ccb, s_cch, s_cib, s_cih,
        scale, scale * K.LOG2E, _cap2(softcap), Hq // Hkv, Hq // Hp, Hq // (ccnt.shape[1] if has_cols else 1), p_off,
        D=D, BLOCK_D=BD, BLOCK_M=block_q, BLOCK_N=cfg["bwd_bn"], BLOCK_KP=block_k, CAUSAL=causal,
        HAS_BANK=has_bank, HAS_COLS=has_cols, EVEN=even,
        LOG_F=_log_len(fidx.shape[-1]), LOG_P=_log_len(pidx.shape[-1]), PREC=prec, UPCAST=_upcast(q),
        LIST_F=_list_len(fidx.shape[-1], has_cols), LIST_P=_list_len(pidx.shape[-1], has_cols),
        SOFTCAP=softcap > 0, num_warps=cfg["fwd_warps"], num_stages=cfg["bwd_stages"],
    )
    s_tcb, s_tch = _bh_strides(tcnt)
    s_tib, s_tih = _bh_strides(tidx)
    s_pib, s_pih = _bh_strides(pidx)
    bn = cfg["bwd_bn"]
    n_kt = tcnt.shape[2] * (block_k // bn)  # key tiles of the longest sequence
    K._bwd_dkv_kernel[(n_kt, Hkv, B)](
        q, k, v, do, lse, delta, dk, dv,
        sb(q), q.stride(1), q.stride(2), sb(k), k.stride(1), k.stride(2), sb(v), v.stride(1), v.stride(2),
        sb(do), do.stride(1), do.stride(2), sb(lse), lse.stride(1),
        q_off, q_len, k_off, kv_len,
        tcnt, tidx, tslot, mids, bank,
        s_tcb, s_tch, s_tib, s_tih, tidx.stride(2), s_pib, s_pih, pidx.stride(2),
        scale, scale * K.LOG2E, _cap2(softcap), Hq // Hkv, Hq // Hp, fidx.shape[-1],
        D=D, BLOCK_D=BD, BLOCK_QP=block_q, BLOCK_M=cfg["bwd_bm"], BLOCK_N=bn, BLOCK_KP=block_k,
        CAUSAL=causal, HAS_BANK=has_bank, EVEN=even, PREC=prec, UPCAST=_upcast(q), SOFTCAP=softcap > 0,
        num_warps=cfg["bwd_warps"], num_stages=cfg["bwd_stages"],
    )
    if has_cols:
        dk = (dk.float() + dkc).to(k.dtype)
        dv = (dv.float() + dvc).to(v.dtype)
    if sinks is None:
        return dq, dk, dv, lse.new_empty(0)
    # rows outside every sequence keep lse = -inf (and delta = 0): no sink term there
    p_sink = torch.where(torch.isinf(lse) & (lse < 0), torch.zeros_like(lse),
                         torch.exp(sinks.float()[None, :, None] - lse))
    dsinks = -(p_sink * delta).sum((0, 2))
    return dq, dk, dv, dsinks.to(sinks.dtype)


# ----------------------------------------------------------------------------------------------
# custom ops (torch.compile-friendly) + autograd
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("sparsattn::block_sparse_fwd", mutates_args=())
def _op_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fcnt: torch.Tensor, fidx: torch.Tensor,
            pcnt: torch.Tensor, pidx: torch.Tensor, mids: Optional[torch.Tensor], bank: Optional[torch.Tensor],
            cidx: Optional[torch.Tensor], ccnt: Optional[torch.Tensor], tcnt: Optional[torch.Tensor],
            tidx: Optional[torch.Tensor], tslot: Optional[torch.Tensor], q_len: torch.Tensor, kv_len: torch.Tensor,
            q_off: torch.Tensor, k_off: torch.Tensor, block_q: int, block_k: int, causal: bool, scale: float,
            packed: bool, even: bool, p_off: int, sinks: Optional[torch.Tensor] = None,
            softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    return _fwd(q, k, v, fcnt, fidx, pcnt, pidx, mids, bank, cidx, ccnt, q_len, kv_len, q_off, k_off,
                block_q, block_k, causal, scale, packed, even, p_off, sinks, softcap)


@_op_fwd.register_fake
def _(q, k, v, fcnt, fidx, pcnt, pidx, mids, bank, cidx, ccnt, tcnt, tidx, tslot, q_len, kv_len, q_off, k_off,
      block_q, block_k, causal, scale, packed, even, p_off, sinks=None, softcap=0.0):
    return torch.empty_like(q), q.new_empty((q.shape[0], q.shape[1], q.shape[2]), dtype=torch.float32)


@torch.library.custom_op("sparsattn::block_sparse_bwd", mutates_args=())
def _op_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
            lse: torch.Tensor, fcnt: torch.Tensor, fidx: torch.Tensor, pcnt: torch.Tensor, pidx: torch.Tensor,
            mids: Optional[torch.Tensor], bank: Optional[torch.Tensor], cidx: Optional[torch.Tensor],
            ccnt: Optional[torch.Tensor], tcnt: torch.Tensor, tidx: torch.Tensor, tslot: torch.Tensor,
            q_len: torch.Tensor, kv_len: torch.Tensor, q_off: torch.Tensor, k_off: torch.Tensor, block_q: int,
            block_k: int, causal: bool, scale: float, packed: bool, even: bool, p_off: int,
            sinks: Optional[torch.Tensor] = None, softcap: float = 0.0
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd(do, q, k, v, o, lse, fcnt, fidx, pcnt, pidx, mids, bank, cidx, ccnt, tcnt, tidx, tslot,
                q_len, kv_len, q_off, k_off, block_q, block_k, causal, scale, packed, even, p_off, sinks, softcap)


@_op_bwd.register_fake
def _(do, q, k, v, o, lse, fcnt, fidx, pcnt, pidx, mids, bank, cidx, ccnt, tcnt, tidx, tslot, q_len, kv_len, q_off,
      k_off, block_q, block_k, causal, scale, packed, even, p_off, sinks=None, softcap=0.0):
    ds = sinks.new_empty(sinks.shape) if sinks is not None else lse.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), ds


def _setup(ctx, inputs, output):
    (q, k, v, fcnt, fidx, pcnt, pidx, mids, bank, cidx, ccnt, tcnt, tidx, tslot, q_len, kv_len, q_off, k_off,
     block_q, block_k, causal, scale, packed, even, p_off, sinks, softcap) = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, fcnt, fidx, pcnt, pidx, mids, bank, cidx, ccnt, tcnt, tidx, tslot,
                          q_len, kv_len, q_off, k_off, sinks)
    ctx.meta = (block_q, block_k, causal, scale, packed, even, p_off)
    ctx.softcap = softcap


def _backward(ctx, do, dlse):
    (q, k, v, o, lse, fcnt, fidx, pcnt, pidx, mids, bank, cidx, ccnt, tcnt, tidx, tslot,
     q_len, kv_len, q_off, k_off, sinks) = ctx.saved_tensors
    if tcnt is None:
        raise RuntimeError("block_sparse_attention: backward needs the transposed pattern; call with "
                           "inputs that require grad so it is prepared")
    if dlse is not None and bool((dlse != 0).any()):
        raise RuntimeError("block_sparse_attention: gradients through the returned lse are not supported")
    dq, dk, dv, dsinks = _op_bwd(do, q, k, v, o, lse, fcnt, fidx, pcnt, pidx, mids, bank, cidx, ccnt, tcnt, tidx,
                                 tslot, q_len, kv_len, q_off, k_off, *ctx.meta, sinks=sinks, softcap=ctx.softcap)
    return (dq, dk, dv) + (None,) * 22 + ((dsinks if sinks is not None else None), None)


_op_fwd.register_autograd(_backward, setup_context=_setup)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockPattern, *,
                           scale: Optional[float] = None, q_lens: Optional[torch.Tensor] = None,
                           kv_lens: Optional[torch.Tensor] = None, q_offsets: Optional[torch.Tensor] = None,
                           kv_offsets: Optional[torch.Tensor] = None, packed: bool = False,
                           softcap: Optional[float] = None, sinks: Optional[torch.Tensor] = None):
    """block_sparse_attention: Triton attention of ``q [B, Hq, Tq, D]`` on ``k, v [B, Hkv, Tk, D]``
    restricted to ``pattern``; returns ``(out, lse)`` (lse natural log, float32, ``-inf`` for empty rows).

    ``softcap``: scores ``softcap * tanh(s / softcap)`` after the scale, before the mask (Gemma 2).
    ``sinks``: float ``[Hq]`` learned sink logits (gpt-oss) that join every row's softmax denominator
    without a value; the returned lse includes them (a sequence's row with no key: zeros, ``lse = sink``).
    Differentiable with respect to q, k, v and sinks. Per-sequence lengths/offsets address a padded batch
    (``q_lens``...) or, with ``packed=True``, sequences packed along the token axis of a batch-1
    tensor (offsets are then the cumulative starts). Inputs are assumed validated.
    """
    if v.shape[-1] != q.shape[-1]:
        raise ValueError(f"v: the triton backend needs v's head_dim equal to q's ({q.shape[-1]}), got {v.shape[-1]}")
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    n_seq = q_lens.shape[0] if q_lens is not None else (kv_lens.shape[0] if kv_lens is not None else q.shape[0])
    Tq, Tk = q.shape[2], k.shape[2]
    varlen = q_lens is not None or kv_lens is not None
    even = (not varlen) and Tk % pattern.block_k == 0 and Tq % pattern.block_q == 0
    qL, kL = _lens(q_lens, n_seq, Tq, q.device), _lens(kv_lens, n_seq, Tk, q.device)
    qO, kO = _offs(q_offsets, n_seq, q.device), _offs(kv_offsets, n_seq, q.device)
    p = pattern
    cols = p.columns
    cidx = cols.indices if cols is not None else None
    ccnt = cols.counts if cols is not None else None
    need_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                             or (sinks is not None and sinks.requires_grad))
    tr = p.transposed() if need_grad else None
    bank = None
    if p.mask_bank is not None:  # the kernel reads tiles as bytes
        bank = p.derived("bank_u8", lambda: p.mask_bank.to(torch.uint8).contiguous())
    out, lse = _op_fwd(q, k, v, p.full_kv_num_blocks, p.full_kv_indices, p.kv_num_blocks, p.kv_indices,
                       p.mask_ids, bank, cidx, ccnt,
                       tr["q_num_blocks"] if tr else None, tr["q_indices"] if tr else None,
                       tr["q_slot"] if tr else None, qL, kL, qO, kO,
                       p.block_q, p.block_k, bool(p.causal), scale, bool(packed), bool(even), _pattern_offset(p),
                       sinks=None if sinks is None else sinks.contiguous(),
                       softcap=0.0 if softcap is None else float(softcap))
    return out, lse
