"""retrieval_attention: static sink + window tokens plus tokens retrieved by an ANN index on the host."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ._select import decode_inputs, mask_to_pattern, sink_window_mask
from .base import Method, PresetContext, SelectContext, register


@register("retrieval_attention")
@dataclass
class RetrievalAttention(Method):
    """RetrievalAttention: ANN retrieval of critical keys on the CPU + static tokens (RetrievalAttention,
    arXiv 2409.10516).

    The first ``n_sink`` and last ``window`` tokens are always read (GPU-resident in the paper);
    the others live in an inner-product HNSW index (``hnswlib``, host memory) per (sequence, KV
    head), extended incrementally as tokens leave the window. Each query head of a group retrieves
    its ``top_k`` nearest keys by inner product; the group's union is read. The kernel then attends
    over the union of static and retrieved indices, which equals the paper's log-sum-exp merge of
    the GPU and CPU parts.

    Defaults: 128 initial + 512 recent static tokens [code, MInference's port]; ``top_k`` 100 (the
    paper's small k, [mem], unverified; MInference's port uses 2000). HNSW: ``M`` 16,
    ``ef_construction`` 200, search ``ef = max(ef_search, top_k)``.

    ``index``: ``"hnsw"`` (default: a plain key-key HNSW, the baseline the paper improves on) or
    ``"attention_aware"``: the paper's idea, a key graph built from the prefill queries' exact
    top-``knn`` keys projected onto key-key edges (``sparsattn.methods._ann.AttentionAwareIndex``, degree
    ``2 * M``); it needs ``ctx.prefill_q`` ``[B, Hq, Tp, D]`` on the first decode step
    (at most ``max_build_queries`` per KV head are used). It is a numpy implementation (slower
    than hnswlib per query) that recovers the OOD recall a key-only index loses.

    Index state in ``ctx.state["retrieval_attention"][layer]``. ``select(q, k_cache, ctx)`` ->
    TokenPattern (heads Hkv).
    """

    paper = "RetrievalAttention: Accelerating Long-Context LLM Inference via Vector Retrieval (arXiv 2409.10516)"
    slow = ("builds its HNSW index on the CPU (one thread) at the first decode step of every run: several "
            "seconds per 4K keys x layers x KV heads")
    phase = "decode"
    n_sink: int = 128
    window: int = 512
    top_k: int = 100
    index: str = "hnsw"
    M: int = 16
    ef_construction: int = 200
    ef_search: int = 100
    knn: int = 32
    max_build_queries: int = 4096
    @classmethod
    def budget_config(cls, budget_tokens: int, ctx: PresetContext) -> dict:
        """Preset: ``n_sink = max(1, B // 8)``, ``window = max(1, B // 2 - n_sink)``, ``top_k = max(1,
        B // (2 G))`` per query head (G = ``ctx.group_size``: the union per KV head stays within B);
        the HNSW index (needs hnswlib; the attention-aware index needs the prefill queries)."""
        B = int(budget_tokens)
        n_sink = max(1, B // 8)
        return {"n_sink": n_sink, "window": max(1, B // 2 - n_sink), "top_k": max(1, B // (2 * ctx.group_size)),
                "index": "hnsw"}


    def __post_init__(self):
        for name, lo in (("n_sink", 0), ("window", 0), ("top_k", 0), ("M", 2), ("ef_construction", 1), ("ef_search", 1),
                         ("knn", 1), ("max_build_queries", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
        if self.index not in ("hnsw", "attention_aware"):
            raise ValueError(f"index: expected 'hnsw' or 'attention_aware', got {self.index!r}")

    def _build_queries(self, ctx, b: int, h: int, G: int) -> np.ndarray:
        pq = ctx.prefill_q
        if pq is None:
            raise ValueError("ctx.prefill_q: index='attention_aware' needs the prefill queries "
                             "[B, Hq, Tp, D] of this layer when the index is built (first decode step)")
        qq = pq[b, h * G:(h + 1) * G].detach().float().reshape(-1, pq.shape[-1])
        if qq.shape[0] > self.max_build_queries:  # evenly spaced subsample, the last queries included
            sel = torch.linspace(qq.shape[0] - 1, 0, self.max_build_queries).round().long().flip(0)
            qq = qq[sel]
        return qq.cpu().numpy()

    def _index(self, keys: np.ndarray, ids: np.ndarray, idx=None):
        try:
            import hnswlib
        except ImportError as e:  # the optional 'ann' extra
            raise ImportError("retrieval_attention: index='hnsw' needs hnswlib (pip install 'sparsattn[ann]'); "
                              "index='attention_aware' needs no extra package") from e

        if idx is None:
            idx = hnswlib.Index(space="ip", dim=keys.shape[1])
            idx.init_index(max_elements=max(len(ids), 16), ef_construction=self.ef_construction, M=self.M, random_seed=0)
        elif idx.get_current_count() + len(ids) > idx.get_max_elements():
            idx.resize_index(max(2 * idx.get_max_elements(), idx.get_current_count() + len(ids)))
        if len(ids):
            idx.add_items(keys, ids, num_threads=1)
        return idx

    def select(self, q, k, ctx: SelectContext | None = None):
        q, k, kl = decode_inputs(q, k, ctx)
        ctx = ctx if ctx is not None else SelectContext()
        B, Hq, D = q.shape
        Hkv, T = k.shape[1], k.shape[2]
        G = Hq // Hkv
        mask = sink_window_mask(B, Hkv, T, kl, self.n_sink, self.window).clone()
        states = ctx.state.setdefault("retrieval_attention", {})
        st = states.get(ctx.layer)
        if st is None or len(st["index"]) != B or len(st["index"][0]) != Hkv or any(
                int(kl[b]) < st["kv_lens"][b] for b in range(B)):
            st = {"index": [[None] * Hkv for _ in range(B)], "upto": [self.n_sink] * B, "kv_lens": [0] * B}
            states[ctx.layer] = st
        qh = q.detach().float().cpu().numpy().reshape(B, Hkv, G, D)
        for b in range(B):
            L = int(kl[b])
            end = max(L - self.window, self.n_sink)  # tokens [n_sink, end) live in the index
            lo = st["upto"][b]
            if end > lo:
                keys = k[b, :, lo:end].detach().float().cpu().numpy()
                ids = np.arange(lo, end)
                for h in range(Hkv):
                    kh = np.ascontiguousarray(keys[h])
                    ix = st["index"][b][h]
                    if self.index == "hnsw":
                        st["index"][b][h] = self._index(kh, ids, ix)
                    elif ix is None:
                        from ._ann import AttentionAwareIndex

                        st["index"][b][h] = AttentionAwareIndex(D, degree=2 * self.M, knn=self.knn).build(
                            kh, ids, self._build_queries(ctx, b, h, G))
                    else:
                        ix.add(kh, ids)
                st["upto"][b] = end
            st["kv_lens"][b] = L
            n_idx = max(0, st["upto"][b] - self.n_sink)
            if n_idx == 0 or self.top_k == 0:
                continue
            if self.top_k >= n_idx:  # the budget covers every indexed key: exact
                mask[b, :, self.n_sink:st["upto"][b]] = True
                continue
            for h in range(Hkv):
                ix = st["index"][b][h]
                if self.index == "hnsw":
                    ix.set_ef(max(self.ef_search, self.top_k))
                    labels, _ = ix.knn_query(qh[b, h], k=self.top_k, num_threads=1)
                else:
                    labels = np.concatenate([ix.search(qv, self.top_k, ef=max(self.ef_search, self.top_k)) for qv in qh[b, h]])
                sel = torch.as_tensor(np.unique(labels.astype(np.int64)), device=k.device)
                mask[b, h, sel] = True
        return mask_to_pattern(mask, T)
