"""tidal_decode: top-k positions chosen in two full-attention layers and reused by the others."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._select import decode_inputs, full_pattern, group_scores, topk_pattern, valid_units
from .base import Method, PresetContext, SelectContext, register


@register("tidal_decode")
@dataclass
class TidalDecode(Method):
    """TidalDecode: position-persistent sparse attention (TidalDecode, arXiv 2410.05076).

    Per decode step: layers ``< sparse_layer_start`` are dense. The token-selection layer
    ``sparse_layer_start`` and the re-selection layer ``correction_layer`` run FULL attention over
    the cache and only record the top ``token_budget`` positions of the exact ``q·k`` scores; every
    other layer ``> sparse_layer_start`` attends to the positions recorded by the last selection
    layer of the same step. (As the paper and the authors' ``src/tidal_build/modify_llama.py``:
    the selection layers return the full pattern; the top-k is stored, not applied there.) The
    positions live in ``ctx.state["tidal_decode"]`` only (keyed by the cache length, so a stale
    selection from an earlier step is refused).

    Defaults: ``sparse_layer_start`` 2 and ``correction_layer`` 13 (the repository's Llama-3-8B
    example) [code]; ``token_budget`` 2048 lies in the paper's evaluated range 128..4096 (the
    exact default is unverified). GQA: ``head_reduce`` combines the scores of a group's query
    heads (default ``"max"``: one token list per KV head, read once for the group);
    ``head_reduce="none"`` keeps one top-k list per query head, which is the authors' selection
    (their code repeats the KV heads and takes the top-k of each query head's scores). All layers
    must have the same number of KV heads.

    ``select(q [B, Hq, (1,) D], k_cache [B, Hkv, T, D], ctx) -> TokenPattern`` needs ``ctx.layer``;
    pattern heads Hkv (Hq for ``head_reduce="none"``).
    """

    paper = "TidalDecode: Fast and Accurate LLM Decoding with Position Persistent Sparse Attention (arXiv 2410.05076)"
    phase = "decode"
    token_budget: int = 2048
    sparse_layer_start: int = 2
    correction_layer: int = 13
    head_reduce: str = "max"
    @classmethod
    def budget_config(cls, budget_tokens: int, ctx: PresetContext) -> dict:
        """Preset: ``token_budget = B``, selection from layer 2, the re-selection layer scaled from the
        paper's 13 of 32 layers (Llama-3-8B) to ``ctx.n_layers`` (layer 3 of 8). Models with fewer than
        5 layers select earlier so that at least one layer attends sparsely (both selection layers run
        full attention)."""
        start = max(0, min(2, ctx.n_layers - 3))
        corr = max(start + 1, min(round(13 * ctx.n_layers / 32), ctx.n_layers - 2))
        return {"token_budget": int(budget_tokens), "sparse_layer_start": start, "correction_layer": corr}


    def __post_init__(self):
        if not isinstance(self.token_budget, int) or self.token_budget < 1:
            raise ValueError(f"token_budget: expected an int >= 1, got {self.token_budget!r}")
        if not isinstance(self.sparse_layer_start, int) or self.sparse_layer_start < 0:
            raise ValueError(f"sparse_layer_start: expected an int >= 0, got {self.sparse_layer_start!r}")
        if not isinstance(self.correction_layer, int) or self.correction_layer <= self.sparse_layer_start:
            raise ValueError(f"correction_layer: expected an int > sparse_layer_start ({self.sparse_layer_start}), "
                             f"got {self.correction_layer!r}")
        if self.head_reduce not in ("max", "mean", "sum", "none"):
            raise ValueError(f"head_reduce: expected 'max', 'mean', 'sum' or 'none', got {self.head_reduce!r}")

    def scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Exact ``q·k`` of every cached token: float32 ``[B, Hkv, T]`` reduced over each GQA group by
        ``head_reduce``, or ``[B, Hq, T]`` per query head (``"none"``)."""
        if self.head_reduce != "none":
            return group_scores(q, k, self.head_reduce)
        B, Hq, D = q.shape
        Hkv = k.shape[1]
        s = torch.matmul(q.view(B, Hkv, Hq // Hkv, D).to(k.dtype), k.transpose(-1, -2)).float()
        return s.reshape(B, Hq, k.shape[2])

    def select(self, q, k, ctx: SelectContext | None = None):
        q, k, kl = decode_inputs(q, k, ctx)
        if ctx is None or ctx.layer is None:
            raise ValueError("ctx.layer: TidalDecode needs the layer index (and ctx.state shared across layers)")
        B, Hq, Hkv, T = q.shape[0], q.shape[1], k.shape[1], k.shape[2]
        rows = Hq if self.head_reduce == "none" else Hkv
        layer = ctx.layer
        if layer < self.sparse_layer_start:
            return full_pattern(B, rows, kl, T)
        st = ctx.state.setdefault("tidal_decode", {})
        if layer in (self.sparse_layer_start, self.correction_layer):
            # a selection layer: full attention here; the top-k is recorded for the layers after it
            pat = topk_pattern(self.scores(q, k), self.token_budget, valid_units(kl, T), T)
            st.update(pattern=pat, kv_lens=kl.clone(), T=T, layer=layer)
            return full_pattern(B, rows, kl, T)
        pat = st.get("pattern")
        if pat is None or st["T"] != T or not torch.equal(st["kv_lens"], kl):
            raise ValueError(f"ctx.state['tidal_decode']: no positions for this step at layer {layer}; the token "
                             f"selection layer {self.sparse_layer_start} must run first in every step")
        if pat.heads != rows or pat.batch != B:
            raise ValueError(f"k: expected {rows} pattern heads and batch {B} as at the selection layer, "
                             f"got {pat.heads}, {pat.batch}")
        return pat
