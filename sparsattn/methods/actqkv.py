"""actqkv: block retrieval with an activation-aware probe query and an entropy-guided KV cut-off."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._select import decode_inputs, mask_to_pattern
from ._common import check_int
from .base import Method, PresetContext, SelectContext, register

Tensor = torch.Tensor


def activation_bias(window: Tensor) -> Tensor:
    """activation_bias: per-token Activation Bias of a window of query activations (ActQKV, arXiv 2502.13542).

    ``window [..., W, C]`` -> ``[..., W]`` float32. With ``mu_c`` and ``var_c``, the mean and the
    (population) variance of channel c over the W tokens, a token's bias is the mean over channels
    of ``(x_c - mu_c)^2 / (var_c + mean_c(var) / 100)``: how far its activation lies from the
    window's typical activation (the ``mean(var) / 100`` term keeps near-constant channels from
    dominating; constant from the authors' code). A window of one token, or of identical tokens,
    gives zeros.
    """
    if not isinstance(window, Tensor) or window.dim() < 2:
        raise ValueError(f"window: expected a tensor [..., W, C], got {getattr(window, 'shape', type(window).__name__)}")
    x = window.float()
    mu = x.mean(-2, keepdim=True)
    var = x.var(-2, unbiased=False, keepdim=True)
    eps = var.mean(-1, keepdim=True) / 100
    dev = (x - mu).square() / (var + eps).clamp_min(torch.finfo(torch.float32).tiny)
    return dev.mean(-1)


def probe_query(window: Tensor) -> tuple[Tensor, Tensor]:
    """probe_query: activation-aware probe query of a window (ActQKV, arXiv 2502.13542).

    ``window [..., W, C]`` -> ``(probe [..., C] float32, weights [..., W])``: the window's tokens
    weighted by their Activation Bias normalised to sum to one, so the anchor tokens (the ones
    that deviate most from the window's typical activation) dominate the probe. Uniform weights
    (mean pooling) where every bias is zero.
    """
    ab = activation_bias(window)
    tot = ab.sum(-1, keepdim=True)
    w = torch.where(tot > 0, ab / tot.clamp_min(torch.finfo(torch.float32).tiny),
                    torch.full_like(ab, 1.0 / ab.shape[-1]))
    return (w[..., None] * window.float()).sum(-2), w


@register("actqkv")
@dataclass
class ActQKV(Method):
    """ActQKV: block retrieval by an activation-aware probe query with a dynamic, entropy-guided per-layer
    cut-off (Activation-aware Probe-Query: Effective Key-Value Retrieval for Long-Context LLMs
    Inference, arXiv 2502.13542).

    Decode step, per layer (InfLLM-style memory, as the paper builds on InfLLM/Q-LLM):

    * the cache of each sequence is split into the first ``n_init`` tokens (always read), complete
      memory blocks of ``block_size`` tokens, and the local window: the last ``n_local`` tokens plus
      the incomplete block before them (always read);
    * probe query: the activation-aware combination (``probe_query``) of this layer's last
      ``probe_window`` decode queries, the current one included. The paper builds it at prefill
      from each chunk's queries; at decode the chunk is the single new token, so the default
      ``probe_window = 1`` makes the probe the current query, as in the authors' code. A larger
      window carries the weighting to decode (needs ``ctx.state`` across steps, i.e. a
      ``SparseCache``);
    * block score: cosine similarity of the probe with each block's representative key
      (``head_granularity="shared"``: the query heads concatenated and each KV head's key
      repeated over its group, one block list for all heads, as the authors' default;
      ``"kv_head"``: one list per KV head);
    * dynamic KV cut-off: the scores' information density is the normalised entropy
      ``H(softmax(scores)) / log(n_blocks)``. Layers are served in order from a per-step pool of
      ``n_layers x avg`` blocks (``avg = (token_budget - n_init - n_local) // block_size``): layer n
      receives ``round(m_n / sum_{i>=n} m_i x remaining)`` blocks, ``m_i`` the mean of layer i's
      last ``history`` densities (flatter score distributions get more blocks), clamped to
      ``[min_frac x avg, max_frac x avg]``; until every layer has ``history`` samples (and at the
      first step, before the layers are known) the share is uniform, i.e. ``avg`` blocks. Each
      layer also leaves ``min_frac x avg`` blocks for every later layer, so a sequence never reads
      more than ``n_layers x avg`` retrieved blocks per step (the authors' code can overshoot
      when the minimum clamps bind). Budgets are per sequence.
    * Sequences whose valid length is at most ``token_budget`` read every token.

    Provenance: the formulas follow the authors' public code (github.com/MrXiaoaa/ActQKV); the
    paper's method section was not available, only its abstract and a third-party summary that
    quotes the Activation Bias as ``(q_tj - mean)^2 / sigma^2`` (consistent with the code).

    Defaults from the authors' Llama-3 configuration (github.com/MrXiaoaa/ActQKV,
    ``config/llama3-...-dynamic_dev.yaml`` and ``context_manager_activate_3_dev.py``): ``n_init`` 64,
    ``n_local`` 512, ``block_size`` 32, 46 retrieved blocks on average (``token_budget`` 2048 = the
    paper's "2K" budget = 64 + 512 + 46 x 32), per-layer clamp [32, 92] blocks (``min_frac`` 0.7 ~
    32/46, ``max_frac`` 2), ``history`` 100 (the code's warm-up/sample window), softmax of the
    cosine scores at ``temperature`` 1. Note: with cosines in [-1, 1] and temperature 1 the
    normalised entropies stay close to 1 (about 0.99 on random keys), so the layer shares stay close
    to uniform; a lower ``temperature`` (not in the paper) sharpens the differences between layers.

    Deviations, documented: (1) a block's representative key is the mean of its keys (InfLLM and
    ActQKV keep the 4 keys that received the most attention from the local window at prefill,
    which a decode-time selector never sees), computed once per block and cached in
    ``ctx.state``; (2) the Activation Bias uses the window's own channel statistics (the code keeps
    process-wide running statistics shared by all layers and uses uniform weights for the first
    1000 windows); (3) Q-LLM's question term (``question_weight``), which the code adds at prefill
    only, is not part of ActQKV's decode and is left out; (4) scores use the cached keys as the
    integration gives them (after RoPE), not InfLLM's position-free memory keys. Without state
    across steps (no ``SparseCache``) the cut-off is the uniform ``avg`` blocks per layer.

    ``select(q [B, Hq, (1,) D], k_cache [B, Hkv, T, D], ctx) -> TokenPattern`` (heads 1 for
    ``"shared"``, Hkv for ``"kv_head"``). ``ctx.kv_lens`` [B] valid lengths and ``ctx.padding_side``
    ``padding_side`` ("left": the valid tokens are the last ``kv_lens[b]``; default right).
    State in ``ctx.state["actqkv"]``; ``ctx.state["actqkv"]["alloc"][layer]`` holds the blocks
    each sequence read at that layer in the last step.
    """

    paper = ("Activation-aware Probe-Query: Effective Key-Value Retrieval for Long-Context LLMs Inference "
             "(arXiv 2502.13542)")
    phase = "decode"
    token_budget: int = 2048
    n_init: int = 64
    n_local: int = 512
    block_size: int = 32
    probe_window: int = 1
    history: int = 100
    min_frac: float = 0.7
    max_frac: float = 2.0
    temperature: float = 1.0
    head_granularity: str = "shared"
    @classmethod
    def budget_config(cls, budget_tokens: int, ctx: PresetContext) -> dict:
        """Preset: ``token_budget = B`` with the authors' proportions scaled down: ``n_init = max(1, B // 32)``,
        ``n_local = B // 4``, ``block_size = min(32, max(4, B // 8))`` (the rest is retrieved blocks)."""
        B = int(budget_tokens)
        n_init, n_local, bs = max(1, B // 32), B // 4, min(32, max(4, B // 8))
        return {"token_budget": B, "n_init": n_init, "n_local": n_local, "block_size": bs}


    def __post_init__(self):
        check_int("token_budget", self.token_budget, 1)
        check_int("n_init", self.n_init, 0)
        check_int("n_local", self.n_local, 0)
        check_int("block_size", self.block_size, 1)
        check_int("probe_window", self.probe_window, 1)
        check_int("history", self.history, 1)
        if self.token_budget < self.n_init + self.n_local + self.block_size:
            raise ValueError(f"token_budget: expected at least n_init + n_local + block_size = "
                             f"{self.n_init + self.n_local + self.block_size} (one retrieved block), "
                             f"got {self.token_budget}")
        if isinstance(self.min_frac, bool) or not isinstance(self.min_frac, (int, float)) \
                or not 0 < self.min_frac <= 1:
            raise ValueError(f"min_frac: expected a number in (0, 1], got {self.min_frac!r}")
        if isinstance(self.max_frac, bool) or not isinstance(self.max_frac, (int, float)) or self.max_frac < 1:
            raise ValueError(f"max_frac: expected a number >= 1, got {self.max_frac!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not self.temperature > 0:
            raise ValueError(f"temperature: expected a number > 0, got {self.temperature!r}")
        if self.head_granularity not in ("shared", "kv_head"):
            raise ValueError(f"head_granularity: expected 'shared' or 'kv_head', got {self.head_granularity!r}")

    # -- budget ------------------------------------------------------------------------------------
    @property
    def avg_blocks(self) -> int:
        """Retrieved blocks per layer on average: ``(token_budget - n_init - n_local) // block_size``."""
        return (self.token_budget - self.n_init - self.n_local) // self.block_size

    @property
    def block_bounds(self) -> tuple[int, int]:
        """Per-layer (min, max) retrieved blocks of the dynamic cut-off."""
        avg = self.avg_blocks
        lo = min(avg, max(1, int(self.min_frac * avg + 1e-9)))
        hi = max(avg, int(round(self.max_frac * avg)))
        return lo, hi

    def _allocate(self, S: dict, layer, hn: Tensor, nb: Tensor, dense: Tensor) -> Tensor:
        """Blocks each sequence reads at ``layer`` this step (``[B]`` long); updates the step pool."""
        B = hn.shape[0]
        dev = hn.device
        avg = self.avg_blocks
        lo, hi = self.block_bounds
        alloc = torch.full((B,), avg, dtype=torch.long, device=dev)
        if layer is not None:
            step = S.setdefault("step", {"cur": [], "last": None, "remaining": None})
            if step["last"] is None or layer <= step["last"]:  # a new decode step starts
                if step["cur"]:
                    S["order"] = list(step["cur"])
                step["cur"], step["remaining"] = [], None
            step["cur"].append(layer)
            step["last"] = layer
            ls = S["layers"][layer]
            hist = ls.get("hist")
            if hist is None or hist.shape != (self.history, B) or hist.device != dev:
                hist = ls["hist"] = torch.zeros(self.history, B, dtype=torch.float32, device=dev)
                ls["count"] = 0
            hist[ls["count"] % self.history] = hn
            ls["count"] += 1
            order = S.get("order")
            if order is not None and layer in order:
                pos = order.index(layer)
                rest = order[pos:]
                if pos == 0:
                    step["remaining"] = torch.full((B,), len(order) * avg, dtype=torch.long, device=dev)
                rem = step["remaining"]
                if rem is not None and rem.shape == (B,):
                    warm = all(S["layers"].get(l, {}).get("count", 0) >= self.history
                               and S["layers"][l]["hist"].shape == (self.history, B) for l in order)
                    if warm:
                        m = torch.stack([S["layers"][l]["hist"].mean(0) for l in rest])  # [n_rest, B]
                        tot = m.sum(0)
                        share = torch.where(tot > 0, m[0] / tot.clamp_min(1e-12), torch.full_like(tot, 1 / len(rest)))
                    else:
                        share = torch.full((B,), 1 / len(rest), device=dev)
                    want = torch.round(share * rem.float()).long().clamp(lo, hi)
                    alloc = torch.minimum(want, rem - lo * (len(rest) - 1)).clamp_min(0)
        used = torch.where(dense, nb, torch.minimum(alloc, nb))
        if layer is not None:
            step = S["step"]
            if step["remaining"] is not None and step["remaining"].shape == (B,) and S.get("order") \
                    and layer in S["order"]:
                step["remaining"] = step["remaining"] - used
            S.setdefault("alloc", {})[layer] = used
        return used

    # -- representative keys -----------------------------------------------------------------------
    def _block_means(self, k: Tensor, lo: Tensor, nb: list[int], ls: dict) -> Tensor:
        """Mean key of every complete block ``[B, Hkv, max(nb), D]`` float32 (zeros past a row's
        ``nb[b]``); complete blocks are cached in ``ls`` and reused while the cache only grows."""
        B, H, T, D = k.shape
        bs, NB = self.block_size, max(nb)
        start, prev = 0, None
        st = ls.get("blocks")
        if (st is not None and st["means"].shape[:2] == (B, H) and st["means"].shape[-1] == D
                and st["means"].device == k.device and T >= st["T"] and torch.equal(st["lo"], lo)):
            nd = st["means"].shape[2]
            if 0 < nd <= NB:
                pos = lo[:, None] + self.n_init + torch.arange(nd, device=k.device)[None, :] * bs  # [B, nd]
                firsts = k[torch.arange(B, device=k.device)[:, None], :, pos].permute(0, 2, 1, 3)
                if torch.equal(firsts, st["firsts"]):  # the same tokens still open those blocks
                    start, prev = nd, st["means"]
        new = k.new_zeros(B, H, NB - start, D, dtype=torch.float32)
        lo_l = lo.tolist()
        for b in range(B):
            if nb[b] > start:
                s = lo_l[b] + self.n_init + start * bs
                e = lo_l[b] + self.n_init + nb[b] * bs
                new[b, :, :nb[b] - start] = k[b, :, s:e].float().view(H, nb[b] - start, bs, D).mean(2)
        means = new if prev is None else torch.cat([prev, new], 2)
        nd = min(nb)
        if nd > 0:
            pos = lo[:, None] + self.n_init + torch.arange(nd, device=k.device)[None, :] * bs
            firsts = k[torch.arange(B, device=k.device)[:, None], :, pos].permute(0, 2, 1, 3).clone()
            ls["blocks"] = {"means": means[:, :, :nd].clone(), "firsts": firsts, "lo": lo.clone(), "T": T}
        return means

    # -- select ------------------------------------------------------------------------------------
    def _probe(self, q: Tensor, ls: dict) -> Tensor:
        """Probe query ``[B, Hq, D]`` float32 from this layer's last ``probe_window`` queries."""
        B, Hq, D = q.shape
        if self.probe_window == 1:
            return q.float()
        win = ls.get("qwin")
        cur = q[:, :, None]
        if win is not None and win.shape[:2] == (B, Hq) and win.shape[-1] == D and win.device == q.device:
            win = torch.cat([win.to(q.dtype), cur], 2)[:, :, -self.probe_window:]
        else:
            win = cur
        ls["qwin"] = win
        W = win.shape[2]
        if self.head_granularity == "shared":
            x = win.permute(0, 2, 1, 3).reshape(B, W, Hq * D)  # one channel vector per token, all heads
            p, _ = probe_query(x)
            return p.view(B, Hq, D)
        G = Hq // ls["hkv"]
        x = win.view(B, ls["hkv"], G, W, D).permute(0, 1, 3, 2, 4).reshape(B, ls["hkv"], W, G * D)
        p, _ = probe_query(x)
        return p.view(B, Hq, D)

    def select(self, q, k, ctx: SelectContext | None = None):
        q, k, kl = decode_inputs(q, k, ctx)
        ctx = ctx if ctx is not None else SelectContext()
        B, Hq, D = q.shape
        Hkv, T = k.shape[1], k.shape[2]
        G = Hq // Hkv
        dev = k.device
        side = ctx.padding_side or "right"
        if side not in ("left", "right"):
            raise ValueError(f"ctx.padding_side: expected 'left' or 'right', got {side!r}")
        lo = (T - kl) if side == "left" else torch.zeros_like(kl)
        L = kl
        nb_t = ((L - self.n_init - self.n_local) // self.block_size).clamp_min(0)
        dense = L <= self.token_budget
        S = ctx.state.setdefault("actqkv", {})
        layers = S.setdefault("layers", {})
        ls = layers.setdefault(ctx.layer, {})
        ls["hkv"] = Hkv
        nb = nb_t.tolist()
        NB = max(nb) if nb else 0
        Hp = 1 if self.head_granularity == "shared" else Hkv

        t = torch.arange(T, device=dev)[None, :]
        rel = t - lo[:, None]
        valid = (rel >= 0) & (rel < L[:, None])  # [B, T]
        if NB == 0:
            self._probe(q, ls)  # keep the query window current
            self._allocate(S, ctx.layer, torch.ones(B, device=dev), nb_t, torch.ones_like(dense))
            return mask_to_pattern(valid[:, None, :].expand(B, Hp, T), T)

        probe = self._probe(q, ls)  # [B, Hq, D] float32
        means = self._block_means(k, lo, nb, ls)  # [B, Hkv, NB, D] float32
        qs = probe.view(B, Hkv, G, D).sum(2)  # [B, Hkv, D]: the group's heads against the shared key
        dot = torch.einsum("bhd,bhnd->bhn", qs, means)  # [B, Hkv, NB]
        eps = 1e-12
        if Hp == 1:
            pn = probe.flatten(1).norm(dim=-1)  # [B]
            mn = (G * means.square().sum(-1).sum(1)).sqrt()  # [B, NB]: norm of the group-repeated keys
            cos = (dot.sum(1) / (pn[:, None] * mn).clamp_min(eps))[:, None]  # [B, 1, NB]
        else:
            pn = probe.view(B, Hkv, G * D).norm(dim=-1)  # [B, Hkv]
            mn = math.sqrt(G) * means.norm(dim=-1)  # [B, Hkv, NB]
            cos = dot / (pn[..., None] * mn).clamp_min(eps)
        vblk = torch.arange(NB, device=dev)[None, :] < nb_t[:, None]  # [B, NB]
        any_blk = vblk.any(-1)
        s = cos.masked_fill(~vblk[:, None, :], float("-inf"))
        s = torch.where(any_blk[:, None, None], s, torch.zeros_like(s))
        p = torch.softmax(s / self.temperature, -1)
        ent = -(p * p.clamp_min(1e-30).log()).sum(-1).mean(1)  # [B], heads averaged
        hn = torch.where(nb_t >= 2, ent / nb_t.clamp_min(2).float().log(), torch.ones_like(ent))

        used = self._allocate(S, ctx.layer, hn, nb_t, dense)
        K = max(1, min(NB, int(used.max())))
        top = s.topk(K, dim=-1).indices  # [B, Hp, K]
        keep = (torch.arange(K, device=dev)[None, None, :] < used[:, None, None]).expand(B, Hp, K)
        sel = torch.zeros(B, Hp, NB, dtype=torch.bool, device=dev)
        sel.scatter_(2, top, keep)
        sel &= vblk[:, None, :]

        bend = self.n_init + nb_t * self.block_size  # [B]: first token (relative) of the local window
        fixed = valid & ((rel < self.n_init) | (rel >= bend[:, None]))
        inblk = valid & (rel >= self.n_init) & (rel < bend[:, None])
        j = ((rel - self.n_init).clamp_min(0) // self.block_size).clamp_max(NB - 1)  # [B, T]
        mask = fixed[:, None] | (inblk[:, None] & sel.gather(2, j[:, None, :].expand(B, Hp, T)))
        return mask_to_pattern(mask, T)  # dense rows: used == nb, every block is selected
