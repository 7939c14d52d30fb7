"""Vertical-slash coverage: MInference's PIT windows (one unaligned window of ``bs`` keys per slash
and query block) and the forced sinks / local band (issue 10, §3.6)."""
import warnings

import pytest
import torch

from sparsattn import patterns
from sparsattn.methods import get_method
from sparsattn.methods._vs_cover import vertical_slash_cover
from sparsattn.methods.base import SelectContext


def _window_reference(Tq, Tk, vert, slash, bs):
    """Plain loops: query block rows [a0, a0 + bs) (key positions) read, per slash d < a0 + bs, the keys
    [a0 - d, a0 - d + bs), or [0, bs) where a0 - d < 0; plus the verticals, a key block that the windows
    cover in part being read whole when it holds a vertical outside them; causal and bounds."""
    B, H = vert.shape[:2]
    off = Tk - Tq
    nk = -(-Tk // bs)
    out = torch.zeros(B, H, Tq, Tk, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for qb in range(-(-Tq // bs)):
                a0 = off + qb * bs
                keys = torch.zeros(nk * bs, dtype=torch.bool)
                for d in slash[b, h].tolist():
                    if d >= a0 + bs:
                        continue
                    lo = max(a0 - d, 0)
                    keys[lo:lo + bs] = True
                vk = torch.zeros(nk * bs, dtype=torch.bool)
                vk[vert[b, h].long()] = True
                for kb in range(nk):
                    blk = keys[kb * bs:(kb + 1) * bs]
                    if blk.any() and not blk.all() and (vk[kb * bs:(kb + 1) * bs] & ~blk).any():
                        keys[kb * bs:(kb + 1) * bs] = True
                keys = (keys | vk)[:Tk]
                rows = range(qb * bs, min(qb * bs + bs, Tq))
                for i in rows:
                    out[b, h, i] = keys & (torch.arange(Tk) <= i + off)
    return out


def _pit_reference(T, vert, slash, bs):
    """The authors' index conversion (``convert_vertical_slash_indexes``: merged ranges grow by whole
    windows), re-derived as plain loops for Tq == Tk; returns the element mask it computes."""
    B, H = vert.shape[:2]
    out = torch.zeros(B, H, T, T, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            vs = sorted(set(vert[b, h].tolist()))
            ds = sorted(set(slash[b, h].tolist()), reverse=True)
            for qb in range(-(-T // bs)):
                end_m = qb * bs + bs
                ends = [max(end_m - d, bs) for d in ds if d < end_m]  # ascending
                ranges = []
                for e in ends:
                    if ranges and e <= ranges[-1][1]:
                        continue
                    if ranges and e <= ranges[-1][1] + bs:
                        ranges[-1][1] += bs
                    else:
                        ranges.append([e - bs, e])
                keys = torch.zeros(T + 2 * bs, dtype=torch.bool)
                for a, z in ranges:
                    keys[a:z] = True
                keys[vs] = True
                for i in range(qb * bs, min(end_m, T)):
                    out[b, h, i] = keys[:T] & (torch.arange(T) <= i)
    return out


def _lines(B, H, Tk, nv, ns, seed):
    g = torch.Generator().manual_seed(seed)
    vert = torch.stack([torch.randperm(Tk, generator=g)[:nv] for _ in range(B * H)]).view(B, H, nv)
    # slashes: the band 0..3 plus random far ones (some closer than a window apart)
    far = torch.stack([torch.randperm(Tk - 4, generator=g)[:ns] + 4 for _ in range(B * H)]).view(B, H, ns)
    band = torch.arange(4).expand(B, H, 4)
    return vert, torch.cat([band, far], -1)


@pytest.mark.parametrize("Tq,Tk,bs", [(300, 300, 32), (77, 300, 16), (129, 250, 64), (5, 70, 16)])
def test_cover_equals_window_reference(Tq, Tk, bs):
    vert, slash = _lines(2, 3, Tk, 5, 7, seed=Tq)
    p = vertical_slash_cover(Tq, Tk, vert, slash, block_size=bs)
    p.validate()
    assert torch.equal(p.to_dense_mask(), _window_reference(Tq, Tk, vert, slash, bs))


def test_cover_against_authors_ranges_and_aligned_blocks():
    # the PIT windows are inside the authors' merged ranges (which may add up to bs - 1 keys per merge)
    # and inside the old key-block-aligned cover (which costs up to twice the keys per slash)
    T, bs = 320, 32
    vert, slash = _lines(1, 4, T, 6, 12, seed=1)
    vert = torch.zeros(1, 4, 0, dtype=torch.long)  # slashes only (verticals: the whole-block rule)
    new = vertical_slash_cover(T, T, vert, slash, block_size=bs).to_dense_mask()
    pit = _pit_reference(T, vert, slash, bs)
    aligned = patterns.vertical_slash(T, vert, slash, block_size=bs).to_dense_mask()
    assert not (new & ~pit).any() and not (new & ~aligned).any()
    assert int(new.sum()) < int(aligned.sum())
    # windows at least bs apart never merge: then the cover is exactly the authors'
    far = torch.tensor([[[0, 40, 100, 170, 250]]])
    v1 = torch.zeros(1, 1, 0, dtype=torch.long)
    assert torch.equal(vertical_slash_cover(T, T, v1, far, block_size=bs).to_dense_mask(), _pit_reference(T, v1, far, bs))


def test_vertical_lines_inside_partial_blocks_are_kept():
    # a vertical line in a key block that a slash window covers only partly must stay (the column
    # path skips listed blocks, so the tile has to hold it)
    T, bs = 256, 32
    slash = torch.tensor([[[0, 45]]])  # window of d=45 covers parts of two key blocks per query block
    vert = torch.tensor([[[100]]])
    m = vertical_slash_cover(T, T, vert, slash, block_size=bs).to_dense_mask()[0, 0]
    assert m[101:, 100].all()


def test_forced_band_and_sinks_are_contiguous_under_small_budgets():
    # issue 10: s_size < n_local / v_size < n_sink cut the forced entries in top-k tie order
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 900, 16, generator=g), torch.randn(1, 1, 900, 16, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = get_method("vertical_slash", v_size=20, s_size=64, n_sink=30, n_local=100, last_q=64, block_size=64)
        p = m.select(q, k, SelectContext())
    mask = p.to_dense_mask()[0]  # [H, T, T]
    i = torch.arange(900)
    for h in range(2):
        for dd in range(64):  # the 64 nearest diagonals: every row keeps them
            r = i[dd:]
            assert mask[h, r, r - dd].all(), (h, dd)
        assert mask[h, 899, :20].all()  # columns 0..19, the first 20 of the 30 sinks
    # and nothing but the band and the 20 sink columns (s_size = 64 < n_local, v_size = 20 < n_sink)
    band = (i[:, None] - i[None, :] >= 0) & (i[:, None] - i[None, :] < 64)
    sinks = (i[None, :] < 20) & (i[None, :] <= i[:, None])
    exact = _window_reference(900, 900, torch.arange(20).view(1, 1, 20), torch.arange(64).view(1, 1, 64), 64)[0, 0]
    assert torch.equal(mask[0], exact) and (mask[0] & ~(band | sinks)).sum() > 0  # windows of the band, blockwise


def test_vertical_slash_chunked_prefill_matches_window_reference():
    g = torch.Generator().manual_seed(5)
    Tq, Tk = 70, 333
    q, k = torch.randn(1, 2, Tq, 16, generator=g), torch.randn(1, 2, Tk, 16, generator=g)
    m = get_method("vertical_slash", v_size=12, s_size=9, n_sink=4, n_local=3, last_q=16, block_size=16)
    p = m.select(q, k, SelectContext())
    assert p.columns is not None and p.mask_bank is not None
    rows = torch.arange(Tq)
    assert p.to_dense_mask()[:, :, rows, rows + Tk - Tq].all()


def test_forced_entries_nearest_first():
    # MInference's inf-then-top-k keeps an arbitrary subset of the forced entries when the budget is
    # smaller (here: 64 of the 100 local diagonals, up to offset 99); the nearest are kept instead
    from sparsattn.methods.minference import _forced_then_topk

    g = torch.Generator().manual_seed(0)
    score = torch.rand(1, 2, 900, generator=g)
    assert sorted(_forced_then_topk(score, 100, 64)[0, 1].tolist()) == list(range(64))
    got = _forced_then_topk(score, 30, 40)[0, 0].tolist()
    rest = score[0, 0, 30:].topk(10).indices + 30
    assert got[:30] == list(range(30)) and sorted(got[30:]) == sorted(rest.tolist())
