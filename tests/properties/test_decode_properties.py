"""Property-based tests: ``sparse_decode_attention`` (Triton, in the interpreter on the CPU, and the
reference) against the float64 dense masked formula of ``_oracle.py``: random batch, GQA layout,
cache length, per-sequence or per-KV-head lengths, token or page selections (heads 1 / KV heads
/ query heads, empty rows included), log-weights, paged caches, split-K, dtypes.

The selected token set is written here from the documented semantics: entry ``e < counts[b, r]``
of row ``r`` selects tokens ``[indices[b, r, e] * P, (indices + 1) * P)`` below the row's length.
"""
import torch
from hypothesis import example, given

from sparsattn.kernels.sparse_decode import sparse_decode_attention
from sparsattn.patterns import TokenPattern

from . import _oracle as O
from ._cases import DTYPES, decode_cases
from ._settings import budgeted, examples

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _build(c):
    g = torch.Generator().manual_seed(c["seed"])
    dt = DTYPES[c["dtype"]]
    B, Hkv, G, T, D, Pg = c["B"], c["Hkv"], c["G"], c["T"], c["D"], c["page"]
    Hq = Hkv * G
    q = torch.randn(B, Hq, D, generator=g).to(dt)
    k = torch.randn(B, Hkv, T, D, generator=g).to(dt)
    v = torch.randn(B, Hkv, T, D, generator=g).to(dt)
    lens = torch.tensor(c["lens"])  # [B, Hkv] or [B, 1]
    kv_lens = lens if c["per_head_lens"] else lens[:, 0]
    row_len = lens.expand(B, Hkv)  # length seen by each KV head
    pattern = lw = None
    sel = torch.zeros(B, Hq, T, dtype=torch.bool)  # selected tokens per query head
    wt = torch.zeros(B, Hq, T)
    if c["pattern"] == "none":
        sel = torch.arange(T)[None, None, :] < row_len.repeat_interleave(G, 1)[..., None]
    else:
        R = {"1": 1, "kv": Hkv, "q": Hq}[c["pattern"]]
        Bp = B if c["pattern_batch"] == "per" else 1
        # a row's length: the shortest of the KV heads (and, for a shared pattern, sequences) it serves
        rl = row_len.min(0, keepdim=True).values if Bp == 1 else row_len
        rl = rl.min(1, keepdim=True).values.expand(Bp, R) if R == 1 else rl.repeat_interleave(R // Hkv, 1)
        units = (rl + Pg - 1) // Pg
        n_max = max(1, int(units.max()))
        idx = torch.zeros(Bp, R, n_max, dtype=torch.int32)
        cnt = torch.zeros(Bp, R, dtype=torch.int32)
        for b in range(Bp):
            for r in range(R):
                u = int(units[b, r])
                pick = torch.randperm(u, generator=g)[:round(u * c["budget"])].sort().values
                idx[b, r, :pick.numel()] = pick.int()
                cnt[b, r] = pick.numel()
        pattern = TokenPattern(idx.to(DEVICE), cnt.to(DEVICE), kv_len=T, page_size=Pg)
        if c["log_weight"]:
            lw = torch.randn(Bp, R, n_max, generator=g) * 2
            lw[torch.rand(Bp, R, n_max, generator=g) < 0.1] = float("-inf")
        for b in range(B):
            pb = b if Bp > 1 else 0
            for h in range(Hq):
                r = h // (Hq // R)
                L = int(row_len[b, h // G])
                for e in range(int(cnt[pb, r])):
                    t0 = int(idx[pb, r, e]) * Pg
                    toks = torch.arange(t0, min(t0 + Pg, L))
                    sel[b, h, toks] = True
                    if lw is not None:
                        wt[b, h, toks] = lw[pb, r, e]
    return q, k, v, kv_lens, pattern, lw, sel, wt


def _paged(c, k, v, g):
    """The cache as pages of ``c['paged']`` tokens in a random order + a block table."""
    B, Hkv, T, D = k.shape
    Pc = c["paged"]
    n = -(-T // Pc)
    perm = torch.randperm(B * n, generator=g)
    kp = torch.zeros(B * n, Hkv, Pc, D, dtype=k.dtype)
    vp = torch.zeros_like(kp)
    kpad = torch.nn.functional.pad(k, (0, 0, 0, n * Pc - T)).view(B, Hkv, n, Pc, D).permute(0, 2, 1, 3, 4)
    vpad = torch.nn.functional.pad(v, (0, 0, 0, n * Pc - T)).view(B, Hkv, n, Pc, D).permute(0, 2, 1, 3, 4)
    kp[perm] = kpad.reshape(B * n, Hkv, Pc, D)
    vp[perm] = vpad.reshape(B * n, Hkv, Pc, D)
    return kp, vp, perm.view(B, n).int()


REPRO = dict(B=2, Hkv=2, G=2, T=70, D=24, dtype="fp32", backend="reference", page=4, pattern="1", per_head_lens=True,
             lens=[[70, 33], [5, 70]], budget=0.6, log_weight=False, paged=0, num_splits=None, scale=None,
             pattern_batch="per", seed=1)


@examples("decode")
@given(c=decode_cases())
@example(c=REPRO)  # one shared row with per-KV-head lengths
@budgeted("decode")
def test_sparse_decode_matches_dense_formula(c):
    dt = DTYPES[c["dtype"]]
    q, k, v, kv_lens, pattern, lw, sel, wt = _build(c)
    if c["paged"]:
        kk, vv, bt = _paged(c, k, v, torch.Generator().manual_seed(c["seed"] + 7))
        extra = dict(block_table=bt.to(DEVICE))
    else:
        kk, vv, extra = k, v, {}
    out, lse = sparse_decode_attention(q.to(DEVICE), kk.to(DEVICE), vv.to(DEVICE), pattern, scale=c["scale"],
                                       kv_lens=kv_lens.to(DEVICE), return_lse=True, backend=c["backend"],
                                       log_weight=None if lw is None else lw.to(DEVICE),
                                       num_splits=c["num_splits"], **extra)
    G = c["G"]
    scale = O.default_scale(c["D"]) if c["scale"] is None else c["scale"]
    kr, vr = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    res = []
    for lowp in (False, True):
        o, l_ = O.masked_attention(q[:, :, None], kr, vr, sel[:, :, None], scale, lowp=lowp,
                                   log_weight=wt[:, :, None] if lw is not None else None)
        res.append((o[:, :, 0], l_[:, :, 0]))
    (r_out, r_lse), (b_out, b_lse) = res
    out, lse = out.cpu(), lse.cpu()
    empty = torch.isneginf(r_lse)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "NaN in out/lse"
    assert torch.equal(torch.isneginf(lse), empty), "lse must be -inf exactly on rows without a token"
    if empty.any():
        assert out[empty].abs().max() == 0
    e, tol = O.max_err(out, r_out), O.tolerance(O.max_err(b_out, r_out), dt)
    assert e <= tol, f"out: max|diff| {e:.3g} > {tol:.3g}"
    fin = ~empty
    if fin.any():
        e, tol = O.max_err(lse, r_lse, fin), O.tolerance(O.max_err(b_lse, r_lse, fin), torch.float32)
        assert e <= tol + 1e-5 * float(r_lse[fin].abs().max()), f"lse: max|diff| {e:.3g} > {tol:.3g}"
