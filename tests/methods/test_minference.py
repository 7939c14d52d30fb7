"""MInference: vertical-slash and block-sparse find planted structure; the offline search picks
the right pattern type per head; calibration JSON round trip and refusals."""
import math
import warnings

import pytest
import torch

from sparsattn.methods import get_method
from sparsattn.methods.base import SelectContext
from sparsattn.methods.minference import MInference, attention_recall, build_head_method, search_patterns

D = 32


def slash_qk(T, d_star, alpha=1.5, seed=0):
    """q_i . k_j = alpha * sum_m cos(w_m (i - j - d_star)): peaked on the diagonal i - j = d_star."""
    m = torch.arange(1, D // 2 + 1, dtype=torch.float64)
    w = 2 * math.pi * m / (2 * T)
    i = torch.arange(T, dtype=torch.float64)[:, None]
    q = torch.cat([torch.cos(w * (i - d_star)), torch.sin(w * (i - d_star))], -1) * alpha * math.sqrt(D) / 4
    k = torch.cat([torch.cos(w * i), torch.sin(w * i)], -1) * 4
    return q.float(), k.float()


def vertical_qk(T, cols, seed=0):
    """every query is aligned with u; keys in ``cols`` are too (strong vertical lines)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.zeros(D)
    u[0] = 1.0
    q = torch.randn(T, D, generator=g) * 0.3 + u * 4
    k = torch.randn(T, D, generator=g) * 0.3
    k[cols] = u * 12
    return q, k


def block_qk(T, bs, seed=0):
    """query block i attends to the keys of key block i // 2 (topic one-hot per key block)."""
    g = torch.Generator().manual_seed(seed)
    nb = T // bs
    q = torch.randn(T, D, generator=g) * 0.2
    k = torch.randn(T, D, generator=g) * 0.2
    for j in range(nb):
        k[j * bs:(j + 1) * bs, j % D] += 3.0
    for i in range(nb):
        q[i * bs:(i + 1) * bs, (i // 2) % D] += 8.0
    return q, k


def test_vertical_slash_finds_planted_lines():
    T = 384
    qs, ks = slash_qk(T, d_star=150)
    qv, kv = vertical_qk(T, [70, 171, 300])
    q = torch.stack([qs, qv])[None]
    k = torch.stack([ks, kv])[None]
    m = get_method("vertical_slash", v_size=3 + 4, s_size=4 + 2, last_q=32, n_sink=4, n_local=4, block_size=32)
    p = m.select(q, k)
    assert p.heads == 2 and p.columns is not None
    mask = p.to_dense_mask()[0]
    i = torch.arange(150, T)
    assert mask[0, i, i - 150].all(), "planted slash d=150 not kept"
    cols = set(p.columns.indices[0, 1, : int(p.columns.counts[0, 1])].tolist())
    assert {70, 171, 300} <= cols
    for c in (70, 171, 300):
        assert mask[1, c:, c].all()
    assert p.density < 0.6
    # the slash head does not get the vertical lines' columns beyond the forced sinks
    cols0 = set(p.columns.indices[0, 0, : int(p.columns.counts[0, 0])].tolist())
    assert not {70, 171, 300} <= cols0


def test_vertical_slash_gqa_pattern_is_per_query_head():
    T = 256
    qs, ks = slash_qk(T, d_star=100)
    qs2, _ = slash_qk(T, d_star=40)
    q = torch.stack([qs, qs2])[None]
    k = ks[None, None]
    p = get_method("vertical_slash", v_size=4, s_size=6, last_q=32, n_sink=4, n_local=4, block_size=32).select(q, k)
    assert p.heads == 2
    mask = p.to_dense_mask()[0]
    i = torch.arange(100, T)
    assert mask[0, i, i - 100].all() and not mask[1, i, i - 100].all()
    i = torch.arange(40, T)
    assert mask[1, i, i - 40].all()


def test_vertical_slash_clamps_with_warning():
    q = torch.randn(1, 2, 100, 16)
    with pytest.warns(UserWarning, match="v_size"):
        get_method("vertical_slash").select(q, q)


def test_block_sparse_finds_planted_blocks():
    T, bs = 512, 32
    q, k = block_qk(T, bs)
    p = get_method("block_sparse", top_k=3, block_size=bs).select(q[None, None], k[None, None])
    sel = p.block_mask()[0, 0]
    for i in range(2, T // bs):
        assert sel[i, i // 2], f"query block {i} misses planted key block {i // 2}"
        assert sel[i, 0] and sel[i, i]
        assert int(sel[i].sum()) <= 3


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("Tq,Tk", [(197, 197), (64, 300), (1, 130)])
def test_block_sparse_small_top_k_keeps_forced_blocks(top_k, Tq, Tk):
    # issue 10: at top_k=1 the forced blocks were cut by top-k, leaving rows without their own key
    g = torch.Generator().manual_seed(Tq)
    q, k = torch.randn(1, 4, Tq, 16, generator=g) * 2, torch.randn(1, 2, Tk, 16, generator=g) * 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = get_method("block_sparse", top_k=top_k, block_size=64).select(q, k)
    m = p.to_dense_mask()
    rows = torch.arange(Tq)
    assert m[:, :, rows, rows + Tk - Tq].all()
    bm = p.block_mask()[0]
    assert bm[:, :, 0].all()  # block 0 as well
    assert int(bm.sum(-1).max()) <= 3


def _captured(T=512, bs=32):
    qv, kv = vertical_qk(T, [45, 130, 222, 301, 390, 470], seed=1)
    qb, kb = block_qk(T, bs, seed=2)
    q = torch.stack([qv, qb])[None]
    k = torch.stack([kv, kb])[None]
    v = torch.randn_like(k)
    return q, k, v


CANDS = [{"type": "a_shape", "n_init": 16, "n_local": 64},
         {"type": "vertical_slash", "v_size": 40, "s_size": 32},
         {"type": "block_sparse", "top_k": 3}]


def test_search_picks_planted_pattern_types():
    q, k, v = _captured()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = search_patterns({0: (q, k, v)}, CANDS, block_size=32, last_q=32)
    assert plan[0][0]["type"] == "vertical_slash", plan[0][0]
    assert plan[0][1]["type"] == "block_sparse", plan[0][1]
    for h in (0, 1):
        assert 0.9 < plan[0][h]["score"] <= 1.0 + 1e-9
        assert 0 < plan[0][h]["density"] < 1
    # a budget below every candidate's density keeps the sparsest one
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tight = search_patterns({0: (q, k, v)}, CANDS, budget=0.01, block_size=32, last_q=32)
    dens = [tight[0][h]["density"] for h in (0, 1)]
    assert all(d > 0.01 for d in dens)


def test_fit_save_load_select_and_refusals(tmp_path):
    q, k, v = _captured()
    with pytest.raises(RuntimeError, match="fit"):
        get_method("minference").select(q, k, SelectContext(layer=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = MInference.fit({0: (q, k, v), 1: (k, k, v)}, CANDS, block_size=32, last_q=32, path=str(tmp_path / "mi.json"))
    loaded = get_method("minference", path=str(tmp_path / "mi.json"), block_size=32, last_q=32)
    assert loaded.is_fitted and loaded.plan == m.plan
    ctx = SelectContext(layer=0)
    p = loaded.select(q, k, ctx)
    assert p.heads == 2
    mask = p.to_dense_mask()[0]
    # each head's mask is the one of its chosen pattern type run alone
    for h in range(2):
        e = m.plan[0][h]
        ph = build_head_method(e, block_size=32, last_q=32).select(q[:, h:h + 1], k[:, h:h + 1])
        assert torch.equal(mask[h], ph.to_dense_mask()[0, 0])
    assert torch.allclose(attention_recall(q, k, p).float(),
                          torch.tensor([m.plan[0][h]["score"] for h in range(2)]).float(), atol=1e-5)
    # another model shape is refused, naming the field
    with pytest.raises(ValueError, match="num_heads"):
        loaded.select(q.repeat(1, 2, 1, 1), k.repeat(1, 2, 1, 1), ctx)
    with pytest.raises(ValueError, match="head_dim"):
        loaded.select(q[..., :16], k[..., :16], ctx)
    with pytest.raises(ValueError, match="ctx.layer"):
        loaded.select(q, k, SelectContext(layer=2))
    with pytest.raises(ValueError, match="ctx.layer"):
        loaded.select(q, k, SelectContext(layer=None))
    with pytest.raises(ValueError, match="num_kv_heads"):
        MInference.load(tmp_path / "mi.json", expect_shape={"num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
                                                            "head_dim": D})
