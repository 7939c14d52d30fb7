"""Strategies and builders of the property suite: random shapes, lengths and patterns, and the
element mask each case means, written here from the documented semantics (not from the library).

Semantics (``sparsattn.patterns`` module docstring): for sequence ``b`` with lengths ``Lq, Lk``,
query ``i`` may use key ``j`` iff ``i < Lq``, ``j < Lk``, ``causal -> j <= i + (Lk - Lq)``, and
``(i, j)`` is in the pattern's element set: ``j``'s block is listed for ``i``'s query block (a block
holding an element of the mask the pattern was built from; with ``causal`` that mask is cut at
the pattern's own diagonal ``j <= i + (Tk - Tq)``) and the block's tile (if it has one) holds
``(i, j)``, or ``j`` is a column of the head and its block is not listed. Block indices are
relative to each sequence's start (left padding, packed sequences).
"""
from dataclasses import replace

import torch
from hypothesis import strategies as st

from sparsattn import patterns as P

from ._settings import MAX_CACHE, MAX_T

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@st.composite
def pattern_params(draw):
    """Head layout, head_dim, blocks, dtype and the pattern's kind."""
    c = dict(
        Hkv=draw(st.sampled_from([1, 2])),
        G=draw(st.sampled_from([1, 2, 3, 4])),
        D=draw(st.sampled_from([8, 24, 64])),
        bq=draw(st.sampled_from([16, 32, 64])),
        bk=draw(st.sampled_from([16, 32, 64])),
        dtype=draw(st.sampled_from(sorted(DTYPES))),
        causal=draw(st.booleans()),
        kind=draw(st.sampled_from(["none", "blocks", "tiles"])),
        backend=draw(st.sampled_from(["triton", "reference"])),
        grads=draw(st.booleans()),
        scale=draw(st.sampled_from([None, 0.3, 1.0])),
        seed=draw(st.integers(0, 2 ** 16)),
    )
    if c["kind"] == "none":
        c.update(columns=False, pattern_batch="one", pattern_heads="1", density=1.0, holes=False, col_heads="1")
    else:
        c.update(columns=draw(st.booleans()), pattern_batch=draw(st.sampled_from(["one", "per"])),
                 pattern_heads=draw(st.sampled_from(["1", "kv", "q"])),
                 density=draw(st.sampled_from([0.0, 0.3, 0.7, 1.0])), holes=draw(st.booleans()),
                 col_heads=draw(st.sampled_from(["1", "pattern"])))
    return c


@st.composite
def attention_cases(draw):
    """A padded batch: ``attention(q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D], pattern, q_lens, kv_lens)``."""
    c = draw(pattern_params())
    B = draw(st.integers(1, 3))
    Tq = draw(st.integers(1, MAX_T))
    Tk = draw(st.integers(0, MAX_T))
    lens = draw(st.sampled_from(["none", "q", "kv", "both"]))
    c.update(B=B, Tq=Tq, Tk=Tk, padding=draw(st.sampled_from(["right", "left"])),
             layout=draw(st.sampled_from(["bhtd", "bthd"])),  # bthd: [B, T, H, D] storage seen transposed
             q_lens=[draw(st.integers(0, Tq)) for _ in range(B)] if lens in ("q", "both") else None,
             kv_lens=[draw(st.integers(0, Tk)) for _ in range(B)] if lens in ("kv", "both") else None)
    return c


@st.composite
def varlen_cases(draw):
    """Packed sequences: ``attention_varlen(q [Hq, sum Lq, D], k/v [Hkv, sum Lk, D], cu_seqlens...)``."""
    c = draw(pattern_params())
    N = draw(st.integers(1, 3))
    c.update(B=N, q_seq=[draw(st.integers(0, MAX_T)) for _ in range(N)],
             k_seq=[draw(st.integers(0, MAX_T)) for _ in range(N)])
    return c


def heads_of(c):
    Hkv = c["Hkv"]
    Hq = Hkv * c["G"]
    Hp = {"1": 1, "kv": Hkv, "q": Hq}[c["pattern_heads"]]
    return Hq, Hkv, Hp


def build_pattern(c, Tq, Tk, Bp, device):
    """(pattern or None, element set ``[Bp, Hq, Tq, Tk]`` of the pattern per query head (before
    sequence bounds and per-sequence causality))."""
    Hq, Hkv, Hp = heads_of(c)
    if c["kind"] == "none":
        return None, torch.ones(1, Hq, Tq, Tk, dtype=torch.bool)
    g = torch.Generator().manual_seed(c["seed"] + 1)
    bq, bk = c["bq"], c["bk"]
    nq, nk = -(-Tq // bq), -(-Tk // bk)
    sel = torch.rand(Bp, Hp, nq, nk, generator=g) < c["density"]
    if c["holes"] and nq and nk:  # an empty query-block row and an unused key-block column
        sel[:, :, int(torch.randint(nq, (1,), generator=g))] = False
        sel[:, :, :, int(torch.randint(nk, (1,), generator=g))] = False
    elem = sel.repeat_interleave(bq, 2).repeat_interleave(bk, 3)[:, :, :Tq, :Tk]
    if c["kind"] == "tiles":  # element tiles inside some blocks (the pattern's mask bank)
        tiled = (torch.rand(Bp, Hp, nq, nk, generator=g) < 0.5).repeat_interleave(bq, 2).repeat_interleave(bk, 3)
        noise = torch.rand(Bp, Hp, nq * bq, nk * bk, generator=g) < 0.5
        elem = elem & (~tiled | noise)[:, :, :Tq, :Tk]
        p = P.from_dense_mask(elem.to(device), block_size=(bq, bk), causal=c["causal"])
    else:
        p = P.from_block_mask(sel.to(device), block_size=(bq, bk), q_len=Tq, kv_len=Tk, causal=c["causal"])
    # the mask the pattern is built from, within the pattern's own shape: causal for (Tq, Tk)
    i = torch.arange(Tq)[:, None]
    j = torch.arange(Tk)[None, :]
    valid = (j <= i + (Tk - Tq)) if c["causal"] else torch.ones(Tq, Tk, dtype=torch.bool)
    built = elem & valid
    up = lambda t: t.repeat_interleave(bq, 2).repeat_interleave(bk, 3)[:, :, :Tq, :Tk]  # noqa: E731
    blocks = lambda t, red, fill=False: red(red(_pad(t, nq * bq, nk * bk, fill).view(*t.shape[:2], nq, bq, nk, bk), 5), 3)  # noqa: E731
    # listed blocks: those holding an element of the built mask. Inside a listed block the element
    # set is the block's tile; a block whose mask adds nothing to the causal + bounds region has no
    # tile ("only causal and bounds apply"): every element, then the sequence's own causality.
    listed = blocks(built, lambda t, d: t.any(d))
    if c["kind"] == "tiles":
        plain = blocks(built | ~valid, lambda t, d: t.all(d), True)  # out of bounds counts as covered
        elem = up(listed) & (up(plain) | built)
    else:
        elem = up(listed)
    if c["columns"]:
        Hc = 1 if c["col_heads"] == "1" else Hp
        cols = torch.rand(Bp, Hc, Tk, generator=g) < 0.15
        p = replace(p, columns=P.TokenPattern.from_mask(cols.to(device), kv_len=Tk))
        cols_h = cols.repeat_interleave(Hp // Hc, 1)  # column rows per pattern head
        elem = elem | (cols_h[:, :, None, :] & ~up(listed))
    return p, elem.repeat_interleave(Hq // Hp, 1)


def _pad(t, R, C, fill=False):
    out = torch.full((*t.shape[:2], R, C), fill, dtype=t.dtype)
    out[:, :, :t.shape[2], :t.shape[3]] = t
    return out


def allowed_for(elem_b, Lq, Lk, causal):
    """``[Hq, Lq, Lk]`` allowed pairs of one sequence from the pattern's element set ``[Hq, Tq, Tk]``."""
    a = elem_b[:, :Lq, :Lk]
    if causal:
        a = a & (torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None] + (Lk - Lq))
    return a


# ---------------------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------------------


@st.composite
def decode_cases(draw):
    """``sparse_decode_attention(q [B, Hq, D], cache, TokenPattern, kv_lens, log_weight, block_table)``."""
    B = draw(st.integers(1, 3))
    Hkv = draw(st.sampled_from([1, 2]))
    G = draw(st.sampled_from([1, 2, 3, 4]))
    paged = draw(st.sampled_from([0, 8, 32]))  # 0: contiguous cache; else tokens per cache page
    T = draw(st.integers(1, MAX_CACHE))
    if paged:  # a paged cache holds whole pages
        T = -(-T // paged) * paged
    per_head = draw(st.booleans())
    c = dict(B=B, Hkv=Hkv, G=G, T=T, D=draw(st.sampled_from([8, 24, 64])),
             dtype=draw(st.sampled_from(sorted(DTYPES))), backend=draw(st.sampled_from(["triton", "reference"])),
             page=draw(st.sampled_from([1, 4, 16])),
             pattern=draw(st.sampled_from(["none", "1", "kv", "q"])),
             per_head_lens=per_head,
             lens=[[draw(st.integers(0, T)) for _ in range(Hkv if per_head else 1)] for _ in range(B)],
             budget=draw(st.sampled_from([0.0, 0.2, 0.6, 1.0])),
             log_weight=draw(st.booleans()), paged=paged,
             num_splits=draw(st.sampled_from([None, 1, 3])), scale=draw(st.sampled_from([None, 0.5])),
             pattern_batch=draw(st.sampled_from(["one", "per"])),
             seed=draw(st.integers(0, 2 ** 16)))
    return c
