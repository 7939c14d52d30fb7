"""RazorAttention: planted echo / induction heads are found; per-head split; JSON round trip."""
import pytest
import torch

from sparsattn.methods import get_method
from sparsattn.methods.base import SelectContext
from sparsattn.methods.razor import RazorAttention, echo_induction_scores, repeated_random_tokens


def test_repeated_random_tokens():
    t = repeated_random_tokens(1000, 50, 4, seed=3, low=10)
    assert t.shape == (200,) and t.dtype == torch.long
    assert torch.equal(t[:50], t[150:]) and len(set(t[:50].tolist())) == 50 and int(t.min()) >= 10
    assert torch.equal(t, repeated_random_tokens(1000, 50, 4, seed=3, low=10))
    with pytest.raises(ValueError, match="repeats"):
        repeated_random_tokens(10, 5, 1)


def _planted_qk(n=60, repeats=4, D=64, seed=0):
    """head 0 echo (q_i ~ k_j iff same token), head 1 induction (iff x_{j-1} == x_i), heads 2-3 random."""
    tok = repeated_random_tokens(256, n, repeats, seed=seed)
    g = torch.Generator().manual_seed(seed)
    E = torch.nn.functional.normalize(torch.randn(256, D, generator=g), dim=-1)
    x = E[tok]
    prev = torch.cat([torch.zeros(1, D), x[:-1]])
    T = tok.numel()
    q = torch.randn(1, 4, T, D, generator=g) * 0.5
    k = torch.randn(1, 4, T, D, generator=g) * 0.5
    q[0, 0], k[0, 0] = x * 12, x * 12
    q[0, 1], k[0, 1] = x * 12, prev * 12
    return q, k, n


def test_scores_find_planted_heads(tmp_path):
    q, k, n = _planted_qk()
    e, i = echo_induction_scores(q, k, n)
    assert int(e.argmax()) == 0 and int(i.argmax()) == 1
    assert e[0] > 0.5 and i[1] > 0.5 and e[2:].max() < 0.1 and i[2:].max() < 0.1
    m = RazorAttention.fit({0: (q, k), 1: (q.flip(1), k.flip(1))}, n, echo_fraction=0.25, induction_fraction=0.25,
                           min_window=16, compression=100.0, n_sink=2, block_size=32, path=str(tmp_path / "r.json"))
    assert m.retrieval_heads == {0: [0, 1], 1: [2, 3]}
    p = m.select(q, k, SelectContext(layer=0))
    assert p.heads == 4
    mask = p.to_dense_mask()[0]
    T = q.shape[2]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    assert torch.equal(mask[0], causal) and torch.equal(mask[1], causal)
    ii = torch.arange(T)[:, None]
    jj = torch.arange(T)[None, :]
    window = max(16, -(-T // 100))
    want = (jj <= ii) & ((jj < 2) | (ii - jj < window))
    assert torch.equal(mask[2], want) and torch.equal(mask[3], want)
    # round trip
    loaded = get_method("razor", path=str(tmp_path / "r.json"), min_window=16, compression=100.0, n_sink=2,
                        block_size=32)
    assert loaded.retrieval_heads == m.retrieval_heads
    assert torch.equal(loaded.select(q, k, SelectContext(layer=1)).to_dense_mask(),
                       m.select(q, k, SelectContext(layer=1)).to_dense_mask())
    assert loaded.scores[0]["echo"][0] == pytest.approx(float(e[0]))
    with pytest.raises(ValueError, match="num_heads"):
        loaded.select(q[:, :2], k[:, :2], SelectContext(layer=0))
    with pytest.raises(ValueError, match="ctx.layer"):
        loaded.select(q, k, SelectContext(layer=7))


def test_unfitted_and_bad_values():
    q = torch.randn(1, 2, 64, 16)
    with pytest.raises(RuntimeError, match="fit"):
        get_method("razor").select(q, q, SelectContext(layer=0))
    with pytest.raises(ValueError, match="compression"):
        get_method("razor", compression=0.5)
    with pytest.raises(ValueError, match="echo_fraction"):
        get_method("razor", echo_fraction=2.0)
    with pytest.raises(ValueError, match="period"):
        echo_induction_scores(q, q, 64)
