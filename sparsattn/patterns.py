"""Patterns: the one shared vocabulary between sparse-attention methods and kernels.

A method looks at q/k and returns a pattern; a kernel computes attention on exactly the pattern.

``BlockPattern`` (prefill and training) lists, per (batch, head, query block), the key blocks to
compute, split into *full* blocks (every element computed, only sequence bounds apply) and
*partial* blocks (an element mask applies: the causal diagonal, and optionally a tile from a
small deduplicated ``mask_bank`` for sliding-window edges, neighborhoods, sinks that are not
block-aligned...). Optionally it carries ``columns``: individual key columns outside the chosen
blocks (MInference's vertical lines), computed by the kernel's column path.

Semantics of the element mask of a ``BlockPattern`` (what ``to_dense_mask`` returns and what every
kernel computes), for query row ``i`` and key ``j`` of sequence ``b`` with lengths ``Lq, Lk``:

* ``i < Lq`` and ``j < Lk`` (sequence bounds), and
* if ``causal``: ``j <= i + (Lk - Lq)`` (bottom-right aligned, as flash-attention), and
* ``j``'s block is a full block of ``i``'s query block, or a partial block whose bank tile (if
  any) is true at ``(i % block_q, j % block_k)``; or ``j`` is one of the ``columns`` of the head
  and ``j``'s block is not listed (full or partial) for ``i``'s query block.

Note that ``causal`` applies to full blocks too: a full block must lie entirely on or below the
diagonal; ``validate()`` checks this.

``TokenPattern`` (decode, vertical columns) lists per (batch, head) sorted int32 token (or page)
indices with counts.

Density = computed (query, key) pairs / causal pairs (when causal) or / all pairs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence

import torch

Tensor = torch.Tensor

__all__ = [
    "BlockPattern",
    "TokenPattern",
    "dense",
    "causal",
    "sliding_window",
    "sink_local",
    "a_shape",
    "dilated",
    "strided_shards",
    "vertical_slash",
    "neighborhood_1d",
    "neighborhood_2d",
    "neighborhood_3d",
    "from_block_mask",
    "from_dense_mask",
    "from_flex_block_mask",
    "from_topk_blocks",
    "plot",
]


def _err(name: str, expected: str, got) -> ValueError:
    return ValueError(f"{name}: expected {expected}, got {got}")


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# ----------------------------------------------------------------------------------------------
# TokenPattern
# ----------------------------------------------------------------------------------------------


@dataclass
class TokenPattern:
    """TokenPattern: per (batch, head) sorted token (or page) indices with counts.

    Attributes:
        indices: int32 ``[B, H, max_n]``; the first ``counts[b, h]`` entries of each row are the
            selected positions, strictly increasing; the rest is padding (ignored).
        counts: int32 ``[B, H]``.
        kv_len: the number of keys (tokens) the indices refer to.
        page_size: 1 for token indices; > 1 when each index names a page of that many tokens.
    """

    indices: Tensor
    counts: Tensor
    kv_len: int
    page_size: int = 1

    def __post_init__(self):
        self.validate(deep=False)

    @property
    def batch(self) -> int:
        return self.indices.shape[0]

    @property
    def heads(self) -> int:
        return self.indices.shape[1]

    @property
    def device(self) -> torch.device:
        return self.indices.device

    def validate(self, deep: bool = True) -> "TokenPattern":
        """Check shapes, dtypes, ranges and ordering; raise ValueError naming the field."""
        if not isinstance(self.indices, Tensor) or self.indices.dim() != 3:
            raise _err("indices", "an int32 tensor [B, H, max_n]", getattr(self.indices, "shape", type(self.indices)))
        if self.indices.dtype != torch.int32:
            raise _err("indices", "dtype torch.int32", self.indices.dtype)
        if not isinstance(self.counts, Tensor) or tuple(self.counts.shape) != tuple(self.indices.shape[:2]):
            raise _err("counts", f"an int32 tensor of shape {tuple(self.indices.shape[:2])}", getattr(self.counts, "shape", None))
        if self.counts.dtype != torch.int32:
            raise _err("counts", "dtype torch.int32", self.counts.dtype)
        if self.counts.device != self.indices.device:
            raise _err("counts", f"device {self.indices.device}", self.counts.device)
        if not isinstance(self.kv_len, int) or self.kv_len < 0:
            raise _err("kv_len", "an int >= 0", self.kv_len)
        if not isinstance(self.page_size, int) or self.page_size < 1:
            raise _err("page_size", "an int >= 1", self.page_size)
        if deep and self.indices.numel():
            n_units = _cdiv(self.kv_len, self.page_size)
            if (self.counts < 0).any() or (self.counts > self.indices.shape[-1]).any():
                raise _err("counts", f"values in [0, {self.indices.shape[-1]}]",
                           f"min {int(self.counts.min())}, max {int(self.counts.max())}")
            valid = torch.arange(self.indices.shape[-1], device=self.device) < self.counts[..., None]
            idx = self.indices
            if ((idx < 0) | (idx >= n_units))[valid].any():
                raise _err("indices", f"values in [0, {n_units}) within counts", "an index out of range")
            if idx.shape[-1] > 1:
                inc = idx[..., 1:] > idx[..., :-1]
                if (~inc & valid[..., 1:]).any():
                    raise _err("indices", "strictly increasing values within counts", "unsorted or repeated indices")
        return self

    @classmethod
    def from_lists(cls, lists: Sequence[Sequence[Sequence[int]]], kv_len: int, *, page_size: int = 1,
                   device=None) -> "TokenPattern":
        """Build from nested Python lists ``lists[b][h] = [indices...]`` (sorted and deduplicated here)."""
        B = len(lists)
        H = len(lists[0]) if B else 0
        rows = [[sorted(set(int(x) for x in lists[b][h])) for h in range(H)] for b in range(B)]
        max_n = max([len(r) for rr in rows for r in rr] + [0])
        idx = torch.zeros(B, H, max(max_n, 1), dtype=torch.int32)
        cnt = torch.zeros(B, H, dtype=torch.int32)
        for b in range(B):
            for h in range(H):
                r = rows[b][h]
                cnt[b, h] = len(r)
                if r:
                    idx[b, h, : len(r)] = torch.tensor(r, dtype=torch.int32)
        return cls(idx.to(device), cnt.to(device), kv_len, page_size).validate()

    @classmethod
    def from_mask(cls, mask: Tensor, *, page_size: int = 1, kv_len: Optional[int] = None) -> "TokenPattern":
        """Build from a bool mask ``[B, H, n_units]`` (units are tokens, or pages when page_size > 1)."""
        if mask.dim() != 3 or mask.dtype != torch.bool:
            raise _err("mask", "a bool tensor [B, H, n]", (mask.dtype, tuple(mask.shape)))
        n = mask.shape[-1]
        counts = mask.sum(-1).to(torch.int32)
        ar = torch.arange(n, device=mask.device)
        key = torch.where(mask, ar, ar + n)
        order = key.sort(dim=-1).values
        max_n = max(int(counts.max()) if counts.numel() else 0, 1)
        idx = torch.where(order[..., :max_n] < n, order[..., :max_n], torch.zeros_like(order[..., :max_n]))
        return cls(idx.to(torch.int32).contiguous(), counts, kv_len if kv_len is not None else n * page_size, page_size)

    def to_unit_mask(self) -> Tensor:
        """bool ``[B, H, n_units]``: which tokens (or pages) are selected."""
        n_units = _cdiv(self.kv_len, self.page_size)
        valid = torch.arange(self.indices.shape[-1], device=self.device) < self.counts[..., None]
        out = torch.zeros(self.batch, self.heads, n_units + 1, dtype=torch.bool, device=self.device)
        idx = torch.where(valid, self.indices.long(), torch.full_like(self.indices, n_units, dtype=torch.long))
        out.scatter_(-1, idx, True)
        return out[..., :n_units]

    def to_token_mask(self) -> Tensor:
        """bool ``[B, H, kv_len]``: which tokens are selected (pages expanded)."""
        m = self.to_unit_mask()
        if self.page_size > 1:
            m = m.repeat_interleave(self.page_size, dim=-1)[..., : self.kv_len]
        return m

    @property
    def density(self) -> float:
        """Selected tokens / kv_len, averaged over (batch, head)."""
        if self.kv_len == 0:
            return 0.0
        return float(self.to_token_mask().float().mean())

    def to(self, device) -> "TokenPattern":
        return replace(self, indices=self.indices.to(device), counts=self.counts.to(device))


# ----------------------------------------------------------------------------------------------
# BlockPattern
# ----------------------------------------------------------------------------------------------


def _lists_from_sel(sel: Tensor) -> tuple[Tensor, Tensor]:
    """bool [..., n] -> (counts int32 [...], sorted indices int32 [..., max(count, 1)]).

    Linear time: each selected entry goes to slot ``cumsum - 1`` of its row (no sort)."""
    n = sel.shape[-1]
    counts = sel.sum(-1, dtype=torch.int32)
    max_n = max(int(counts.max()) if counts.numel() else 0, 1)
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

    def _combine(self, other: "BlockPattern", op: str) -> "BlockPattern":
        if not isinstance(other, BlockPattern):
            raise _err("other", "a BlockPattern", type(other))
        for name in ("block_q", "block_k", "q_len", "kv_len", "causal"):
            if getattr(self, name) != getattr(other, name):
                raise _err(f"other.{name}", repr(getattr(self, name)), repr(getattr(other, name)))
        if self.device != other.device:
            raise _err("other.device", str(self.device), other.device)
        B = max(self.batch, other.batch)
        H = max(self.heads, other.heads)
        for p in (self, other):
            if p.batch not in (1, B) or p.heads not in (1, H):
                raise _err("other", f"batch/heads broadcastable to ({B}, {H})", (p.batch, p.heads))
        bq, bk = self.block_q, self.block_k
        sa, ia = self._tiles_dense()
        sb, ib = other._tiles_dense()
        sa, ia, sb, ib = (t.expand(B, H, -1, -1) for t in (sa, ia, sb, ib))
        ones = torch.ones(1, bq, bk, dtype=torch.bool, device=self.device)
        bank_a = torch.cat([self.mask_bank if self.mask_bank is not None else ones[:0], ones])
        bank_b = torch.cat([other.mask_bank if other.mask_bank is not None else ones[:0], ones])
        ta = torch.where(ia < 0, bank_a.shape[0] - 1, ia)
        tb = torch.where(ib < 0, bank_b.shape[0] - 1, ib)
        if op == "union":
            full = (sa == 2) | (sb == 2)
            part = ~full & ((sa == 1) | (sb == 1))
        else:
            full = (sa == 2) & (sb == 2)
            part = ~full & (sa > 0) & (sb > 0)
        b, h, q, k = part.nonzero(as_tuple=True)
        tile_a = torch.where((sa[b, h, q, k] > 0)[:, None, None], bank_a[ta[b, h, q, k]], False)
        tile_b = torch.where((sb[b, h, q, k] > 0)[:, None, None], bank_b[tb[b, h, q, k]], False)
        if op == "union":
            # a full block counts as an all-true tile
            tile_a = tile_a | (sa[b, h, q, k] == 2)[:, None, None]
            tile_b = tile_b | (sb[b, h, q, k] == 2)[:, None, None]
            tiles = tile_a | tile_b
        else:
            tile_a = tile_a | (sa[b, h, q, k] == 2)[:, None, None]
            tile_b = tile_b | (sb[b, h, q, k] == 2)[:, None, None]
            tiles = tile_a & tile_b
        columns = None
        if self.columns is not None or other.columns is not None:
            if op != "union":
                raise ValueError("other: intersection of patterns with columns is not supported; "
                                 "intersect the block parts and choose the columns explicitly")
            cols = [p.columns.to_token_mask() for p in (self, other) if p.columns is not None]
            cols = [_broadcast_heads(c, H, "columns").expand(B, H, -1) for c in cols]
            cm = cols[0] if len(cols) == 1 else cols[0] | cols[1]
            columns = TokenPattern.from_mask(cm, kv_len=self.kv_len)
        return _assemble(full, part, (b, h, q, k), tiles, bq, bk, self.q_len, self.kv_len, self.causal, columns)

    def union(self, other: "BlockPattern") -> "BlockPattern":
        """Pattern whose element mask is the union of both (same block sizes, lengths, causal flag)."""
        return self._combine(other, "union")

    def intersection(self, other: "BlockPattern") -> "BlockPattern":
        """Pattern whose element mask is the intersection of both (block parts only)."""
        return self._combine(other, "intersection")

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


_HASH_P = 2147483629  # a prime below 2**31


def _unique_tiles(tiles: Tensor) -> tuple[Tensor, Tensor]:
    """Distinct rows of a bool matrix ``[P, n]`` -> (rows ``[U, n]``, inverse ``[P]``).

    ``torch.unique(dim=0)`` sorts whole rows (slow on long contexts: thousands of 64x64 tiles);
    instead the rows are packed into 31-bit words, hashed twice modulo a prime, and made unique
    by hash. Every row is then compared with its representative; on a hash collision (never
    seen, but possible) the exact ``torch.unique(dim=0)`` is used."""
    P_, n = tiles.shape
    dev = tiles.device
    W = _cdiv(n, 31)
    padded = torch.nn.functional.pad(tiles, (0, W * 31 - n)).view(P_, W, 31).long()
    words = (padded << torch.arange(31, device=dev)).sum(-1)  # [P, W], each < 2**31
    gen = torch.Generator().manual_seed(12345)
    mult = torch.randint(1, _HASH_P, (2, W), generator=gen).to(dev)
    h = [((words * m) % _HASH_P).sum(-1) % _HASH_P for m in mult]  # products < 2**62, sums < 2**31 * W
    key = h[0] * _HASH_P + h[1]
    ukey, inv = torch.unique(key, return_inverse=True)
    first = torch.full((ukey.numel(),), P_, dtype=torch.long, device=dev)
    first.scatter_reduce_(0, inv, torch.arange(P_, device=dev), reduce="amin")
    uniq = tiles[first]
    if not torch.equal(uniq[inv], tiles):  # a collision: fall back to the exact row sort
        return torch.unique(tiles, dim=0, return_inverse=True)
    return uniq, inv


def _assemble(full: Tensor, part: Tensor, part_coords, tiles: Optional[Tensor], bq: int, bk: int,
              q_len: int, kv_len: int, is_causal: bool, columns: Optional[TokenPattern] = None) -> BlockPattern:
    """Build a BlockPattern from block selections and, for partial blocks, element tiles.

    ``tiles`` (bool ``[P, bq, bk]``, aligned with ``part.nonzero()`` order) may be None (partial
    blocks masked only by causality and bounds). Tiles that add nothing beyond causality and
    bounds get id -1; the rest are deduplicated into the bank. Partial blocks whose tile is empty
    are dropped; full-row tiles stay partial (a kernel may not skip bounds/causality there).
    """
    dev = full.device
    mask_ids = mask_bank = None
    if tiles is not None and tiles.shape[0]:
        b, h, q, k = part_coords
        off = kv_len - q_len
        r = q[:, None, None] * bq + torch.arange(bq, device=dev)[:, None]
        c = k[:, None, None] * bk + torch.arange(bk, device=dev)[None, :]
        base = (r < q_len) & (c < kv_len)
        if is_causal:
            base = base & (c <= r + off)
        eff = tiles & base
        nonempty = eff.flatten(1).any(1)
        plain = (eff == base).flatten(1).all(1)
        part = part.clone()
        part[b[~nonempty], h[~nonempty], q[~nonempty], k[~nonempty]] = False
        # full blocks off the diagonal where the tile covers everything can be promoted to full
        keep = nonempty
        b, h, q, k, eff, plain = b[keep], h[keep], q[keep], k[keep], eff[keep], plain[keep]
        need = ~plain
        ids_flat = torch.full((b.numel(),), -1, dtype=torch.long, device=dev)
        if need.any():
            uniq, inv = _unique_tiles(eff[need].flatten(1))
            mask_bank = uniq.view(-1, bq, bk).contiguous()
            ids_flat[need] = inv
            idmap = torch.full(part.shape, -1, dtype=torch.int32, device=dev)
            idmap[b, h, q, k] = ids_flat.to(torch.int32)
        else:
            idmap = None
    else:
        idmap = None
    full_cnt, full_idx = _lists_from_sel(full)
    part_cnt, part_idx = _lists_from_sel(part)
    if idmap is not None:
        mask_ids = torch.gather(idmap, 3, part_idx.long())
        valid = torch.arange(part_idx.shape[-1], device=dev) < part_cnt[..., None]
        mask_ids = torch.where(valid, mask_ids, torch.full_like(mask_ids, -1)).contiguous()
    return BlockPattern(part_cnt, part_idx, full_cnt, full_idx, bq, bk, q_len, kv_len, is_causal,
                        mask_ids, mask_bank, columns)


# ----------------------------------------------------------------------------------------------
# Constructors
# ----------------------------------------------------------------------------------------------


def _check_lengths(q_len, kv_len, block_q, block_k):
    if not isinstance(q_len, int) or q_len < 0:
        raise _err("q_len", "an int >= 0", q_len)
    if kv_len is None:
        kv_len = q_len
    if not isinstance(kv_len, int) or kv_len < 0:
        raise _err("kv_len", "an int >= 0", kv_len)
    if block_k is None:
        block_k = block_q
    for name, v in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(v, int) or v < 16 or v & (v - 1):
            raise _err(name, "a power of two >= 16", v)
    return kv_len, block_k


def _block_grid(q_len, kv_len, bq, bk, device):
    """Per (qb, kb): first/last row index and first/last key index (clipped to lengths)."""
    nq, nk = _cdiv(q_len, bq), _cdiv(kv_len, bk)
    qb = torch.arange(nq, device=device)
    kb = torch.arange(nk, device=device)
    r0 = (qb * bq)[:, None]
    r1 = torch.clamp((qb + 1) * bq, max=q_len)[:, None] - 1
    c0 = (kb * bk)[None, :]
    c1 = torch.clamp((kb + 1) * bk, max=kv_len)[None, :] - 1
    return r0, r1, c0, c1


def _from_predicate(pred: Callable[[Tensor, Tensor], Tensor], full_pred: Callable, any_pred: Callable,
                    q_len: int, kv_len: int, bq: int, bk: int, is_causal: bool, device,
                    columns: Optional[TokenPattern] = None, heads: int = 1) -> BlockPattern:
    """Generic builder for structured patterns.

    ``any_pred(r0, r1, c0, c1)`` -> bool [(H,) nq, nk]: the block may contain a kept pair;
    ``full_pred(r0, r1, c0, c1)`` -> bool: every pair of the block is kept by ``pred`` (causality
    and bounds are added here); ``pred(rows, cols)`` -> bool element predicate on broadcast
    index tensors (rows [P, bq, 1], cols [P, 1, bk], and a head index tensor for per-head patterns).
    """
    r0, r1, c0, c1 = _block_grid(q_len, kv_len, bq, bk, device)
    off = kv_len - q_len
    anyb = any_pred(r0, r1, c0, c1)
    fullb = full_pred(r0, r1, c0, c1)
    if is_causal:
        anyb = anyb & (c0 <= r1 + off)
        fullb = fullb & (c1 <= r0 + off)
    if anyb.dim() == 2:
        anyb, fullb = anyb[None], fullb[None]
    anyb = anyb[None].expand(1, anyb.shape[0], -1, -1)
    fullb = (fullb[None].expand_as(anyb)) & anyb
    part = anyb & ~fullb
    b, h, q, k = part.nonzero(as_tuple=True)
    tiles = None
    if b.numel():
        rows = q[:, None, None] * bq + torch.arange(bq, device=device)[None, :, None]
        cols = k[:, None, None] * bk + torch.arange(bk, device=device)[None, None, :]
        tiles = pred(rows, cols, h[:, None, None]) if _takes_head(pred) else pred(rows, cols)
    return _assemble(fullb, part, (b, h, q, k), tiles, bq, bk, q_len, kv_len, is_causal, columns)


def _takes_head(fn) -> bool:
    import inspect

    try:
        return len(inspect.signature(fn).parameters) >= 3
    except (TypeError, ValueError):
        return False


def _expand_bh(p: BlockPattern, batch: int, heads: int) -> BlockPattern:
    if batch == p.batch and heads == p.heads:
        return p
    ex = lambda t: None if t is None else t.expand(batch, heads, *t.shape[2:]).contiguous()  # noqa: E731
    return replace(p, kv_num_blocks=ex(p.kv_num_blocks), kv_indices=ex(p.kv_indices),
                   full_kv_num_blocks=ex(p.full_kv_num_blocks), full_kv_indices=ex(p.full_kv_indices),
                   mask_ids=ex(p.mask_ids), _cache={})


def dense(q_len: int, kv_len: Optional[int] = None, *, block_q: int = 128, block_k: Optional[int] = None,
          batch: int = 1, heads: int = 1, device=None) -> BlockPattern:
    """dense: every key block for every query block (non-causal)."""
    kv_len, block_k = _check_lengths(q_len, kv_len, block_q, block_k)
    t = lambda r0, r1, c0, c1: torch.ones(r0.shape[0], c0.shape[1], dtype=torch.bool, device=device)  # noqa: E731
    p = _from_predicate(lambda r, c: torch.ones(r.shape[0], r.shape[1], c.shape[2], dtype=torch.bool, device=device),
                        t, t, q_len, kv_len, block_q, block_k, False, device)
    return _expand_bh(p, batch, heads)


def causal(q_len: int, kv_len: Optional[int] = None, *, block_q: int = 128, block_k: Optional[int] = None,
           batch: int = 1, heads: int = 1, device=None) -> BlockPattern:
    """causal: every key block on or below the (bottom-right aligned) diagonal; diagonal blocks partial."""
    kv_len, block_k = _check_lengths(q_len, kv_len, block_q, block_k)
    t = lambda r0, r1, c0, c1: torch.ones(r0.shape[0], c0.shape[1], dtype=torch.bool, device=device)  # noqa: E731
    p = _from_predicate(lambda r, c: torch.ones(r.shape[0], r.shape[1], c.shape[2], dtype=torch.bool, device=device),
                        t, t, q_len, kv_len, block_q, block_k, True, device)
    return _expand_bh(p, batch, heads)


def sliding_window(q_len: int, window: int, kv_len: Optional[int] = None, *, causal: bool = True,
                   block_q: int = 128, block_k: Optional[int] = None, batch: int = 1, heads: int = 1,
                   device=None) -> BlockPattern:
    """sliding_window: query i sees keys j with ``0 <= (i + off) - j < window`` (causal), or
    ``|i + off - j| < window`` when ``causal=False`` (symmetric window), ``off = kv_len - q_len``."""
    kv_len, block_k = _check_lengths(q_len, kv_len, block_q, block_k)
    if not isinstance(window, int) or window < 1:
        raise _err("window", "an int >= 1", window)
    off = kv_len - q_len
    if causal:
        pred = lambda r, c: (r + off - c) < window  # noqa: E731
        anyp = lambda r0, r1, c0, c1: (r0 + off - c1) < window  # noqa: E731
        fullp = lambda r0, r1, c0, c1: (r1 + off - c0) < window  # noqa: E731
    else:
        pred = lambda r, c: (r + off - c).abs() < window  # noqa: E731
        anyp = lambda r0, r1, c0, c1: ((r0 + off - c1) < window) & ((c0 - r1 - off) < window)  # noqa: E731
        fullp = lambda r0, r1, c0, c1: ((r1 + off - c0) < window) & ((c1 - r0 - off) < window)  # noqa: E731
    p = _from_predicate(pred, fullp, anyp, q_len, kv_len, block_q, block_k, causal, device)
    return _expand_bh(p, batch, heads)


def sink_local(q_len: int, sink: int, window: int, kv_len: Optional[int] = None, *, block_q: int = 128,
               block_k: Optional[int] = None, batch: int = 1, heads: int = 1, device=None) -> BlockPattern:
    """sink_local (A-shape, StreamingLLM / MInference): the first ``sink`` keys plus a causal
    sliding window of ``window`` keys."""
    kv_len, block_k = _check_lengths(q_len, kv_len, block_q, block_k)
    if not isinstance(sink, int) or sink < 0:
        raise _err("sink", "an int >= 0", sink)
    if not isinstance(window, int) or window < 1:
        raise _err("window", "an int >= 1", window)
    off = kv_len - q_len
    pred = lambda r, c: (c < sink) | ((r + off - c) < window)  # noqa: E731
    anyp = lambda r0, r1, c0, c1: (c0 < sink) | ((r0 + off - c1) < window)  # noqa: E731
    fullp = lambda r0, r1, c0, c1: (c1 < sink) | ((r1 + off - c0) < window)  # noqa: E731
    p = _from_predicate(pred, fullp, anyp, q_len, kv_len, block_q, block_k, True, device)
    return _expand_bh(p, batch, heads)


a_shape = sink_local


def dilated(q_len: int, dilation: int, window_blocks: Optional[int] = None, kv_len: Optional[int] = None, *,
            causal: bool = True, local_blocks: int = 1, block_q: int = 128, block_k: Optional[int] = None,
            batch: int = 1, heads: int = 1, device=None) -> BlockPattern:
    """dilated: block-level dilation (LongNet-style, at kernel granularity): a query block sees every
    ``dilation``-th key block counted back from its diagonal (within ``window_blocks`` blocks if
    given) plus its ``local_blocks`` nearest blocks."""
    kv_len, block_k = _check_lengths(q_len, kv_len, block_q, block_k)
    if not isinstance(dilation, int) or dilation < 1:
        raise _err("dilation", "an int >= 1", dilation)
    if window_blocks is not None and (not isinstance(window_blocks, int) or window_blocks < 1):
        raise _err("window_blocks", "None or an int >= 1", window_blocks)
    if not isinstance(local_blocks, int) or local_blocks < 1:
        raise _err("local_blocks", "an int >= 1", local_blocks)
    nq, nk = _cdiv(q_len, block_q), _cdiv(kv_len, block_k)
    dev = device
    qb = torch.arange(nq, device=dev)[:, None]
    kb = torch.arange(nk, device=dev)[None, :]
    diag = ((qb * block_q + (kv_len - q_len)) // block_k)  # key block holding the diagonal of the first row
    dist = diag - kb
    sel = (dist.abs() < local_blocks) | (dist % dilation == 0)
    if causal:
        sel = sel & (dist >= -((block_q - 1) // block_k + 1))
    if window_blocks is not None:
        sel = sel & (dist.abs() < window_blocks)
    p = from_block_mask(sel[None, None], block_size=(block_q, block_k), q_len=q_len, kv_len=kv_len, causal=causal)
    return _expand_bh(p, batch, heads)


def strided_shards(q_len: int, heads: int, *, vert_stride: int = 8, local_blocks: int = 16,
                   kv_len: Optional[int] = None, head_offsets: Optional[Sequence[int]] = None,
                   block_size: int = 64, causal: bool = True, batch: int = 1, device=None) -> BlockPattern:
    """strided_shards (S2-Attention, arXiv 2407.17678): each head sees its ``local_blocks`` nearest key
    blocks plus every ``vert_stride``-th block with a head-specific offset; the offsets rotate
    across heads so that the union over heads covers every block of the context."""
    kv_len, _ = _check_lengths(q_len, kv_len, block_size, None)
    if not isinstance(heads, int) or heads < 1:
        raise _err("heads", "an int >= 1", heads)
    if not isinstance(vert_stride, int) or vert_stride < 1:
        raise _err("vert_stride", "an int >= 1", vert_stride)
    if not isinstance(local_blocks, int) or local_blocks < 0:
        raise _err("local_blocks", "an int >= 0", local_blocks)
    if head_offsets is None:  # DKernel: head_sliding_step = max(1, vert_stride // heads)
        step = max(1, vert_stride // heads)
        head_offsets = [(h * step) % vert_stride for h in range(heads)]
    if len(head_offsets) != heads:
        raise _err("head_offsets", f"{heads} values", len(head_offsets))
    nq, nk = _cdiv(q_len, block_size), _cdiv(kv_len, block_size)
    qb = torch.arange(nq, device=device)[:, None]
    kb = torch.arange(nk, device=device)[None, :]
    diag = (qb * block_size + (kv_len - q_len)) // block_size
    offs = torch.tensor(list(head_offsets), device=device)[:, None, None]
    sel = ((diag - kb)[None] < local_blocks) & ((diag - kb)[None] >= 0) | (((kb[None] + offs) % vert_stride) == 0)
    if not causal:
        sel = sel | (((diag - kb).abs() < local_blocks)[None])
    return _expand_bh(from_block_mask(sel[None], block_size=block_size, q_len=q_len, kv_len=kv_len, causal=causal),
                      batch, heads)


def vertical_slash(q_len: int, vertical: Tensor, slash: Tensor, kv_len: Optional[int] = None, *,
                   vertical_counts: Optional[Tensor] = None, slash_counts: Optional[Tensor] = None,
                   block_size: int = 64) -> BlockPattern:
    """vertical_slash (MInference, arXiv 2407.02490): key columns (vertical lines) plus diagonals
    (slash lines) per head, causal.

    Args:
        vertical: int ``[B, H, nv]``: key indices of vertical lines (any order; duplicates merged).
        slash: int ``[B, H, ns]``: diagonal offsets ``d = (i + off) - j >= 0`` of slash lines.
        vertical_counts, slash_counts: optional ``[B, H]`` numbers of valid entries (default all).
            Each of these four may also be a NumPy array or nested Python lists of ints.
        block_size: slash lines are covered by the key blocks they cross (block granularity,
            as MInference's kernel); verticals go through the column path exactly.
    """
    kv_len, _ = _check_lengths(q_len, kv_len, block_size, None)
    dev0 = next((t.device for t in (vertical, slash) if isinstance(t, Tensor)), None)
    vertical = _int_tensor("vertical", vertical, dev0)
    slash = _int_tensor("slash", slash, dev0)
    vertical_counts = None if vertical_counts is None else _int_tensor("vertical_counts", vertical_counts, dev0)
    slash_counts = None if slash_counts is None else _int_tensor("slash_counts", slash_counts, dev0)
    if vertical.dim() != 3:
        raise _err("vertical", "an int tensor [B, H, nv]", tuple(vertical.shape))
    if slash.dim() != 3 or slash.shape[:2] != vertical.shape[:2]:
        raise _err("slash", f"an int tensor [{vertical.shape[0]}, {vertical.shape[1]}, ns]", tuple(slash.shape))
    dev = vertical.device
    B, H = vertical.shape[:2]
    nq, nk = _cdiv(q_len, block_size), _cdiv(kv_len, block_size)
    off = kv_len - q_len
    ns = slash.shape[-1]
    s_valid = torch.ones_like(slash, dtype=torch.bool) if slash_counts is None else \
        torch.arange(ns, device=dev) < slash_counts[..., None]
    s = slash.long()
    if ((s < 0) | (s > q_len + off))[s_valid].any():
        raise _err("slash", f"diagonal offsets in [0, {q_len + off}]", "an offset out of range")
    # a diagonal d crosses, for query block qb, key columns [r0+off-d, r1+off-d]
    qb = torch.arange(nq, device=dev)
    r0 = qb * block_size
    r1 = torch.clamp((qb + 1) * block_size, max=q_len) - 1
    c_lo = (r0[None, None, :, None] + off - s[:, :, None, :])  # [B,H,nq,ns]
    c_hi = (r1[None, None, :, None] + off - s[:, :, None, :])
    c_lo = c_lo.clamp(min=0)
    ok = (c_hi >= 0) & (c_lo < kv_len) & s_valid[:, :, None, :]
    kb_lo = (c_lo // block_size).clamp(max=nk - 1)
    kb_hi = (c_hi.clamp(max=kv_len - 1) // block_size).clamp(min=0)
    sel = torch.zeros(B, H, nq, nk + 1, dtype=torch.bool, device=dev)
    drop = torch.full_like(kb_lo, nk)
    sel.scatter_(-1, torch.where(ok, kb_lo, drop), True)
    sel.scatter_(-1, torch.where(ok, kb_hi, drop), True)
    sel = sel[..., :nk]
    nv = vertical.shape[-1]
    v_valid = torch.ones_like(vertical, dtype=torch.bool) if vertical_counts is None else \
        torch.arange(nv, device=dev) < vertical_counts[..., None]
    v = vertical.long()
    if ((v < 0) | (v >= kv_len))[v_valid].any():
        raise _err("vertical", f"key indices in [0, {kv_len})", "an index out of range")
    vm = torch.zeros(B, H, kv_len + 1, dtype=torch.bool, device=dev)
    vm.scatter_(-1, torch.where(v_valid, v, torch.full_like(v, kv_len)), True)
    columns = TokenPattern.from_mask(vm[..., :kv_len], kv_len=kv_len)
    p = from_block_mask(sel, block_size=block_size, q_len=q_len, kv_len=kv_len, causal=True)
    return replace(p, columns=columns, _cache={})


def _int_tensor(name: str, x, device) -> Tensor:
    """An integer tensor from a tensor, a NumPy array or (nested) Python lists/tuples of ints."""
    if not isinstance(x, Tensor):
        try:
            x = torch.as_tensor(x, device=device)
        except (TypeError, ValueError, RuntimeError) as e:
            raise _err(name, "an integer tensor (or nested lists of ints)", f"{type(x).__name__} ({e})") from None
        if x.numel() == 0:  # torch.as_tensor([]) is float
            x = x.long()
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise _err(name, "an integer tensor (or nested lists of ints)", x.dtype)
    return x


def _neighborhood_window(pos: Tensor, n: int, k: int, dilation: int, is_causal: bool):
    """Start of the (clamped) neighborhood window of each position along one axis (NATTEN semantics)."""
    if is_causal:
        return pos - (k - 1) * dilation  # may be negative: positions < 0 are excluded by the caller
    # within each dilation group the positions form a sequence of length ceil((n - g)/dilation)
    g = pos % dilation
    idx = pos // dilation
    length = (n - g + dilation - 1) // dilation
    start = torch.clamp(idx - k // 2, min=0)
    start = torch.minimum(start, torch.clamp(length - k, min=0))
    return start * dilation + g


def _neighborhood_pred(rows: Tensor, cols: Tensor, shape: Sequence[int], kernel: Sequence[int],
                       dilation: Sequence[int], is_causal: Sequence[bool]) -> Tensor:
    ok = torch.ones(torch.broadcast_shapes(rows.shape, cols.shape), dtype=torch.bool, device=rows.device)
    rem_r, rem_c = rows, cols
    strides = [int(math.prod(shape[a + 1:])) for a in range(len(shape))]
    for a in range(len(shape)):
        pr = (rem_r // strides[a]) % shape[a]
        pc = (rem_c // strides[a]) % shape[a]
        start = _neighborhood_window(pr, shape[a], kernel[a], dilation[a], is_causal[a])
        d = pc - start
        okax = (d >= 0) & (d % dilation[a] == 0) & (d // dilation[a] < kernel[a]) & (pc % dilation[a] == pr % dilation[a])
        if is_causal[a]:
            okax = okax & (pc <= pr)
        ok = ok & okax
    return ok


def _neighborhood(shape: Sequence[int], kernel, dilation, is_causal, block_size, batch, heads, device):
    nd = len(shape)
    kernel = [kernel] * nd if isinstance(kernel, int) else list(kernel)
    dilation = [dilation] * nd if isinstance(dilation, int) else list(dilation)
    is_causal = [is_causal] * nd if isinstance(is_causal, bool) else list(is_causal)
    for name, vals in (("kernel_size", kernel), ("dilation", dilation)):
        if len(vals) != nd or any(not isinstance(v, int) or v < 1 for v in vals):
            raise _err(name, f"{nd} ints >= 1", vals)
    for a in range(nd):
        if kernel[a] * dilation[a] > shape[a]:
            raise _err("kernel_size", f"kernel_size * dilation <= {shape[a]} on axis {a}", kernel[a] * dilation[a])
    n = int(math.prod(shape))
    kv_len, block_k = _check_lengths(n, n, block_size, None)
    pred = lambda r, c: _neighborhood_pred(r, c, shape, kernel, dilation, is_causal)  # noqa: E731
    # block-level any: evaluate exactly on the blocks (n is moderate for vision / 1D NA use)
    nb = _cdiv(n, block_size)
    anyb = torch.zeros(nb, nb, dtype=torch.bool, device=device)
    fullb = torch.zeros(nb, nb, dtype=torch.bool, device=device)
    ar = torch.arange(block_size, device=device)
    for qb in range(nb):
        rows = (qb * block_size + ar)[:, None]
        cols = torch.arange(nb * block_size, device=device)[None, :]
        m = pred(rows, cols) & (rows < n) & (cols < n)
        mb = m.view(block_size, nb, block_size)
        anyb[qb] = mb.any(0).any(-1)
        valid = ((rows < n) & (cols < n)).view(block_size, nb, block_size)
        fullb[qb] = (mb | ~valid).all(0).all(-1) & anyb[qb]
    p = _from_predicate(pred, lambda *a: fullb, lambda *a: anyb, n, n, block_size, block_size, False, device)
    return _expand_bh(p, batch, heads)


def neighborhood_1d(length: int, kernel_size: int, *, dilation: int = 1, causal: bool = False,
                    block_size: int = 64, batch: int = 1, heads: int = 1, device=None) -> BlockPattern:
    """neighborhood_1d (Neighborhood Attention / NATTEN, arXiv 2403.04690): each query sees
    ``kernel_size`` keys spaced by ``dilation`` around it, the window clamped inward at the edges
    (causal: the latest ``kernel_size`` dilated positions up to itself)."""
    if not isinstance(length, int) or length < 1:
        raise _err("length", "an int >= 1", length)
    return _neighborhood([length], kernel_size, dilation, causal, block_size, batch, heads, device)


def neighborhood_2d(height: int, width: int, kernel_size, *, dilation=1, causal=False, block_size: int = 64,
                    batch: int = 1, heads: int = 1, device=None) -> BlockPattern:
    """neighborhood_2d (Neighborhood Attention / NATTEN, arXiv 2403.04690) on a row-major
    ``height x width`` token grid; ``kernel_size``, ``dilation``, ``causal`` per axis or shared."""
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or v < 1:
            raise _err(name, "an int >= 1", v)
    return _neighborhood([height, width], kernel_size, dilation, causal, block_size, batch, heads, device)


def neighborhood_3d(depth: int, height: int, width: int, kernel_size, *, dilation=1, causal=False,
                    block_size: int = 64, batch: int = 1, heads: int = 1, device=None) -> BlockPattern:
    """neighborhood_3d (Neighborhood Attention / NATTEN, arXiv 2403.04690) on a row-major
    ``depth x height x width`` token grid; ``kernel_size``, ``dilation``, ``causal`` per axis or shared."""
    for name, v in (("depth", depth), ("height", height), ("width", width)):
        if not isinstance(v, int) or v < 1:
            raise _err(name, "an int >= 1", v)
    return _neighborhood([depth, height, width], kernel_size, dilation, causal, block_size, batch, heads, device)


def from_block_mask(block_mask: Tensor, *, block_size, q_len: int, kv_len: Optional[int] = None,
                    causal: bool = False) -> BlockPattern:
    """from_block_mask: BlockPattern from a bool block mask ``[B or 1, H or 1, n_q_blocks, n_kv_blocks]``.

    Blocks crossing the diagonal (when ``causal``) or the sequence end are partial; the rest full.
    Blocks entirely above the diagonal are dropped. ``block_size`` is an int or ``(block_q, block_k)``.
    """
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    kv_len, bk = _check_lengths(q_len, kv_len, bq, bk)
    if not isinstance(block_mask, Tensor) or block_mask.dtype != torch.bool or block_mask.dim() != 4:
        raise _err("block_mask", "a bool tensor [B, H, n_q_blocks, n_kv_blocks]",
                   (getattr(block_mask, "dtype", type(block_mask)), tuple(getattr(block_mask, "shape", ()))))
    nq, nk = _cdiv(q_len, bq), _cdiv(kv_len, bk)
    if tuple(block_mask.shape[2:]) != (nq, nk):
        raise _err("block_mask", f"[..., {nq}, {nk}] blocks for q_len={q_len}, kv_len={kv_len}, block=({bq},{bk})",
                   tuple(block_mask.shape))
    dev = block_mask.device
    r0, r1, c0, c1 = _block_grid(q_len, kv_len, bq, bk, dev)
    sel = block_mask
    if causal:
        off = kv_len - q_len
        anyc = c0 <= r1 + off
        fullc = c1 <= r0 + off
        sel = sel & anyc
        full = sel & fullc
    else:
        full = sel.clone()
    part = sel & ~full
    fc, fi = _lists_from_sel(full)
    pc, pi = _lists_from_sel(part)
    return BlockPattern(pc, pi, fc, fi, bq, bk, q_len, kv_len, causal)


def from_topk_blocks(indices: Tensor, *, q_len: int, kv_len: Optional[int] = None, block_size=64,
                     causal: bool = True, counts: Optional[Tensor] = None) -> BlockPattern:
    """from_topk_blocks: BlockPattern from per-query-block key-block indices ``[B, H, nq, k]``
    (any order, duplicates and out-of-causal entries dropped); ``counts [B, H, nq]`` optional.

    Same pattern as ``from_block_mask`` of the selected blocks, built in ``O(nq * k log k)``
    without a ``[nq, n_kv_blocks]`` mask (the cost of index building at long contexts)."""
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    kv_len, bk = _check_lengths(q_len, kv_len, bq, bk)
    nq, nk = _cdiv(q_len, bq), _cdiv(kv_len, bk)
    if not isinstance(indices, Tensor) or indices.dim() != 4 or indices.shape[2] != nq:
        raise _err("indices", f"an int tensor [B, H, {nq}, k]", tuple(getattr(indices, "shape", ())))
    if indices.is_floating_point() or indices.dtype == torch.bool:
        raise _err("indices", "an integer tensor", indices.dtype)
    dev = indices.device
    idx = indices.long()
    valid = (idx >= 0) & (idx < nk)
    if counts is not None:
        valid = valid & (torch.arange(idx.shape[-1], device=dev) < counts[..., None])
    key = torch.where(valid, idx, nk).sort(dim=-1).values  # the only sort; duplicates now adjacent
    ok = key < nk
    if key.shape[-1] > 1:
        ok[..., 1:] &= key[..., 1:] != key[..., :-1]
    kb = key.clamp(max=max(nk - 1, 0))
    qb = torch.arange(nq, device=dev)[:, None]
    r0, r1 = qb * bq, torch.clamp((qb + 1) * bq, max=q_len) - 1
    c0, c1 = kb * bk, torch.clamp((kb + 1) * bk, max=kv_len) - 1
    if causal:
        off = kv_len - q_len
        ok = ok & (c0 <= r1 + off)
        full = ok & (c1 <= r0 + off)
    else:
        full = ok
    fc, fi = _compact_sorted(key, full)
    pc, pi = _compact_sorted(key, ok & ~full)
    return BlockPattern(pc, pi, fc, fi, bq, bk, q_len, kv_len, causal)


def _compact_sorted(key: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """The ``keep`` entries of ascending ``key [..., k]`` moved to the front, order kept ->
    (counts int32, int32 lists ``[..., max(count, 1)]`` padded with 0), as ``_lists_from_sel``."""
    counts = keep.sum(-1, dtype=torch.int32)
    max_n = max(int(counts.max()) if counts.numel() else 0, 1)
    out = torch.zeros(*key.shape[:-1], max_n + 1, dtype=torch.int32, device=key.device)
    if key.shape[-1]:
        slot = torch.where(keep, keep.cumsum(-1) - 1, max_n)
        out.scatter_(-1, slot, key.to(torch.int32))
    return counts.contiguous(), out[..., :max_n].contiguous()


def from_dense_mask(mask: Tensor, *, block_size=64, causal: bool = False) -> BlockPattern:
    """from_dense_mask: BlockPattern computing exactly a bool element mask ``[B, H, q_len, kv_len]``
    (quadratic: for tests and small inputs). Element tiles of partial blocks go to the mask bank.
    With ``causal=True`` the mask is also ANDed with the causal mask."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 4:
        raise _err("mask", "a bool tensor [B, H, q_len, kv_len]", getattr(mask, "shape", type(mask)))
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    B, H, q_len, kv_len = mask.shape
    kv_len, bk = _check_lengths(q_len, kv_len, bq, bk)
    nq, nk = _cdiv(q_len, bq), _cdiv(kv_len, bk)
    dev = mask.device
    m = mask
    i = torch.arange(q_len, device=dev)[:, None]
    j = torch.arange(kv_len, device=dev)[None, :]
    valid = torch.ones(q_len, kv_len, dtype=torch.bool, device=dev)
    if causal:
        valid = j <= i + (kv_len - q_len)
        m = m & valid
    pad = torch.zeros(B, H, nq * bq, nk * bk, dtype=torch.bool, device=dev)
    pad[:, :, :q_len, :kv_len] = m
    vpad = torch.zeros(nq * bq, nk * bk, dtype=torch.bool, device=dev)
    vpad[:q_len, :kv_len] = valid
    tiles = pad.view(B, H, nq, bq, nk, bk).permute(0, 1, 2, 4, 3, 5)
    vt = vpad.view(nq, bq, nk, bk).permute(0, 2, 1, 3)
    anyb = tiles.any(-1).any(-1)
    fullb = (tiles | ~vt).all(-1).all(-1) & anyb
    if causal:  # full blocks must not cross the diagonal (they are computed without element mask)
        r0, r1, c0, c1 = _block_grid(q_len, kv_len, bq, bk, dev)
        fullb = fullb & (c1 <= r0 + (kv_len - q_len))
    part = anyb & ~fullb
    b, h, q, k = part.nonzero(as_tuple=True)
    return _assemble(fullb, part, (b, h, q, k), tiles[b, h, q, k], bq, bk, q_len, kv_len, causal)


def from_flex_block_mask(block_mask, *, causal: bool = False) -> BlockPattern:
    """from_flex_block_mask: BlockPattern from a FlexAttention ``BlockMask``; the ``mask_mod`` is
    evaluated on the partial blocks only (with ``torch.vmap``) and stored as bank tiles."""
    bq, bk = block_mask.BLOCK_SIZE
    q_len, kv_len = block_mask.seq_lengths
    kvn, kvi = block_mask.kv_num_blocks.to(torch.int32), block_mask.kv_indices.to(torch.int32)
    fn = block_mask.full_kv_num_blocks
    fi = block_mask.full_kv_indices
    nk = _cdiv(kv_len, bk)
    nq = _cdiv(q_len, bq)
    kvn, kvi = kvn[:, :, :nq], kvi[:, :, :nq]
    part = _sel_from_lists(kvn, kvi.clamp(0, nk), nk)
    full = _sel_from_lists(fn.to(torch.int32)[:, :, :nq], fi.to(torch.int32)[:, :, :nq].clamp(0, nk), nk) if fn is not None \
        else torch.zeros_like(part)
    part = part & ~full
    b, h, q, k = part.nonzero(as_tuple=True)
    dev = part.device
    tiles = None
    if b.numel():
        mm = block_mask.mask_mod
        rows = q[:, None, None] * bq + torch.arange(bq, device=dev)[None, :, None]
        cols = k[:, None, None] * bk + torch.arange(bk, device=dev)[None, None, :]
        f = torch.vmap(torch.vmap(torch.vmap(mm, in_dims=(None, None, None, 0)), in_dims=(None, None, 0, None)),
                       in_dims=(0, 0, 0, 0))
        tiles = f(b, h, rows[:, :, 0], cols[:, 0, :]).to(torch.bool)
    if causal:
        r0, r1, c0, c1 = _block_grid(q_len, kv_len, bq, bk, dev)
        crossing = full & ~(c1 <= r0 + (kv_len - q_len))
        if crossing.any():
            raise ValueError("block_mask: a full block crosses the causal diagonal; pass causal=False "
                             "or a BlockMask whose diagonal blocks are partial")
    return _assemble(full, part, (b, h, q, k), tiles, bq, bk, q_len, kv_len, causal)


# ----------------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------------


def plot(pattern, path, *, heads: Optional[Sequence[int]] = None, batch: int = 0, max_px: int = 512,
         title: Optional[str] = None):
    """plot: write a PNG of the pattern's element mask per head (block view for long sequences).

    For ``q_len, kv_len <= max_px`` every pixel is one (query, key) pair; otherwise each pixel is
    one block, shaded by its kind (full, partial) and columns are drawn as lines.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if isinstance(pattern, TokenPattern):
        img = pattern.to_token_mask()[batch].float().cpu()
        fig, ax = plt.subplots(figsize=(8, 0.3 * img.shape[0] + 1))
        ax.imshow(img, aspect="auto", interpolation="nearest", cmap="Blues")
        ax.set_xlabel("key position")
        ax.set_ylabel("head")
        ax.set_title(title or f"TokenPattern density={pattern.density:.3f}")
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return path
    if not isinstance(pattern, BlockPattern):
        raise _err("pattern", "a BlockPattern or TokenPattern", type(pattern))
    H = pattern.heads
    heads = list(range(min(H, 8))) if heads is None else list(heads)
    for h in heads:
        if not 0 <= h < H:
            raise _err("heads", f"indices in [0, {H})", h)
    small = pattern.q_len <= max_px and pattern.kv_len <= max_px
    ncol = min(4, len(heads))
    nrow = _cdiv(len(heads), ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 3.2 * nrow), squeeze=False)
    b = min(batch, pattern.batch - 1)
    if small:
        mask = pattern.to_dense_mask()[b].float().cpu()
    else:
        full = pattern.full_sel()[b].float().cpu()
        part = pattern.partial_sel()[b].float().cpu()
        mask = full + 0.5 * part
    for n, h in enumerate(heads):
        ax = axes[n // ncol][n % ncol]
        ax.imshow(mask[h], cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        if not small and pattern.columns is not None:
            ch = h if pattern.columns.heads == H else 0
            cb = min(b, pattern.columns.batch - 1)
            cols = pattern.columns.indices[cb, ch, : int(pattern.columns.counts[cb, ch])].cpu()
            for c in cols[:2000]:
                ax.axvline(float(c) / pattern.block_k, color="orange", lw=0.3, alpha=0.5)
        ax.set_title(f"head {h}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for n in range(len(heads), nrow * ncol):
        axes[n // ncol][n % ncol].axis("off")
    unit = "element" if small else f"block {pattern.block_q}x{pattern.block_k} (dark=full, light=partial)"
    fig.suptitle(title or f"{unit}; density {pattern.density:.3f}", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
