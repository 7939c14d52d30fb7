"""Point-to-point context parallelism: the skipping ring pass and the sparse block fetch, forward and
backward, with the next step's transfer in flight while the current one is computed (Ring
Attention, arXiv 2310.01889; block-sparse distributed attention as in arXiv 2302.06218).

Forward, step ``t = 0 .. world-1``: post the transfers of step ``t + 1``, compute this rank's rows
on the keys of step ``t`` through the block-sparse kernel, merge by log-sum-exp. Backward runs the
same key schedule again (K/V are not kept from the forward) and sends the K/V gradient of each
part straight back to the rank that owns those keys, which adds it up in float32.
"""
from __future__ import annotations

from typing import Optional

import torch

from .comm import Comm
from ..kernels.merge import merge_running as lse_merge
from .plan import Plan
from .shard_ops import shard_backward, shard_forward


class _Schedule:
    """The transfers of one strategy: what rank ``plan.rank`` sends and receives at step ``t``."""

    def __init__(self, plan: Plan, strategy: str, kv: torch.Tensor):
        self.plan, self.strategy, self.kv = plan, strategy, kv
        self.W, self.r = plan.world, plan.rank

    def _buf(self, n_tok: int) -> torch.Tensor:
        s = list(self.kv.shape)
        s[3] = n_tok
        return self.kv.new_empty(s)

    def post(self, comm: Comm, t: int, held: Optional[torch.Tensor]):
        """Post step ``t``'s K/V transfers. Returns (works, (source rank, receive buffer) or None)."""
        p, W, r = self.plan, self.W, self.r
        sends, recvs, got = [], [], None
        if self.strategy == "ring":
            s_out = p.ring_send(t)
            if s_out is not None:
                sends.append(((r + 1) % W, held))
            s_in = p.ring_recv(t)
            if s_in is not None:
                got = (s_in, self._buf(p.lens[s_in]))
                recvs.append(((r - 1) % W, got[1]))
        else:
            dst, src = (r + t) % W, (r - t) % W
            if p.need[dst][r]:
                sends.append((dst, self.kv.index_select(3, p.send_index[dst])))
            if p.need[r][src]:
                got = (src, self._buf(p.fetch_tokens[r][src]))
                recvs.append((src, got[1]))
        return comm.post(sends, recvs, tag=2 * t), got

    def sub(self, s: int):
        """The local pattern of my rows on the keys received from (or owned by) rank ``s``."""
        subs = self.plan.ring_sub if self.strategy == "ring" else self.plan.fetch_sub
        return subs.get(s) if self.plan.need[self.r][s] else None


def _steps(sched: _Schedule, comm: Comm):
    """Yield ``(t, source rank, kv buffer)`` for t = 0..W-1 with step t+1's transfer in flight
    (source and buffer None at a step where nothing arrives)."""
    W = sched.W
    held = sched.kv
    works, got = sched.post(comm, 1, held) if W > 1 else ([], None)
    yield 0, sched.r, sched.kv
    for t in range(1, W):
        comm.wait(works)
        if got is not None:
            held = got[1]
        cur = got
        works, got = sched.post(comm, t + 1, held) if t + 1 < W else ([], None)
        yield (t, cur[0], cur[1]) if cur is not None else (t, None, None)


def p2p_forward(q: torch.Tensor, kv: torch.Tensor, plan: Plan, strategy: str, comm: Comm,
                scale: Optional[float], backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged ``(out in q.dtype, lse float32)`` of this rank's rows; ``kv = stack([k, v])``."""
    sched = _Schedule(plan, strategy, kv)
    acc_o = acc_l = None
    for _, s, buf in _steps(sched, comm):
        sub = sched.sub(s) if s is not None else None
        if sub is None or q.shape[2] == 0:
            continue
        comm.compute_start()
        o, lse = shard_forward(q, buf[0], buf[1], sub, scale, backend)
        acc_o, acc_l = lse_merge(acc_o, acc_l, o, lse)
        comm.compute_end()
    if acc_o is None:
        return torch.zeros_like(q), torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
    return acc_o.to(q.dtype), acc_l


def p2p_backward(do: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                 plan: Plan, strategy: str, comm: Comm, scale: Optional[float], backend: str):
    """(dq, dk, dv) of this rank's shard: K/V re-sent on the forward schedule, each part's K/V
    gradient returned to its owner one step later (overlapped with the next step's compute)."""
    sched = _Schedule(plan, strategy, kv)
    W, r = plan.world, plan.rank
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
    pending = []  # (works, [(receive buffer, local token index or None)])

    def settle(item):
        works, bufs = item
        comm.wait(works)
        comm.compute_start()
        for g, idx in bufs:
            if idx is None:
                dkv.add_(g.float())
            else:
                dkv.index_add_(3, idx, g.float())
        comm.compute_end()

    for t, s, buf in _steps(sched, comm):
        sub = sched.sub(s) if s is not None else None
        g = None
        if sub is not None and q.shape[2]:
            comm.compute_start()
            dq_, dk_, dv_ = shard_backward(do, q, buf[0], buf[1], out, lse, sub, scale, backend)
            dq.add_(dq_.float())
            g = torch.stack([dk_, dv_]).to(kv.dtype)
            comm.compute_end()
        if t == 0:
            if g is not None:
                dkv.add_(g.float())
            continue
        while pending:  # the gradients of the previous step have had a compute step to travel
            settle(pending.pop(0))
        # send this part's gradient to its owner s; receive from rank r + t the gradient of the
        # part of my keys it computed at its step t
        src = (r + t) % W
        recvs = []
        if plan.need[src][r]:
            idx = None if strategy == "ring" else plan.send_index[src]
            n = plan.lens[r] if idx is None else idx.numel()
            shape = list(kv.shape)
            shape[3] = n
            recvs.append((src, kv.new_empty(shape), idx))
        if g is None and s is not None and plan.need[r][s]:  # the owner expects a part (it may compute nothing)
            g = torch.zeros_like(buf)
        sends = [(s, g)] if g is not None and s != r else []
        works = comm.post(sends, [(p, b) for p, b, _ in recvs], tag=2 * t + 1)
        pending.append((works, [(b, i) for _, b, i in recvs]))
    while pending:
        settle(pending.pop(0))
    return dq.to(q.dtype), dkv[0].to(kv.dtype), dkv[1].to(kv.dtype)


class P2PAttention(torch.autograd.Function):
    """P2PAttention: autograd of the ring / fetch strategies (backward = the same schedule again
    plus the K/V gradients returned to their owners)."""

    @staticmethod
    def forward(ctx, q, k, v, plan, strategy, comm, scale, backend):
        kv = torch.stack([k.detach(), v.detach()])
        out, lse = p2p_forward(q.detach(), kv, plan, strategy, comm, scale, backend)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cp = (plan, strategy, comm, scale, backend)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        if dlse is not None and bool((dlse != 0).any()):
            raise RuntimeError("context_parallel_attention: gradients through the returned lse are not supported")
        q, k, v, out, lse = ctx.saved_tensors
        plan, strategy, comm, scale, backend = ctx.cp
        kv = torch.stack([k.detach(), v.detach()])
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = p2p_backward(dout.contiguous(), q.detach(), kv, out, lse, plan, strategy, comm, scale, backend)
        return dq, dk, dv, None, None, None, None, None
