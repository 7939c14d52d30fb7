"""Ulysses: context parallelism by an all-to-all over heads (DeepSpeed-Ulysses, arXiv 2309.14509):
every rank trades its sequence shard of all heads for the whole sequence of ``heads / world``
heads, runs the block-sparse kernel on the full sequence with the global pattern's rows of those
heads, and trades the output back. Backward runs the two all-to-alls in reverse.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..patterns import BlockPattern
from .comm import Comm
from .layout import ShardLayout
from .shard_ops import shard_backward, shard_forward


def head_slice(pattern: BlockPattern, group: int, n_groups: int, Hq: int, Hkv: int) -> BlockPattern:
    """The pattern of head group ``group`` of ``n_groups`` (query heads ``Hq``, KV heads ``Hkv``)."""
    H = pattern.heads
    if H == 1:
        return pattern
    if H not in (Hq, Hkv):
        raise ValueError(f"pattern heads: expected 1, {Hkv} or {Hq}, got {H}")
    key = ("cp_heads", group, n_groups)
    p = pattern._cache.get(key)
    if p is None:
        n = H // n_groups
        sl = slice(group * n, (group + 1) * n)
        cut = lambda t: None if t is None else t[:, sl].contiguous()  # noqa: E731
        p = BlockPattern(cut(pattern.kv_num_blocks), cut(pattern.kv_indices), cut(pattern.full_kv_num_blocks),
                         cut(pattern.full_kv_indices), pattern.block_q, pattern.block_k, pattern.q_len,
                         pattern.kv_len, pattern.causal, cut(pattern.mask_ids), pattern.mask_bank)
        pattern._cache[key] = p
    return p


_ORDERS: dict = {}


def _orders(layout: ShardLayout, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, inverse) of the concatenated shards vs global positions, cached per layout/device."""
    key = (layout, str(device))
    if key not in _ORDERS:
        if len(_ORDERS) > 16:
            _ORDERS.clear()
        order = layout.order(device)
        _ORDERS[key] = (order, torch.argsort(order))
    return _ORDERS[key]


def _to_heads(comm: Comm, layout: ShardLayout, parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sequence shards ``[B, H_i, L_r, D]`` -> full sequences (global order) of my head group
    ``[B, H_i / W, T, D]``, all tensors in one all_to_all."""
    W, r = comm.world, comm.rank
    lens = [layout.rank_len(j) for j in range(W)]
    B, D = parts[0].shape[0], parts[0].shape[-1]
    hg = [p.shape[1] // W for p in parts]
    # per destination j: the heads of group j of every tensor, flattened
    send = torch.cat([p.reshape(B, W, h, p.shape[2], D).transpose(0, 1).reshape(W, -1) for p, h in zip(parts, hg)], 1)
    per_tok = B * sum(hg) * D
    recv = send.new_empty(per_tok * sum(lens))
    comm.all_to_all(recv, send.reshape(-1), [per_tok * n for n in lens], [per_tok * lens[r]] * W)
    inv = _orders(layout, send.device)[1]
    outs, off = [[] for _ in parts], 0
    for j in range(W):
        chunk = recv[off:off + per_tok * lens[j]]
        off += per_tok * lens[j]
        o2 = 0
        for i, h in enumerate(hg):
            n = B * h * lens[j] * D
            outs[i].append(chunk[o2:o2 + n].view(B, h, lens[j], D))
            o2 += n
    return [torch.cat(o, 2).index_select(2, inv) for o in outs]


def _to_seq(comm: Comm, layout: ShardLayout, parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Inverse of ``_to_heads``: full sequences of my head group ``[B, h, T, D]`` -> my sequence
    shard of all heads ``[B, h * W, L_r, D]`` (lse-like ``[B, h, T]`` tensors take ``D = 1``)."""
    W, r = comm.world, comm.rank
    lens = [layout.rank_len(j) for j in range(W)]
    order = _orders(layout, parts[0].device)[0]
    parts = [p.index_select(2, order) for p in parts]  # layout order: rank 0's tokens first
    B, D = parts[0].shape[0], parts[0].shape[-1]
    hs = [p.shape[1] for p in parts]
    per_tok = B * sum(hs) * D
    pieces, off = [], 0
    for j in range(W):
        pieces.append(torch.cat([p[:, :, off:off + lens[j]].reshape(-1) for p in parts]))
        off += lens[j]
    send = torch.cat(pieces)
    recv = send.new_empty(per_tok * lens[r] * W)
    comm.all_to_all(recv, send, [per_tok * lens[r]] * W, [per_tok * n for n in lens])
    outs = [[] for _ in parts]
    chunks = recv.view(W, per_tok * lens[r])
    for j in range(W):
        o2 = 0
        for i, h in enumerate(hs):
            n = B * h * lens[r] * D
            outs[i].append(chunks[j, o2:o2 + n].view(B, h, lens[r], D))
            o2 += n
    return [torch.cat(o, 1) for o in outs]


class UlyssesAttention(torch.autograd.Function):
    """UlyssesAttention: all-to-all to head groups, block-sparse attention on the full sequence,
    all-to-all back; backward: the reverse all-to-alls around the kernel's backward."""

    @staticmethod
    def forward(ctx, q, k, v, pattern, layout, comm, scale, backend):
        W, Hq, Hkv = comm.world, q.shape[1], k.shape[1]
        qh, kh, vh = _to_heads(comm, layout, [q.detach(), k.detach(), v.detach()])
        sub = head_slice(pattern, comm.rank, W, Hq, Hkv)
        comm.compute_start()
        oh, lh = shard_forward(qh, kh, vh, sub, scale, backend)
        comm.compute_end()
        (o,) = _to_seq(comm, layout, [oh])
        (l1,) = _to_seq(comm, layout, [lh[..., None]])
        ctx.save_for_backward(qh, kh, vh, oh, lh)
        ctx.cp = (sub, layout, comm, scale, backend)
        return o, l1[..., 0]

    @staticmethod
    def backward(ctx, dout, dlse):
        if dlse is not None and bool((dlse != 0).any()):
            raise RuntimeError("context_parallel_attention: gradients through the returned lse are not supported")
        qh, kh, vh, oh, lh = ctx.saved_tensors
        sub, layout, comm, scale, backend = ctx.cp
        (doh,) = _to_heads(comm, layout, [dout.contiguous()])
        comm.compute_start()
        dq, dk, dv = shard_backward(doh, qh, kh, vh, oh, lh, sub, scale, backend)
        comm.compute_end()
        dq, dk, dv = _to_seq(comm, layout, [dq.to(qh.dtype), dk.to(kh.dtype), dv.to(vh.dtype)])
        return dq, dk, dv, None, None, None, None, None


def ulysses_ok(Hq: int, Hkv: int, world: int, pattern_heads: int) -> tuple[bool, str]:
    """Whether the all-to-all over heads can run, and why not."""
    if Hq % world or Hkv % world:
        return False, f"query heads {Hq} and KV heads {Hkv} must both be divisible by the {world} ranks"
    return True, "heads divide the ranks"


def run_ulysses(q, k, v, pattern: BlockPattern, layout: ShardLayout, comm: Comm, scale: Optional[float],
                backend: str):
    """Output and lse of this rank's shard through ``UlyssesAttention``."""
    return UlyssesAttention.apply(q, k, v, pattern, layout, comm, scale, backend)
