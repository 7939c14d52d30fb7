"""routing layer: attention inside given clusters against a float64 loop reference (outputs and
gradients, odd lengths), one cluster equals dense attention, balanced routing, k-means state
(initialisation, EMA, commitment loss), local heads, training, and bad input."""
import copy

import os

import pytest
import torch
import torch.nn.functional as F

from sparsattn.nn import get_layer
from sparsattn.nn.base import attention_backend
from tests.nn._i12_checks import compare_with_reference, future_leak, masked_ref, train_falls


def _skip_triton_on_cpu_tensors(backend="triton"):
    """These tests build CPU tensors: the Triton path then needs the interpreter (tests/conftest.py
    sets it on machines without CUDA; on a GPU machine the kernel tests run Triton on CUDA)."""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton path on CPU tensors needs the interpreter (set by tests/conftest.py without CUDA)")


def _members_attention(q, kn, v, b, hh, m, causal, exclude_self):
    """Attention among the members ``m`` (positions, ascending) of one cluster of sequence ``b``,
    head ``hh``: causal by position, own key masked except for the cluster's first member."""
    w = len(m)
    mask = torch.ones(w, w, dtype=torch.bool)
    if causal:
        mask = mask.tril()
    if exclude_self:
        mask &= ~torch.eye(w, dtype=torch.bool)
        mask[0, 0] = mask[0, 0] or causal or w == 1
    return masked_ref(q[b, hh, m][None], kn[b, hh, m][None], v[b, hh, m][None], mask)[0]


def _cluster_reference(q, kn, v, idx, causal, exclude_self):
    """Loops over clusters: attention among members (in position order), causal by position, own
    key masked except for the cluster's first member; the mean over a token's clusters."""
    B, h, T, d = q.shape
    acc = torch.zeros(B, h, T, d, dtype=torch.float64)
    cnt = torch.zeros(B, h, T, dtype=torch.float64)
    for b in range(B):
        for hh in range(h):
            for members in idx[b, hh]:
                m = members.tolist()
                acc[b, hh, m] += _members_attention(q, kn, v, b, hh, m, causal, exclude_self)
                cnt[b, hh, m] += 1
    return acc / cnt.clamp(min=1)[..., None]


@pytest.mark.parametrize("causal,exclude_self,T,k,w", [(True, True, 37, 4, 10), (False, True, 29, 3, 12),
                                                        (True, False, 20, 2, 20), (False, False, 18, 5, 3)])
def test_given_clusters_match_reference_with_grads(causal, exclude_self, T, k, w):
    layer = get_layer("routing", 24, 3, num_clusters=k, causal=causal, exclude_self=exclude_self, shared_qk=True)
    B, h, d = 2, 2, 8
    q = torch.randn(B, h, T, d, dtype=torch.float64)
    kn = F.normalize(torch.randn(B, h, T, d, dtype=torch.float64), dim=-1)
    v = torch.randn(B, h, T, d, dtype=torch.float64)
    idx = torch.stack([torch.stack([torch.randperm(T)[:w].sort().values for _ in range(k)]) for _ in range(B * h)])
    idx = idx.view(B, h, k, w)
    ins32 = [t.float().requires_grad_(True) for t in (q, kn, v)]
    ins64 = [t.clone().requires_grad_(True) for t in (q, kn, v)]
    with attention_backend("reference"):
        y32 = layer.routed_attention(*ins32, idx)
    y64 = _cluster_reference(*ins64, idx, causal, exclude_self)
    assert float((y32.detach().double() - y64.detach()).abs().max()) < 1e-5
    g = torch.randn_like(y64)
    (y32 * g.float()).sum().backward()
    (y64 * g).sum().backward()
    for a, b in zip(ins32, ins64):
        assert float((a.grad.double() - b.grad).abs().max()) < 1e-4


def test_triton_interpreter_path_matches_reference():
    _skip_triton_on_cpu_tensors()
    layer = get_layer("routing", 16, 2, num_clusters=2, causal=True)
    q = torch.randn(1, 1, 20, 8)
    kn = F.normalize(torch.randn(1, 1, 20, 8), dim=-1)
    v = torch.randn(1, 1, 20, 8)
    idx = torch.stack([torch.randperm(20)[:10].sort().values for _ in range(2)]).view(1, 1, 2, 10)
    with attention_backend("triton"):
        y = layer.routed_attention(q, kn, v, idx)
    ref = _cluster_reference(q.double(), kn.double(), v.double(), idx, True, True)
    assert float((y.double() - ref).abs().max()) < 1e-4


@pytest.mark.parametrize("causal", [True, False])
def test_one_cluster_is_dense(causal):
    layer = get_layer("routing", 16, 2, num_clusters=1, local_heads=0, exclude_self=False, causal=causal, shared_qk=True)

    def dense(layer64, x64):
        B, T, C = x64.shape
        q = layer64.q_proj(x64).view(B, T, 2, 8).transpose(1, 2)
        v = layer64.v_proj(x64).view(B, T, 2, 8).transpose(1, 2)
        m = torch.ones(T, T, dtype=torch.bool)
        o = masked_ref(q, F.normalize(q, dim=-1), v, m.tril() if causal else m)
        return layer64.out(o.transpose(1, 2).reshape(B, T, C))

    layer.eval()
    compare_with_reference(layer, torch.randn(2, 23, 16), dense)


def test_balanced_routing_and_kmeans_state():
    layer = get_layer("routing", 32, 4, num_clusters=3, local_window=4, routing="balanced")
    x = torch.randn(2, 25, 32)
    assert not bool(layer.initted)
    m0 = layer.means.clone()
    layer.train()
    with attention_backend("reference"):
        y = layer(x)
    assert bool(layer.initted) and not torch.equal(layer.means, m0)
    assert torch.allclose(layer.means.norm(dim=-1), torch.ones(2, 3), atol=1e-5)
    aux = layer.extra_loss()
    assert aux is not None and float(aux.detach()) > 0 and aux.requires_grad
    (y.sum() + aux).backward()
    # routing: each cluster takes its w = ceil(25 / 3) = 9 closest tokens, in position order
    xn = F.normalize(torch.randn(2, 2, 25, 8), dim=-1)
    idx = layer.route(xn)
    assert idx.shape == (2, 2, 3, 9)
    assert bool((idx[..., 1:] > idx[..., :-1]).all())
    sim = torch.einsum("bhtd,hkd->bhkt", xn, layer.means)
    kth = sim.topk(9, -1).values[..., -1:]
    assert bool((sim.gather(-1, idx) >= kth - 1e-6).all())
    m1 = layer.means.clone()
    layer.eval()
    with attention_backend("reference"):
        layer(x)
    assert torch.equal(layer.means, m1) and layer.extra_loss() is None


def test_local_heads_are_causal_and_training_falls():
    layer = get_layer("routing", 16, 2, local_heads=2, local_window=4)
    assert future_leak(layer, torch.randn(2, 20, 16), 11) == 0.0
    first, last = train_falls("routing", (24,), num_clusters=2, local_window=4)
    assert last < 0.7 * first
    c = get_layer("routing", 16, 2, num_clusters=4, local_window=32).cost(128)
    assert 0 < c["density"] < 1 and c["flops"] > 0


def _assign_reference(q, kn, v, assign, causal, exclude_self):
    """Nearest-centroid clusters by loops: attention among a cluster's members in position order."""
    B, h, T, d = q.shape
    out = torch.zeros(B, h, T, d, dtype=torch.float64)
    for b in range(B):
        for hh in range(h):
            for c in assign[b, hh].unique().tolist():
                m = (assign[b, hh] == c).nonzero().flatten().tolist()
                out[b, hh, m] = _members_attention(q, kn, v, b, hh, m, causal, exclude_self)
    return out


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("causal,exclude_self,T,k", [(True, True, 37, 4), (False, True, 29, 3), (True, False, 70, 2),
                                                      (False, False, 18, 5)])
def test_assigned_clusters_match_reference_with_grads(backend, causal, exclude_self, T, k):
    """routing='assign': attention inside nearest-centroid clusters of very unequal sizes (one
    cluster of one token included) equals the float64 loop reference, outputs and gradients."""
    _skip_triton_on_cpu_tensors(backend)
    layer = get_layer("routing", 24, 3, num_clusters=k, causal=causal, exclude_self=exclude_self, routing="assign",
                      shared_qk=True)
    B, h, d = 2, 2, 8
    g = torch.Generator().manual_seed(T)
    q, v = (torch.randn(B, h, T, d, dtype=torch.float64, generator=g) for _ in range(2))
    kn = F.normalize(torch.randn(B, h, T, d, dtype=torch.float64, generator=g), dim=-1)
    probs = torch.tensor([0.6] + [0.4 / (k - 1)] * (k - 1))
    assign = torch.multinomial(probs, B * h * T, replacement=True, generator=g).view(B, h, T)
    assign[0, 0] = 0
    assign[0, 0, T // 2] = 1  # a cluster of one token
    ins32 = [t.float().requires_grad_(True) for t in (q, kn, v)]
    ins64 = [t.clone().requires_grad_(True) for t in (q, kn, v)]
    with attention_backend(backend):
        y32 = layer.assigned_attention(*ins32, assign)
    y64 = _assign_reference(*ins64, assign, causal, exclude_self)
    assert float((y32.detach().double() - y64.detach()).abs().max()) < 1e-4
    if backend == "reference":
        gr = torch.randn_like(y64)
        (y32 * gr.float()).sum().backward()
        (y64 * gr).sum().backward()
        for a, b in zip(ins32, ins64):
            assert float((a.grad.double() - b.grad).abs().max()) < 1e-4


def test_assign_is_the_causal_default_and_strictly_causal_in_training():
    layer = get_layer("routing", 16, 2, num_clusters=3, local_window=4)
    assert layer.routing == "assign" and layer.caveat() == ""
    assert get_layer("routing", 16, 2, causal=False).routing == "balanced"
    x = torch.randn(2, 30, 16)

    def leak(layer):  # twins: a training forward updates the centroids
        x2 = x.clone()
        x2[:, 12:] += torch.randn(2, 18, 16)
        a, b = copy.deepcopy(layer), copy.deepcopy(layer)
        with torch.no_grad(), attention_backend("reference"):
            return float((a(x)[:, :12] - b(x2)[:, :12]).abs().max())

    layer.train()
    assert leak(layer) < 1e-6  # the first batch (k-means init after routing) included; float rounding only
    with torch.no_grad(), attention_backend("reference"):
        layer(x)
    assert bool(layer.initted)
    assert leak(layer) < 1e-6
    layer.eval()
    assert leak(layer) < 1e-6
    assert future_leak(layer, x, 12) < 1e-6
    first, last = train_falls("routing", (24,), num_clusters=2, local_window=4, routing="assign")
    assert last < 0.7 * first


@pytest.mark.parametrize("kwargs,arg", [
    (dict(routing="topk"), "routing"),
    (dict(routing="assign", window_size=4), "window_size"),
    (dict(dim=30, heads=4), "dim"),
    (dict(num_clusters=0), "num_clusters"),
    (dict(window_size=0), "window_size"),
    (dict(local_heads=3), "local_heads"),
    (dict(local_window=0), "local_window"),
    (dict(decay=1.5), "decay"),
    (dict(commitment=-1.0), "commitment"),
    (dict(exclude_self=1), "exclude_self"),
    (dict(causal=None), "causal"),
    (dict(shared_qk=0), "shared_qk"),
    (dict(shared_qk=False, exclude_self=True), "exclude_self"),
    (dict(causal=False, exclude_self=True), "exclude_self"),  # non-causal default: separate q / k
])
def test_invalid_config(kwargs, arg):
    kw = dict(dim=16, heads=2)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=arg):
        get_layer("routing", kw.pop("dim"), kw.pop("heads"), **kw)


def test_invalid_input():
    layer = get_layer("routing", 16, 2)
    with pytest.raises(ValueError, match="x"):
        layer(torch.randn(1, 4, 4, 16))
    with pytest.raises(ValueError, match="x"):
        layer(torch.randn(1, 8, 12))


# -- shared_qk=False: queries and keys routed separately to shared centroids --------------------------

def _two_order_reference(q, k, v, qmem, kmem, causal):
    """Separate query / key routing by loops: ``qmem[b][h]`` / ``kmem[b][h]`` lists of (position,
    cluster) slots; a query slot reads the key slots of its cluster at positions <= its own (causal);
    a token's output is the mean over its query slots (zero without slots or keys)."""
    B, h, T, d = q.shape
    acc = torch.zeros(B, h, T, d, dtype=torch.float64)
    cnt = torch.zeros(B, h, T, dtype=torch.float64)
    for b in range(B):
        for hh in range(h):
            for (i, ci) in qmem[b][hh]:
                keys = [j for (j, cj) in kmem[b][hh] if cj == ci and (j <= i or not causal)]
                cnt[b, hh, i] += 1
                if keys:
                    s = (k[b, hh, keys] @ q[b, hh, i]) / q.shape[-1] ** 0.5
                    acc[b, hh, i] += torch.softmax(s, 0) @ v[b, hh, keys]
    return acc / cnt.clamp(min=1)[..., None]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("routing,causal,T", [("assign", True, 37), ("assign", False, 29), ("assign", True, 70),
                                              ("balanced", False, 23), ("balanced", True, 19)])
def test_separate_qk_matches_reference_with_grads(backend, routing, causal, T):
    """shared_qk=False: a query attends to the keys routed to its own cluster (at positions <= its
    own when causal; the orders of queries and keys differ, so this is exact element masking on
    original positions), one block-sparse call; float64 loop reference, outputs and gradients. Very
    unequal clusters, a query cluster without any key, and (balanced) tokens in several or no
    clusters."""
    _skip_triton_on_cpu_tensors(backend)
    k_ = 4
    layer = get_layer("routing", 24, 3, num_clusters=k_, causal=causal, shared_qk=False, routing=routing)
    B, h, d = 2, 2, 8
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(B, h, T, d, dtype=torch.float64, generator=g) for _ in range(3))
    if routing == "assign":
        probs = torch.tensor([0.55, 0.3, 0.1, 0.05])
        qa, ka = (torch.multinomial(probs, B * h * T, replacement=True, generator=g).view(B, h, T) for _ in range(2))
        ka[0, 0] = torch.where(ka[0, 0] == 3, torch.zeros_like(ka[0, 0]), ka[0, 0])
        qa[0, 0, 3] = 3  # a query whose cluster has no key at all
        (qpos, qseg), (kpos, kseg) = layer._assign_order(qa), layer._assign_order(ka)
    else:
        w = 7
        idx = lambda: torch.stack([torch.randperm(T, generator=g)[:w].sort().values  # noqa: E731
                                   for _ in range(B * h * k_)]).view(B, h, k_, w)
        (qpos, qseg), (kpos, kseg) = layer._balanced_order(idx()), layer._balanced_order(idx())
    mem = lambda pos, seg: [[list(zip(pos[b, hh].tolist(), seg[b, hh].tolist())) for hh in range(h)]  # noqa: E731
                            for b in range(B)]
    ins32 = [t.float().requires_grad_(True) for t in (q, k, v)]
    ins64 = [t.clone().requires_grad_(True) for t in (q, k, v)]
    with attention_backend(backend):
        y32 = layer.two_order_attention(*ins32, qpos, qseg, kpos, kseg)
    y64 = _two_order_reference(*ins64, mem(qpos, qseg), mem(kpos, kseg), causal)
    assert float((y32.detach().double() - y64.detach()).abs().max()) < 1e-4
    if backend == "reference":
        gr = torch.randn_like(y64)
        (y32 * gr.float()).sum().backward()
        (y64 * gr).sum().backward()
        for a, b in zip(ins32, ins64):
            assert float((a.grad.double() - b.grad).abs().max()) < 1e-4


def _heads_and_local(l64, x, causal, window=5, d=8):
    """The float64 references' common start (1 local head of ``window``, head_dim ``d``): per-head
    q, k, v of the layer's projections and the local head's masked attention -> (q, k, v, local, (B, T))."""
    B, T, _ = x.shape
    sp = lambda t: t.view(B, T, -1, d).transpose(1, 2)  # noqa: E731
    q, k, v = sp(l64.q_proj(x)), sp(l64.k_proj(x)), sp(l64.v_proj(x))
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    near = (i - j).abs() < window
    loc = masked_ref(q[:, :1], k[:, :1], v[:, :1], near & (j <= i) if causal else near)
    return q, k, v, loc, (B, T)


@pytest.mark.parametrize("causal", [True, False])
def test_separate_qk_layer_matches_reference(causal):
    """The whole layer (eval, assign routing, 1 local + 2 routed heads) against a float64
    reference built from its weights: queries and keys by their own nearest centroid, attention
    with the raw query and key inside a cluster, the local head in its window."""
    layer = get_layer("routing", 24, 3, num_clusters=3, local_heads=1, local_window=5, causal=causal,
                      shared_qk=False, routing="assign")
    layer.eval()

    def ref(l64, x):
        q, k, v, loc, (B, T) = _heads_and_local(l64, x, causal)
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        mu = l64.means
        qa = torch.einsum("bhtd,hkd->bhtk", F.normalize(q[:, 1:], dim=-1), mu).argmax(-1)
        ka = torch.einsum("bhtd,hkd->bhtk", F.normalize(k[:, 1:], dim=-1), mu).argmax(-1)
        m = qa[..., :, None] == ka[..., None, :]
        rout = masked_ref(q[:, 1:], k[:, 1:], v[:, 1:], m & (j <= i) if causal else m)
        return l64.out(torch.cat([loc, rout], 1).transpose(1, 2).reshape(B, T, 24))

    compare_with_reference(layer, torch.randn(2, 21, 24), ref, atol=5e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_separate_qk_one_cluster_is_dense(causal):
    layer = get_layer("routing", 16, 2, num_clusters=1, local_heads=0, causal=causal, shared_qk=False)

    def dense(l64, x):
        B, T, C = x.shape
        sp = lambda t: t.view(B, T, 2, 8).transpose(1, 2)  # noqa: E731
        m = torch.ones(T, T, dtype=torch.bool)
        o = masked_ref(sp(l64.q_proj(x)), sp(l64.k_proj(x)), sp(l64.v_proj(x)), m.tril() if causal else m)
        return l64.out(o.transpose(1, 2).reshape(B, T, C))

    layer.eval()
    compare_with_reference(layer, torch.randn(2, 23, 16), dense)


def test_separate_qk_defaults_causality_and_ema_from_queries_and_keys():
    """Defaults follow the authors' code (shared under the causal mask, separate otherwise); the
    separate causal form is strictly causal in training (first batch included) and eval; the
    centroids learn from queries and keys (decay 0: each centroid becomes the mean of the unit
    queries and keys nearest to it); the layer trains."""
    assert get_layer("routing", 16, 2).shared_qk and get_layer("routing", 16, 2).exclude_self
    nc = get_layer("routing", 16, 2, causal=False)
    assert not nc.shared_qk and not nc.exclude_self and nc.k_proj.out_features == 16
    layer = get_layer("routing", 16, 2, num_clusters=3, local_window=4, shared_qk=False)
    assert layer.routing == "assign" and layer.caveat() == ""
    x = torch.randn(2, 30, 16)

    def leak(layer):
        x2 = x.clone()
        x2[:, 12:] += torch.randn(2, 18, 16)
        a, b = copy.deepcopy(layer), copy.deepcopy(layer)
        with torch.no_grad(), attention_backend("reference"):
            return float((a(x)[:, :12] - b(x2)[:, :12]).abs().max())

    layer.train()
    assert leak(layer) < 1e-6
    with torch.no_grad(), attention_backend("reference"):
        layer(x)
    assert bool(layer.initted) and leak(layer) < 1e-6
    layer.eval()
    assert leak(layer) < 1e-6 and future_leak(layer, x, 12) < 1e-6

    ema = get_layer("routing", 16, 2, num_clusters=3, local_heads=1, decay=0.0, shared_qk=False)
    ema.train()
    with torch.no_grad(), attention_backend("reference"):
        ema(x)  # first batch: k-means initialisation
        mu = ema.means.clone()
        ema(x)
    qn = F.normalize(ema.q_proj(x).view(2, 30, 2, 8)[:, :, 1], dim=-1).reshape(60, 8)
    kn = F.normalize(ema.k_proj(x).view(2, 30, 2, 8)[:, :, 1], dim=-1).reshape(60, 8)
    pts = torch.cat([qn, kn]).detach()
    a = (pts @ mu[0].T).argmax(-1)
    for c in range(3):
        if (a == c).any():
            assert torch.allclose(ema.means[0, c], F.normalize(pts[a == c].mean(0), dim=0), atol=1e-5)
    first, last = train_falls("routing", (24,), num_clusters=2, local_window=4, shared_qk=False)
    assert last < 0.7 * first


# -- routing_stats: do a query's cluster and the key it needs coincide? (issue 12, MQAR diagnosis) -----

def _offset_layer(key_offset):
    """1 routed head, d = 4, 2 clusters: query = (x0, x1, 3, 0) and key = (x0, x1, 3 * key_offset, 0)
    for inputs x = (x0, x1, 0, 1); centroids +e2 and -e2 (the offset direction)."""
    layer = get_layer("routing", 4, 1, num_clusters=2, local_heads=0, shared_qk=False)
    wq = torch.zeros(4, 4)
    wq[0, 0] = wq[1, 1] = 1.0
    wk = wq.clone()
    wq[2, 3], wk[2, 3] = 3.0, 3.0 * key_offset
    with torch.no_grad():
        layer.q_proj.weight.copy_(wq)
        layer.k_proj.weight.copy_(wk)
        layer.means.copy_(torch.tensor([[[0.0, 0, 1, 0], [0.0, 0, -1, 0]]]))
    return layer.eval()


def _two_token_input(g, B=2, T=11):
    tok = torch.randint(0, 2, (B, T), generator=g)
    x = torch.zeros(B, T, 4)
    x[..., 0], x[..., 1], x[..., 3] = (tok == 0).float(), (tok == 1).float(), 1.0
    return x, tok


def test_routing_stats_measures_separated_and_shared_clusters():
    """Queries offset one way and keys the other (dense attention is blind to a common key offset,
    the unit vectors are not): every query lands in one cluster and every key in the other, so no
    query has a key; with the same offset on both, every query reads its dense top key. A third
    case checks dense_mass against a count by hand."""
    g = torch.Generator().manual_seed(0)
    x, tok = _two_token_input(g)
    sep = _offset_layer(-1.0).routing_stats(x)
    assert sep["no_key"] == 1.0 and sep["co_clustered"] == 0.0 and sep["dense_mass"] == 0.0
    assert sep["query_use"].tolist() == [[1.0, 0.0]] and sep["key_use"].tolist() == [[0.0, 1.0]]
    same = _offset_layer(1.0).routing_stats(x)
    assert same["no_key"] == 0.0 and same["co_clustered"] == 1.0 and abs(same["dense_mass"] - 1.0) < 1e-6

    layer = _offset_layer(0.0)                      # no offset; centroids e0 / e1: one cluster per token
    with torch.no_grad():
        layer.q_proj.weight[2, 3] = 0.0
        layer.means.copy_(torch.tensor([[[1.0, 0, 0, 0], [0.0, 1, 0, 0]]]))
    st = layer.routing_stats(x)
    assert st["no_key"] == 0.0 and st["co_clustered"] == 1.0
    B, T = tok.shape
    want = []
    for b in range(B):
        for i in range(T):
            n_same = int((tok[b, :i + 1] == tok[b, i]).sum())
            e = torch.exp(torch.tensor(0.5)).item()      # logit 1 / sqrt(4) for the same token, 0 else
            want.append(n_same * e / (n_same * e + (i + 1 - n_same)))
    assert abs(st["dense_mass"] - sum(want) / len(want)) < 1e-5
    pos = torch.zeros(B, T, dtype=torch.bool)
    pos[:, -1] = True
    last = [w for k, w in enumerate(want) if k % T == T - 1]
    assert abs(layer.routing_stats(x, positions=pos)["dense_mass"] - sum(last) / len(last)) < 1e-5
    with pytest.raises(ValueError, match="positions"):
        layer.routing_stats(x, positions=pos[:, :-1])
    with pytest.raises(ValueError, match="local_heads"):
        get_layer("routing", 8, 2, local_heads=2).routing_stats(torch.randn(1, 5, 8))


@pytest.mark.parametrize("causal", [True, False])
def test_layer_qk_norm_matches_reference(causal):
    """qk_norm='layer' (the authors' code): the routed heads' q and k layer-normalised without scale
    or bias, routed by their unit vectors and attended with logits LN(q) . LN(k) (no 1/sqrt(d));
    float64 reference from the layer's weights, outputs and gradients (eval, 3 clusters, 1 local
    head); with shared Q = K the key is LN(q) and the own key is masked as before."""
    for shared in (False, True):
        layer = get_layer("routing", 24, 3, num_clusters=3, local_heads=1, local_window=5, causal=causal,
                          shared_qk=shared, routing="assign", qk_norm="layer")
        layer.eval()

        def ref(l64, x):
            q, k, v, loc, (B, T) = _heads_and_local(l64, x, causal)
            i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
            ln = lambda t: F.layer_norm(t, (8,), eps=1e-6)  # noqa: E731
            ql = ln(q[:, 1:])
            kl = ql if shared else ln(k[:, 1:])
            mu = l64.means
            qa = torch.einsum("bhtd,hkd->bhtk", F.normalize(ql, dim=-1), mu).argmax(-1)
            ka = torch.einsum("bhtd,hkd->bhtk", F.normalize(kl, dim=-1), mu).argmax(-1)
            m = qa[..., :, None] == ka[..., None, :]
            if causal:
                m = m & (j <= i)
            if shared:  # own key masked unless the query is its cluster's first member (causal) / alone
                first = torch.stack([m[..., r, :r].sum(-1) == 0 for r in range(T)], -1) if causal else \
                    (m.sum(-1) == 1)
                m = m & ((i != j) | first[..., :, None])
            rout = masked_ref(ql, kl, v[:, 1:], m, scale=1.0)
            return l64.out(torch.cat([loc, rout], 1).transpose(1, 2).reshape(B, T, 24))

        compare_with_reference(layer, torch.randn(2, 21, 24), ref, atol=5e-5)
    with pytest.raises(ValueError, match="qk_norm"):
        get_layer("routing", 16, 2, qk_norm="rms")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_keys_in_several_clusters_match_reference(backend):
    """key_clusters=2: every key joins its 2 nearest clusters, every query its nearest one (padding
    query slots keep the two orders the same length); a query reads the keys of its cluster at
    positions <= its own, one softmax; float64 reference from the layer's weights, outputs and
    gradients (eval, causal, 4 clusters, qk_norm='layer' with the sqrt(d) logit scale)."""
    _skip_triton_on_cpu_tensors(backend)
    layer = get_layer("routing", 24, 3, num_clusters=4, local_heads=1, local_window=5, shared_qk=False,
                      qk_norm="layer", qk_scale="sqrt", key_clusters=2)
    layer.eval()

    def ref(l64, x):
        B, T, _ = x.shape
        sp = lambda t: t.view(B, T, -1, 8).transpose(1, 2)  # noqa: E731
        q, k, v = sp(l64.q_proj(x)), sp(l64.k_proj(x)), sp(l64.v_proj(x))
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        loc = masked_ref(q[:, :1], k[:, :1], v[:, :1], ((i - j).abs() < 5) & (j <= i))
        qn = F.normalize(F.layer_norm(q[:, 1:], (8,), eps=1e-6), dim=-1)
        kn = F.normalize(F.layer_norm(k[:, 1:], (8,), eps=1e-6), dim=-1)
        qa = torch.einsum("bhtd,hkd->bhtk", qn, l64.means).argmax(-1)
        ktop = torch.einsum("bhtd,hkd->bhtk", kn, l64.means).topk(2, -1).indices
        m = (qa[..., :, None, None] == ktop[..., None, :, :]).any(-1) & (j <= i)
        rout = masked_ref(qn * 8 ** 0.5, kn, v[:, 1:], m, scale=1.0)  # logits sqrt(d) * cos
        return l64.out(torch.cat([loc, rout], 1).transpose(1, 2).reshape(B, T, 24))

    compare_with_reference(layer, torch.randn(2, 21, 24), ref, atol=5e-5, backend=backend)
    one = get_layer("routing", 24, 3, num_clusters=4, local_heads=1, local_window=5, shared_qk=False)
    assert layer.cost(64)["density"] > one.cost(64)["density"]
    bad = [({"key_clusters": 5, "shared_qk": False}, "key_clusters"),
           ({"key_clusters": 2, "shared_qk": True}, "key_clusters"),
           ({"key_clusters": 2, "shared_qk": False, "routing": "balanced"}, "key_clusters"),
           ({"qk_scale": 2.0}, "qk_scale"), ({"qk_scale": "cube", "qk_norm": "layer"}, "qk_scale"),
           ({"kmeans_on": "keys", "shared_qk": True}, "kmeans_on"),
           ({"kmeans_on": "all", "shared_qk": False}, "kmeans_on"),
           ({"learn_qk_scale": True, "shared_qk": False}, "qk_scale")]
    for kw, arg in bad:
        with pytest.raises(ValueError, match=arg):
            get_layer("routing", 24, 3, num_clusters=4, **kw)


def _recall_run(seed=0, steps=150, T=16, V=16, dim=32, **cfg):
    """One routed head (4 clusters, no local head) trained on a one-step associative recall: every
    context position holds a (key, value) pair, the last one asks a key; the answer is its value.
    -> (held-out accuracy, routing_stats at the asking position)."""
    from torch import nn

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    layer = get_layer("routing", dim, 1, local_heads=0, num_clusters=4, **cfg)
    ek, ev, head = nn.Embedding(V, dim), nn.Embedding(V + 1, dim), nn.Linear(dim, V)
    opt = torch.optim.Adam([*layer.parameters(), *ek.parameters(), *ev.parameters(), *head.parameters()], lr=1e-2)

    def batch(n):
        keys = torch.stack([torch.randperm(V, generator=g)[:T - 1] for _ in range(n)])
        vals = torch.randint(0, V, (n, T - 1), generator=g)
        pick = torch.randint(0, T - 1, (n, 1), generator=g)
        x = torch.cat([ek(keys) + ev(vals), (ek(keys.gather(1, pick)[:, 0]) + ev.weight[V])[:, None]], 1)
        return x, vals.gather(1, pick)[:, 0]

    with attention_backend("reference"):
        for _ in range(steps):
            x, y = batch(64)
            loss = F.cross_entropy(head(layer(x)[:, -1]), y) + layer.extra_loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
        layer.eval()
        with torch.no_grad():
            x, y = batch(256)
            acc = float((head(layer(x)[:, -1]).argmax(-1) == y).float().mean())
            ask = torch.zeros(256, T, dtype=torch.bool)
            ask[:, -1] = True
            return acc, layer.routing_stats(x, positions=ask)


def test_mqar_preset_routing_co_clusters_queries_with_their_keys():
    """The fix of the MQAR failure (docs/layers.md): with the mqar preset's routing (separate q/k,
    cosine logits, centroids from the queries, every key in its 3 nearest of 4 clusters) the routed head
    learns a lookup and the asked key lies in the query's cluster; with the earlier separate-q/k
    routing (raw logits, centroids from queries and keys, one cluster per key) it does not."""
    from sparsattn.nn import layer_class

    mqar = {k: v for k, v in layer_class("routing").presets["mqar"].items()
            if k in ("shared_qk", "qk_norm", "qk_scale", "kmeans_on", "key_clusters")}
    assert mqar == {"shared_qk": False, "qk_norm": "layer", "qk_scale": "sqrt", "kmeans_on": "queries",
                    "key_clusters": 3}
    for cfg in (mqar, {**mqar, "key_clusters": 2}):  # the preset, and with each key in 2 clusters only
        acc, st = _recall_run(**cfg)
        assert acc >= 0.85 and st["co_clustered"] >= 0.8 and st["no_key"] == 0.0, (cfg, acc, st)
    acc_old, st_old = _recall_run(shared_qk=False)
    assert acc_old <= 0.75 and st_old["co_clustered"] <= 0.7, (acc_old, st_old)
