"""BlockPattern: per (batch, head, query block) the key blocks to compute (see the package docstring)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch

from ._util import Tensor, _cdiv, _err, list_width
from .token import TokenPattern


def _lists_from_sel(sel: Tensor) -> tuple[Tensor, Tensor]:
    """bool [..., n] -> (counts int32 [...], sorted indices int32 [..., max(count, 1)]).

    Linear time: each selected entry goes to slot ``cumsum - 1`` of its row (no sort)."""
    n = sel.shape[-1]
    counts = sel.sum(-1, dtype=torch.int32)
    max_n = list_width(counts, n)
    out = torch.zeros(*sel.shape[:-1], max_n + 1, dtype=torch.int32, device=sel.device)
    if n:
        slot = torch.where(sel, sel.cumsum(-1, dtype=torch.int32) - 1, max_n).long()
        ar = torch.arange(n, device=sel.device, dtype=torch.int32).expand_as(slot)
        out.scatter_(-1, slot, ar)
    return counts.contiguous(), out[..., :max_n].contiguous()


def _sel_from_lists(counts: Tensor, indices: Tensor, n: int) -> Tensor:
    """(counts [...], indices [..., m]) -> bool [..., n]."""
    m = indices.shape[-1]
    valid = torch.arange(m, device=indices.device) < counts[..., None]
    out = torch.zeros(*indices.shape[:-1], n + 1, dtype=torch.bool, device=indices.device)
    idx = torch.where(valid, indices.long(), torch.full_like(indices, n, dtype=torch.long))
    out.scatter_(-1, idx, True)
    return out[..., :n]


@dataclass
class BlockPattern:
    """BlockPattern: per (batch, head, query block) the key blocks to compute.

    Attributes (FlexAttention ``BlockMask`` naming):
        kv_num_blocks: int32 ``[B, H, n_q_blocks]``: number of partial (element-masked) blocks.
        kv_indices: int32 ``[B, H, n_q_blocks, max_partial]``: their key-block indices, sorted.
        full_kv_num_blocks: int32 ``[B, H, n_q_blocks]``: number of full blocks.
        full_kv_indices: int32 ``[B, H, n_q_blocks, max_full]``: their key-block indices, sorted.
        block_q, block_k: block sizes in tokens (powers of two, >= 16).
        q_len, kv_len: the (maximum) query and key lengths.
        causal: the causal (bottom-right aligned) element mask applies to every block.
        mask_ids: optional int32 ``[B, H, n_q_blocks, max_partial]``: for each partial block, a
            row of ``mask_bank`` (``-1`` = no tile, only causal and bounds).
        mask_bank: optional bool ``[n_tiles, block_q, block_k]``.
        columns: optional ``TokenPattern`` of key columns (page_size 1) computed for every query
            row of the head in addition to the blocks (only where their block is not listed).

    ``B`` may be 1 (shared by the batch); ``H`` may be 1, the number of KV heads (shared by a
    GQA group) or the number of query heads.
    """

    kv_num_blocks: Tensor
    kv_indices: Tensor
    full_kv_num_blocks: Tensor
    full_kv_indices: Tensor
    block_q: int
    block_k: int
    q_len: int
    kv_len: int
    causal: bool = False
    mask_ids: Optional[Tensor] = None
    mask_bank: Optional[Tensor] = None
    columns: Optional[TokenPattern] = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        self.validate(deep=False)

    # -- basic properties ----------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self.kv_num_blocks.shape[0]

    @property
    def heads(self) -> int:
        return self.kv_num_blocks.shape[1]

    @property
    def n_q_blocks(self) -> int:
        return _cdiv(self.q_len, self.block_q)

    @property
    def n_kv_blocks(self) -> int:
        return _cdiv(self.kv_len, self.block_k)

    @property
    def device(self) -> torch.device:
        return self.kv_num_blocks.device

    def to(self, device) -> "BlockPattern":
        """Copy of the pattern on ``device``."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, kv_num_blocks=mv(self.kv_num_blocks), kv_indices=mv(self.kv_indices),
                       full_kv_num_blocks=mv(self.full_kv_num_blocks), full_kv_indices=mv(self.full_kv_indices),
                       mask_ids=mv(self.mask_ids), mask_bank=mv(self.mask_bank),
                       columns=None if self.columns is None else self.columns.to(device), _cache={})

    # -- validation -----------------------------------------------------------------------------
    def validate(self, deep: bool = True) -> "BlockPattern":
        """Check shapes, dtypes, ranges, ordering and causality; raise ValueError naming the field.

        ``deep=False`` checks only shapes and dtypes (no device synchronisation).
        """
        for name in ("block_q", "block_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 16 or v & (v - 1):
                raise _err(name, "a power of two >= 16", v)
        for name in ("q_len", "kv_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise _err(name, "an int >= 0", v)
        nq = self.n_q_blocks
        for name in ("kv_num_blocks", "full_kv_num_blocks"):
            t = getattr(self, name)
            if not isinstance(t, Tensor) or t.dim() != 3:
                raise _err(name, "an int32 tensor [B, H, n_q_blocks]", getattr(t, "shape", type(t)))
            if t.dtype != torch.int32:
                raise _err(name, "dtype torch.int32", t.dtype)
            if t.shape[2] != nq:
                raise _err(name, f"n_q_blocks = ceil(q_len / block_q) = {nq} in dim 2", tuple(t.shape))
        shape3 = tuple(self.kv_num_blocks.shape)
        if tuple(self.full_kv_num_blocks.shape) != shape3:
            raise _err("full_kv_num_blocks", f"shape {shape3} (as kv_num_blocks)", tuple(self.full_kv_num_blocks.shape))
        for name in ("kv_indices", "full_kv_indices"):
            t = getattr(self, name)
            if not isinstance(t, Tensor) or t.dim() != 4 or tuple(t.shape[:3]) != shape3 or t.shape[3] < 1:
                raise _err(name, f"an int32 tensor [{', '.join(map(str, shape3))}, >=1]", getattr(t, "shape", type(t)))
            if t.dtype != torch.int32:
                raise _err(name, "dtype torch.int32", t.dtype)
        for name in ("kv_indices", "full_kv_indices", "full_kv_num_blocks"):
            if getattr(self, name).device != self.kv_num_blocks.device:
                raise _err(name, f"device {self.kv_num_blocks.device}", getattr(self, name).device)
        if (self.mask_ids is None) != (self.mask_bank is None):
            raise _err("mask_ids", "given together with mask_bank", "only one of them")
        if self.mask_ids is not None:
            if self.mask_ids.dtype != torch.int32 or tuple(self.mask_ids.shape) != tuple(self.kv_indices.shape):
                raise _err("mask_ids", f"int32 of shape {tuple(self.kv_indices.shape)}", (self.mask_ids.dtype, tuple(self.mask_ids.shape)))
            if self.mask_bank.dtype != torch.bool or self.mask_bank.dim() != 3 or \
                    tuple(self.mask_bank.shape[1:]) != (self.block_q, self.block_k):
                raise _err("mask_bank", f"bool [n, {self.block_q}, {self.block_k}]", (self.mask_bank.dtype, tuple(self.mask_bank.shape)))
        if self.columns is not None:
            if not isinstance(self.columns, TokenPattern) or self.columns.page_size != 1:
                raise _err("columns", "a TokenPattern with page_size 1", self.columns)
            if self.columns.kv_len != self.kv_len:
                raise _err("columns.kv_len", f"{self.kv_len} (the pattern's kv_len)", self.columns.kv_len)
            if self.columns.batch not in (1, self.batch) and self.batch != 1:
                raise _err("columns", f"batch 1 or {self.batch}", self.columns.batch)
        if deep:
            self._validate_values()
        return self

    def _validate_values(self):
        nk = self.n_kv_blocks
        for cnt_name, idx_name in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
            cnt, idx = getattr(self, cnt_name), getattr(self, idx_name)
            if cnt.numel() == 0:
                continue
            if int(cnt.min()) < 0 or int(cnt.max()) > idx.shape[-1]:
                raise _err(cnt_name, f"values in [0, {idx.shape[-1]}]", f"min {int(cnt.min())}, max {int(cnt.max())}")
            valid = torch.arange(idx.shape[-1], device=idx.device) < cnt[..., None]
            if ((idx < 0) | (idx >= nk))[valid].any():
                raise _err(idx_name, f"key-block indices in [0, {nk}) within counts", "an index out of range")
            if idx.shape[-1] > 1 and (~(idx[..., 1:] > idx[..., :-1]) & valid[..., 1:]).any():
                raise _err(idx_name, "strictly increasing key-block indices within counts", "unsorted or repeated indices")
        if (self.full_sel() & self.partial_sel()).any():
            raise _err("full_kv_indices", "no block listed as both full and partial", "a block in both lists")
        if self.mask_ids is not None and self.kv_indices.numel():
            valid = torch.arange(self.kv_indices.shape[-1], device=self.device) < self.kv_num_blocks[..., None]
            ids = self.mask_ids[valid]
            if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= self.mask_bank.shape[0]):
                raise _err("mask_ids", f"values in [-1, {self.mask_bank.shape[0]})", "an id out of range")
        if self.causal and self.full_kv_indices.numel():
            # a full block must lie on or below the diagonal for every valid row in it
            qb = torch.arange(self.n_q_blocks, device=self.device)
            first_row = qb * self.block_q
            last_key_allowed = first_row + (self.kv_len - self.q_len)  # keys j <= i + off
            valid = torch.arange(self.full_kv_indices.shape[-1], device=self.device) < self.full_kv_num_blocks[..., None]
            block_last_key = (self.full_kv_indices.long() + 1) * self.block_k - 1
            block_last_key = torch.minimum(block_last_key, torch.tensor(self.kv_len - 1, device=self.device))
            bad = (block_last_key > last_key_allowed[None, None, :, None]) & valid
            if bad.any():
                raise _err("full_kv_indices", "causal full blocks entirely on or below the diagonal "
                           "(blocks crossing the diagonal belong in kv_indices)", "a full block above the diagonal")
        if self.columns is not None:
            self.columns.validate()

    # -- validated state and derived data -------------------------------------------------------
    def _tensors(self) -> list:
        ts = [self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks, self.full_kv_indices,
              self.mask_ids, self.mask_bank]
        if self.columns is not None:
            ts += [self.columns.indices, self.columns.counts]
        return ts

    def _state(self) -> tuple:
        """What the validation and every cached derivative depend on: the scalar fields and, per
        tensor, its identity, storage, shape and in-place version counter.

        Inference-mode tensors keep no version counter, so a pattern holding them would hide an
        in-place change: on first call they are replaced by ordinary copies (made outside inference
        mode; their in-place changes, in inference mode too, bump the counter). An in-place change
        after a call therefore always changes the state."""
        if any(isinstance(t, Tensor) and t.is_inference() for t in self._tensors()):
            self._own_inference_tensors()
        parts = [self.block_q, self.block_k, self.q_len, self.kv_len, bool(self.causal), id(self.columns)]
        if self.columns is not None:
            parts += [self.columns.kv_len, self.columns.page_size]
        for t in self._tensors():
            parts.append(None if not isinstance(t, Tensor) else
                         (id(t), t.data_ptr(), tuple(t.shape), tuple(t.stride()), t._version))
        return tuple(parts)

    def _own_inference_tensors(self) -> None:
        with torch.inference_mode(False):
            cp = lambda t: t.clone() if isinstance(t, Tensor) and t.is_inference() else t  # noqa: E731
            for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "mask_ids",
                         "mask_bank"):
                setattr(self, name, cp(getattr(self, name)))
            if self.columns is not None and (self.columns.indices.is_inference() or self.columns.counts.is_inference()):
                self.columns = replace(self.columns, indices=cp(self.columns.indices), counts=cp(self.columns.counts))
        self._cache.clear()

    def derived(self, name: str, build: Callable[[], object]):
        """derived: data computed from the pattern (transposed lists, kernel copies, a Flex mask...),
        built once per state: any in-place change of a tensor, or a replaced field, drops every
        cached item (validation included)."""
        st = self._state()
        if self._cache.get("_state") != st:
            self._cache.clear()
            self._cache["_state"] = st
        if name not in self._cache:
            self._cache[name] = build()
        return self._cache[name]

    def ensure_valid(self) -> "BlockPattern":
        """ensure_valid: ``validate()`` once per state of the pattern (the kernels' check before every
        call): a pattern changed in place after a call is validated again, never read out of range."""
        self.derived("validated", lambda: self.validate() and True)
        return self

    # -- block-level views ----------------------------------------------------------------------
    def full_sel(self) -> Tensor:
        """bool ``[B, H, n_q_blocks, n_kv_blocks]``: full blocks."""
        return _sel_from_lists(self.full_kv_num_blocks, self.full_kv_indices, self.n_kv_blocks)

    def partial_sel(self) -> Tensor:
        """bool ``[B, H, n_q_blocks, n_kv_blocks]``: partial blocks."""
        return _sel_from_lists(self.kv_num_blocks, self.kv_indices, self.n_kv_blocks)

    def block_mask(self) -> Tensor:
        """bool ``[B, H, n_q_blocks, n_kv_blocks]``: blocks computed (full or partial)."""
        return self.full_sel() | self.partial_sel()

    @property
    def num_computed_blocks(self) -> int:
        """Number of (query block, key block) tiles the kernel computes, summed over batch and heads."""
        return int(self.kv_num_blocks.sum() + self.full_kv_num_blocks.sum())

    def transposed(self) -> dict:
        """Per key block, the query blocks that use it (for the backward pass), cached.

        Returns a dict of int32 tensors: ``q_num_blocks [B, H, n_kv_blocks]``,
        ``q_indices [B, H, n_kv_blocks, max_q]`` (sorted), ``q_slot [B, H, n_kv_blocks, max_q]``
        (the position of that key block in the query block's combined list: ``slot < max_full``
        means full list position ``slot``; else partial list position ``slot - max_full``).
        """
        return self.derived("transposed", lambda: _transpose_lists(self))

    # -- dense views ----------------------------------------------------------------------------
    def to_dense_mask(self, q_lens: Optional[Tensor] = None, kv_lens: Optional[Tensor] = None) -> Tensor:
        """Element mask, bool ``[B, H, q_len, kv_len]`` (for tests and small inputs: quadratic).

        Args:
            q_lens, kv_lens: optional per-sequence lengths ``[B]`` (default: all ``q_len`` / ``kv_len``);
                rows/columns past a sequence's length are False and causality aligns per sequence.
        """
        Bo = self.batch
        for name, t in (("q_lens", q_lens), ("kv_lens", kv_lens)):
            if t is not None:
                if t.dim() != 1 or self.batch not in (1, t.shape[0]):
                    raise _err(name, f"a 1-D tensor of length {self.batch} (or any length for batch-1 patterns)", tuple(t.shape))
                Bo = t.shape[0]
        out = torch.zeros(Bo, self.heads, self.q_len, self.kv_len, dtype=torch.bool, device=self.device)
        for b in range(Bo):
            ql = self.q_len if q_lens is None else int(q_lens[b])
            kl = self.kv_len if kv_lens is None else int(kv_lens[b])
            out[b, :, :ql, :kl] = self.mask_rows(b if self.batch > 1 else 0, 0, self.n_q_blocks, ql, kl)
        return out

    def mask_rows(self, b: int, qb0: int, qb1: int, q_len: Optional[int] = None, kv_len: Optional[int] = None) -> Tensor:
        """Element mask of query blocks ``[qb0, qb1)`` of pattern batch ``b``: bool ``[H, rows, kv_len]``.

        ``q_len``/``kv_len`` are the sequence's own lengths (default the pattern's); rows are
        clipped to ``q_len`` and causality is aligned to these lengths.
        """
        ql = self.q_len if q_len is None else q_len
        kl = self.kv_len if kv_len is None else kv_len
        H, nk = self.heads, self.n_kv_blocks
        bq, bk = self.block_q, self.block_k
        dev = self.device
        qb1 = min(qb1, _cdiv(ql, bq)) if ql > 0 else qb0
        nrow = max(qb1 - qb0, 0)
        rows = torch.arange(qb0 * bq, qb0 * bq + nrow * bq, device=dev)
        full = _sel_from_lists(self.full_kv_num_blocks[b, :, qb0:qb1], self.full_kv_indices[b, :, qb0:qb1], nk)
        part = _sel_from_lists(self.kv_num_blocks[b, :, qb0:qb1], self.kv_indices[b, :, qb0:qb1], nk)
        m = full.repeat_interleave(bq, 1).repeat_interleave(bk, 2)
        if self.mask_ids is not None:
            ids_dense = torch.full((H, nrow, nk), -1, dtype=torch.long, device=dev)
            cnt = self.kv_num_blocks[b, :, qb0:qb1]
            idx = self.kv_indices[b, :, qb0:qb1]
            valid = torch.arange(idx.shape[-1], device=dev) < cnt[..., None]
            hh, qq, ss = valid.nonzero(as_tuple=True)
            ids_dense[hh, qq, idx[hh, qq, ss].long()] = self.mask_ids[b, :, qb0:qb1][hh, qq, ss].long()
            bank = torch.cat([self.mask_bank, torch.ones(1, bq, bk, dtype=torch.bool, device=dev)], 0)
            tiles = bank[torch.where(ids_dense < 0, bank.shape[0] - 1, ids_dense)] & part[..., None, None]
            pm = tiles.permute(0, 1, 3, 2, 4).reshape(H, nrow * bq, nk * bk)
        else:
            pm = part.repeat_interleave(bq, 1).repeat_interleave(bk, 2)
        m = m | pm
        if self.columns is not None:
            cb = b if self.columns.batch > 1 else 0
            col_tok = _broadcast_heads(self.columns.to_token_mask()[cb:cb + 1], H, "columns")[0]  # [H, kv_len]
            col_tok = torch.nn.functional.pad(col_tok, (0, nk * bk - col_tok.shape[-1]))
            listed = (full | part).repeat_interleave(bq, 1).repeat_interleave(bk, 2)
            m = m | (col_tok[:, None, :] & ~listed)
        m = m[:, : max(min(ql, qb1 * bq) - qb0 * bq, 0), :kl]
        rows = rows[: m.shape[1]]
        j = torch.arange(kl, device=dev)
        ok = (j[None, :] < kl) & (rows[:, None] < ql)
        if self.causal:
            ok = ok & (j[None, :] <= rows[:, None] + (kl - ql))
        return m & ok[None]

    def pair_counts(self) -> tuple[Tensor, Tensor]:
        """(computed pairs, reference pairs) per (batch, head): float64 tensors ``[B, H]``.

        The reference is causal pairs when ``causal`` else ``q_len * kv_len``. Computed without
        materialising the dense mask (cost grows with the number of partial blocks).
        """
        return self.derived("pair_counts", self._pair_counts)

    def _pair_counts(self) -> tuple[Tensor, Tensor]:
        B, H = self.batch, self.heads
        bq, bk = self.block_q, self.block_k
        dev = self.device
        off = self.kv_len - self.q_len

        def block_pairs(qb: Tensor, kb: Tensor, tile: Optional[Tensor]) -> Tensor:
            # exact number of valid pairs in each (qb, kb) block, optionally ANDed with tiles
            r = qb[..., None, None] * bq + torch.arange(bq, device=dev)[:, None]
            c = kb[..., None, None] * bk + torch.arange(bk, device=dev)[None, :]
            ok = (r < self.q_len) & (c < self.kv_len)
            if self.causal:
                ok = ok & (c <= r + off)
            if tile is not None:
                ok = ok & tile
            return ok.sum((-1, -2)).double()

        total = torch.zeros(B, H, dtype=torch.float64, device=dev)
        for is_full, cnt, idx, ids in ((True, self.full_kv_num_blocks, self.full_kv_indices, None),
                                       (False, self.kv_num_blocks, self.kv_indices, self.mask_ids)):
            valid = torch.arange(idx.shape[-1], device=dev) < cnt[..., None]
            bidx, hidx, qidx, sidx = valid.nonzero(as_tuple=True)
            if bidx.numel() == 0:
                continue
            kb = idx[bidx, hidx, qidx, sidx].long()
            tiles = None
            if ids is not None:
                tid = ids[bidx, hidx, qidx, sidx].long()
                bank = torch.cat([self.mask_bank, torch.ones(1, bq, bk, dtype=torch.bool, device=dev)], 0)
                tiles = bank[torch.where(tid < 0, bank.shape[0] - 1, tid)]
            if is_full:  # full blocks: every in-bounds pair (validate() keeps them off the diagonal)
                rows = torch.clamp(self.q_len - qidx * bq, max=bq).double()
                cols = torch.clamp(self.kv_len - kb * bk, max=bk).double()
                total.index_put_((bidx, hidx), rows * cols, accumulate=True)
                continue
            # partial blocks: exact count per tile, chunked to bound memory
            per = torch.zeros(bidx.numel(), dtype=torch.float64, device=dev)
            step = max(1, (1 << 24) // (bq * bk))
            for s in range(0, bidx.numel(), step):
                per[s:s + step] = block_pairs(qidx[s:s + step], kb[s:s + step],
                                              None if tiles is None else tiles[s:s + step])
            total.index_put_((bidx, hidx), per, accumulate=True)
        if self.columns is not None:
            total = total + self._column_pairs()
        if self.causal:
            i = torch.arange(self.q_len, device=dev, dtype=torch.float64)
            ref = torch.clamp(torch.clamp(i + off + 1, min=0), max=self.kv_len).sum()
        else:
            ref = torch.tensor(float(self.q_len) * self.kv_len, dtype=torch.float64, device=dev)
        return total, ref.expand(B, H)

    def _column_pairs(self) -> Tensor:
        """Pairs added by the column path: per (b, h, q block) columns whose block is unlisted."""
        cols = self.columns
        B, H = max(self.batch, cols.batch), self.heads
        dev = self.device
        bq, bk = self.block_q, self.block_k
        listed = self.block_mask()  # [B,H,nq,nk]
        idx = _broadcast_heads(cols.indices, H, "columns").long()
        cnt = _broadcast_heads(cols.counts[..., None], H, "columns")[..., 0]
        valid = torch.arange(idx.shape[-1], device=dev) < cnt[..., None]  # [Bc,H,n]
        kb = idx // bk
        lst = listed.expand(B, H, -1, -1)
        owned = torch.gather(lst, 3, kb[:, :, None, :].expand(B, H, lst.shape[2], -1).clamp_max(lst.shape[3] - 1))
        use = valid[:, :, None, :] & ~owned  # [B,H,nq,n]
        # rows in q block qb that may see column j: i in [qb*bq, min(q_len, (qb+1)*bq)), j <= i + off
        qb = torch.arange(self.n_q_blocks, device=dev)
        lo = qb * bq
        hi = torch.clamp((qb + 1) * bq, max=self.q_len)
        if self.causal:
            first = torch.clamp(idx[:, :, None, :] - (self.kv_len - self.q_len), min=0)
            n_rows = torch.clamp(hi[None, None, :, None] - torch.maximum(first, lo[None, None, :, None]), min=0)
        else:
            n_rows = (hi - lo)[None, None, :, None].expand_as(use)
        return (n_rows * use).sum((-1, -2)).double()

    @property
    def density(self) -> float:
        """Computed pairs / reference pairs (causal pairs when causal), averaged over (batch, head)."""
        comp, ref = self.pair_counts()
        if float(ref.sum()) == 0:
            return 0.0
        return float((comp / ref.clamp_min(1)).mean())

    # -- set operations -------------------------------------------------------------------------
    def _tiles_dense(self) -> tuple[Tensor, Tensor]:
        """(state [B,H,nq,nk] int8 (0 none, 1 partial, 2 full), tile ids into bank + all-true tile)."""
        full, part = self.full_sel(), self.partial_sel()
        state = torch.zeros(full.shape, dtype=torch.int8, device=self.device)
        state[part] = 1
        state[full] = 2
        return state, self._ids_dense()

    def _ids_dense(self) -> Tensor:
        B, H, nq, nk = self.batch, self.heads, self.n_q_blocks, self.n_kv_blocks
        ids = torch.full((B, H, nq, nk), -1, dtype=torch.long, device=self.device)
        if self.mask_ids is not None:
            valid = torch.arange(self.kv_indices.shape[-1], device=self.device) < self.kv_num_blocks[..., None]
            b, h, q, s = valid.nonzero(as_tuple=True)
            ids[b, h, q, self.kv_indices[b, h, q, s].long()] = self.mask_ids[b, h, q, s].long()
        return ids

    def union(self, other: "BlockPattern") -> "BlockPattern":
        """Pattern whose element mask is the union of both (same block sizes, lengths, causal flag)."""
        from .algebra import combine

        return combine(self, other, "union")

    def intersection(self, other: "BlockPattern") -> "BlockPattern":
        """Pattern whose element mask is the intersection of both (block parts only)."""
        from .algebra import combine

        return combine(self, other, "intersection")

    __or__ = union
    __and__ = intersection

    # -- FlexAttention --------------------------------------------------------------------------
    def to_flex_block_mask(self):
        """Convert to a FlexAttention ``BlockMask`` computing the same element mask.

        Columns are not representable as blocks and raise ValueError. The mask_mod closes over the
        pattern's tiles; reuse the returned object (Flex recompiles for every new mask_mod).
        """
        from torch.nn.attention.flex_attention import BlockMask

        if self.columns is not None:
            raise ValueError("pattern.columns: a FlexAttention BlockMask has no column path; "
                             "use the triton or reference backend for patterns with columns")
        if self.block_q != self.block_k:
            # Flex supports rectangular blocks in recent versions; keep it explicit
            pass
        off = self.kv_len - self.q_len
        causal = self.causal
        bq, bk = self.block_q, self.block_k
        if self.mask_ids is not None:
            ids = self._ids_dense()
            bank = torch.cat([self.mask_bank, torch.ones(1, bq, bk, dtype=torch.bool, device=self.device)])
            ids = torch.where(ids < 0, bank.shape[0] - 1, ids)
            Bp, Hp = self.batch, self.heads

            def mask_mod(b, h, q_idx, kv_idx):
                t = ids[b % Bp if Bp > 1 else 0, h % Hp if Hp > 1 else 0, q_idx // bq, kv_idx // bk]
                ok = bank[t, q_idx % bq, kv_idx % bk]
                if causal:
                    ok = ok & (kv_idx <= q_idx + off)
                return ok
        elif causal:
            mask_mod = _causal_mask_mod(off)
        else:
            mask_mod = None
        nk = self.n_kv_blocks

        def widen(t):  # Flex expects index lists as wide as the number of key blocks
            return torch.nn.functional.pad(t, (0, nk - t.shape[-1])) if t.shape[-1] < nk else t[..., :nk]

        kwargs = dict(full_kv_num_blocks=self.full_kv_num_blocks, full_kv_indices=widen(self.full_kv_indices),
                      BLOCK_SIZE=(bq, bk), mask_mod=mask_mod)
        try:
            return BlockMask.from_kv_blocks(self.kv_num_blocks, widen(self.kv_indices),
                                            seq_lengths=(self.q_len, self.kv_len), **kwargs)
        except TypeError:  # older torch without seq_lengths
            return BlockMask.from_kv_blocks(self.kv_num_blocks, widen(self.kv_indices), **kwargs)

    def __repr__(self) -> str:
        return (f"BlockPattern(B={self.batch}, H={self.heads}, q_len={self.q_len}, kv_len={self.kv_len}, "
                f"block=({self.block_q},{self.block_k}), causal={self.causal}, "
                f"blocks={self.num_computed_blocks}, tiles={0 if self.mask_bank is None else self.mask_bank.shape[0]}, "
                f"columns={'yes' if self.columns is not None else 'no'})")


_CAUSAL_MODS: dict = {}


def _causal_mask_mod(off: int):
    """One mask_mod function object per diagonal offset: FlexAttention recompiles for every new
    function object, so patterns with the same geometry share one."""
    fn = _CAUSAL_MODS.get(off)
    if fn is None:
        def fn(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + off
        _CAUSAL_MODS[off] = fn
    return fn


def _broadcast_heads(t: Tensor, H: int, name: str) -> Tensor:
    if t.shape[1] == H:
        return t
    if t.shape[1] == 1:
        return t.expand(t.shape[0], H, *t.shape[2:])
    if H % t.shape[1] == 0:  # KV heads -> query heads (GQA groups)
        return t.repeat_interleave(H // t.shape[1], dim=1)
    raise _err(name, f"1 or a divisor of {H} heads", t.shape[1])


def _transpose_lists(p: BlockPattern) -> dict:
    B, H, nq, nk = p.batch, p.heads, p.n_q_blocks, p.n_kv_blocks
    dev = p.device
    mf = p.full_kv_indices.shape[-1]
    entries = []
    for cnt, idx, base in ((p.full_kv_num_blocks, p.full_kv_indices, 0), (p.kv_num_blocks, p.kv_indices, mf)):
        valid = torch.arange(idx.shape[-1], device=dev) < cnt[..., None]
        b, h, q, s = valid.nonzero(as_tuple=True)
        entries.append((b, h, q, idx[b, h, q, s].long(), s + base))
    b = torch.cat([e[0] for e in entries])
    h = torch.cat([e[1] for e in entries])
    q = torch.cat([e[2] for e in entries])
    k = torch.cat([e[3] for e in entries])
    slot = torch.cat([e[4] for e in entries])
    row = (b * H + h) * nk + k
    order = torch.argsort(row * nq + q)
    row, q, slot = row[order], q[order], slot[order]
    counts = torch.bincount(row, minlength=B * H * nk).view(B, H, nk)
    max_q = max(int(counts.max()) if counts.numel() else 0, 1)
    starts = torch.cumsum(counts.view(-1), 0) - counts.view(-1)
    pos = torch.arange(row.numel(), device=dev) - starts[row]
    q_idx = torch.zeros(B * H * nk, max_q, dtype=torch.int32, device=dev)
    q_slot = torch.zeros(B * H * nk, max_q, dtype=torch.int32, device=dev)
    q_idx[row, pos] = q.to(torch.int32)
    q_slot[row, pos] = slot.to(torch.int32)
    return {"q_num_blocks": counts.to(torch.int32).contiguous(),
            "q_indices": q_idx.view(B, H, nk, max_q).contiguous(),
            "q_slot": q_slot.view(B, H, nk, max_q).contiguous()}
