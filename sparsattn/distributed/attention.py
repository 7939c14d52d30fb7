"""context_parallel_attention: block-sparse attention of one sequence sharded over the ranks of a
process group (distributed multi-head attention of "A Unified View of Long-Sequence Models towards
Modeling Million-Scale Dependencies", arXiv 2302.06218; ring pass of Ring Attention, arXiv
2310.01889; head all-to-all of DeepSpeed-Ulysses, arXiv 2309.14509).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from .. import api as _api
from ..patterns import BlockPattern
from .comm import Comm, CPStats
from .layout import LAYOUTS, ShardLayout, make_layout
from .p2p import P2PAttention
from .plan import build_plan
from .shard_ops import resolve_backend
from .subpattern import check_pattern, pattern_hash
from .ulysses import run_ulysses, ulysses_ok

STRATEGIES = ("auto", "ring", "fetch", "ulysses")
_CODES = {name: i for i, name in enumerate(STRATEGIES + LAYOUTS)}
_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3}


def choose_strategy(strategy: str, plan_any, Hq: int, Hkv: int, D: int, elem: int, B: int,
                    world: int, pattern_heads: int) -> tuple[str, str]:
    """The strategy that runs, and why (identical on every rank: computed from the global pattern).

    ``auto``: the strategy whose busiest rank receives the fewest bytes in forward: the sparse
    fetch, or Ulysses when the heads divide the ranks; the plain ring when fetching would save less
    than 10% over it (fewer, larger messages and no gather copies).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    ok, why = ulysses_ok(Hq, Hkv, world, pattern_heads)
    if strategy == "ulysses":
        if not ok:
            raise ValueError(f"strategy: 'ulysses' cannot run: {why}")
        return "ulysses", "requested"
    if strategy != "auto":
        return strategy, "requested"
    kv_row, q_row = 2 * B * Hkv * D * elem, 2 * B * Hq * D * elem
    est = {s: max(p.bytes_estimate(s, kv_row, q_row, 4 * B * Hq) for p in plan_any)
           for s in ("ring", "fetch", "ulysses")}
    best = "fetch" if est["fetch"] < 0.9 * est["ring"] else "ring"
    if ok and est["ulysses"] < est[best]:
        best = "ulysses"
    return best, "bytes received by the busiest rank: " + ", ".join(f"{k} {v}" for k, v in est.items())


def _check_local(q, k, v, layout: ShardLayout, rank: int, scale) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor [batch, heads, local tokens, head_dim], got "
                             f"{getattr(t, 'shape', type(t))}")
    L = layout.rank_len(rank)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[2] != L:
            raise ValueError(f"{name}: expected {L} local tokens on rank {rank} (layout {layout.kind!r}, "
                             f"seq_len {layout.seq_len}, world {layout.world}), got {t.shape[2]}")
    if v.shape[-1] != q.shape[-1]:
        raise ValueError(f"v: expected head_dim {q.shape[-1]} (as q), got {v.shape[-1]}")
    _api.validate_inputs(q, k, v, None, scale)


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockPattern, *,
                               group=None, layout: Union[str, ShardLayout] = "zigzag", strategy: str = "auto",
                               scale: Optional[float] = None, return_lse: bool = False,
                               backend: Optional[str] = None, timeout_s: Optional[float] = None,
                               check: bool = True, stats: Optional[CPStats] = None):
    """context_parallel_attention: block-sparse attention of a sequence sharded over ``group``
    (paper: arXiv 2302.06218; Ring Attention arXiv 2310.01889; Ulysses arXiv 2309.14509).

    Args:
        q: this rank's shard ``[B, Hq, L, D]``; k, v: ``[B, Hkv, L, D]`` (GQA: ``Hkv`` divides
            ``Hq``), ``L = layout.rank_len(rank)`` (use ``sparsattn.distributed.shard``).
        pattern: the *global* ``BlockPattern`` over the whole sequence (``q_len = kv_len = T``),
            the same on every rank (checked by an all-gather of its hash when ``check``).
        group: a ProcessGroup, a 1-D DeviceMesh, or None (the default group).
        layout: "zigzag" (balances causal work), "contiguous", or a ``ShardLayout``; the shard
            unit is the pattern's largest block size.
        strategy: "ring" (K/V shards passed around the ring, skipping those no later rank needs),
            "fetch" (each rank receives only the key blocks its rows select), "ulysses" (all-to-all
            over heads; heads must divide the ranks) or "auto" (fewest bytes; see
            ``choose_strategy``).
        scale, backend: as ``sparsattn.attention`` ("triton" or "reference"; None picks).
        timeout_s: seconds a transfer may take before raising (default 300; on CUDA the process
            group's own timeout applies to transfers).
        stats: a ``CPStats`` to accumulate bytes moved and the compute / wait split.
    Returns:
        this rank's output shard ``[B, Hq, L, D]`` (and ``lse [B, Hq, L]`` float32 when
        ``return_lse``). Differentiable in q, k, v (not through lse).
    """
    if not isinstance(pattern, BlockPattern):
        raise ValueError(f"pattern: expected a sparsattn.patterns.BlockPattern, got {type(pattern).__name__}")
    comm = Comm(group, timeout_s, stats, q.device)
    T = pattern.q_len
    check_pattern(pattern, T)
    if pattern.device != q.device:
        raise ValueError(f"pattern device: expected {q.device} (as q), got {pattern.device}")
    if pattern.batch not in (1, q.shape[0]):
        raise ValueError(f"pattern batch: expected 1 or {q.shape[0]}, got {pattern.batch}")
    if pattern.heads not in (1, k.shape[1], q.shape[1]):
        raise ValueError(f"pattern heads: expected 1, {k.shape[1]} or {q.shape[1]}, got {pattern.heads}")
    lay = make_layout(layout, T, comm.world, max(pattern.block_q, pattern.block_k))
    _check_local(q, k, v, lay, comm.rank, scale)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    if check:
        B, Hq, _, D = q.shape
        comm.check_same([pattern_hash(pattern), T, B, Hq, k.shape[1], D, lay.unit, _CODES[lay.kind],
                         _CODES[strategy], _DTYPE_CODES.get(q.dtype, -1)], "pattern, shapes, layout or strategy")
    if not pattern._cache.get("validated"):
        pattern.validate()
        pattern._cache["validated"] = True
    be = resolve_backend(q, backend)
    plans = [build_plan(pattern, lay, r, "shared") for r in range(comm.world)] if strategy == "auto" else None
    name, why = choose_strategy(strategy, plans, q.shape[1], k.shape[1], q.shape[-1], q.element_size(),
                                q.shape[0], comm.world, pattern.heads)
    comm.stats.strategy = name
    comm.stats.notes["why"] = why
    if name == "ulysses":
        out, lse = run_ulysses(q, k, v, pattern, lay, comm, scale, be)
    else:
        plan = build_plan(pattern, lay, comm.rank, name)
        out, lse = P2PAttention.apply(q, k, v, plan, name, comm, scale, be)
    return (out, lse) if return_lse else out
