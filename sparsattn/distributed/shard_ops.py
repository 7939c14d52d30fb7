"""Shard ops: attention of local query rows on one set of key blocks through the block-sparse kernel
(forward), and the gradient of that part given the *merged* output and log-sum-exp (backward), as
in Ring Attention's blockwise backward (arXiv 2310.01889).

With the merged ``out`` and ``lse`` of a row, the gradient of part ``s`` is the kernel's backward
run with those instead of the part's own: ``P = exp(S - lse)`` is then the global probability and
``delta = rowsum(dout * out)`` the global one, so parts never need their own outputs in backward.
The Triton backend calls the kernel's registered backward op directly; the reference backend
differentiates the torch reference with the upstream gradients of the merge.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import api as _api
from ..patterns import BlockPattern
from ..kernels.merge import part_weight

BACKENDS = ("triton", "reference")


def resolve_backend(q: torch.Tensor, backend: Optional[str]) -> str:
    """The kernel backend for context parallelism: "triton" or "reference" (flex has no backward
    from a merged log-sum-exp); None picks by ``sparsattn.api.choose_backend`` (flex -> triton)."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")
    name = _api.choose_backend(q, None, backend=backend)
    return "triton" if name == "flex" else name


def shard_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockPattern,
                  scale: Optional[float], backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of ``q`` on ``k, v`` restricted to the local ``pattern`` (no autograd)."""
    with torch.no_grad():
        return _api.attention(q, k, v, pattern, scale=scale, return_lse=True, backend=backend)


def _triton_args(do, q, k, v, out, lse, p: BlockPattern, scale: float) -> list:
    """Arguments of ``torch.ops.sparsattn.block_sparse_bwd`` by name (from the op's schema)."""
    from ..kernels import block_sparse as bs

    B, Tq, Tk = q.shape[0], q.shape[2], k.shape[2]
    i32 = dict(dtype=torch.int32, device=q.device)
    bank = None
    if p.mask_bank is not None:
        bank = p._cache.get("bank_u8")
        if bank is None:
            bank = p._cache["bank_u8"] = p.mask_bank.to(torch.uint8).contiguous()
    tr = p.transposed()
    vals = dict(do=do.contiguous(), q=q, k=k, v=v, o=out, lse=lse.contiguous(), fcnt=p.full_kv_num_blocks,
                fidx=p.full_kv_indices, pcnt=p.kv_num_blocks, pidx=p.kv_indices, mids=p.mask_ids, bank=bank,
                cidx=None, ccnt=None, tcnt=tr["q_num_blocks"], tidx=tr["q_indices"], tslot=tr["q_slot"],
                q_len=torch.full((B,), Tq, **i32), kv_len=torch.full((B,), Tk, **i32),
                q_off=torch.zeros(B, **i32), k_off=torch.zeros(B, **i32), block_q=p.block_q, block_k=p.block_k,
                causal=bool(p.causal), scale=float(scale), packed=False,
                even=Tk % p.block_k == 0 and Tq % p.block_q == 0, sinks=None, softcap=0.0)
    if hasattr(bs, "_pattern_offset"):
        vals["p_off"] = bs._pattern_offset(p)
    args = []
    for a in torch.ops.sparsattn.block_sparse_bwd.default._schema.arguments:
        if a.name not in vals:
            raise RuntimeError(f"sparsattn.distributed: the block-sparse backward op has an unknown argument "
                               f"{a.name!r}; update shard_ops._triton_args")
        args.append(vals[a.name])
    return args


def shard_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, pattern: BlockPattern, scale: Optional[float], backend: str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of the part of attention on ``k, v`` (local ``pattern``), given the merged
    output ``out`` and log-sum-exp ``lse`` of the rows and the output gradient ``do``."""
    D = q.shape[-1]
    sc = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if backend == "triton":
        from ..kernels import block_sparse  # noqa: F401  (registers the op)

        q_, k_, v_ = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        # (dq, dk, dv, d sinks): no sinks here, the last output is empty
        return tuple(torch.ops.sparsattn.block_sparse_bwd(*_triton_args(do, q_, k_, v_, out.to(q.dtype), lse, pattern,
                                                                        sc))[:3])
    from ..kernels.block_sparse.reference import block_sparse_reference

    with torch.enable_grad():
        qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
        o_s, l_s = block_sparse_reference(qq, kk, vv, pattern, scale=sc)
        w = part_weight(l_s.detach(), lse)  # [B, H, T]
        dof = do.float()
        delta = (dof * out.float()).sum(-1)
        g_o = (w[..., None] * dof).to(o_s.dtype)
        g_l = w * ((dof * o_s.detach().float()).sum(-1) - delta)
        g_l = torch.where(torch.isfinite(g_l), g_l, torch.zeros_like(g_l))
        dq, dk, dv = torch.autograd.grad((o_s, l_s), (qq, kk, vv), (g_o, g_l), allow_unused=True)
    return tuple(torch.zeros_like(t) if g is None else g for g, t in ((dq, q), (dk, k), (dv, v)))
