"""Issue 10 regressions: per-sequence causal alignment and rows without any key.

* Triton, causal, per-sequence lengths with ``q_len > kv_len`` past the first query block: full
  blocks crossed the sequence's own (bottom-right) diagonal and were computed unmasked (forward
  and dQ), so rows saw keys they must not (max |diff| 2.68 on the issue's first repro).
* ``pattern=None`` with per-sequence lengths where ``q_len < kv_len`` (relative to the padded
  shape): the default causal lists were cut at the padded shape's diagonal, in both backends.
* The reference raised ``IndexError`` (amax of an empty dim) whenever a whole chunk of query
  rows had no key; documented: zeros and ``lse = -inf``.

Every expectation is a float64 dense formula written here, per sequence.
"""
import math

import pytest
import torch

import sparsattn as sa
from sparsattn import patterns as P

from .conftest_helpers import rel

INF = float("-inf")


def _oracle_padded(q, k, v, q_lens, kv_lens, causal=True, scale=None):
    """float64 per-sequence attention on a right-padded batch: (out, lse); zeros / -inf where no key."""
    B, Hq, Tq, D = q.shape
    G = Hq // k.shape[1]
    scale = 1 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(B, Hq, Tq, v.shape[-1], dtype=torch.float64)
    lse = torch.full((B, Hq, Tq), INF, dtype=torch.float64)
    for b in range(B):
        Lq, Lk = int(q_lens[b]), int(kv_lens[b])
        if Lq == 0 or Lk == 0:
            continue
        s = q[b, :, :Lq].double() @ k[b, :, :Lk].double().repeat_interleave(G, 0).transpose(-1, -2) * scale
        if causal:
            keep = torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None] + (Lk - Lq)
            s = s.masked_fill(~keep, INF)
        l_ = torch.logsumexp(s, -1)
        p = torch.exp(s - torch.where(torch.isinf(l_), 0.0, l_.double())[..., None]).nan_to_num(0.0)
        p = torch.where(torch.isinf(l_)[..., None], torch.zeros_like(p), p)
        out[b, :, :Lq] = p @ v[b, :, :Lk].double().repeat_interleave(G, 0)
        lse[b, :, :Lq] = l_
    return out, lse


def _grads_f64(q, k, v, g, **kw):
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    o, _ = _oracle_padded(q64, k64, v64, **kw)
    return torch.autograd.grad((o * g.double()).sum(), (q64, k64, v64))


# the repros (batch 2, 2 heads, 200 tokens, head_dim 64, causal, right padding)
REPROS = [
    ("kv_lens=[200,50]", [200, 200], [200, 50]),
    ("q_lens=[200,180],kv_lens=[200,170]", [200, 180], [200, 170]),
    ("kv_lens=[130,30]", [200, 200], [130, 30]),
    ("q_lens=[100,200],kv_lens=[200,200]", [100, 200], [200, 200]),  # q_len < kv_len: default lists
]


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("name,ql,kl", REPROS, ids=[r[0] for r in REPROS])
def test_causal_per_sequence_alignment(name, ql, kl, backend, device):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 200, 64, device=device).requires_grad_() for _ in range(3))
    qlt, klt = torch.tensor(ql, device=device), torch.tensor(kl, device=device)
    out, lse = sa.attention(q, k, v, causal=True, q_lens=qlt, kv_lens=klt, return_lse=True, backend=backend)
    ref, rlse = _oracle_padded(q.detach().cpu(), k.detach().cpu(), v.detach().cpu(), ql, kl)
    assert (out.detach().cpu().double() - ref).abs().max() < 1e-4
    assert torch.equal(torch.isinf(lse.cpu()), torch.isinf(rlse))
    fin = torch.isfinite(rlse)
    assert (lse.detach().cpu().double() - rlse)[fin].abs().max() < 1e-4
    g = torch.randn_like(out)
    for b in range(2):
        g[b, :, ql[b]:] = 0  # rows past a sequence are not outputs
    got = torch.autograd.grad((out * g).sum(), (q, k, v))
    want = _grads_f64(q.cpu(), k.cpu(), v.cpu(), g.cpu(), q_lens=ql, kv_lens=kl)
    for nm, a, b in zip("qkv", got, want):
        assert (a.cpu().double() - b).abs().max() < 1e-4, f"d{nm}"


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_varlen_more_queries_than_keys(backend, device):
    """The issue's packed repro: cu_seqlens_q [0, 200, 260], cu_seqlens_k [0, 50, 110], causal."""
    torch.manual_seed(0)
    q = torch.randn(2, 260, 64, device=device)
    k, v = torch.randn(2, 110, 64, device=device), torch.randn(2, 110, 64, device=device)
    cq, ck = [0, 200, 260], [0, 50, 110]
    out = sa.attention_varlen(q, k, v, cq, ck, causal=True, backend=backend).cpu()
    for b in range(2):
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        L = cq[b + 1] - cq[b]
        r, _ = _oracle_padded(q[None, :, qs].cpu(), k[None, :, ks].cpu(), v[None, :, ks].cpu(), [L], [ck[b + 1] - ck[b]])
        assert (out[:, qs].double() - r[0]).abs().max() < 1e-4, f"sequence {b}"


def _empty_cases(device):
    """(name, callable(backend) -> (out, lse), expected (out, lse)) for inputs whose whole chunks of
    query rows have no key."""
    g = torch.Generator().manual_seed(3)
    rn = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    cases = []
    q, k0 = rn(1, 2, 40, 32), rn(1, 2, 0, 32)
    exp = (torch.zeros(1, 2, 40, 32, dtype=torch.float64), torch.full((1, 2, 40), INF, dtype=torch.float64))
    cases.append(("Tk=0", lambda be: sa.attention(q, k0, k0, return_lse=True, backend=be), exp))
    cases.append(("Tk=0 causal", lambda be: sa.attention(q, k0, k0, causal=True, return_lse=True, backend=be), exp))
    q2, k2, v2 = rn(2, 2, 40, 32), rn(2, 2, 40, 32), rn(2, 2, 40, 32)
    kl = torch.tensor([40, 0], device=device)
    cases.append(("kv_lens with 0", lambda be: sa.attention(q2, k2, v2, kv_lens=kl, return_lse=True, backend=be),
                  _oracle_padded(q2.cpu(), k2.cpu(), v2.cpu(), [40, 40], [40, 0], causal=False)))
    q3, k3, v3 = rn(1, 2, 300, 32), rn(1, 2, 20, 32), rn(1, 2, 20, 32)
    cases.append(("causal Tq-Tk=280", lambda be: sa.attention(q3, k3, v3, causal=True, return_lse=True, backend=be),
                  _oracle_padded(q3.cpu(), k3.cpu(), v3.cpu(), [300], [20])))
    m = torch.zeros(1, 1, 10, 10, dtype=torch.bool, device=device)
    m[0, 0, 8:, :3] = True  # rows 0..255 (the reference's first chunk) select nothing
    p = P.from_block_mask(m, block_size=32, q_len=300)
    q4, k4, v4 = rn(1, 2, 300, 32), rn(1, 2, 300, 32), rn(1, 2, 300, 32)
    o4 = torch.zeros(1, 2, 300, 32, dtype=torch.float64)
    l4 = torch.full((1, 2, 300), INF, dtype=torch.float64)
    o4[:, :, 256:], l4[:, :, 256:] = _oracle_padded(q4[:, :, 256:].cpu(), k4[:, :, :96].cpu(), v4[:, :, :96].cpu(),
                                                    [44], [96], causal=False)
    cases.append(("pattern whose first rows select nothing",
                  lambda be: sa.attention(q4, k4, v4, p, return_lse=True, backend=be), (o4, l4)))
    qv, kv, vv = rn(2, 300, 32), rn(2, 30, 32), rn(2, 30, 32)
    ov, lv = _oracle_padded(qv[None].cpu(), kv[None].cpu(), vv[None].cpu(), [300], [30])
    cases.append(("varlen Tq > Tk", lambda be: sa.attention_varlen(qv, kv, vv, [0, 300], [0, 30], causal=True,
                                                                    return_lse=True, backend=be), (ov[0], lv[0])))
    return cases


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_rows_without_keys_are_zero_with_lse_minus_inf(backend, device):
    for name, fn, (eo, el) in _empty_cases(device):
        out, lse = fn(backend)
        out, lse = out.cpu().double(), lse.cpu().double()
        assert not torch.isnan(out).any() and not torch.isnan(lse).any(), name
        assert torch.equal(torch.isinf(lse), torch.isinf(el)), name
        assert (out - eo).abs().max() < 1e-4, name
        fin = torch.isfinite(el)
        if fin.any():
            assert (lse - el)[fin].abs().max() < 1e-4, name


def test_reference_grads_through_empty_chunks(device):
    """The reference stays differentiable when some chunks are empty (zeros carry no gradient)."""
    q = torch.randn(1, 2, 300, 32, device=device, requires_grad=True)
    k = torch.randn(1, 2, 20, 32, device=device, requires_grad=True)
    v = torch.randn(1, 2, 20, 32, device=device, requires_grad=True)
    out = sa.attention(q, k, v, causal=True, backend="reference")
    out.sum().backward()
    assert (q.grad[:, :, :280] == 0).all() and q.grad[:, :, 280:].abs().sum() > 0
    assert rel(out[:, :, :280], torch.zeros_like(out[:, :, :280])) == 0
