"""routing: online k-means content routing with local + routed heads (Efficient Content-Based Sparse
Attention with Routing Transformers, Roy et al., arXiv 2003.05997)."""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...patterns import sliding_window
from ..base import Layer, attend, register_layer
from ._util import check_bool, check_dim_heads, check_float, check_input, check_int, next_pow2, routed_pattern


@register_layer("routing")
class RoutingAttention(Layer):
    """RoutingAttention: routed heads attend within online k-means clusters of their queries and
    keys, local heads within a sliding window (Routing Transformer, arXiv 2003.05997).

    ``x [B, T, dim] -> [B, T, dim]``, causal (default) or not.

    Routed heads (``heads - local_heads`` of them), per head:
      1. query/key projections, two forms (``shared_qk``):
         * ``shared_qk=True`` (default when causal): queries and keys share one projection (the
           paper's Q = K under the left-to-right mask; the authors' decoder default
           ``share_qk=True``); routing uses ``x^ = q / |q|``, attention uses ``q`` as the query
           and ``x^`` as the key (as lucidrains' shared-QK attention);
         * ``shared_qk=False`` (default when not causal; the authors' encoder self-attention):
           separate query and key projections; queries are routed by ``q / |q|`` and keys by
           ``k / |k|`` to the same centroids, and attention uses the raw ``q`` and ``k``;
         * ``qk_norm="layer"`` (the authors' code): q and k layer-normalised without scale or bias
           before routing, and attention on those unit vectors with logits ``qk_scale * cos``
           (default ``d``, the authors' ``LN(q) . LN(k)``; ``"sqrt"``: ``sqrt(d)``, the usual
           ``LN(q) . LN(k) / sqrt(d)`` of QK-LayerNorm; ``learn_qk_scale``: a learned scale per
           head from that value): a query then reads a key strongly only when it points the same
           way, the condition under which a shared centroid holds both (``routed_inputs``);
      2. ``num_clusters`` centroids per head (buffers), updated in training by EMA of the mean of
         the normalised vectors assigned to them (nearest centroid; with separate q/k, the queries'
         and the keys' vectors together, the paper's ``(1 - decay) / 2`` share each when their
         counts are equal): ``mu <- normalize(decay * mu + (1 - decay) * mean)``; the first
         training batch initialises them with ``kmeans_init_iters`` Lloyd iterations; with separate
         q/k ``kmeans_on`` picks what they learn from: ``"both"`` (default), ``"queries"`` or
         ``"keys"`` (initialisation, EMA and commitment loss alike);
      3. routing, two forms (``routing``):
         * ``"balanced"`` (the paper's; default when not causal): every centroid takes the
           ``w = ceil(T / num_clusters)`` tokens closest to it (``window_size`` when given; with
           separate q/k the ``w`` closest queries and, separately, the ``w`` closest keys); a token
           may be in several clusters or in none;
         * ``"assign"`` (default when causal): every token (query and key separately when
           ``shared_qk=False``) joins its nearest centroid only, so a token's cluster depends on
           that token alone and the layer is strictly causal; clusters have the sizes the data
           gives them (attention inside a cluster costs its size squared); with separate q/k a key
           may join its ``key_clusters`` nearest centroids (default 1; still causal), so a query
           whose key lies near the border of its cell still finds it (one softmax per query: a
           query is in one cluster only);
      4. attention inside each cluster, causal on sequence positions: a query reads the keys of its
         cluster at positions <= its own. Shared Q = K: a token's own key is masked unless it is
         the cluster's first member (``exclude_self``; self-attention dominates when the key is
         the query; Reformer and lucidrains mask it the same way). Separate q/k: nothing is
         masked beyond causality (``exclude_self`` must be False / None), and a query whose
         cluster holds no key at or before it gets zero from its routed head;
      5. balanced: a token in several clusters takes the mean of its outputs (lucidrains'
         ``scatter_mean``), a token in none gets zero from the routed heads; assign: every token
         has exactly one cluster.
    Kernels: shared balanced: the clustered tokens are gathered cluster-major, one block-sparse call
    on a block-diagonal pattern (block = ``next_pow2(w)`` slots, an element tile for the
    causal/self mask and spare slots) shared by the batch. Shared assign: the tokens are sorted by
    (cluster, position) per sequence and head, one block-sparse call on the per-(sequence, head)
    pattern of that order (``patterns.from_predicate`` with exact block bounds). Separate q/k (both
    routings): queries and keys are each put in cluster-major order (their orders differ), and one
    block-sparse call runs on the per-(sequence, head) ``from_predicate`` pattern "same cluster and
    key position <= query position": a block is computed only where the two clusters' ranges meet
    and (causal) some key is not after some query; the causal condition on original positions is
    exact through element tiles (``two_order_attention``).

    Local heads (``local_heads``, default ``heads // 2``): sliding-window attention over the last
    ``local_window`` tokens (non-causal: ``|i - j| < local_window``; ``patterns.sliding_window``),
    with their own key projection.

    ``extra_loss()``: the commitment loss ``commitment * mean |x^ - mu_assigned|^2`` of the last
    training forward (over queries and keys with separate q/k; pulls vectors toward their
    centroids; lucidrains' commitment 1e-4).

    Hyper-parameters (paper / lucidrains defaults): ``num_clusters=8`` (the paper's k ~ sqrt(T):
    8 clusters of 64 at T = 512), ``decay=0.999``, ``commitment=1e-4``, ``local_window=256``,
    ``kmeans_init_iters=10``, ``shared_qk=causal``.

    ``routing_stats(x, positions)``: whether the clusters hold the keys the queries need (share
    of queries without a key, share whose dense top key is co-clustered, dense attention mass in
    the cluster, centroid use): the measurement behind the ``mqar`` preset.

    Differences from the paper kept: duplicates are averaged, not log-sum-exp merged (the kernels
    give no gradient through the lse); the balanced top-w selection is a competition over the
    whole sequence, so whether a token is routed depends on later tokens (as in the paper's and
    lucidrains' balanced routing; the attention weights themselves are causal): the causal form
    therefore routes by nearest centroid (``routing="assign"``) unless ``routing="balanced"`` is
    asked for, and in that form the first training batch is routed with the initial centroids
    before k-means initialises them from it (so no batch statistic of later tokens reaches an
    earlier output); the authors' code (and lucidrains') mask causality inside a cluster by slot
    index, which equals the position order only when queries and keys share their routing: with
    separate q/k this layer masks by sequence position instead (exact, in any routing); the
    authors' code layer-normalises q and k (routing and attention) and updates the centroids once
    from the queries and once from the keys, this layer by default l2-normalises for routing only
    and makes one update from both (``qk_norm="layer"`` follows the authors' normalisation);
    centroids from the queries only (``kmeans_on="queries"``), keys in several nearest clusters
    (``key_clusters``) and the ``sqrt(d)`` logit scale are this layer's additions (the ``mqar``
    preset: with centroids learned from both, the queries and the keys of a separate-q/k head
    drift into different clusters and the routed head stops learning; docs/layers.md);
    routing is used in every layer of a model built from this layer (the paper routes in some
    layers only: build hybrids with the harness); local attention is a sliding window, not
    lucidrains' blocked look-back window.
    """

    paper = "Efficient Content-Based Sparse Attention with Routing Transformers, arXiv 2003.05997"
    kind = "sparse"
    layout = "1d"
    causal_modes = (True, False)
    content_based = True
    # mqar: a faster centroid EMA (decay 0.999 lags ~1000 steps behind q/k that move fast in a 2000-step
    # run), the paper's shared Q = K kept: MQAR T = 64, 2 heads, seeds 0/1/2: 0.929/0.934/0.929 against
    # 0.858/0.864 with decay 0.999; separate q/k gave 0.898/0.903 (0.999) and 0.935/0.830/0.865 (0.99)
    # (docs/layers/routing_qk_cpu.csv, docs/layers/routing_assign_cpu.csv)
    # mqar since the co-clustering fix (docs/layers/routing_mqar_fix_cpu.csv, 2-core CPU, 2000 steps): T = 64 with
    # the local window cut to 4: 0.9932 (0.2343 before, dense 0.9972); T = 128, window 32: 0.9905 (0.101 before,
    # dense 0.9964). Separate q/k (shared Q = K matches a question against the other occurrence of its own token:
    # 0.22 with one cluster), cosine logits sqrt(d) * cos (the learned raw bilinear form does not put a query near
    # its key: cos 0.2; the authors' d * cos learns slowly), centroids from the queries only (with centroids from
    # both, the queries and the keys drift into separate clusters: 89-100 % of the queries in a cluster holding
    # 1-2 % of the keys) and every key in its 3 nearest of the 4 clusters (2: 0.9617 at T = 64, 0.7959 at T = 128)
    presets = {"default": {}, "mqar": {"num_clusters": 4, "local_window": 32, "decay": 0.99, "shared_qk": False,
                                       "qk_norm": "layer", "qk_scale": "sqrt", "kmeans_on": "queries",
                                       "key_clusters": 3}}

    causal_caveat = ("the causal form with routing='balanced' is not strictly causal: balanced top-w routing (the "
                     "paper's) picks the w tokens nearest each centroid from the whole sequence, so later tokens "
                     "decide whether an earlier token is routed (attention weights inside a cluster stay causal); "
                     "outputs before t can change when tokens after t change; routing='assign' (the causal "
                     "default) is strictly causal")

    def caveat(self) -> str:
        """The causal caveat of this instance: only the causal balanced form leaks."""
        return self.causal_caveat if (self.causal and self.routing == "balanced") else ""

    def __init__(self, dim: int, heads: int, num_clusters: int = 8, window_size: Optional[int] = None,
                 local_heads: Optional[int] = None, local_window: int = 256, decay: float = 0.999,
                 commitment: float = 1e-4, kmeans_init_iters: int = 10, exclude_self: Optional[bool] = None,
                 causal: bool = True, routing: Optional[str] = None, shared_qk: Optional[bool] = None,
                 qk_norm: str = "l2", kmeans_on: str = "both",
                 qk_scale=None, learn_qk_scale: bool = False, key_clusters: int = 1):
        super().__init__()
        check_dim_heads(dim, heads)
        check_int("num_clusters", num_clusters)
        if window_size is not None:
            check_int("window_size", window_size)
        local_heads = heads // 2 if local_heads is None else local_heads
        check_int("local_heads", local_heads, 0)
        if local_heads > heads:
            raise ValueError(f"local_heads: expected at most heads={heads}, got {local_heads}")
        check_int("local_window", local_window)
        check_float("decay", decay, 0.0, 1.0)
        check_float("commitment", commitment, 0.0, 1e6)
        check_int("kmeans_init_iters", kmeans_init_iters, 0)
        check_bool("causal", causal)
        shared_qk = causal if shared_qk is None else check_bool("shared_qk", shared_qk)
        if exclude_self is None:
            exclude_self = shared_qk
        check_bool("exclude_self", exclude_self)
        if exclude_self and not shared_qk:
            raise ValueError("exclude_self: masking a token's own key is only for shared_qk=True (a query that is "
                             "its own key); with separate query and key projections pass False or None")
        if routing is None:
            routing = "assign" if causal else "balanced"
        if routing not in ("balanced", "assign"):
            raise ValueError(f"routing: expected 'balanced', 'assign' or None, got {routing!r}")
        if routing == "assign" and window_size is not None:
            raise ValueError("window_size: only used by routing='balanced' (assign gives every token its nearest "
                             f"centroid), got {window_size}")
        if qk_norm not in ("l2", "layer"):
            raise ValueError(f"qk_norm: expected 'l2' or 'layer', got {qk_norm!r}")
        self.routing, self.qk_norm = routing, qk_norm
        if kmeans_on not in ("both", "queries", "keys"):
            raise ValueError(f"kmeans_on: expected 'both', 'queries' or 'keys', got {kmeans_on!r}")
        if kmeans_on != "both" and shared_qk:
            raise ValueError(f"kmeans_on: {kmeans_on!r} (centroids from one side only) needs shared_qk=False")
        self.kmeans_on = kmeans_on
        if qk_scale is not None and qk_scale != "sqrt":
            check_float("qk_scale", qk_scale, 0.0, 1e4, lo_open=True)
        check_bool("learn_qk_scale", learn_qk_scale)
        if (qk_scale is not None or learn_qk_scale) and qk_norm != "layer":
            raise ValueError("qk_scale: the logit scale of normalised q and k, only with qk_norm='layer'")
        self.qk_scale = qk_scale
        check_int("key_clusters", key_clusters)
        if key_clusters > num_clusters:
            raise ValueError(f"key_clusters: expected at most num_clusters={num_clusters}, got {key_clusters}")
        if key_clusters > 1 and (shared_qk or routing != "assign"):
            raise ValueError("key_clusters: a key in several clusters needs shared_qk=False and routing='assign'")
        self.key_clusters = key_clusters
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.num_clusters, self.window_size = num_clusters, window_size
        self.local_heads, self.routed_heads = local_heads, heads - local_heads
        self.local_window, self.decay, self.commitment = local_window, decay, commitment
        self.kmeans_init_iters, self.exclude_self, self.causal = kmeans_init_iters, exclude_self, causal
        self.shared_qk = shared_qk
        d = self.head_dim
        self.q_proj = nn.Linear(dim, dim, bias=False)       # all heads' queries (= keys of routed heads if shared)
        n_keys = local_heads + (0 if shared_qk else self.routed_heads)
        self.k_proj = nn.Linear(dim, n_keys * d, bias=False) if n_keys else None
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim)
        hr = max(self.routed_heads, 1)
        self.register_buffer("means", F.normalize(torch.randn(hr, num_clusters, d), dim=-1))
        self.register_buffer("initted", torch.tensor(False))
        self.qk_log_scale = nn.Parameter(torch.full((hr,), math.log(self._logit_scale(d)))) if learn_qk_scale else None
        self._aux: Optional[torch.Tensor] = None
        self._patterns: "OrderedDict[tuple, object]" = OrderedDict()

    # -- clustering ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _kmeans_init(self, xn: torch.Tensor) -> None:
        """Lloyd iterations on the batch's normalised vectors ``xn [B, h, T, d]`` (first training step)."""
        B, h, T, d = xn.shape
        pts = xn.transpose(0, 1).reshape(h, B * T, d).float()
        g = torch.Generator(device="cpu").manual_seed(0)
        pick = torch.randperm(B * T, generator=g)[: self.num_clusters].to(xn.device)
        if pick.numel() < self.num_clusters:  # fewer tokens than clusters: repeat
            pick = pick.repeat(-(-self.num_clusters // max(pick.numel(), 1)))[: self.num_clusters]
        mu = pts[:, pick]
        for _ in range(self.kmeans_init_iters):
            a = (pts @ mu.transpose(1, 2)).argmax(-1)
            s = torch.zeros_like(mu).scatter_add_(1, a[..., None].expand(-1, -1, d), pts)
            n = torch.zeros(h, self.num_clusters, device=xn.device).scatter_add_(1, a, torch.ones_like(a, dtype=torch.float))
            mu = torch.where(n[..., None] > 0, F.normalize(s, dim=-1), mu)
        self.means.copy_(mu)
        self.initted.fill_(True)

    @torch.no_grad()
    def _ema(self, xn: torch.Tensor, assign: torch.Tensor) -> None:
        B, h, T, d = xn.shape
        pts = xn.transpose(0, 1).reshape(h, B * T, d).float()
        a = assign.transpose(0, 1).reshape(h, B * T)
        s = torch.zeros_like(self.means).scatter_add_(1, a[..., None].expand(-1, -1, d), pts)
        n = torch.zeros(h, self.num_clusters, device=xn.device).scatter_add_(1, a, torch.ones_like(a, dtype=torch.float))
        new = s / n.clamp(min=1)[..., None]
        upd = F.normalize(self.decay * self.means + (1 - self.decay) * new, dim=-1)
        self.means.copy_(torch.where(n[..., None] > 0, upd, self.means))

    def window(self, T: int) -> int:
        """Tokens per cluster ``w`` at sequence length ``T``."""
        return min(T, self.window_size or -(-T // self.num_clusters))

    def route(self, xn: torch.Tensor) -> torch.Tensor:
        """Balanced routing: ``xn [B, h, T, d]`` (normalised) -> member indices ``[B, h, k, w]``,
        each cluster's ``w`` closest tokens in ascending position order."""
        T = xn.shape[2]
        w = self.window(T)
        with torch.no_grad():
            sim = torch.einsum("bhtd,hkd->bhkt", xn.detach().float(), self.means.float())
            idx = sim.topk(w, dim=-1).indices
        return idx.sort(-1).values

    # -- attention ----------------------------------------------------------------------------------
    def _cluster_pattern(self, k: int, w: int, device):
        key = (k, w, self.causal, self.exclude_self, str(device))
        p = self._patterns.get(key)
        if p is None:
            P = next_pow2(w)
            i = torch.arange(P, device=device)[:, None]
            j = torch.arange(P, device=device)[None, :]
            tile = (j < w) & (i >= 0)  # [P, P]
            if self.causal:
                tile = tile & (j <= i)
            if self.exclude_self:
                first_only = (i == 0) & (j == 0) if self.causal else (torch.full_like(tile, w == 1) & (i == j))
                tile = tile & ((i != j) | first_only)
            sel = torch.arange(k, device=device).view(1, 1, k, 1)
            p = routed_pattern(sel, P, tile[None], torch.zeros(k, dtype=torch.long, device=device))
            self._patterns[key] = p
            if len(self._patterns) > 8:
                self._patterns.popitem(last=False)
        return p

    def routed_attention(self, q: torch.Tensor, kn: torch.Tensor, v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Attention inside given clusters: q/kn/v ``[B, h, T, d]``, member indices
        ``idx [B, h, k, w]`` (ascending within a cluster) -> ``[B, h, T, d]`` (mean over a token's
        clusters, zero for a token in none)."""
        B, h, T, d = q.shape
        k, w = idx.shape[2], idx.shape[3]
        P = next_pow2(w)
        pad = torch.full((B, h, k, P - w), T, dtype=idx.dtype, device=idx.device)
        slots = torch.cat([idx, pad], -1).reshape(B, h, k * P)
        zrow = lambda t: torch.cat([t, t.new_zeros(B, h, 1, t.shape[-1])], 2)  # noqa: E731
        gi = slots[..., None].expand(-1, -1, -1, d)
        qs, ks, vs = (torch.gather(zrow(t), 2, gi) for t in (q, kn, v))
        o = attend(qs, ks, vs, self._cluster_pattern(k, w, q.device))
        acc = torch.zeros(B, h, T + 1, d, device=q.device, dtype=torch.float32).scatter_add(2, gi, o.float())
        cnt = torch.zeros(B, h, T + 1, device=q.device, dtype=torch.float32).scatter_add(
            2, slots, torch.ones_like(slots, dtype=torch.float32))
        return (acc / cnt.clamp(min=1)[..., None])[:, :, :T].to(o.dtype)

    def _assign_pattern(self, seg: torch.Tensor):
        """Pattern of the (cluster, position)-sorted order: ``seg [N, T]`` (non-decreasing cluster id
        per row) -> BlockPattern with ``N`` heads: same cluster, causal by sorted index (= by position
        inside a cluster), own key masked except for a cluster's first member (causal) or a cluster
        of one (not causal)."""
        from ...patterns import from_predicate, mask_mod

        N, T = seg.shape
        first = torch.ones_like(seg, dtype=torch.bool)
        first[:, 1:] = seg[:, 1:] != seg[:, :-1]
        single = first.clone()
        single[:, :-1] &= seg[:, 1:] != seg[:, :-1]
        keep_self = first if self.causal else single
        hs = torch.arange(N, device=seg.device)[:, None, None]
        excl = self.exclude_self

        def elem(qi, kj, h):
            qi, kj = qi.clamp(max=T - 1), kj.clamp(max=T - 1)  # tile rows / columns past T are cut later
            same = seg[h, qi] == seg[h, kj]
            if excl:
                same = same & ((qi != kj) | keep_self[h, qi])
            return same

        def any_(r0, r1, c0, c1):  # cluster ranges of the row block and the column block meet
            return (seg[hs, r1] >= seg[hs, c0]) & (seg[hs, r0] <= seg[hs, c1])

        def full(r0, r1, c0, c1):  # one cluster over both blocks, and no own key inside
            one = (seg[hs, r0] == seg[hs, r1]) & (seg[hs, c0] == seg[hs, c1]) & (seg[hs, r0] == seg[hs, c0])
            if excl:
                one = one & ((c1 < r0) | (c0 > r1))
            return one

        bq = 64 if T >= 64 else 16
        return from_predicate(mask_mod(elem, any=any_, full=full), T, causal=self.causal, block_q=bq,
                              heads=N, device=seg.device)

    def assigned_attention(self, q: torch.Tensor, kn: torch.Tensor, v: torch.Tensor,
                           assign: torch.Tensor) -> torch.Tensor:
        """Attention inside nearest-centroid clusters: q/kn/v ``[B, h, T, d]``, cluster of every
        token ``assign [B, h, T]`` -> ``[B, h, T, d]``."""
        B, h, T, d = q.shape
        pos = torch.arange(T, device=q.device)
        order = (assign.long() * T + pos).argsort(-1)                  # [B, h, T]: cluster-major, position order
        seg = assign.gather(-1, order).reshape(B * h, T)
        gi = order[..., None].expand(-1, -1, -1, d)
        fold = lambda t: torch.gather(t, 2, gi).reshape(1, B * h, T, d)  # noqa: E731
        o = attend(fold(q), fold(kn), fold(v), self._assign_pattern(seg)).reshape(B, h, T, d)
        return torch.empty_like(o).scatter(2, gi, o)

    def _two_order_pattern(self, qseg: torch.Tensor, qpos: torch.Tensor, kseg: torch.Tensor, kpos: torch.Tensor):
        """The block pattern of separate query and key orders (``_routing_patterns.two_order_pattern``)."""
        from ._routing_patterns import two_order_pattern

        return two_order_pattern(qseg, qpos, kseg, kpos, causal=self.causal)

    def two_order_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qpos: torch.Tensor,
                            qseg: torch.Tensor, kpos: torch.Tensor, kseg: torch.Tensor) -> torch.Tensor:
        """Attention with separate query and key routing (``shared_qk=False``): q/k/v ``[B, h, T, d]``;
        query slots ``qpos [B, h, L]`` (sequence positions) with clusters ``qseg [B, h, L]`` and key
        slots ``kpos`` / ``kseg`` the same way, each cluster-major with ascending positions inside a
        cluster. A query slot attends to the key slots of its cluster (causal: at positions <= its
        own); the output of a token is the mean over its query slots (zero for a token in none, or
        for a query whose cluster holds no key at or before it) -> ``[B, h, T, d]``. A query slot at
        position ``T`` is padding (its output is dropped): with ``key_clusters > 1`` there are more
        key slots than queries, and both orders must have the same length."""
        B, h, T, d = q.shape
        L = qpos.shape[-1]
        gq = qpos[..., None].expand(-1, -1, -1, d)
        gk = kpos[..., None].expand(-1, -1, -1, d)
        fold = lambda t, g: torch.gather(t, 2, g).reshape(1, B * h, L, d)  # noqa: E731
        pat = self._two_order_pattern(qseg.reshape(B * h, L), qpos.reshape(B * h, L),
                                      kseg.reshape(B * h, L), kpos.reshape(B * h, L))
        qz = torch.cat([q, q.new_zeros(B, h, 1, d)], 2)  # row T: padding query slots (see key_clusters)
        o = attend(fold(qz, gq), fold(k, gk), fold(v, gk), pat).reshape(B, h, L, d)
        acc = torch.zeros(B, h, T + 1, d, device=q.device, dtype=torch.float32).scatter_add(2, gq, o.float())
        cnt = torch.zeros(B, h, T + 1, device=q.device, dtype=torch.float32).scatter_add(
            2, qpos, torch.ones_like(qpos, dtype=torch.float32))
        return (acc / cnt.clamp(min=1)[..., None])[:, :, :T].to(o.dtype)

    @staticmethod
    def _assign_order(assign: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest-centroid routing ``assign [B, h, T]`` -> (positions, clusters) in (cluster, position) order."""
        T = assign.shape[-1]
        pos = torch.arange(T, device=assign.device)
        order = (assign.long() * T + pos).argsort(-1)
        return order, assign.long().gather(-1, order)

    def _multi_order(self, xn: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each of the ``T`` unit vectors ``xn [B, h, T, d]`` in its ``r`` nearest clusters ->
        (positions, clusters) ``[B, h, r * T]`` in (cluster, position) order."""
        B, h, T, _ = xn.shape
        top = torch.einsum("bhtd,hkd->bhtk", xn.detach(), self.means.float()).topk(r, -1).indices
        assign = top.reshape(B, h, T * r)
        pos = torch.arange(T, device=xn.device).repeat_interleave(r).expand(B, h, -1)
        order = (assign * T + pos).argsort(-1)
        return pos.gather(-1, order), assign.gather(-1, order)

    @staticmethod
    def _balanced_order(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Balanced routing ``idx [B, h, k, w]`` -> (positions, clusters) ``[B, h, k * w]``, cluster-major."""
        B, h, k, w = idx.shape
        seg = torch.arange(k, device=idx.device).repeat_interleave(w).expand(B, h, -1)
        return idx.reshape(B, h, k * w).long(), seg

    def _local_pattern(self, T: int, device):
        key = ("local", T, self.causal, str(device))
        p = self._patterns.get(key)
        if p is None:
            win = min(self.local_window, T)
            p = sliding_window(T, win, causal=self.causal, block_q=64 if T >= 64 else 16, device=device)
            self._patterns[key] = p
        return p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[B, T, dim]`` -> ``[B, T, dim]``."""
        check_input(x, 3, self.dim, "[B, T, dim]")
        B, T, _ = x.shape
        d, hl, hr = self.head_dim, self.local_heads, self.routed_heads
        q = self.q_proj(x).view(B, T, self.heads, d).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.heads, d).transpose(1, 2)
        k = self.k_proj(x).view(B, T, -1, d).transpose(1, 2) if self.k_proj is not None else None
        outs = []
        if hl:
            outs.append(attend(q[:, :hl], k[:, :hl], v[:, :hl], self._local_pattern(T, x.device)))
        self._aux = None
        if hr:
            o, pts, assign = (self._routed_shared if self.shared_qk else self._routed_separate)(
                q[:, hl:], None if self.shared_qk else k[:, hl:], v[:, hl:])
            outs.append(o)
            if self.training:
                mu = self.means.float()[torch.arange(hr, device=x.device)[None, :, None], assign]
                self._aux = self.commitment * (pts - mu).pow(2).sum(-1).mean()
                self._ema(pts.detach(), assign)
        o = torch.cat(outs, 1) if len(outs) > 1 else outs[0]
        return self.out(o.transpose(1, 2).reshape(B, T, self.dim))

    def _nearest(self, xn: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bhtd,hkd->bhtk", xn.detach(), self.means.float()).argmax(-1)

    def _logit_scale(self, d: int) -> float:
        """The logit scale of ``qk_norm="layer"``: ``qk_scale``, ``sqrt(d)`` for ``"sqrt"``, ``d`` (the
        authors') for None."""
        if self.qk_scale is None:
            return float(d)
        return math.sqrt(d) if self.qk_scale == "sqrt" else float(self.qk_scale)

    def unit_vectors(self, qr: torch.Tensor, kr: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The routed heads' unit queries and keys (float32) from their
        projections ``qr`` / ``kr [B, h, T, d]`` (``kr`` None with shared Q = K: the keys are the
        queries): ``q / |q|`` (``qk_norm="l2"``) or the unit vector of ``q`` layer-normalised
        without scale or bias (``"layer"``, the authors' code), the same for ``k``."""
        if self.qk_norm == "layer":
            d = qr.shape[-1]
            qu = F.normalize(F.layer_norm(qr.float(), (d,), eps=1e-6), dim=-1)
            ku = qu if kr is None else F.normalize(F.layer_norm(kr.float(), (d,), eps=1e-6), dim=-1)
            return qu, ku
        qu = F.normalize(qr.float(), dim=-1)
        return qu, (qu if kr is None else F.normalize(kr.float(), dim=-1))

    def routed_inputs(self, qr: torch.Tensor, kr: Optional[torch.Tensor]):
        """The routed heads' attention query, attention key and routing unit vectors (queries, keys)
        from their projections ``qr`` / ``kr [B, h, T, d]`` (``kr`` None with shared Q = K; then
        the keys' unit vectors are the queries'), per ``qk_norm``:

        * routing vectors: ``unit_vectors``;
        * ``qk_norm="l2"``: attention on the raw ``q`` and ``k`` (shared Q = K: the raw ``q``
          against the unit key ``q / |q|``);
        * ``qk_norm="layer"`` (the authors' code): attention on the routing vectors themselves with
          logits ``qk_scale * cos`` (default ``d``: ``LN(q) . LN(k)``, the authors' logits, ``d`` times
          the correlation of q and k; ``"sqrt"``: ``sqrt(d)``): a logit is large only where the query and the
          key point the same way on the sphere the centroids live on, so the key a query needs is
          near it and k-means tends to put both in one cluster (the paper's argument for routing,
          which holds for unit vectors only).
        """
        qn, kn = self.unit_vectors(qr, kr)
        if self.qk_norm == "layer":
            d = qr.shape[-1]
            scale = self.qk_log_scale.exp()[None, :, None, None] if self.qk_log_scale is not None else \
                self._logit_scale(d)
            return (qn * scale).to(qr.dtype), (kn * math.sqrt(d)).to(qr.dtype), qn, kn
        if kr is None:
            return qr, qn.to(qr.dtype), qn, qn
        return qr, kr, qn, kn

    def _routed_shared(self, qr, kr, vr):
        """Routed heads with the shared Q = K projection -> (output, routed unit vectors, their clusters)."""
        qa, ka, xn, _ = self.routed_inputs(qr, None)
        first_batch = self.training and not bool(self.initted)
        if first_batch and self.routing == "balanced":
            self._kmeans_init(xn.detach())
        assign = self._nearest(xn)
        if self.routing == "assign":
            o = self.assigned_attention(qa, ka, vr, assign)
            if first_batch:  # after this batch's routing: its later tokens never reach its earlier outputs
                self._kmeans_init(xn.detach())
                assign = self._nearest(xn)
        else:
            o = self.routed_attention(qa, ka, vr, self.route(xn))
        return o, xn, assign

    def _routed_separate(self, qr, kr, vr):
        """Routed heads with separate query and key projections (``shared_qk=False``): queries and
        keys are routed to the same centroids, each by its own unit vector; the centroids learn
        from both -> (output, the queries' and keys' unit vectors ``[B, h, 2T, d]``, their clusters)."""
        first_batch = self.training and not bool(self.initted)
        qr, kr, qn, kn = self.routed_inputs(qr, kr)
        if first_batch and self.routing == "balanced":
            self._kmeans_init(self._fit_points(qn, kn).detach())
        if self.routing == "assign":  # every key in its key_clusters nearest clusters (1: nearest only)
            qpos, qseg = self._assign_order(self._nearest(qn))
            kpos, kseg = self._multi_order(kn, self.key_clusters)
            B, h, T = qpos.shape
            pad = (self.key_clusters - 1) * T  # padding query slots: position T, a cluster beyond every key's
            if pad:
                qpos = torch.cat([qpos, qpos.new_full((B, h, pad), T)], -1)
                qseg = torch.cat([qseg, qseg.new_full((B, h, pad), self.num_clusters)], -1)
        else:
            (qpos, qseg), (kpos, kseg) = self._balanced_order(self.route(qn)), self._balanced_order(self.route(kn))
        o = self.two_order_attention(qr, kr, vr, qpos, qseg, kpos, kseg)
        if first_batch and self.routing == "assign":  # after this batch's routing (causal, as above)
            self._kmeans_init(self._fit_points(qn, kn).detach())
        pts = self._fit_points(qn, kn)
        return o, pts, self._nearest(pts)

    def _fit_points(self, qn: torch.Tensor, kn: torch.Tensor) -> torch.Tensor:
        """The unit vectors the centroids learn from (k-means initialisation, EMA, commitment):
        queries and keys (``kmeans_on="both"``), the queries only (``"queries"``) or the keys only
        (``"keys"``)."""
        if self.kmeans_on == "both":
            return torch.cat([qn, kn], 2)
        return qn if self.kmeans_on == "queries" else kn

    def routing_stats(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None) -> dict:
        """Whether the routed heads' clusters hold the keys their queries need, on ``x [B, T, dim]``
        (``no_key``, ``co_clustered``, ``dense_mass``, ``query_use``, ``key_use``; optionally only at
        ``positions``, bool ``[B, T]``): see ``sparsattn.nn.layers._routing_stats.routing_stats``."""
        from ._routing_stats import routing_stats

        return routing_stats(self, x, positions)

    def extra_loss(self) -> Optional[torch.Tensor]:
        """The commitment loss of the last training forward (None in eval mode)."""
        return self._aux

    def cost(self, T: int) -> dict:
        """Attention cost at ``T`` tokens: density (computed pairs / causal or all pairs, averaged
        over heads) and FLOPs of the attention plus the cluster assignment. With
        ``routing="assign"`` the cluster sizes depend on the data: the cost is that of equal
        clusters (``ceil(T / num_clusters)`` tokens each), the smallest it can be."""
        check_int("T", T)
        total = T * (T + 1) / 2 if self.causal else float(T * T)
        win = min(self.local_window, T)
        t = torch.arange(T, dtype=torch.float64)
        local = float(torch.clamp(t + 1, max=win).sum()) if self.causal else \
            float((torch.clamp(t + win - 1, max=T - 1) - torch.clamp(t - win + 1, min=0) + 1).sum())
        w = self.window(T)
        r = self.key_clusters  # keys in r clusters: r times the keys per cluster
        routed = self.num_clusters * (w * (r * w + 1) / 2 if self.causal else w * r * w)
        pairs = self.local_heads * local + self.routed_heads * routed
        flops = 4.0 * pairs * self.head_dim + 2.0 * T * self.num_clusters * self.head_dim * self.routed_heads
        return {"density": min(1.0, pairs / (self.heads * total)), "flops": flops}
