"""ShardLayout: how one sequence is split over the ranks of a context-parallel group (contiguous or
zigzag), and helpers that shard / unshard a full tensor (Ring Attention, arXiv 2310.01889; the
zigzag split balances causal work as in Striped Attention, arXiv 2311.09431).

The sequence of ``seq_len`` tokens is cut into *units* of ``unit`` tokens (a multiple of the
pattern's block sizes, so every shard starts on a block boundary), the units into chunks:

* ``"contiguous"``: ``world`` chunks, rank ``r`` holds chunk ``r``;
* ``"zigzag"``: ``2 * world`` chunks, rank ``r`` holds chunks ``r`` and ``2 * world - 1 - r`` (so
  under a causal mask every rank has one cheap early chunk and one expensive late chunk).

Chunks differ by at most one unit (the first ones get the extra units); a chunk may be empty when
the sequence is short, and the last non-empty chunk may end with a partial unit. The chunk holding
the end of the sequence is always the last chunk of its rank, so every rank's shard is block
aligned except possibly at its own end (the kernels handle a partial last block).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

LAYOUTS = ("contiguous", "zigzag")


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


@dataclass(frozen=True)
class ShardLayout:
    """ShardLayout: the split of ``seq_len`` tokens over ``world`` ranks (see the module docstring).

    Args:
        seq_len: total tokens of the sequence (>= 0).
        world: number of ranks (>= 1).
        kind: ``"contiguous"`` or ``"zigzag"``.
        unit: tokens per indivisible unit (a power of two >= 16; use the pattern's largest block).
    """

    seq_len: int
    world: int
    kind: str = "zigzag"
    unit: int = 128

    def __post_init__(self):
        if not isinstance(self.seq_len, int) or self.seq_len < 0:
            raise ValueError(f"seq_len: expected an int >= 0, got {self.seq_len!r}")
        if not isinstance(self.world, int) or self.world < 1:
            raise ValueError(f"world: expected an int >= 1, got {self.world!r}")
        if self.kind not in LAYOUTS:
            raise ValueError(f"layout: expected one of {LAYOUTS}, got {self.kind!r}")
        if not isinstance(self.unit, int) or self.unit < 16 or self.unit & (self.unit - 1):
            raise ValueError(f"unit: expected a power of two >= 16, got {self.unit!r}")

    @property
    def n_chunks(self) -> int:
        """Number of chunks: ``world`` (contiguous) or ``2 * world`` (zigzag)."""
        return self.world if self.kind == "contiguous" else 2 * self.world

    def chunk_bounds(self) -> list[tuple[int, int]]:
        """Token range ``(start, end)`` of every chunk, in sequence order."""
        n_units = _cdiv(self.seq_len, self.unit)
        base, rem = divmod(n_units, self.n_chunks)
        out, u = [], 0
        for c in range(self.n_chunks):
            nu = base + (1 if c < rem else 0)
            out.append((min(u * self.unit, self.seq_len), min((u + nu) * self.unit, self.seq_len)))
            u += nu
        return out

    def rank_chunks(self, rank: int) -> list[int]:
        """Chunk ids held by ``rank``, in the rank's local order."""
        if not 0 <= rank < self.world:
            raise ValueError(f"rank: expected 0 <= rank < {self.world}, got {rank}")
        if self.kind == "contiguous":
            return [rank]
        return [rank, 2 * self.world - 1 - rank]

    def rank_ranges(self, rank: int) -> list[tuple[int, int]]:
        """Global token ranges ``(start, end)`` held by ``rank``, in local order (empty ones kept)."""
        b = self.chunk_bounds()
        return [b[c] for c in self.rank_chunks(rank)]

    def rank_len(self, rank: int) -> int:
        """Number of tokens held by ``rank``."""
        return sum(z - a for a, z in self.rank_ranges(rank))

    def positions(self, rank: int, device=None) -> torch.Tensor:
        """Global token positions (int64) of ``rank``'s local tokens, in local order."""
        parts = [torch.arange(a, z, device=device) for a, z in self.rank_ranges(rank)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)

    def blocks(self, rank: int, block: int, device=None) -> torch.Tensor:
        """Global block ids (int64, block size ``block`` dividing ``unit``) of ``rank``'s tokens, in
        local order; local block ``i`` of the rank's shard is global block ``blocks[i]``."""
        if block > self.unit or self.unit % block:
            raise ValueError(f"block: expected a divisor of the layout unit {self.unit}, got {block}")
        parts = [torch.arange(a // block, _cdiv(z, block), device=device) for a, z in self.rank_ranges(rank) if z > a]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)

    def order(self, device=None) -> torch.Tensor:
        """Global positions of the concatenation of all ranks' shards (rank 0 first): position
        ``i`` of that concatenation is global token ``order[i]``."""
        return torch.cat([self.positions(r, device) for r in range(self.world)])


def make_layout(layout, seq_len: int, world: int, unit: int) -> ShardLayout:
    """A ShardLayout from a name (``"contiguous"``/``"zigzag"``) or a ShardLayout (checked against
    ``seq_len``, ``world`` and ``unit``: its unit must be a multiple of ``unit``)."""
    if isinstance(layout, ShardLayout):
        if layout.seq_len != seq_len or layout.world != world:
            raise ValueError(f"layout: expected seq_len={seq_len}, world={world}, got "
                             f"seq_len={layout.seq_len}, world={layout.world}")
        if layout.unit % unit:
            raise ValueError(f"layout.unit: expected a multiple of the pattern's block size {unit}, got {layout.unit}")
        return layout
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS} or a ShardLayout, got {layout!r}")
    return ShardLayout(seq_len, world, layout, unit)


def shard(x: torch.Tensor, layout: ShardLayout, rank: int, dim: int = 2) -> torch.Tensor:
    """shard: the part of the full tensor ``x`` (tokens along ``dim``) that ``rank`` holds."""
    if x.shape[dim] != layout.seq_len:
        raise ValueError(f"x: expected {layout.seq_len} tokens in dim {dim}, got shape {tuple(x.shape)}")
    parts = [x.narrow(dim, a, z - a) for a, z in layout.rank_ranges(rank)]
    return torch.cat(parts, dim)


def unshard(shards: Sequence[torch.Tensor], layout: ShardLayout, dim: int = 2) -> torch.Tensor:
    """unshard: the full tensor from every rank's shard (``shards[r]`` held by rank ``r``)."""
    if len(shards) != layout.world:
        raise ValueError(f"shards: expected {layout.world} tensors (one per rank), got {len(shards)}")
    pieces: list[tuple[int, torch.Tensor]] = []
    for r, s in enumerate(shards):
        if s.shape[dim] != layout.rank_len(r):
            raise ValueError(f"shards[{r}]: expected {layout.rank_len(r)} tokens in dim {dim}, got {s.shape[dim]}")
        off = 0
        for a, z in layout.rank_ranges(r):
            pieces.append((a, s.narrow(dim, off, z - a)))
            off += z - a
    pieces.sort(key=lambda t: t[0])
    return torch.cat([p for _, p in pieces], dim)
