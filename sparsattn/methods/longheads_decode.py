"""longheads_decode: LongHeads' per-head chunk selection at generation, over cached chunk representatives."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from ._select import decode_inputs, mask_to_pattern, reduce_group
from .base import Method, PresetContext, SelectContext, register
from .longheads import mean_chunk_keys

_KEY = "longheads_decode"


@register("longheads_decode")
@dataclass
class LongHeadsDecode(Method):
    """LongHeadsDecode: each KV head reads whole chunks of ``window_size`` tokens, at most
    ``atten_length`` tokens per step: the first chunk, the current (incomplete) chunk and the one
    before it, plus the chunks whose representative key best matches the new query (LongHeads:
    Multi-Head Attention is Secretly a Long Context Processor, arXiv 2402.10685).

    Chunk representative = the mean key of the chunk (``chunk_key="mean"`` of the prefill method
    ``longheads``), built once when a chunk is complete and cached in
    ``ctx.state["longheads_decode"][layer]``; later steps only add the chunks completed since. The
    paper's representative (attention-weighted mean key, with the mean of the chunk's within-chunk
    attention outputs as its query) needs the values and the queries of every token of the chunk;
    a decode method is given neither (only the new query and the key cache, and past queries are
    never cached), so it cannot be rebuilt here faithfully: the mean key is the documented
    key-only variant. The cache is scored as given (post-RoPE keys and query; the paper scores with
    pre-RoPE ones, and re-assigns positions inside the selected window; neither is possible from a
    selection, see ``longheads``).

    Cache of representatives: valid while the lengths ``ctx.kv_lens`` only grow, batch /
    heads / head_dim are unchanged and a probe of two keys per row (slot 0 and the last slot of the
    last cached chunk) is bit-identical; otherwise everything is recomputed (a new sequence, an
    evicting KV policy). Chunk scores ``q · representative`` per query head, combined over a GQA
    group by ``head_reduce`` (``"max"``, default: a chunk that any query head of the group ranks
    high is read once for the group; ``"mean"`` = scoring with the group's mean query; ``"sum"``;
    ``"none"``: one selection per query head, the paper's MHA behaviour).

    Mask refresh: the ranking of complete chunks is recomputed every ``refresh_interval`` steps
    (1 = every step) per layer; in between the last ranking is reused while the forced chunks
    (first, previous, current) follow the growing sequence, so each step still reads
    ``atten_length // window_size`` chunks (fewer only when the sequence holds fewer).

    Defaults (``LuLuLuyi/LongHeads``): window_size=256, atten_length=4096 (16 chunks).
    ``atten_length`` beyond the cache is clamped (every chunk read) with one warning per
    generation state. ``select(q [B, Hq, (1,) D], k_cache [B, Hkv, T, D], ctx) -> TokenPattern``
    with ``page_size = window_size``, heads Hkv (Hq for ``head_reduce="none"``).
    """

    paper = "LongHeads: Multi-Head Attention is Secretly a Long Context Processor (arXiv 2402.10685)"
    phase = "decode"
    window_size: int = 256
    atten_length: int = 4096
    refresh_interval: int = 1
    head_reduce: str = "max"
    @classmethod
    def budget_config(cls, budget_tokens: int, ctx: PresetContext) -> dict:
        """Preset: the paper's ~16 chunks per budget: chunks of a power of two <= B / 16 (1..256 tokens),
        ``atten_length = max(3 * window_size, B)``."""
        B = int(budget_tokens)
        w = 1 << max(0, min(8, (B // 16).bit_length() - 1))
        return {"window_size": w, "atten_length": max(3 * w, B)}


    def __post_init__(self):
        for name in ("window_size", "atten_length", "refresh_interval"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        if self.atten_length < 3 * self.window_size:
            raise ValueError(f"atten_length: expected >= 3 * window_size = {3 * self.window_size} (the first, "
                             f"previous and current chunks are always read), got {self.atten_length!r}")
        if self.head_reduce not in ("max", "mean", "sum", "none"):
            raise ValueError(f"head_reduce: expected 'max', 'mean', 'sum' or 'none', got {self.head_reduce!r}")

    # ------------------------------------------------------------------------------------------
    # chunk representatives
    # ------------------------------------------------------------------------------------------

    def chunk_reps(self, k: torch.Tensor, kv_lens: torch.Tensor, ctx: Optional[SelectContext] = None):
        """Mean keys of the complete chunks: ``(reps float32 [B, Hkv, n, D], n_done [B])``; chunk c of
        row b is valid for ``c < n_done[b] = kv_lens[b] // window_size``. Kept incrementally in
        ``ctx.state`` (only chunks completed since the last call are computed). Also returns whether
        the cached state was reused."""
        B, H, T, D = k.shape
        w = self.window_size
        n_done = kv_lens // w
        hi = int(n_done.max()) if B else 0
        st = None if ctx is None else ctx.state.setdefault(_KEY, {}).get(ctx.layer)
        reused = False
        if st is not None and self._still_valid(st, k, kv_lens):
            reps, lo = st["reps"], int(st["n_done"].min())
            if reps.shape[2] < hi:
                reps = torch.cat([reps, reps.new_zeros(B, H, hi - reps.shape[2], D)], 2)
            reused = True
        else:
            reps, lo = k.new_zeros(B, H, hi, D, dtype=torch.float32), 0
        if lo < hi:  # chunks complete in some row since the last call (rows behind are recomputed later)
            reps[:, :, lo:hi] = mean_chunk_keys(k[:, :, lo * w:hi * w], w)
        if ctx is not None:
            prev = st if reused else {}
            ctx.state[_KEY][ctx.layer] = {"reps": reps, "n_done": n_done.clone(), "kv_lens": kv_lens.clone(),
                                          "probe": self._probe(k, n_done), "rank": prev.get("rank"),
                                          "since": prev.get("since", 0)}
        return reps, n_done, reused

    def _probe(self, k: torch.Tensor, n_done: torch.Tensor) -> torch.Tensor:
        """Keys at slot 0 and at the last slot of the last complete chunk of each row: ``[B, H, 2, D]``."""
        last = (n_done * self.window_size - 1).clamp(min=0)
        slots = torch.stack([torch.zeros_like(last), last], 1)  # [B, 2]
        idx = slots[:, None, :, None].expand(k.shape[0], k.shape[1], 2, k.shape[3])
        return torch.gather(k, 2, idx.clamp(max=max(k.shape[2] - 1, 0))) if k.shape[2] else k.new_zeros(idx.shape)

    def _still_valid(self, st: dict, k: torch.Tensor, kv_lens: torch.Tensor) -> bool:
        B, H, T, D = k.shape
        if st["reps"].shape[:2] != (B, H) or st["reps"].shape[3] != D or st["kv_lens"].shape != kv_lens.shape:
            return False
        if bool((kv_lens < st["kv_lens"]).any()):
            return False
        probe = self._probe(k, st["n_done"])
        return probe.dtype == st["probe"].dtype and torch.equal(probe, st["probe"])

    # ------------------------------------------------------------------------------------------
    # selection
    # ------------------------------------------------------------------------------------------

    def _n_chunks(self, kv_lens: torch.Tensor, ctx: Optional[SelectContext]) -> int:
        n_sel = self.atten_length // self.window_size
        limit = -(-int(kv_lens.max()) // self.window_size) if kv_lens.numel() else 0
        if n_sel > limit:
            flags = ctx.state.setdefault(_KEY, {}) if ctx is not None else {}
            if not flags.get("_warned"):
                warnings.warn(f"longheads_decode: atten_length={self.atten_length} ({n_sel} chunks of {self.window_size}) "
                              f"exceeds the cache ({limit} chunks); clamped: every chunk is read", stacklevel=3)
                flags["_warned"] = True
        return n_sel

    def _rank(self, q: torch.Tensor, reps: torch.Tensor, n_done: torch.Tensor, n_sel: int) -> tuple:
        """The ``n_sel`` best complete chunks other than the first: indices ``[B, R, n]`` (best first)
        and whether each entry is a real chunk."""
        B, Hq, D = q.shape
        Hkv, nc = reps.shape[1], reps.shape[2]
        if nc <= 1:
            z = torch.zeros(B, Hq if self.head_reduce == "none" else Hkv, 1, dtype=torch.long, device=q.device)
            return z, z.bool()
        qg = q.float().view(B, Hkv, Hq // Hkv, D)
        s = torch.matmul(qg, reps.transpose(-1, -2))  # [B, Hkv, G, nc]
        s = s.flatten(1, 2) if self.head_reduce == "none" else reduce_group(s, self.head_reduce)
        c = torch.arange(nc, device=q.device)
        cand = (c[None, :] >= 1) & (c[None, :] < n_done[:, None])  # complete chunks, not the first
        s = s.masked_fill(~cand[:, None, :], float("-inf"))
        top = s.topk(min(n_sel, nc), dim=-1)
        return top.indices, torch.isfinite(top.values)

    def select(self, q, k, ctx: SelectContext | None = None):
        q, k, kl = decode_inputs(q, k, ctx)
        B, Hq, D = q.shape
        Hkv, T = k.shape[1], k.shape[2]
        w = self.window_size
        rows = Hq if self.head_reduce == "none" else Hkv
        n_sel = self._n_chunks(kl, ctx)
        reps, n_done, reused = self.chunk_reps(k, kl, ctx)
        st = None if ctx is None else ctx.state[_KEY][ctx.layer]
        rank = st["rank"] if st is not None and reused else None
        if rank is not None and (rank[0].shape[:2] != (B, rows) or st["since"] + 1 >= self.refresh_interval):
            rank = None
        if rank is None:
            rank = self._rank(q, reps, n_done, n_sel)
            if st is not None:
                st["rank"], st["since"] = rank, 0
        elif st is not None:
            st["since"] += 1
        idx, ok = rank
        n_units = -(-T // w)
        c = torch.arange(n_units, device=k.device)
        cur = ((kl - 1) // w)[:, None]  # chunk of the newest token
        live = (kl > 0)[:, None]
        forced = ((c[None, :] == 0) | (c[None, :] == cur) | (c[None, :] == cur - 1)) & (c[None, :] <= cur) & live
        need = (n_sel - forced.sum(-1)).clamp(min=0)[:, None, None]  # [B, 1, 1]
        idx = idx.clamp(max=n_units - 1)
        keep = ok & ~torch.gather(forced[:, None, :].expand(B, rows, n_units), 2, idx) & live[:, :, None]
        keep = keep & (keep.long().cumsum(-1) <= need)  # the best ranked chunks not forced, up to the budget
        mask = forced[:, None, :].expand(B, rows, n_units).clone()
        mask.scatter_(2, idx, keep | torch.gather(mask, 2, idx))
        return mask_to_pattern(mask, T, page_size=w)
