"""Property-based tests: ``sparsattn.attention`` and ``sparsattn.attention_varlen`` (Triton, in the
interpreter on the CPU, and the reference backend) against the float64 dense masked formula of
``_oracle.py``, on random batches, GQA layouts, lengths (``q_len > kv_len`` per sequence too),
padding sides, block sizes, patterns with empty rows / columns, bank tiles and key columns,
dtypes, and gradients.

Checked per example: no NaN; rows without a key (and padding rows) are exactly 0 with
``lse = -inf``; out / lse / dq / dk / dv within ``K x`` the error of the same computation done in
the inputs' dtype by plain torch (floored per dtype).
"""
import torch
import torch.nn.functional as F
from hypothesis import example, given

import sparsattn as sa

from . import _oracle as O
from ._cases import DTYPES, allowed_for, attention_cases, build_pattern, heads_of, varlen_cases
from ._settings import budgeted, examples

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _tensors(c, shapes):
    g = torch.Generator().manual_seed(c["seed"])
    dt = DTYPES[c["dtype"]]
    return [torch.randn(*s, generator=g).to(dt) for s in shapes], g


def _check(c, out, lse, grads, ref, base, empty, dt):
    """Compare the kernel's (out, lse, grads) with the float64 oracle and the low-precision baseline."""
    (r_out, r_lse, r_grads), (b_out, b_lse, b_grads) = ref, base
    out, lse = out.detach().cpu(), lse.detach().cpu()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "NaN in out/lse"
    assert torch.equal(torch.isneginf(lse), empty), "lse must be -inf exactly on rows without keys"
    if empty.any():
        assert out[empty].abs().max() == 0, "rows without keys must be exactly 0"
    e, tol = O.max_err(out, r_out), O.tolerance(O.max_err(b_out, r_out), dt)
    assert e <= tol, f"out: max|diff| {e:.3g} > {tol:.3g}"
    fin = ~empty
    if fin.any():
        e, tol = O.max_err(lse, r_lse, fin), O.tolerance(O.max_err(b_lse, r_lse, fin), torch.float32)
        assert e <= tol + 1e-5 * float(r_lse[fin].abs().max()), f"lse: max|diff| {e:.3g} > {tol:.3g}"
    for name, a, r, b in zip(("dq", "dk", "dv"), grads or (), r_grads or (), b_grads or ()):
        assert not torch.isnan(a).any(), f"NaN in {name}"
        e, tol = O.max_err(a, r), O.tolerance(O.max_err(b, r), dt, grad=True)
        assert e <= tol, f"{name}: max|diff| {e:.3g} > {tol:.3g}"


def _grads(fn, inputs, g):
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    out, lse = fn(*xs)
    gx = torch.autograd.grad((out.float() * g.to(out.device).float()).sum(), xs, allow_unused=True)
    return out, lse, [torch.zeros_like(x) if d is None else d for x, d in zip(xs, gx)]


# --------------------------------------------------------------------------------------------
# padded batches
# --------------------------------------------------------------------------------------------


def _padded_oracle(c, elem, q, k, v, lowp):
    """out ``[B, Hq, Tq, D]`` and lse ``[B, Hq, Tq]`` of every sequence, written from the semantics."""
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    G = Hq // k.shape[1]
    scale = O.default_scale(D) if c["scale"] is None else c["scale"]
    outs, lses = [], []
    for b in range(B):
        Lq = Tq if c["q_lens"] is None else c["q_lens"][b]
        Lk = Tk if c["kv_lens"] is None else c["kv_lens"][b]
        qo, ko = (0, 0) if c["padding"] == "right" else (Tq - Lq, Tk - Lk)
        allowed = allowed_for(elem[b if elem.shape[0] > 1 else 0], Lq, Lk, c["causal"])
        kk = k[b, :, ko:ko + Lk].repeat_interleave(G, 0)
        vv = v[b, :, ko:ko + Lk].repeat_interleave(G, 0)
        o, l_ = O.masked_attention(q[b, :, qo:qo + Lq], kk, vv, allowed, scale, lowp=lowp)
        pad = (qo, Tq - Lq - qo)
        outs.append(F.pad(o, (0, 0) + pad))
        lses.append(F.pad(l_, pad, value=O.INF))
    return torch.stack(outs), torch.stack(lses)


# issue 10 §1.1 in small: causal, full 16x16 blocks, the second sequence has 10 keys for 40 queries
REPRO_11 = dict(Hkv=1, G=2, D=24, bq=16, bk=16, dtype="fp32", causal=True, kind="blocks", backend="triton",
                grads=True, scale=None, seed=0, columns=False, pattern_batch="one", pattern_heads="1", density=1.0,
                holes=False, col_heads="1", B=2, Tq=40, Tk=40, padding="right", q_lens=None, kv_lens=[40, 10])
# pattern=None picks 64-token blocks for head_dim 160: sequence 1 (q_len 30 < kv_len 80) needs blocks
# beyond the padded shape's diagonal
DEFAULT_LISTS = dict(REPRO_11, D=160, kind="none", grads=False, Tq=80, Tk=80, q_lens=[30, 80], kv_lens=[80, 80])


@examples("attention")
@given(c=attention_cases())
@example(c=REPRO_11)  # full blocks crossed a sequence's own causal diagonal (Triton fwd + dQ)
@example(c=dict(REPRO_11, padding="left"))
@example(c=DEFAULT_LISTS)
@example(c=dict(DEFAULT_LISTS, backend="reference"))
@example(c=dict(REPRO_11, backend="reference", grads=True, kind="none", Tk=20, Tq=300, kv_lens=None))  # IndexError
@example(c=dict(REPRO_11, backend="reference", kind="none", Tq=5, Tk=0, kv_lens=None))  # output had no grad_fn
@budgeted("attention")
def test_attention_matches_dense_formula(c):
    Hq, Hkv, _ = heads_of(c)
    B, Tq, Tk, D = c["B"], c["Tq"], c["Tk"], c["D"]
    dt = DTYPES[c["dtype"]]
    (q, k, v, g), _ = _tensors(c, [(B, Hq, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D), (B, Hq, Tq, D)])
    Bp = B if c["pattern_batch"] == "per" else 1
    pattern, elem = build_pattern(c, Tq, Tk, Bp, DEVICE)
    lens = {n: (None if c[n] is None else torch.tensor(c[n], device=DEVICE)) for n in ("q_lens", "kv_lens")}

    def run(q_, k_, v_):
        return sa.attention(q_, k_, v_, pattern, causal=c["causal"], scale=c["scale"], return_lse=True,
                            backend=c["backend"], padding_side=c["padding"], **lens)

    dev = [x.to(DEVICE) for x in (q, k, v)]
    if c.get("layout") == "bthd":  # strided inputs, as transformers passes them
        dev = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in dev]
    if c["grads"]:
        out, lse, grads = _grads(run, dev, g)
        _, _, r_grads = _grads(lambda *x: _padded_oracle(c, elem, *x, lowp=False), [q, k, v], g)
        _, _, b_grads = _grads(lambda *x: _padded_oracle(c, elem, *x, lowp=True), [q, k, v], g)
    else:
        out, lse = run(*dev)
        grads = r_grads = b_grads = None
    r_out, r_lse = _padded_oracle(c, elem, q, k, v, lowp=False)
    b_out, b_lse = _padded_oracle(c, elem, q, k, v, lowp=True)
    _check(c, out, lse, grads, (r_out, r_lse, r_grads), (b_out, b_lse, b_grads), torch.isneginf(r_lse), dt)


# --------------------------------------------------------------------------------------------
# packed sequences
# --------------------------------------------------------------------------------------------


def _varlen_oracle(c, elem, q, k, v, lowp):
    Hq, _, D = q.shape
    G = Hq // k.shape[0]
    scale = O.default_scale(D) if c["scale"] is None else c["scale"]
    outs, lses = [], []
    qa = ka = 0
    for b, (Lq, Lk) in enumerate(zip(c["q_seq"], c["k_seq"])):
        allowed = allowed_for(elem[b if elem.shape[0] > 1 else 0], Lq, Lk, c["causal"])
        kk = k[:, ka:ka + Lk].repeat_interleave(G, 0)
        vv = v[:, ka:ka + Lk].repeat_interleave(G, 0)
        o, l_ = O.masked_attention(q[:, qa:qa + Lq], kk, vv, allowed, scale, lowp=lowp)
        outs.append(o)
        lses.append(l_)
        qa, ka = qa + Lq, ka + Lk
    return torch.cat(outs, 1), torch.cat(lses, 1)


VARLEN_REPRO = dict(DEFAULT_LISTS, B=2, q_seq=[80, 12], k_seq=[10, 12])


@examples("varlen")
@given(c=varlen_cases())
@example(c=VARLEN_REPRO)  # issue 10 §1.1 (packed): sequence 2 lost its keys (pattern=None)
@example(c=dict(REPRO_11, B=2, q_seq=[40, 12], k_seq=[30, 40]))  # full blocks across sequence 1's diagonal
@example(c=dict(VARLEN_REPRO, backend="reference", q_seq=[300], k_seq=[30], B=1))  # empty chunks
@budgeted("varlen")
def test_attention_varlen_matches_dense_formula(c):
    Hq, Hkv, _ = heads_of(c)
    D = c["D"]
    dt = DTYPES[c["dtype"]]
    tq, tk = sum(c["q_seq"]), sum(c["k_seq"])
    Tq, Tk = max(c["q_seq"]), max(c["k_seq"])
    (q, k, v, g), _ = _tensors(c, [(Hq, tq, D), (Hkv, tk, D), (Hkv, tk, D), (Hq, tq, D)])
    Bp = c["B"] if c["pattern_batch"] == "per" else 1
    pattern, elem = build_pattern(c, Tq, Tk, Bp, DEVICE)
    cu_q = torch.tensor([0] + c["q_seq"], device=DEVICE).cumsum(0)
    cu_k = torch.tensor([0] + c["k_seq"], device=DEVICE).cumsum(0)

    def run(q_, k_, v_):
        return sa.attention_varlen(q_, k_, v_, cu_q, cu_k, pattern, causal=c["causal"], scale=c["scale"],
                                   return_lse=True, backend=c["backend"])

    dev = [x.to(DEVICE) for x in (q, k, v)]
    if c["grads"]:
        out, lse, grads = _grads(run, dev, g)
        _, _, r_grads = _grads(lambda *x: _varlen_oracle(c, elem, *x, lowp=False), [q, k, v], g)
        _, _, b_grads = _grads(lambda *x: _varlen_oracle(c, elem, *x, lowp=True), [q, k, v], g)
    else:
        out, lse = run(*dev)
        grads = r_grads = b_grads = None
    r_out, r_lse = _varlen_oracle(c, elem, q, k, v, lowp=False)
    b_out, b_lse = _varlen_oracle(c, elem, q, k, v, lowp=True)
    _check(c, out, lse, grads, (r_out, r_lse, r_grads), (b_out, b_lse, b_grads), torch.isneginf(r_lse), dt)
