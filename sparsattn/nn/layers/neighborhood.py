"""neighborhood: 1-D / 2-D / 3-D neighborhood attention with dilation and causal variants, fused
through the block-sparse kernel (Faster Neighborhood Attention, Hassani et al., arXiv 2403.04690;
Neighborhood Attention Transformer, arXiv 2204.07143)."""
from __future__ import annotations

from collections import OrderedDict

import torch

from ...patterns import neighborhood_1d, neighborhood_2d, neighborhood_3d
from ..base import Layer, attend, register_layer
from ._util import QKVOut, check_bool, check_dim_heads, check_int


def _per_axis(name: str, v, nd: int, kind):
    vals = [v] * nd if isinstance(v, kind) and not (kind is int and isinstance(v, bool)) else v
    if not isinstance(vals, (list, tuple)) or len(vals) != nd:
        raise ValueError(f"{name}: expected one value or {nd} values (one per axis), got {v!r}")
    for x in vals:
        if kind is int and (isinstance(x, bool) or not isinstance(x, int) or x < 1):
            raise ValueError(f"{name}: expected ints >= 1, got {v!r}")
        if kind is bool and not isinstance(x, bool):
            raise ValueError(f"{name}: expected True/False per axis, got {v!r}")
    return tuple(vals)


@register_layer("neighborhood")
class NeighborhoodAttention(Layer):
    """NeighborhoodAttention: each query attends to its ``kernel_size`` nearest (dilated) neighbours
    per axis, run as one block-sparse kernel call (Faster Neighborhood Attention, arXiv 2403.04690).

    Input: ``x [B, T, dim]`` (``spatial_dims=1``), ``[B, H, W, dim]`` (``spatial_dims=2``, the
    default; row-major tokens) or ``[B, D, H, W, dim]`` (``spatial_dims=3``); output has the shape
    of ``x``. ``kernel_size``, ``dilation`` and ``causal`` are one value or one per axis. The
    instance's ``layout`` is ``"1d"`` for ``spatial_dims=1`` (sequences: the harness feeds
    ``[B, T, dim]``), else ``"2d"``.

    Semantics (NATTEN's): per axis a window of ``kernel_size`` positions spaced by ``dilation``
    centred on the query and clamped inward at the borders (every query sees exactly
    ``kernel_size`` keys per axis); causal axes see the latest ``kernel_size`` dilated positions up
    to the query. ``kernel_size * dilation`` must not exceed an axis length.

    Hyper-parameters (defaults: NAT / NATTEN's common setting): ``kernel_size=7``, ``dilation=1``,
    ``causal=False``; ``block_size=64`` is a performance knob (the kernel's tile), no semantics.

    How the fused kernel is formed: the neighbourhood mask is a ``BlockPattern``
    (``patterns.neighborhood_1d/2d/3d``): tiles entirely inside every neighbourhood are full
    blocks, edge tiles are partial blocks with a deduplicated element tile; the pattern is built
    once per (shape, device) and cached. NATTEN instead tiles queries by their spatial rank and
    loads a haloed KV tile; here tiles are contiguous in row-major token order, so a 2-D tile of
    64 tokens spans whole rows (more partial tiles on wide maps; the result is the same).

    Differences from the paper kept: no relative positional bias (NAT's ``rpb``): the block-sparse
    kernel adds no bias, so position must come from the model (positional embeddings); q/k/v
    projections are bias-free; the newer ``stride`` (generalised NA) is not offered.
    """

    paper = "Faster Neighborhood Attention: Reducing the O(n^2) Cost of Self Attention at the Threadblock Level, arXiv 2403.04690"
    kind = "sparse"
    layout = "2d"
    causal_modes = (False, True)
    content_based = False
    presets = {"default": {}, "mqar": {"spatial_dims": 1, "kernel_size": 15, "causal": True},
               "listops": {"spatial_dims": 1, "kernel_size": 31}, "pathfinder": {"kernel_size": 7}}

    def __init__(self, dim: int, heads: int, kernel_size=7, dilation=1, causal=False, spatial_dims: int = 2,
                 block_size: int = 64):
        super().__init__()
        check_dim_heads(dim, heads)
        for name, v in (("kernel_size", kernel_size), ("dilation", dilation)):
            vals = v if isinstance(v, (list, tuple)) else [v]
            if not vals or len(vals) > 3 or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in vals):
                raise ValueError(f"{name}: expected an int >= 1 or 1..3 of them (per axis), got {v!r}")
        cv = causal if isinstance(causal, (list, tuple)) else [causal]
        if not cv or len(cv) > 3 or any(not isinstance(x, bool) for x in cv):
            raise ValueError(f"causal: expected True/False or 1..3 of them (per axis), got {causal!r}")
        if spatial_dims not in (1, 2, 3) or isinstance(spatial_dims, bool):
            raise ValueError(f"spatial_dims: expected 1, 2 or 3, got {spatial_dims!r}")
        for name, v in (("kernel_size", kernel_size), ("dilation", dilation), ("causal", causal)):
            if isinstance(v, (list, tuple)) and len(v) != spatial_dims:
                raise ValueError(f"{name}: expected one value or {spatial_dims} (spatial_dims), got {v!r}")
        check_int("block_size", block_size, 16)
        if block_size & (block_size - 1):
            raise ValueError(f"block_size: expected a power of two >= 16, got {block_size}")
        self.dim, self.heads, self.spatial_dims = dim, heads, spatial_dims
        self.layout = "1d" if spatial_dims == 1 else "2d"
        self.kernel_size, self.dilation, self.causal, self.block_size = kernel_size, dilation, causal, block_size
        self.proj = QKVOut(dim, heads)
        self._patterns: "OrderedDict[tuple, object]" = OrderedDict()

    def pattern(self, shape: tuple, device):
        """The neighbourhood ``BlockPattern`` for a token grid ``shape`` (1-3 axes), cached."""
        nd = len(shape)
        ks = _per_axis("kernel_size", self.kernel_size, nd, int)
        dl = _per_axis("dilation", self.dilation, nd, int)
        cs = _per_axis("causal", self.causal, nd, bool)
        key = (tuple(shape), ks, dl, cs, str(device))
        p = self._patterns.get(key)
        if p is None:
            for a in range(nd):
                if ks[a] * dl[a] > shape[a]:
                    raise ValueError(f"kernel_size: kernel_size * dilation = {ks[a] * dl[a]} exceeds the input's "
                                     f"axis {a} of length {shape[a]}")
            kw = dict(dilation=list(dl), causal=list(cs), block_size=self.block_size, device=device)
            if nd == 1:
                p = neighborhood_1d(shape[0], ks[0], dilation=dl[0], causal=cs[0], block_size=self.block_size,
                                    device=device)
            elif nd == 2:
                p = neighborhood_2d(*shape, list(ks), **kw)
            else:
                p = neighborhood_3d(*shape, list(ks), **kw)
            self._patterns[key] = p
            if len(self._patterns) > 8:
                self._patterns.popitem(last=False)
        return p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[B, T, dim]``, ``[B, H, W, dim]`` or ``[B, D, H, W, dim]`` (by ``spatial_dims``) -> same shape."""
        nd = self.spatial_dims
        what = ("[B, T, dim]", "[B, H, W, dim]", "[B, D, H, W, dim]")[nd - 1]
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != nd + 2 \
                or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected a floating tensor {what} with dim={self.dim} (spatial_dims={nd}), "
                             f"got {getattr(x, 'shape', type(x))}")
        shape = tuple(x.shape[1:-1])
        B = x.shape[0]
        q, k, v = self.proj.split(x.reshape(B, -1, self.dim))
        o = attend(q, k, v, self.pattern(shape, x.device))
        return self.proj.merge(o).view(x.shape)

    def cost(self, T: int) -> dict:
        """Density (computed pairs / causal pairs when every axis is causal, else / all pairs) and
        FLOPs of the neighbourhood pattern at ``T`` tokens (2-D/3-D: a square/cubic grid)."""
        check_int("T", T)
        side = round(T ** (1.0 / self.spatial_dims))
        if side ** self.spatial_dims != T:
            raise ValueError(f"T: expected a {self.spatial_dims}-th power (a square/cubic grid), got {T}")
        p = self.pattern((side,) * self.spatial_dims, "cpu")
        pairs = float(p.to_dense_mask().sum())
        all_causal = all(_per_axis("causal", self.causal, self.spatial_dims, bool))
        total = T * (T + 1) / 2 if all_causal else float(T * T)
        return {"density": pairs / total, "flops": 4.0 * pairs * self.dim}
