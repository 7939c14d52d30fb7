"""KV policies: shrink the KV cache itself (memory, not only compute), one class per paper.

Every policy has ``promised(cache, layer) -> bool [B, Hkv, T]`` (the slots it guarantees to keep)
and ``apply(cache, layer, ...) -> dict`` (bytes before/after, slots kept/dropped). Nothing is lost
silently: a promised slot is kept (tested), and RazorAttention folds every dropped token into its
compensation token (the kept slots' weights always add up to the number of tokens seen).

* ``StreamingLLMPolicy``: attention sinks + a recent window (Efficient Streaming Language Models
  with Attention Sinks, arXiv 2309.17453).
* ``RazorAttentionPolicy``: retrieval heads keep everything; other heads keep sinks + a window +
  one compensation token (mean key/value of the dropped tokens, weighted by their number through a
  per-slot log-weight read by the decode kernel) (RazorAttention, arXiv 2407.15891).
* ``MoAPolicy``: per-head elastic spans ``alpha_h + beta_h * N`` plus sinks (MoA: Mixture of Sparse
  Attention, arXiv 2406.14909).
* ``ZipVLPolicy``: layer-adaptive important-token count (smallest set holding ``tau`` of the
  attention mass) kept at ``hi_bits``, the rest at ``lo_bits`` (ZipVL, arXiv 2410.08584).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..patterns import sink_or_recent
from ..patterns._util import _err  # the library's one error-message helper
from .cache import KVCache
from .quant import QuantizedRows, quantize_rows

Tensor = torch.Tensor


def _live(cache: KVCache, layer: int) -> Tensor:
    pos = cache.positions(layer)
    T = pos.shape[-1]
    return torch.arange(T, device=pos.device) < cache.lengths(layer)[..., None]


def _report(cache: KVCache, layer: int, before_bytes: int, before_slots: int) -> dict:
    return {"bytes_before": before_bytes, "bytes_after": cache.used_bytes(layer),
            "slots_before": before_slots, "slots_after": int(cache.lengths(layer).sum())}


def _dropped_means(cache: KVCache, layer: int, drop: Tensor):
    """Tokens ``n_d [B, H]`` (merged slots count their weight) and weighted mean key/value ``[B, H, D]``
    (float64) of the ``drop [B, H, T]`` slots, read from the layer's head-group store group by group (no
    padded copy of the layer; a group that drops nothing, e.g. RazorAttention's retrieval heads, is skipped)."""
    st = cache.store(layer)
    B, H, D = cache.batch, cache.kv_heads, cache.head_dim
    dev = drop.device
    n_d = torch.zeros(B, H, dtype=torch.float64, device=dev)
    k_hat = torch.zeros(B, H, D, dtype=torch.float64, device=dev)
    v_hat = torch.zeros_like(k_hat)
    for g, hs in st.parts():
        hs = torch.arange(H, device=dev) if hs is None else hs.to(dev)
        d = drop[:, hs, :g.cap]
        if not bool(d.any()):
            continue
        w = d.double() if g.log_weight is None else g.log_weight.double().exp() * d
        n = w.sum(-1)
        denom = n.clamp_min(1e-300)[..., None]
        n_d[:, hs] = n
        k_hat[:, hs] = (w[..., None] * g.k.double()).sum(2) / denom
        v_hat[:, hs] = (w[..., None] * g.v.double()).sum(2) / denom
    return n_d, k_hat, v_hat


def _sink_window_keep(pos: Tensor, seen: Tensor, n_sink: int, window: Tensor) -> Tensor:
    """Slots whose position is a sink (< n_sink) or in the last ``window`` positions ([B, H] or scalar)."""
    w = window if isinstance(window, Tensor) else torch.as_tensor(window, device=pos.device)
    if w.dim() == 0:
        w = w.expand(pos.shape[:2])
    return (pos >= 0) & sink_or_recent(pos, seen[:, None, None], n_sink, w[..., None])  # the one rule


_POLICIES: dict[str, type] = {}


def register_policy(name: str):
    """register_policy: class decorator adding a KVPolicy subclass to the policy registry under ``name``."""
    if not isinstance(name, str) or not name:
        raise _err("name", "a non-empty string", repr(name))

    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, KVPolicy)):
            raise _err("cls", "a subclass of sparsattn.kv.KVPolicy", repr(cls))
        if name in _POLICIES and _POLICIES[name] is not cls:
            raise _err("name", f"a name not yet registered ({_POLICIES[name].__qualname__} has {name!r})", repr(name))
        cls.name = name
        _POLICIES[name] = cls
        return cls

    return deco


def list_policies() -> list:
    """list_policies: the registered KV policy names, in registration order."""
    return list(_POLICIES)


def policy_class(name: str) -> type:
    """policy_class: the KV policy class registered as ``name`` (ValueError naming the valid ones)."""
    if name not in _POLICIES:
        raise _err("policy", f"one of {', '.join(_POLICIES)}", repr(name))
    return _POLICIES[name]


class KVPolicy:
    """KVPolicy: base class (see the module docstring).

    Presets (what tooling needs, declared on the policy so no tool names it):

    * ``example(T, kv_heads)``: a representative instance for a cache of ``T`` tokens and ``kv_heads``
      KV heads, with a one-line description of its settings (``(policy, text)``; the memory benchmark);
    * ``example_signals(k, q_heads, generator)``: the keyword signals ``apply`` needs on keys ``k``
      ``[B, Hkv, T, D]`` (default: none).
    """

    name: str = ""
    paper: str = ""

    @classmethod
    def example(cls, T: int, kv_heads: int) -> tuple:
        """Preset: ``(instance, description)`` for a cache of ``T`` tokens and ``kv_heads`` KV heads
        (default: the class's defaults)."""
        return cls(), "defaults"

    @classmethod
    def example_signals(cls, k: Tensor, q_heads: int, generator: Optional[torch.Generator] = None) -> dict:
        """Preset: the keyword signals ``apply`` takes for keys ``k [B, Hkv, T, D]`` (default: none)."""
        return {}

    def promised(self, cache: KVCache, layer: int) -> Tensor:
        raise NotImplementedError

    def apply(self, cache: KVCache, layer: int, **signals) -> dict:
        """Default: evict every slot not in ``promised``, compact the cache, report the bytes kept.
        Policies that also rewrite slots (compensation tokens, quantisation) override this."""
        b0, s0 = cache.used_bytes(layer), int(cache.lengths(layer).sum())
        cache.evict(layer, self.promised(cache, layer))
        cache.shrink(layer)
        return _report(cache, layer, b0, s0)


@register_policy("streaming_llm")
@dataclass
class StreamingLLMPolicy(KVPolicy):
    """StreamingLLMPolicy: keep ``n_sink`` first tokens + the ``window`` most recent ones (StreamingLLM, arXiv 2309.17453).

    Defaults: 4 sink tokens (the paper's choice) and a 2000-token recent window (the repository's
    example ``recent_size``; unverified here). Merged slots of other policies are kept.
    """

    paper = "Efficient Streaming Language Models with Attention Sinks (arXiv 2309.17453)"
    n_sink: int = 4
    window: int = 2000

    def __post_init__(self):
        if not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise _err("n_sink", "an int >= 0", self.n_sink)
        if not isinstance(self.window, int) or self.window < 1:
            raise _err("window", "an int >= 1", self.window)

    @classmethod
    def example(cls, T: int, kv_heads: int) -> tuple:
        """Preset: 4 sinks + a window of ``T / 16`` (the decode benchmark's 1/16 budget)."""
        w = max(1, T // 16)
        return cls(n_sink=4, window=w), f"n_sink=4, window={w}"

    def promised(self, cache, layer):
        pos = cache.positions(layer)
        keep = _sink_window_keep(pos, cache.seq_lens(layer), self.n_sink, self.window)
        return (keep | (pos < 0)) & _live(cache, layer)


@register_policy("razor")
@dataclass
class RazorAttentionPolicy(KVPolicy):
    """RazorAttentionPolicy: retrieval heads keep all; others sinks + window + a compensation token (arXiv 2407.15891).

    Non-retrieval head h keeps the first ``n_sink`` tokens and the last ``L_h = max(min_window,
    N / compression)`` tokens (N = tokens seen); the dropped ones are replaced by one slot with the
    mean key and mean value, whose score is weighted by the number of dropped tokens
    (``log_weight = log n_d``, applied exactly by the decode kernel). Defaults C = 5, S0 = 4000,
    N0 = 4 are marked unverified ([mem]) in METHODS.md B5.

    Args:
        retrieval_heads: per layer, the kv heads that keep their full cache: a bool tensor
            ``[n_layers, Hkv]`` or a dict ``{layer: [heads]}``.
    """

    paper = "RazorAttention: Efficient KV Cache Compression Through Retrieval Heads (arXiv 2407.15891)"
    retrieval_heads: object = None
    n_sink: int = 4
    compression: float = 5.0
    min_window: int = 4000

    def __post_init__(self):
        if not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise _err("n_sink", "an int >= 0", self.n_sink)
        if not isinstance(self.compression, (int, float)) or self.compression < 1:
            raise _err("compression", "a number >= 1", self.compression)
        if not isinstance(self.min_window, int) or self.min_window < 1:
            raise _err("min_window", "an int >= 1", self.min_window)

    @classmethod
    def example(cls, T: int, kv_heads: int) -> tuple:
        """Preset: KV head 0 of layer 0 is a retrieval head (the paper keeps about 15% of heads whole), the
        others sinks + ``max(S0, N / C)`` + one compensation slot, paper defaults C = 5, S0 = 4000."""
        return (cls(retrieval_heads={0: [0]}, n_sink=4, compression=5.0, min_window=4000),
                "retrieval kv head 0, n_sink=4, C=5, S0=4000")

    def _retrieval(self, cache: KVCache, layer: int) -> Tensor:
        H = cache.kv_heads
        r = torch.zeros(H, dtype=torch.bool, device=cache.device)
        rh = self.retrieval_heads
        if rh is None:
            return r
        if isinstance(rh, dict):
            for h in rh.get(layer, []):
                if not 0 <= int(h) < H:
                    raise _err("retrieval_heads", f"head ids in [0, {H})", h)
                r[int(h)] = True
            return r
        rh = torch.as_tensor(rh)
        if rh.dtype != torch.bool or rh.dim() != 2 or rh.shape[1] != H or rh.shape[0] <= layer:
            raise _err("retrieval_heads", f"a bool tensor [n_layers, {H}] or a dict", tuple(rh.shape))
        return rh[layer].to(cache.device)

    def window(self, n_seen: Tensor) -> Tensor:
        """``L_h = max(S0, N / C)`` per sequence."""
        return torch.clamp(torch.floor(n_seen.double() / self.compression).long(), min=self.min_window)

    def promised(self, cache, layer):
        pos = cache.positions(layer)
        seen = cache.seq_lens(layer)
        keep = _sink_window_keep(pos, seen, self.n_sink, self.window(seen)[:, None].expand(-1, cache.kv_heads))
        keep = keep | self._retrieval(cache, layer)[None, :, None]
        return keep & _live(cache, layer)

    def apply(self, cache, layer, **signals):
        b0, s0 = cache.used_bytes(layer), int(cache.lengths(layer).sum())
        keep = self.promised(cache, layer)
        drop = _live(cache, layer) & ~keep  # includes earlier compensation slots (re-merged)
        n_d, k_hat, v_hat = _dropped_means(cache, layer, drop)
        cache.evict(layer, keep)
        bi, hi = (n_d > 0).nonzero(as_tuple=True)
        cache.write_slot(layer, bi, hi, k_hat[bi, hi], v_hat[bi, hi], n_d[bi, hi].log())
        cache.shrink(layer)
        rep = _report(cache, layer, b0, s0)
        rep["merged_tokens"] = n_d.sum().item()
        return rep


@register_policy("moa")
@dataclass
class MoAPolicy(KVPolicy):
    """MoAPolicy: per-head elastic span ``alpha_h + beta_h * N`` plus sinks (MoA, arXiv 2406.14909).

    ``alpha`` / ``beta``: ``[n_layers][Hkv]`` (the result of MoA's offline profiling and search,
    given here as data). ``n_sink`` = 64 initial tokens kept by every head ([mem], unverified).
    """

    paper = "MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression (arXiv 2406.14909)"
    alpha: object = None
    beta: object = None
    n_sink: int = 64

    def __post_init__(self):
        if self.alpha is None or self.beta is None:
            raise _err("alpha/beta", "per-layer, per-head span rules [n_layers][Hkv]", None)
        self.alpha = torch.as_tensor(self.alpha, dtype=torch.float64)
        self.beta = torch.as_tensor(self.beta, dtype=torch.float64)
        if self.alpha.dim() != 2 or self.alpha.shape != self.beta.shape:
            raise _err("alpha/beta", "2-D [n_layers, Hkv] tensors of the same shape", (tuple(self.alpha.shape), tuple(self.beta.shape)))
        if (self.beta < 0).any() or (self.beta > 1).any():
            raise _err("beta", "values in [0, 1]", self.beta)
        if not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise _err("n_sink", "an int >= 0", self.n_sink)

    @classmethod
    def example(cls, T: int, kv_heads: int) -> tuple:
        """Preset: alpha = 1024 and beta spread over [0, 0.25] across the KV heads, 64 sinks (MoA's
        elastic rule; a real plan comes from MoA's profiling, ``sparsattn calibrate moa``)."""
        beta = [[0.25 * h / max(1, kv_heads - 1) for h in range(kv_heads)]]
        return (cls(alpha=[[1024.0] * kv_heads], beta=beta, n_sink=64),
                "alpha=1024, beta 0..0.25 over heads, n_sink=64")

    def spans(self, layer: int, n_seen: Tensor) -> Tensor:
        """Per-(batch, head) budgets ``[B, Hkv]``: ``max(1, round(alpha + beta * N))``."""
        a = self.alpha[layer].to(n_seen.device)
        b = self.beta[layer].to(n_seen.device)
        return torch.clamp(torch.round(a[None] + b[None] * n_seen.double()[:, None]), min=1).long()

    def promised(self, cache, layer):
        if self.alpha.shape[1] != cache.kv_heads or self.alpha.shape[0] <= layer:
            raise _err("alpha", f"shape [>{layer}, {cache.kv_heads}]", tuple(self.alpha.shape))
        pos = cache.positions(layer)
        seen = cache.seq_lens(layer)
        keep = _sink_window_keep(pos, seen, self.n_sink, self.spans(layer, seen))
        return (keep | (pos < 0)) & _live(cache, layer)


@dataclass
class MixedPrecisionKV:
    """MixedPrecisionKV: important rows at ``hi`` bits, the rest at ``lo`` bits (ZipVL's KV store)."""

    k_hi: QuantizedRows
    v_hi: QuantizedRows
    k_lo: QuantizedRows
    v_lo: QuantizedRows
    hi_idx: Tensor  # [B, H, p] slot ids
    lo_idx: Tensor  # [B, H, T - p]
    positions: Tensor
    lengths: Tensor
    T: int

    def dequantize(self):
        B, H, _ = self.hi_idx.shape
        D = self.k_hi.dim
        out = []
        for hi, lo in ((self.k_hi, self.k_lo), (self.v_hi, self.v_lo)):
            x = torch.zeros(B, H, self.T, D, dtype=hi.dtype, device=self.hi_idx.device)
            x.scatter_(2, self.hi_idx[..., None].expand(-1, -1, -1, D), hi.dequantize())
            x.scatter_(2, self.lo_idx[..., None].expand(-1, -1, -1, D), lo.dequantize())
            out.append(x)
        return out[0], out[1]

    def nbytes(self) -> int:
        n = sum(q.nbytes() for q in (self.k_hi, self.v_hi, self.k_lo, self.v_lo))
        return n + self.hi_idx.numel() * 4 + self.lo_idx.numel() * 4  # slot ids stored as int32


def probe_importance(q_probe: Tensor, k: Tensor, q_positions: Tensor, *, scale: Optional[float] = None) -> Tensor:
    """probe_importance: ZipVL's normalised token importance ``[B, Hkv, T]`` from probe queries.

    ``q_probe [B, Hq, n, D]`` at absolute positions ``q_positions [n]`` attend causally to
    ``k [B, Hkv, T, D]``; importance = column sum of the probabilities (summed over the query
    heads of each kv group) divided by the number of probe queries that can see the token.
    """
    B, Hq, n, D = q_probe.shape
    Hkv, T = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(D) if scale is None else scale
    kk = k.float().repeat_interleave(Hq // Hkv, 1)
    s = torch.einsum("bhnd,bhtd->bhnt", q_probe.float(), kk) * scale
    vis = torch.arange(T, device=k.device)[None, :] <= q_positions.to(k.device)[:, None]  # [n, T]
    s = s.masked_fill(~vis, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    col = p.sum(2).view(B, Hkv, Hq // Hkv, T).sum(2)
    return col / vis.sum(0).clamp_min(1).float()


@register_policy("zipvl")
@dataclass
class ZipVLPolicy(KVPolicy):
    """ZipVLPolicy: layer-adaptive important-token ratio + mixed-precision K/V (ZipVL, arXiv 2410.08584).

    The layer's important-token count ``p`` is the smallest count whose top-p tokens (per
    (batch, kv head), by normalised importance) hold at least ``tau`` of the importance mass,
    averaged over (batch, head). Those tokens are quantised per token to ``hi_bits``, the rest to
    ``lo_bits`` (int8 / int4 here; ZipVL/ZipCache use lower widths such as 4/2 [mem]).
    ``tau`` = 0.97 (the paper's best value, [abs]).
    """

    paper = "ZipVL: Efficient Large Vision-Language Models with Dynamic Token Sparsification (arXiv 2410.08584)"
    tau: float = 0.97
    hi_bits: int = 8
    lo_bits: int = 4

    def __post_init__(self):
        if not isinstance(self.tau, (int, float)) or not 0 < self.tau <= 1:
            raise _err("tau", "a number in (0, 1]", self.tau)
        for name in ("hi_bits", "lo_bits"):
            if getattr(self, name) not in (4, 8):
                raise _err(name, "4 or 8", getattr(self, name))
        if self.lo_bits > self.hi_bits:
            raise _err("lo_bits", f"<= hi_bits ({self.hi_bits})", self.lo_bits)

    @classmethod
    def example(cls, T: int, kv_heads: int) -> tuple:
        """Preset: tau = 0.97, important tokens int8, the rest int4 (nothing evicted)."""
        return cls(tau=0.97, hi_bits=8, lo_bits=4), "tau=0.97, int8 important / int4 rest"

    @classmethod
    def example_signals(cls, k: Tensor, q_heads: int, generator: Optional[torch.Generator] = None) -> dict:
        """Preset: ``importance`` from 64 random probe queries at the last positions (``probe_importance``)."""
        B, _, T, D = k.shape
        n = min(64, T)
        qp = torch.randn(B, q_heads, n, D, generator=generator).to(device=k.device, dtype=k.dtype)
        return {"importance": probe_importance(qp, k, torch.arange(T - n, T))}

    def important_count(self, importance: Tensor) -> int:
        """Smallest p with mean over (batch, head) of (top-p mass / total mass) >= tau."""
        srt = importance.double().sort(-1, descending=True).values
        frac = srt.cumsum(-1) / srt.sum(-1, keepdim=True).clamp_min(1e-300)
        mean = frac.flatten(0, 1).mean(0)
        ok = (mean >= self.tau - 1e-12).nonzero()
        return int(ok[0]) + 1 if ok.numel() else importance.shape[-1]

    def promised(self, cache, layer):
        # every token stays (at reduced precision): nothing is evicted
        return _live(cache, layer)

    def apply(self, cache, layer, importance: Tensor = None, **signals):
        if importance is None:
            raise _err("importance", "a float tensor [B, Hkv, T] (see probe_importance)", None)
        lens = cache.lengths(layer)
        if not bool((lens == lens[:1, :1]).all()):
            raise _err("cache lengths", "equal lengths in every (batch, head) row before ZipVL compression", lens.tolist())
        T = int(lens[0, 0]) if lens.numel() else 0
        if tuple(importance.shape) != (cache.batch, cache.kv_heads, T):
            raise _err("importance", f"shape {(cache.batch, cache.kv_heads, T)}", tuple(importance.shape))
        b0, s0 = cache.used_bytes(layer), int(lens.sum())
        k, v = cache.get(layer)
        k, v = k[:, :, :T], v[:, :, :T]
        p = self.important_count(importance)
        order = importance.argsort(-1, descending=True)
        hi_idx, lo_idx = order[..., :p].sort(-1).values, order[..., p:].sort(-1).values
        D = k.shape[-1]

        def take(x, idx):
            return torch.gather(x, 2, idx[..., None].expand(-1, -1, -1, D))

        mp = MixedPrecisionKV(quantize_rows(take(k, hi_idx), self.hi_bits), quantize_rows(take(v, hi_idx), self.hi_bits),
                              quantize_rows(take(k, lo_idx), self.lo_bits), quantize_rows(take(v, lo_idx), self.lo_bits),
                              hi_idx, lo_idx, cache.positions(layer)[:, :, :T].clone(), lens.clone(), T)
        cache.set_quantized(layer, mp)
        rep = _report(cache, layer, b0, s0)
        rep["important"] = p
        return rep


__all__ = ["KVPolicy", "register_policy", "list_policies", "policy_class", "StreamingLLMPolicy", "RazorAttentionPolicy", "MoAPolicy", "ZipVLPolicy",
           "MixedPrecisionKV", "probe_importance"]
