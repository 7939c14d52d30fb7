"""routing_stats: whether a routing layer's clusters hold the keys its queries need (the diagnosis of
the routing layer's MQAR failure, issue 12; docs/layers.md)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ._util import check_input


@torch.no_grad()
def routing_stats(layer, x: torch.Tensor, positions: Optional[torch.Tensor] = None) -> dict:
    """routing_stats: whether the routed heads of ``layer`` (a ``RoutingAttention``) put the keys
    their queries need in the queries' clusters, on ``x [B, T, dim]`` with the current centroids
    (nothing is updated). Every query is put in its nearest centroid's cluster and every key in its
    ``key_clusters`` nearest ones (the ``routing="assign"`` clusters; balanced routing may add or
    drop members). Returns, over the routed heads and the query positions (all, or those where
    ``positions``, bool ``[B, T]``, is True, e.g. MQAR's answer positions):

    * ``no_key``: share of queries whose cluster holds no key they may read (causal: at or before
      them; with ``exclude_self``, other than their own key): their routed output is zero
      (separate q/k) or their own value (shared Q = K);
    * ``co_clustered``: share of queries whose dense top key, the key the same head's dense
      attention (same query and key vectors, every key it may read) weights most, is in their
      cluster;
    * ``dense_mass``: mean share of that dense attention on the keys of the query's cluster;
    * ``query_use`` / ``key_use``: ``[routed heads, num_clusters]`` share of the queries / keys
      whose nearest centroid is that cluster's (all positions).

    Raises ValueError for a bad ``x`` or ``positions``, or a layer without routed heads.
    """
    check_input(x, 3, layer.dim, "[B, T, dim]")
    if layer.routed_heads == 0:
        raise ValueError("local_heads: routing_stats needs a routed head (local_heads < heads)")
    B, T, _ = x.shape
    if positions is not None and (positions.dtype != torch.bool or tuple(positions.shape) != (B, T)):
        raise ValueError(f"positions: expected a bool tensor of shape {(B, T)}, got {positions.dtype} "
                         f"{tuple(positions.shape)}")
    d, hl, hr, nc = layer.head_dim, layer.local_heads, layer.routed_heads, layer.num_clusters
    q = layer.q_proj(x).view(B, T, layer.heads, d).transpose(1, 2)[:, hl:]
    k = None if layer.shared_qk else layer.k_proj(x).view(B, T, -1, d).transpose(1, 2)[:, hl:]
    qa, ka, qn, kn = layer.routed_inputs(q, k)
    cq, ck = layer._nearest(qn), layer._nearest(kn)                       # [B, hr, T]
    i = torch.arange(T, device=x.device)
    visible = (i[None, :] <= i[:, None]) if layer.causal else torch.ones(T, T, dtype=torch.bool, device=x.device)
    if layer.exclude_self:
        visible = visible & (i[None, :] != i[:, None])
    logits = (qa.float() @ ka.float().transpose(-1, -2) / math.sqrt(d)).masked_fill(~visible, float("-inf"))
    none = ~visible.any(-1)                                                 # shared causal: position 0
    logits[..., none, :] = torch.where(torch.eye(T, dtype=torch.bool, device=x.device)[none], 0.0, float("-inf"))
    p = logits.softmax(-1)
    # a key is in its key_clusters nearest clusters                       same: [B, hr, T, T]
    top = torch.einsum("bhtd,hkd->bhtk", kn, layer.means.float()).topk(layer.key_clusters, -1).indices
    same = (cq[..., :, None, None] == top[..., None, :, :]).any(-1)
    sel = torch.ones(B, hr, T, dtype=torch.bool, device=x.device) if positions is None else \
        positions[:, None, :].expand(B, hr, T)
    share = lambda t: float(t.float()[sel].mean()) if bool(sel.any()) else float("nan")  # noqa: E731
    use = lambda c: F.one_hot(c, nc).float().mean((0, 2))  # noqa: E731
    return {"no_key": share(~(same & visible).any(-1)),
            "co_clustered": share(same.gather(-1, logits.argmax(-1, keepdim=True))[..., 0]),
            "dense_mass": share((p * same).sum(-1)),
            "query_use": use(cq), "key_use": use(ck)}
