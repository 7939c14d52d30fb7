"""The block pattern of the routing layer's separate query and key orders (``shared_qk=False``):
query slot i reads key slot j iff both are in the same cluster and (causal) the key's sequence
position is not after the query's (Routing Transformer, arXiv 2003.05997; issue 12)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...patterns import from_predicate, mask_mod


def two_order_pattern(qseg: torch.Tensor, qpos: torch.Tensor, kseg: torch.Tensor, kpos: torch.Tensor, *,
                      causal: bool):
    """Pattern of separate query and key orders (``shared_qk=False``): query slot ``i`` (cluster
    ``qseg[h, i]``, sequence position ``qpos[h, i]``) reads key slot ``j`` iff both are in the same
    cluster and (causal) ``kpos[h, j] <= qpos[h, i]``. ``qseg`` / ``kseg`` ``[N, L]`` are
    non-decreasing per row (cluster-major orders), so a block is computed only where the two
    clusters' ranges meet (and, causal, where some key position is not after some query
    position); the causal condition on original positions is exact through element tiles."""
    N, L = qseg.shape
    if kseg.shape != (N, L) or qpos.shape != (N, L) or kpos.shape != (N, L):
        raise ValueError(f"kseg: expected the shape of qseg {(N, L)}, got {tuple(kseg.shape)}")
    hs = torch.arange(N, device=qseg.device)[:, None, None]
    bq = 64 if L >= 64 else 16
    nb = -(-L // bq)
    pad = nb * bq - L

    def blocks(t, fill, op):  # per-block min / max of the positions [N, nb]
        t = F.pad(t, (0, pad), value=fill).view(N, nb, bq)
        return t.amin(-1) if op == "min" else t.amax(-1)

    big = 1 << 40
    qmin, qmax = blocks(qpos, big, "min"), blocks(qpos, -1, "max")
    kmin, kmax = blocks(kpos, big, "min"), blocks(kpos, -1, "max")

    def elem(qi, kj, h):
        qi, kj = qi.clamp(max=L - 1), kj.clamp(max=L - 1)  # tile rows / columns past L are cut later
        keep = qseg[h, qi] == kseg[h, kj]
        if causal:
            keep = keep & (kpos[h, kj] <= qpos[h, qi])
        return keep

    def any_(r0, r1, c0, c1):
        meet = (qseg[hs, r1] >= kseg[hs, c0]) & (qseg[hs, r0] <= kseg[hs, c1])
        if causal:
            meet = meet & (kmin[:, None, (c0 // bq)[0]] <= qmax[:, (r0 // bq)[:, 0], None])
        return meet

    def full(r0, r1, c0, c1):
        one = (qseg[hs, r0] == qseg[hs, r1]) & (kseg[hs, c0] == kseg[hs, c1]) & (qseg[hs, r0] == kseg[hs, c0])
        if causal:
            one = one & (kmax[:, None, (c0 // bq)[0]] <= qmin[:, (r0 // bq)[:, 0], None])
        return one

    return from_predicate(mask_mod(elem, any=any_, full=full), L, causal=False, block_q=bq, heads=N,
                          device=qseg.device)
