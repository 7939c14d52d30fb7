"""TokenPattern: per (batch, head) sorted token or page indices with counts (decode, columns)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import torch

from ._util import Tensor, _cdiv, _err, list_width


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
        max_n = list_width(counts, n)
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
