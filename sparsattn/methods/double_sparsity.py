"""double_sparsity: calibrated outlier channels -> (4-bit) label cache -> approximate top-k tokens."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..kv.quant import quantize_minmax, unpack4
from ..kv.select import decode_inputs, reduce_group, topk_pattern, valid_units
from .base import Method, SelectContext, register


@register("double_sparsity")
@dataclass
class DoubleSparsity(Method):
    """DoubleSparsity: top-k tokens from a label cache of calibrated outlier channels (Double Sparsity, arXiv 2408.07092).

    Offline: ``calibrate(qs, ks)`` ranks, per layer and KV head, the channels by mean ``|q_c * k_c|``
    over captured (post-RoPE) queries and keys and keeps the top ``r = D / group_factor``; the
    result is saved/loaded as JSON (``save`` / ``load``). Runtime: the label cache
    ``K[..., channels]`` is kept incrementally in ``ctx.state["double_sparsity"][layer]``, stored
    low-bit: ``label_bits`` 4 (default) = per-token min-max codes packed two per uint8 byte with a
    float16 scale and zero point per token (``codes [B, Hkv, cap, ceil(r / 2)]``, ``scale`` /
    ``zero [B, Hkv, cap, 1]``; the reference code quantises labels per token by min/max), 8 = one
    code per byte, 16 = unquantised labels in the cache's dtype. Approximate scores are computed on
    the fly from the codes: ``q[ch] · label = scale * (q[ch] · codes) + zero * sum(q[ch])``, divided
    by ``sqrt(r)``; they pick the top ``token_budget`` tokens (``budget_ratio`` instead gives
    ``ceil(ratio * T)``, the paper's "1/16" setting). ``label_nbytes(state)`` reports the bytes the
    label cache holds (also ``ctx.extras["label_bytes"]`` after each ``select``).

    Defaults from the repository's converter (``token_budget`` (heavy_const) 256, group_factor 8,
    label_bits 4) [code, per METHODS.md B2]. GQA: scores of the query heads of a group are
    combined by ``head_reduce`` (``"max"``), giving one token list per KV head.

    ``select(q [B, Hq, (1,) D], k_cache [B, Hkv, T, D], ctx)`` needs ``ctx.layer`` and a
    calibration (``needs = ("calibration",)``).
    """

    paper = "Post-Training Sparse Attention with Double Sparsity (arXiv 2408.07092)"
    phase = "decode"
    needs = ("calibration",)
    token_budget: int = 256
    budget_ratio: Optional[float] = None
    group_factor: int = 8
    label_bits: int = 4
    head_reduce: str = "max"
    channels: Optional[dict] = None  # {layer: [[channel ids] per kv head]}

    def __post_init__(self):
        if not isinstance(self.token_budget, int) or self.token_budget < 1:
            raise ValueError(f"token_budget: expected an int >= 1, got {self.token_budget!r}")
        if self.budget_ratio is not None and not (isinstance(self.budget_ratio, (int, float)) and 0 < self.budget_ratio <= 1):
            raise ValueError(f"budget_ratio: expected None or a number in (0, 1], got {self.budget_ratio!r}")
        if not isinstance(self.group_factor, int) or self.group_factor < 1:
            raise ValueError(f"group_factor: expected an int >= 1, got {self.group_factor!r}")
        if self.label_bits not in (4, 8, 16):
            raise ValueError(f"label_bits: expected 4, 8 or 16, got {self.label_bits!r}")
        if self.head_reduce not in ("max", "mean", "sum"):
            raise ValueError(f"head_reduce: expected 'max', 'mean' or 'sum', got {self.head_reduce!r}")
        if self.channels is not None:
            self.channels = {int(l): [list(map(int, h)) for h in c] for l, c in self.channels.items()}

    @property
    def is_fitted(self) -> bool:
        return self.channels is not None

    # ------------------------------------------------------------------ calibration
    def calibrate(self, qs: Sequence[torch.Tensor], ks: Sequence[torch.Tensor]) -> dict:
        """Rank channels per layer and KV head from captured ``q [N, Hq, T, D]`` and ``k [N, Hkv, T, D]``
        (one pair per layer, post-RoPE): importance = mean over tokens and the group of ``|q_c * k_c|``."""
        if len(qs) != len(ks) or not qs:
            raise ValueError(f"qs/ks: expected equal-length non-empty lists (one per layer), got {len(qs)}, {len(ks)}")
        out = {}
        for layer, (q, k) in enumerate(zip(qs, ks)):
            if q.dim() != 4 or k.dim() != 4 or q.shape[-1] != k.shape[-1] or q.shape[1] % k.shape[1]:
                raise ValueError(f"qs[{layer}]/ks[{layer}]: expected [N, Hq, T, D] / [N, Hkv, T, D], got {tuple(q.shape)}, {tuple(k.shape)}")
            N, Hq, T, D = q.shape
            Hkv = k.shape[1]
            r = max(1, D // self.group_factor)
            kk = k.float().repeat_interleave(Hq // Hkv, 1)
            imp = (q.float() * kk).abs().mean(dim=(0, 2))  # [Hq, D]
            imp = imp.view(Hkv, Hq // Hkv, D).mean(1)
            out[layer] = imp.topk(r, dim=-1).indices.sort(-1).values.tolist()
        self.channels = out
        return out

    def save(self, path: str) -> None:
        if self.channels is None:
            raise ValueError("channels: nothing to save; run calibrate() first")
        with open(path, "w") as f:
            json.dump({"method": "double_sparsity", "group_factor": self.group_factor,
                       "channels": {str(l): c for l, c in self.channels.items()}}, f)

    def load(self, path: str) -> "DoubleSparsity":
        with open(path) as f:
            data = json.load(f)
        if data.get("method") != "double_sparsity" or "channels" not in data:
            raise ValueError(f"path: expected a double_sparsity calibration JSON, got keys {sorted(data)}")
        self.channels = {int(l): c for l, c in data["channels"].items()}
        return self

    # ------------------------------------------------------------------ runtime
    @staticmethod
    def label_nbytes(state: dict, layer: Optional[int] = None) -> int:
        """Bytes held by the label cache in ``state`` (a ``SelectContext.state``), one layer or all."""
        st = state.get("double_sparsity", {})
        layers = [layer] if layer is not None else list(st)
        return sum(t.numel() * t.element_size() for l in layers if l in st
                   for name, t in st[l].items() if name in ("labels", "codes", "scale", "zero"))

    def _labels(self, k: torch.Tensor, ch: torch.Tensor, kv_lens: torch.Tensor, ctx) -> dict:
        """Label cache of the layer (see the class docstring), kept in ``ctx.state``: only the rows
        appended since the last call are quantised and written in place; capacity grows by doubling."""
        B, H, T, D = k.shape
        r = ch.shape[1]
        names = ("labels",) if self.label_bits == 16 else ("codes", "scale", "zero")
        st = ctx.state.setdefault("double_sparsity", {}).get(ctx.layer) if ctx is not None else None
        if (st is None or any(n not in st for n in names) or st[names[0]].shape[:2] != (B, H)
                or st.get("r") != r or bool((st["kv_lens"] > kv_lens).any())):
            if self.label_bits == 16:
                st = {"labels": k.new_zeros(B, H, T, r)}
            else:
                nb = -(-r // 2) if self.label_bits == 4 else r
                st = {"codes": torch.zeros(B, H, T, nb, dtype=torch.uint8, device=k.device),
                      "scale": torch.zeros(B, H, T, 1, dtype=torch.float16, device=k.device),
                      "zero": torch.zeros(B, H, T, 1, dtype=torch.float16, device=k.device)}
            st.update(kv_lens=torch.zeros_like(kv_lens), r=r)
        cap = st[names[0]].shape[2]
        if cap < T:
            new_cap = max(T, 2 * cap)
            for n in names:
                t = st[n]
                st[n] = torch.cat([t, t.new_zeros(B, H, new_cap - cap, t.shape[-1])], 2)
        start = int(st["kv_lens"].min())
        end = int(kv_lens.max())
        if end > start:
            new = torch.gather(k[:, :, start:end], 3, ch[None, :, None, :].expand(B, -1, end - start, -1))
            if self.label_bits == 16:
                st["labels"][:, :, start:end] = new
            else:
                qn = quantize_minmax(new, self.label_bits)
                st["codes"][:, :, start:end] = qn.codes
                st["scale"][:, :, start:end] = qn.scale
                st["zero"][:, :, start:end] = qn.zero
        st["kv_lens"] = kv_lens.clone()
        if ctx is not None:
            ctx.state["double_sparsity"][ctx.layer] = st
        return st

    def dequantized_labels(self, st: dict, T: int) -> torch.Tensor:
        """The first ``T`` labels of a layer's label cache ``[B, Hkv, T, r]`` as float32 (for inspection)."""
        if self.label_bits == 16:
            return st["labels"][:, :, :T].float()
        codes = st["codes"][:, :, :T]
        c = unpack4(codes, st["r"]) if self.label_bits == 4 else codes
        return c.float() * st["scale"][:, :, :T].float() + st["zero"][:, :, :T].float()

    def _approx_scores(self, qc: torch.Tensor, st: dict, T: int) -> torch.Tensor:
        """``qc [B, Hkv, G, r]`` · labels, straight from the stored codes: ``[B, Hkv, G, T]`` float32."""
        if self.label_bits == 16:
            lab = st["labels"][:, :, :T]
            return torch.matmul(qc.to(lab.dtype), lab.transpose(-1, -2)).float()
        codes = st["codes"][:, :, :T]
        c = (unpack4(codes, st["r"]) if self.label_bits == 4 else codes).float()  # [B, Hkv, T, r]
        qf = qc.float()
        s = torch.matmul(qf, c.transpose(-1, -2))
        scale = st["scale"][:, :, :T, 0].float()[:, :, None, :]
        zero = st["zero"][:, :, :T, 0].float()[:, :, None, :]
        return s * scale + qf.sum(-1, keepdim=True) * zero

    def select(self, q, k, ctx: SelectContext | None = None):
        q, k, kl = decode_inputs(q, k, ctx)
        if self.channels is None:
            raise ValueError("double_sparsity: not calibrated; call calibrate(qs, ks) or load(path) first")
        layer = 0 if ctx is None or ctx.layer is None else ctx.layer
        if layer not in self.channels:
            raise ValueError(f"ctx.layer: no calibrated channels for layer {layer} (have {sorted(self.channels)})")
        B, Hq, D = q.shape
        Hkv, T = k.shape[1], k.shape[2]
        ch = torch.as_tensor(self.channels[layer], device=k.device, dtype=torch.long)
        if ch.dim() != 2 or ch.shape[0] != Hkv or int(ch.max()) >= D:
            raise ValueError(f"channels[{layer}]: expected [Hkv={Hkv}, r] ids < {D}, got {tuple(ch.shape)}")
        r = ch.shape[1]
        st = self._labels(k, ch, kl, ctx)
        qg = q.view(B, Hkv, Hq // Hkv, D)
        qc = torch.gather(qg, 3, ch[None, :, None, :].expand(B, -1, Hq // Hkv, -1))
        s = self._approx_scores(qc, st, T) / math.sqrt(r)  # [B, Hkv, G, T]
        s = reduce_group(s, self.head_reduce)
        if ctx is not None:
            ctx.extras["label_bytes"] = self.label_nbytes(ctx.state, ctx.layer)
        budget = self.token_budget if self.budget_ratio is None else math.ceil(self.budget_ratio * T)
        return topk_pattern(s, budget, valid_units(kl, T), T)
