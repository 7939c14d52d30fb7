"""halo: blocked local self-attention with halos on 2-D feature maps (HaloNets: Scaling Local
Self-Attention for Parameter Efficient Visual Backbones, Vaswani et al., arXiv 2103.12731)."""
from __future__ import annotations

from collections import OrderedDict

import torch

from ...patterns import from_dense_mask
from ..base import Layer, attend, register_layer
from ._util import QKVOut, check_dim_heads, check_input, check_int, gather_slots, next_pow2, region_order, scatter_slots


@register_layer("halo")
class HaloAttention(Layer):
    """HaloAttention: blocked local attention with halos, run as one block-sparse kernel call
    (HaloNets, arXiv 2103.12731).

    Input ``x [B, H, W, dim]`` -> ``[B, H, W, dim]``. The map is split into non-overlapping
    ``block x block`` query blocks (the last row/column of blocks is cut by the map's border when
    ``H`` or ``W`` is not a multiple of ``block``); every query of a block attends to the
    ``(block + 2 halo)^2`` window around its block (the block plus ``halo`` pixels on each side),
    clipped to the map.

    Hyper-parameters (the paper's models): ``block=8``, ``halo=3`` (a 14x14 window).

    How it runs: tokens are reordered block-major so that a query block is one kernel tile of
    ``next_pow2(block^2)`` slots (64 for block 8; smaller blocks' spare slots are padding); the
    key tiles are the neighbouring blocks within ``ceil(halo / block)`` rings, with element tiles
    that cut them to the halo window (deduplicated by ``patterns.from_dense_mask``: 9 distinct
    tiles plus borders). The pattern is built once per (H, W, device) and cached.

    Differences from the paper kept:
      * no relative position embeddings (the paper uses factorised 2-D relative logits): the
        block-sparse kernel adds no bias; position must come from the model's embeddings;
      * window pixels outside the map are excluded from the softmax (lucidrains' halonet-pytorch
        masks them too); the paper zero-pads;
      * only the attention layer: no attention-based downsampling (strided query pooling), no
        bottleneck block around it; q/k/v projections are bias-free.
    """

    paper = "Scaling Local Self-Attention for Parameter Efficient Visual Backbones (HaloNets), arXiv 2103.12731"
    kind = "sparse"
    layout = "2d"
    causal_modes = (False,)
    content_based = False
    #: Pathfinder-32: the paper's 14x14 window (density 0.19); the reduced 16x16 images: an 8x8 window
    #: (the same density, 0.19), not a 14x14 one that would cover 77% of a 16x16 map
    presets = {"default": {}, "pathfinder": {"block": 8, "halo": 3}, "pathfinder:256": {"block": 4, "halo": 2}}

    def __init__(self, dim: int, heads: int, block: int = 8, halo: int = 3):
        super().__init__()
        check_dim_heads(dim, heads)
        check_int("block", block, 1)
        check_int("halo", halo, 0)
        if block * block > 4096:
            raise ValueError(f"block: expected block * block <= 4096 tokens (one kernel tile), got {block}")
        self.dim, self.heads, self.block, self.halo = dim, heads, block, halo
        self.slot, self.tile = block * block, next_pow2(block * block)
        self.proj = QKVOut(dim, heads)
        self._cache: "OrderedDict[tuple, tuple]" = OrderedDict()

    def mask(self, H: int, W: int, device) -> torch.Tensor:
        """Element mask ``[H*W, H*W]`` in row-major token order (query row, key column): the halo
        windows (for tests and pictures; the forward uses the block-major pattern)."""
        r = torch.arange(H, device=device)
        c = torch.arange(W, device=device)
        b, h = self.block, self.halo
        okr = ((r[:, None] // b) * b - h <= r[None, :]) & (r[None, :] < (r[:, None] // b) * b + b + h)
        okc = ((c[:, None] // b) * b - h <= c[None, :]) & (c[None, :] < (c[:, None] // b) * b + b + h)
        return (okr[:, None, :, None] & okc[None, :, None, :]).reshape(H * W, H * W)

    def _layout(self, H: int, W: int, device):
        key = (H, W, str(device))
        hit = self._cache.get(key)
        if hit is None:
            src, _, _ = region_order(H, W, self.block, self.block, device)
            nR = src.numel() // self.slot
            slots = src.view(nR, self.slot)
            slots = torch.cat([slots, slots.new_full((nR, self.tile - self.slot), -1)], 1).reshape(-1)
            m = self.mask(H, W, device)
            real = slots >= 0
            s = slots.clamp(min=0)
            full = m[s][:, s] & real[:, None] & real[None, :]
            pat = from_dense_mask(full[None, None], block_size=self.tile)
            hit = (src, pat)
            self._cache[key] = hit
            if len(self._cache) > 8:
                self._cache.popitem(last=False)
        return hit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[B, H, W, dim]`` -> ``[B, H, W, dim]``."""
        check_input(x, 4, self.dim, "[B, H, W, dim]")
        B, H, W, _ = x.shape
        src, pat = self._layout(H, W, x.device)
        xs = gather_slots(x.reshape(B, H * W, self.dim), src, self.slot, self.tile)
        q, k, v = self.proj.split(xs)
        o = attend(q, k, v, pat)
        y = self.proj.merge(o)
        return scatter_slots(y, src, self.slot, self.tile, H * W).view(B, H, W, self.dim)

    def cost(self, T: int) -> dict:
        """Density (computed pairs / all pairs of real tokens) and FLOPs at ``T`` pixels of a square map."""
        check_int("T", T)
        side = int(round(T ** 0.5))
        if side * side != T:
            raise ValueError(f"T: expected a square number of pixels, got {T}")
        pairs = float(self.mask(side, side, "cpu").sum())
        return {"density": pairs / (T * T), "flops": 4.0 * pairs * self.dim}
