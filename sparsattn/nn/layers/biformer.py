"""biformer: bi-level routing attention (BiFormer: Vision Transformer with Bi-Level Routing
Attention, Zhu et al., arXiv 2303.08801), 2-D, with a 1-D form for sequences."""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..base import Layer, attend, register_layer
from ._util import (QKVOut, check_bool, check_dim_heads, check_float, check_input, check_int, gather_slots, mask_pattern, next_pow2,
                    region_order, routed_pattern, scatter_slots, slot_tiles)


@register_layer("biformer")
class BiLevelRoutingAttention(Layer):
    """BiLevelRoutingAttention: region-to-region top-k routing, then token attention over the
    tokens of the routed regions, plus a depth-wise convolution on V (BiFormer, arXiv 2303.08801).

    Input ``x [B, H, W, dim]`` (``spatial_dims=2``, the paper's) or ``x [B, T, dim]``
    (``spatial_dims=1``); output has the shape of ``x``.

    Algorithm (per image, the routing shared by all heads as in the paper):
      1. q, k, v projections (q/k width ``qk_dim``, default ``dim``);
      2. the map is cut into ``n_win x n_win`` regions (``region_size`` tokens per side instead when
         given); region queries/keys = the means of q/k over each region's tokens;
      3. region affinity ``(q_r * qk_scale) k_r^T``; every region keeps its ``topk`` regions
         (non-differentiable, as the paper's default ``diff_routing=False``);
      4. every query of a region attends to all tokens of its routed regions: one block-sparse
         kernel call, tokens reordered region-major so that a region is one kernel tile of
         ``next_pow2(region tokens)`` slots (spare slots masked by an element tile);
      5. LCE: a depth-wise ``side_dwconv x side_dwconv`` convolution of V is added before the output
         projection.

    Hyper-parameters (paper / code defaults): ``n_win=7``, ``topk=4`` (BiFormer-T uses 1, 4, 16 and
    full per stage), ``qk_scale = qk_dim ** -0.5`` (the code's scale: the whole q/k width, also
    for the token attention), ``side_dwconv=5``, ``bias=True`` (the code's q/k/v bias).

    1-D form (``spatial_dims=1``, for sequences such as MQAR): regions are runs of ``region_size``
    tokens (default ``ceil(T / n_win)``). Non-causal: exactly the 2-D algorithm on a 1 x T map.
    Causal (``causal=True``): a region-mean query would let later tokens of a region steer which
    blocks its earlier tokens read (a leak of the future), so each *token* routes instead: token t
    scores the mean keys of the complete regions before its own and keeps the ``topk`` best, and
    always sees its own region causally (a local window). The union is one token-level mask run
    through the block-sparse kernel (``_util.mask_pattern``: quadratic mask building, fine at
    MQAR lengths). The LCE convolution is causal (left-padded) there.

    Differences from the paper kept: a map whose side is not a multiple of the region side gets
    cut border regions whose missing tokens are excluded (the code's ``auto_pad`` zero-pads and
    lets padded tokens take part); no kv down-sampling modes (the paper's default is identity);
    no ``param_routing``/``soft_routing`` options (off in the paper's models).
    """

    paper = "BiFormer: Vision Transformer with Bi-Level Routing Attention, arXiv 2303.08801"
    kind = "sparse"
    layout = "2d"
    causal_modes = (False, True)
    content_based = True
    presets = {"default": {},
               "pathfinder": {"n_win": 8, "topk": 16},
               "mqar": {"spatial_dims": 1, "region_size": 16, "topk": 2, "causal": True},
               "listops": {"spatial_dims": 1, "region_size": 16, "topk": 2}}

    def __init__(self, dim: int, heads: int, n_win: int = 7, topk: int = 4, region_size: Optional[int] = None,
                 qk_dim: Optional[int] = None, qk_scale: Optional[float] = None, side_dwconv: int = 5,
                 spatial_dims: int = 2, causal: bool = False, bias: bool = True):
        super().__init__()
        check_dim_heads(dim, heads)
        check_int("n_win", n_win)
        check_int("topk", topk)
        if region_size is not None:
            check_int("region_size", region_size)
        qk_dim = dim if qk_dim is None else check_int("qk_dim", qk_dim)
        if qk_dim % heads:
            raise ValueError(f"qk_dim: expected a multiple of heads={heads}, got {qk_dim}")
        if qk_scale is not None:
            check_float("qk_scale", qk_scale, 0.0, 1e6, lo_open=True)
        check_int("side_dwconv", side_dwconv, 0)
        if side_dwconv and side_dwconv % 2 == 0:
            raise ValueError(f"side_dwconv: expected 0 or an odd kernel size, got {side_dwconv}")
        if spatial_dims not in (1, 2) or isinstance(spatial_dims, bool):
            raise ValueError(f"spatial_dims: expected 1 or 2, got {spatial_dims!r}")
        check_bool("causal", causal)
        check_bool("bias", bias)
        if causal and spatial_dims != 1:
            raise ValueError("causal: only the 1-D form (spatial_dims=1) has a causal variant")
        self.dim, self.heads, self.n_win, self.topk, self.region_size = dim, heads, n_win, topk, region_size
        self.qk_dim, self.spatial_dims, self.causal = qk_dim, spatial_dims, causal
        self.scale = qk_dim ** -0.5 if qk_scale is None else float(qk_scale)
        self.layout = "1d" if spatial_dims == 1 else "2d"
        self.proj = QKVOut(dim, heads, qk_dim=qk_dim, bias=bias)
        self.side_dwconv = side_dwconv
        conv = nn.Conv1d if spatial_dims == 1 else nn.Conv2d
        self.lepe = conv(dim, dim, side_dwconv, padding=0 if causal else side_dwconv // 2, groups=dim) \
            if side_dwconv else None
        self._cache: "OrderedDict[tuple, tuple]" = OrderedDict()

    # -- geometry -----------------------------------------------------------------------------------
    def _regions(self, H: int, W: int) -> tuple[int, int]:
        if self.spatial_dims == 1:
            return 1, (self.region_size or -(-W // self.n_win))
        if self.region_size:
            return self.region_size, self.region_size
        return -(-H // self.n_win), -(-W // self.n_win)

    def _layout(self, H: int, W: int, device):
        key = (H, W, str(device))
        hit = self._cache.get(key)
        if hit is None:
            rh, rw = self._regions(H, W)
            slot = rh * rw
            block = next_pow2(slot)
            src, nRh, nRw = region_order(H, W, rh, rw, device)
            bank, key_tile = slot_tiles(src, slot, block)
            count = (src.view(-1, slot) >= 0).sum(1).clamp(min=1)
            hit = (src, slot, block, bank, key_tile, count)
            self._cache[key] = hit
            if len(self._cache) > 8:
                self._cache.popitem(last=False)
        return hit

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[B, H, W, dim]`` (2-D) or ``[B, T, dim]`` (1-D) -> same shape."""
        if self.spatial_dims == 2:
            check_input(x, 4, self.dim, "[B, H, W, dim]")
            B, H, W, C = x.shape
        else:
            check_input(x, 3, self.dim, "[B, T, dim]")
            B, W, C = x.shape
            H = 1
        N = H * W
        xf = x.reshape(B, N, C)
        q, k, v = self.proj.split(xf)
        if self.causal:
            o = self._causal_tokens(q, k, v)
        else:
            o = self._regions_attend(q, k, v, H, W)
        y = o.transpose(1, 2).reshape(B, N, C)
        if self.lepe is not None:
            vm = v.transpose(1, 2).reshape(B, N, C)
            if self.spatial_dims == 2:
                lep = self.lepe(vm.transpose(1, 2).reshape(B, C, H, W)).flatten(2).transpose(1, 2)
            else:
                vin = vm.transpose(1, 2)
                if self.causal:
                    vin = F.pad(vin, (self.side_dwconv - 1, 0))
                lep = self.lepe(vin).transpose(1, 2)
            y = y + lep.to(y.dtype)
        return self.proj.out(y).view(x.shape)

    def _regions_attend(self, q, k, v, H, W):
        B, h, N, d = q.shape
        src, slot, block, bank, key_tile, count = self._layout(H, W, q.device)
        nR = src.numel() // slot
        qf = q.transpose(1, 2).reshape(B, N, -1)
        kf = k.transpose(1, 2).reshape(B, N, -1)
        with torch.no_grad():  # routing is not differentiated (the paper's diff_routing=False)
            qr = gather_slots(qf.detach().float(), src, slot, slot).view(B, nR, slot, -1).sum(2) / count[:, None]
            kr = gather_slots(kf.detach().float(), src, slot, slot).view(B, nR, slot, -1).sum(2) / count[:, None]
            aff = (qr * self.scale) @ kr.transpose(1, 2)
            idx = aff.topk(min(self.topk, nR), dim=-1).indices
        pat = routed_pattern(idx[:, None], block, bank, key_tile)
        g = lambda t: gather_slots(t.reshape(B * h, N, t.shape[-1]), src, slot, block)  # noqa: E731
        qs, ks, vs = (g(t).view(B, h, nR * block, -1) for t in (q, k, v))
        o = attend(qs, ks, vs, pat, scale=self.scale)
        return scatter_slots(o.reshape(B * h, nR * block, -1), src, slot, block, N).view(B, h, N, -1)

    def token_mask(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Causal 1-D form: the token-level mask ``[B, 1, T, T]`` (routing shared by heads) from
        q/k ``[B, heads, T, d]``: own region causally plus the ``topk`` best earlier regions."""
        B, h, T, d = q.shape
        R = self.region_size or -(-T // self.n_win)
        nR = -(-T // R)
        with torch.no_grad():
            qf = q.detach().transpose(1, 2).reshape(B, T, -1).float()
            kf = k.detach().transpose(1, 2).reshape(B, T, -1).float()
            reg = torch.arange(T, device=q.device) // R
            kpad = F.pad(kf, (0, 0, 0, nR * R - T)).view(B, nR, R, -1)
            cnt = torch.bincount(reg, minlength=nR).clamp(min=1).to(kf.dtype)
            kr = kpad.sum(2) / cnt[:, None]
            s = (qf * self.scale) @ kr.transpose(1, 2)  # [B, T, nR]
            earlier = torch.arange(nR, device=q.device)[None, :] < reg[:, None]  # complete earlier regions
            s = s.masked_fill(~earlier, float("-inf"))
            kk = min(self.topk, nR)
            top = s.topk(kk, dim=-1)
            chosen = torch.zeros(B, T, nR, dtype=torch.bool, device=q.device)
            chosen.scatter_(2, top.indices, torch.isfinite(top.values))
            own = reg[:, None] == reg[None, :]
            j = torch.arange(T, device=q.device)
            mask = chosen.gather(2, reg[None, None, :].expand(B, T, T)) | (own & (j[None, :] <= j[:, None]))[None]
        return mask[:, None]

    def _causal_tokens(self, q, k, v):
        mask = self.token_mask(q, k)
        T = q.shape[2]
        pat = mask_pattern(mask, 64 if T >= 64 else 16)
        return attend(q, k, v, pat, scale=self.scale)

    def cost(self, T: int) -> dict:
        """Attention cost at ``T`` tokens (2-D: a square map of ``T`` pixels): density of the
        token attention (computed pairs / all pairs, or / causal pairs for the causal form) and
        FLOPs of the token attention plus the region routing."""
        check_int("T", T)
        if self.spatial_dims == 1:
            R = self.region_size or -(-T // self.n_win)
            nR = -(-T // R)
            t = torch.arange(T, dtype=torch.float64)
            r = torch.div(t, R, rounding_mode="floor")
            if self.causal:
                pairs = float(((t - r * R + 1) + torch.clamp(r, max=self.topk) * R).sum())
                total = T * (T + 1) / 2
                route = 2.0 * T * nR * self.qk_dim
            else:
                pairs = float(T * min(self.topk, nR) * R)
                total = float(T * T)
                route = 2.0 * nR * nR * self.qk_dim
        else:
            side = max(1, int(round(math.sqrt(T))))
            rh, rw = self._regions(side, side)
            nR = (-(-side // rh)) * (-(-side // rw))
            pairs = float(T * min(self.topk, nR) * rh * rw)
            total = float(T * T)
            route = 2.0 * nR * nR * self.qk_dim
        pairs = min(pairs, total)
        return {"density": pairs / total, "flops": 2.0 * pairs * (self.qk_dim + self.dim) + route}
