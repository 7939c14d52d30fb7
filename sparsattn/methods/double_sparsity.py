"""double_sparsity: calibrated outlier channels -> (4-bit) label cache -> approximate top-k tokens."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..calibration import Field, ModelShape, read_json, write_json
from ..kv.quant import quantize_minmax, unpack4
from ..kernels.unit_scores import label_scores
from ._select import decode_inputs, lengths_since, record_lengths, reduce_group, topk_pattern, valid_units
from ..patterns import TokenPattern
from .base import Calibrated, Method, PresetContext, SelectContext, register


def _channel_table(f: Field) -> dict:
    """``{layer: [[channel ids] per KV head]}`` from a field (a file's ``channels`` or the argument),
    every layer a non-empty list of equally long lists of distinct ids >= 0 (ValueError naming the field)."""
    out = {}
    for layer, rows in f.int_keys(0).items():
        heads = rows.as_list(min_len=1)
        ids = [h.int_list(0) for h in heads]
        for h, row in zip(heads, ids):
            if not row or len(row) != len(ids[0]):
                raise h.error(f"a non-empty list of {len(ids[0]) or 'r >= 1'} channel ids (as head 0)",
                              f"{len(row)} ids")
            if len(set(row)) != len(row):
                raise h.error("distinct channel ids", row)
        out[layer] = ids
    return out


def pseudo_quantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """pseudo_quantize: per-row (last dim) min-max quantisation to ``bits`` and back, in float32, as
    Double Sparsity's evaluation code does to the query's and the keys' label channels (arXiv
    2408.07092): ``scale = (2**bits - 1) / (max - min)`` (1 when ``max == min``), codes
    ``round((x - min) * scale)`` clamped to ``[0, 2**bits - 1]``, result ``codes / scale + min``."""
    qmax = 2 ** bits - 1
    xf = x.float()
    lo, hi = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
    rng = hi - lo
    scale = qmax / torch.where(rng > 0, rng, torch.ones_like(rng))
    return torch.clamp(torch.round((xf - lo) * scale), 0, qmax) / scale + lo


@register("double_sparsity")
@dataclass
class DoubleSparsity(Calibrated, Method):
    """DoubleSparsity: top-k tokens from a label cache of calibrated outlier channels (Double Sparsity, arXiv 2408.07092).

    Offline: ``calibrate(qs, ks)`` ranks, per layer and KV head, the channels by mean ``|q_c * k_c|``
    over captured (post-RoPE) queries and keys and keeps the top ``r = D / group_factor``; the
    result is saved/loaded as JSON (``save`` / ``load`` / ``path=``; ``fit(captured, path=...)`` does both;
    from a model: ``sparsattn calibrate double_sparsity``). Runtime: the label cache
    ``K[..., channels]`` is kept incrementally in ``ctx.state["double_sparsity"][layer]``, stored
    low-bit: ``label_bits`` 4 (default) = per-token min-max codes packed two per uint8 byte with a
    float16 scale and zero point per token (``codes [B, Hkv, cap, ceil(r / 2)]``, ``scale`` /
    ``zero [B, Hkv, cap, 1]``; the reference code quantises labels per token by min/max), 8 = one
    code per byte, 16 = unquantised labels in the cache's dtype. Approximate scores are computed on
    the fly from the codes: ``q[ch] · label = scale * (q[ch] · codes) + zero * sum(q[ch])``, divided
    by ``sqrt(r)``; they pick the top ``token_budget`` tokens (``budget_ratio`` instead gives
    ``ceil(ratio * T)``, the paper's "1/16" setting). ``label_nbytes(state)`` reports the bytes the
    label cache holds (also ``ctx.label_bytes`` after each ``select``).

    The query's label channels are quantised the same way before scoring (``quantize_query=True``,
    the default): per query head min-max to ``label_bits`` and dequantised, as the authors'
    evaluation code (``evaluation/modify_llama.py``: ``pseudo_quantize`` of the query's and the
    keys' outlier channels) and the paper's 4-bit label setting; ``quantize_query=False`` scores
    the full-precision query against the quantised labels (slightly more exact approximate scores,
    not the paper's). No effect at ``label_bits=16``.

    Defaults from the repository's converter (``token_budget`` (heavy_const) 256, group_factor 8,
    label_bits 4) [code, per METHODS.md B2]. GQA: scores of the query heads of a group are
    combined by ``head_reduce`` (``"max"``), giving one token list per KV head; ``"none"`` keeps
    one token list per query head (pattern heads Hq), the authors' selection (their code repeats
    K/V per query head). Channels are calibrated per KV head (mean over the group).

    ``select(q [B, Hq, (1,) D], k_cache [B, Hkv, T, D], ctx)`` needs ``ctx.layer`` and a
    calibration (``needs = ("calibration",)``).

    Offload variant (the paper's Double Sparsity-Offload): ``attend_offloaded(q, cache, layer, ctx)``
    runs one decode step on a ``KVCache`` layer kept in host memory; only the label cache is on the
    device and only the selected K/V rows are copied over (optionally the next layer's rows are
    prefetched with a predicted query, ``next_q``); bytes moved in ``ctx.h2d_bytes``.
    """

    paper = "Post-Training Sparse Attention with Double Sparsity (arXiv 2408.07092)"
    phase = "decode"
    needs = ("calibration",)
    token_budget: int = 256
    budget_ratio: Optional[float] = None
    group_factor: int = 8
    label_bits: int = 4
    head_reduce: str = "max"
    quantize_query: bool = True
    channels: Optional[dict] = None  # {layer: [[channel ids] per kv head]}
    path: Optional[str] = None  # channels JSON written by ``save`` (read at construction)
    @classmethod
    def calibrate_from_qk(cls, qs: Sequence[torch.Tensor], ks: Sequence[torch.Tensor], config: dict) -> dict:
        """Preset: ``{"channels": ...}`` ranked by ``calibrate`` on captured per-layer q/k with ``config``'s
        ``group_factor`` (channels per KV head = D / group_factor)."""
        return {"channels": cls(**{k: v for k, v in config.items() if k != "channels"}).calibrate(qs, ks)}

    @classmethod
    def budget_config(cls, budget_tokens: int, ctx: PresetContext) -> dict:
        """Preset: ``token_budget = B`` (the channels come from a calibration)."""
        return {"token_budget": int(budget_tokens)}


    def __post_init__(self):
        if not isinstance(self.token_budget, int) or self.token_budget < 1:
            raise ValueError(f"token_budget: expected an int >= 1, got {self.token_budget!r}")
        if self.budget_ratio is not None and not (isinstance(self.budget_ratio, (int, float)) and 0 < self.budget_ratio <= 1):
            raise ValueError(f"budget_ratio: expected None or a number in (0, 1], got {self.budget_ratio!r}")
        if not isinstance(self.group_factor, int) or self.group_factor < 1:
            raise ValueError(f"group_factor: expected an int >= 1, got {self.group_factor!r}")
        if self.label_bits not in (4, 8, 16):
            raise ValueError(f"label_bits: expected 4, 8 or 16, got {self.label_bits!r}")
        if self.head_reduce not in ("max", "mean", "sum", "none"):
            raise ValueError(f"head_reduce: expected 'max', 'mean', 'sum' or 'none', got {self.head_reduce!r}")
        if not isinstance(self.quantize_query, bool):
            raise ValueError(f"quantize_query: expected a bool, got {self.quantize_query!r}")
        if self.channels is not None:
            if self.path is not None:
                raise ValueError("channels/path: give the channels or a file to read them from, not both")
            self.channels = _channel_table(Field(self.channels, "double_sparsity(channels=...)", "channels"))
        self._load_path()

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
        self.__dict__.pop("_ch_dev", None)
        return out

    @classmethod
    def fit(cls, data, *, path: Optional[str] = None, **config) -> "DoubleSparsity":
        """fit: a calibrated instance (hyper-parameters ``config``) from captured q/k: ``data`` is
        ``{layer: (q, k[, v])}`` (layers 0..L-1) or a pair of per-layer lists ``(qs, ks)``; ranks the
        channels with ``calibrate`` and saves them to ``path`` when given."""
        if isinstance(data, dict):
            layers = sorted(data, key=int)
            if [int(l) for l in layers] != list(range(len(layers))):
                raise ValueError(f"data: expected layers 0..{len(layers) - 1}, got {layers}")
            qs, ks = [data[l][0] for l in layers], [data[l][1] for l in layers]
        elif isinstance(data, (tuple, list)) and len(data) == 2:
            qs, ks = data
        else:
            raise ValueError(f"data: expected {{layer: (q, k)}} or (qs, ks), got {type(data).__name__}")
        inst = cls(**config)
        inst.calibrate(list(qs), list(ks))
        if path is not None:
            inst.path = inst.save(path)
        return inst

    def save(self, path: str) -> str:
        """save: write the channels as JSON ``{"method": "double_sparsity", "group_factor": g,
        "channels": {layer: [[channel ids] per KV head]}}`` (atomically); returns the path."""
        if self.channels is None:
            raise ValueError("channels: nothing to save; run calibrate() first")
        return write_json(path, {"method": "double_sparsity", "group_factor": self.group_factor,
                          "channels": {str(l): [list(map(int, h)) for h in c] for l, c in self.channels.items()}})

    def _read_calibration(self, path: str, *, expect_shape=None) -> None:
        """Channels from a file written by ``save`` (``load(path)`` on the class or an instance), read
        through ``sparsattn.calibration``: a missing, binary or truncated file, a file that is not a
        JSON object, another method, or a mistyped channel list raise ValueError naming the file and
        the field; ``expect_shape`` (a ModelShape) checks layers, KV heads and channel ids < head_dim."""
        root = read_json(path, kind="double_sparsity calibration JSON file")
        root.as_dict()
        root["method"].as_str(["double_sparsity"])
        if root.get("group_factor") is not None:
            root["group_factor"].as_int(1)
        table = _channel_table(root["channels"])
        if expect_shape is not None:
            shp = expect_shape if isinstance(expect_shape, ModelShape) else ModelShape.from_dict(expect_shape)
            f = root["channels"]
            if sorted(table) != list(range(shp.num_layers)):
                raise f.error(f"layers 0..{shp.num_layers - 1} (expect_shape)", f"layers {sorted(table)}")
            for layer, rows in table.items():
                if len(rows) != shp.num_kv_heads or max(max(r) for r in rows) >= shp.head_dim:
                    raise f[str(layer)].error(f"{shp.num_kv_heads} KV heads of channel ids < {shp.head_dim} "
                                              "(expect_shape)")
        self.channels = table
        self.__dict__.pop("_ch_dev", None)

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

        def rows(start, end):
            return torch.gather(k[:, :, start:end], 3, ch[None, :, None, :].expand(B, -1, end - start, -1))

        layer = None if ctx is None else ctx.layer
        return self._label_state(rows, (B, H, T, ch.shape[1]), k.dtype, k.device, kv_lens, ctx, layer)

    def _label_state(self, rows, shape, dtype, device, kv_lens: torch.Tensor, ctx, layer, ragged: bool = False) -> dict:
        """Shared body of the label cache: ``rows(start, end)`` returns the new labels
        ``[B, Hkv, end - start, r]`` on ``device`` (from a resident K: rows from the shortest
        sequence's old length to the longest new one); with ``ragged``, ``rows(b_idx, t_idx)``
        returns ``[n, Hkv, r]`` for exactly each sequence's new rows (host K: nothing extra moved)."""
        B, H, T, r = shape
        names = ("labels",) if self.label_bits == 16 else ("codes", "scale", "zero")
        st = ctx.state.setdefault("double_sparsity", {}).get(layer) if ctx is not None else None
        fits = (st is not None and all(n in st for n in names) and st[names[0]].shape[:2] == (B, H)
                and st.get("r") == r)
        ok, start, end = lengths_since(st if fits else None, kv_lens)  # at most one host sync
        if not (fits and ok):
            if self.label_bits == 16:
                st = {"labels": torch.zeros(B, H, T, r, dtype=dtype, device=device)}
            else:
                nb = -(-r // 2) if self.label_bits == 4 else r
                st = {"codes": torch.zeros(B, H, T, nb, dtype=torch.uint8, device=device),
                      "scale": torch.zeros(B, H, T, 1, dtype=torch.float16, device=device),
                      "zero": torch.zeros(B, H, T, 1, dtype=torch.float16, device=device)}
            st.update(kv_lens=torch.zeros_like(kv_lens), r=r)
            start = 0
        cap = st[names[0]].shape[2]
        if cap < T:
            new_cap = max(T, 2 * cap)
            for n in names:
                t = st[n]
                st[n] = torch.cat([t, t.new_zeros(B, H, new_cap - cap, t.shape[-1])], 2)
        if ragged:  # only each sequence's own new rows: rows(b, t) -> [n, Hkv, r]
            t = torch.arange(T, device=kv_lens.device)
            bi, ti = ((t >= st["kv_lens"][:, None]) & (t < kv_lens[:, None])).nonzero(as_tuple=True)
            if bi.numel():
                new = rows(bi, ti)
                bi, ti = bi.to(device), ti.to(device)
                if self.label_bits == 16:
                    st["labels"][bi, :, ti] = new
                else:
                    qn = quantize_minmax(new, self.label_bits)
                    st["codes"][bi, :, ti] = qn.codes
                    st["scale"][bi, :, ti] = qn.scale
                    st["zero"][bi, :, ti] = qn.zero
        else:
            if end > start:
                new = rows(start, end)
                if self.label_bits == 16:
                    st["labels"][:, :, start:end] = new
                else:
                    qn = quantize_minmax(new, self.label_bits)
                    st["codes"][:, :, start:end] = qn.codes
                    st["scale"][:, :, start:end] = qn.scale
                    st["zero"][:, :, start:end] = qn.zero
        record_lengths(st, kv_lens)
        if ctx is not None:
            ctx.state["double_sparsity"][layer] = st
        return st

    def dequantized_labels(self, st: dict, T: int) -> torch.Tensor:
        """The first ``T`` labels of a layer's label cache ``[B, Hkv, T, r]`` as float32 (for inspection)."""
        if self.label_bits == 16:
            return st["labels"][:, :, :T].float()
        codes = st["codes"][:, :, :T]
        c = unpack4(codes, st["r"]) if self.label_bits == 4 else codes
        return c.float() * st["scale"][:, :, :T].float() + st["zero"][:, :, :T].float()

    def _approx_scores(self, qc: torch.Tensor, st: dict, T: int) -> torch.Tensor:
        """``qc [B, Hkv, G, r]`` · labels, reduced over each group by ``head_reduce`` and divided by
        ``sqrt(r)``: ``[B, Hkv, T]`` float32. Quantised labels are scored straight from the stored
        codes in one pass (``sparsattn.kernels.unit_scores.label_scores``: Triton on CUDA)."""
        B, Hkv, G, r = qc.shape
        if self.label_bits == 16:
            lab = st["labels"][:, :, :T]
            s = torch.matmul(qc.to(lab.dtype), lab.transpose(-1, -2)).float() / math.sqrt(r)
            return s.reshape(B, Hkv * G, T) if self.head_reduce == "none" else reduce_group(s, self.head_reduce)
        return label_scores(qc.reshape(B, Hkv * G, r), st["codes"][:, :, :T], st["scale"][:, :, :T, 0],
                            st["zero"][:, :, :T, 0], r=st["r"], bits=self.label_bits, reduce=self.head_reduce,
                            mult=1.0 / math.sqrt(r))

    def _channels(self, layer: int, Hkv: int, D: int, device) -> torch.Tensor:
        if self.channels is None:
            raise ValueError("double_sparsity: not calibrated; call calibrate(qs, ks) or load(path) first")
        if layer not in self.channels:
            raise ValueError(f"ctx.layer: no calibrated channels for layer {layer} (have {sorted(self.channels)})")
        # checked on the host list and kept on the device per (layer, device), valid while the layer's
        # list is the same object: no host sync and no host-to-device copy per decode step
        key = (layer, str(device), Hkv, D)
        cache = self.__dict__.setdefault("_ch_dev", {})
        rows = self.channels[layer]
        hit = cache.get(key)
        if hit is not None and hit[0] is rows:
            return hit[1]
        if (not isinstance(rows, (list, tuple)) or len(rows) != Hkv or not rows
                or len({len(h) for h in rows}) != 1 or not all(0 <= int(c) < D for h in rows for c in h)):
            raise ValueError(f"channels[{layer}]: expected [Hkv={Hkv}, r] ids in [0, {D}), got "
                             f"{len(rows) if isinstance(rows, (list, tuple)) else type(rows).__name__} rows")
        ch = torch.as_tensor(rows, device=device, dtype=torch.long)
        if len(cache) > 256:
            cache.clear()
        cache[key] = (rows, ch)
        return ch

    def _topk(self, q: torch.Tensor, st: dict, ch: torch.Tensor, kl: torch.Tensor, T: int):
        """Top-k TokenPattern ``[B, Hkv, k]`` of ``q [B, Hq, D]`` from a layer's label cache."""
        B, Hq, D = q.shape
        Hkv, r = ch.shape
        qg = q.view(B, Hkv, Hq // Hkv, D)
        qc = torch.gather(qg, 3, ch[None, :, None, :].expand(B, -1, Hq // Hkv, -1))
        if self.quantize_query and self.label_bits < 16:  # the query's labels quantised as the keys' (authors)
            qc = pseudo_quantize(qc, self.label_bits)
        s = self._approx_scores(qc, st, T)  # [B, Hkv, T] ([B, Hq, T] for head_reduce="none")
        budget = self.token_budget if self.budget_ratio is None else math.ceil(self.budget_ratio * T)
        return topk_pattern(s, budget, valid_units(kl, T), T)

    def select(self, q, k, ctx: SelectContext | None = None):
        q, k, kl = decode_inputs(q, k, ctx)
        if self.channels is None:
            raise ValueError("double_sparsity: not calibrated; call calibrate(qs, ks) or load(path) first")
        layer = 0 if ctx is None or ctx.layer is None else ctx.layer
        ch = self._channels(layer, k.shape[1], q.shape[-1], k.device)
        st = self._labels(k, ch, kl, ctx)
        if ctx is not None:
            ctx.label_bytes = self.label_nbytes(ctx.state, ctx.layer)
        return self._topk(q, st, ch, kl, k.shape[2])

    # ------------------------------------------------------------------ offload (Double Sparsity-Offload)
    def _offloaded_layer(self, cache, layer: int, name: str = "layer"):
        """Check that ``layer`` of ``cache`` is offloaded with one length for every KV head of a sequence."""
        from ..kv.cache import KVCache

        if not isinstance(cache, KVCache):
            raise ValueError(f"cache: expected a sparsattn.kv.KVCache, got {type(cache).__name__}")
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < cache.n_layers:
            raise ValueError(f"{name}: expected an int in [0, {cache.n_layers}), got {layer!r}")
        L = cache.layers[layer]
        if L.lengths is None or not L.on_host:
            raise ValueError(f"{name}: layer {layer} is not offloaded (call cache.offload({layer}) first; "
                             "for a resident cache use select() + attention)")
        lens = cache.lengths(layer)
        if not bool((lens == lens[:, :1]).all()):
            raise ValueError(f"cache: layer {layer} has different lengths per KV head (evicted rows); "
                             "Double Sparsity-Offload needs one length per sequence")
        return L

    def _host_label_rows(self, cache, L, ch_host: torch.Tensor):
        """``rows(b_idx, t_idx)``: the calibrated channels of host keys at slots ``(b, t)`` copied to the
        device ``[n, Hkv, r]`` (only those ``r`` channels cross the bus); bytes counted in ``moved``."""
        H = cache.kv_heads
        r = ch_host.shape[1]
        moved = [0]

        def rows(bi, ti):
            bi, ti = bi.cpu(), ti.cpu()
            if cache.layout == "paged":
                P = cache.page_size
                pg = L.block_table.cpu().clamp_min(0)[bi, ti // P].long()
                src = L.k[pg, :, ti % P]  # [n, H, D]
            else:
                src = L.k[bi, :, ti]  # [n, H, D]
            pin = torch.cuda.is_available()
            out = torch.empty(src.shape[0], H, r, dtype=L.k.dtype, pin_memory=pin)
            torch.gather(src, 2, ch_host[None].expand(src.shape[0], -1, -1), out=out)
            moved[0] += out.numel() * out.element_size()
            return out.to(cache.device, non_blocking=pin)

        return rows, moved

    def _offload_select(self, q: torch.Tensor, cache, layer: int, ctx):
        """Update the layer's label cache from host keys and return ``(pattern, label bytes moved)``."""
        if self.head_reduce == "none":
            raise ValueError("head_reduce: the offload variant fetches one token list per KV head; use 'max', "
                             "'mean' or 'sum' with attend_offloaded (got 'none')")
        L = self._offloaded_layer(cache, layer)
        D = cache.head_dim
        if not isinstance(q, torch.Tensor) or q.dim() != 3 or q.shape[0] != cache.batch or q.shape[2] != D \
                or q.shape[1] % cache.kv_heads:
            raise ValueError(f"q: expected [B={cache.batch}, Hq (a multiple of {cache.kv_heads}), D={D}], "
                             f"got {getattr(q, 'shape', type(q).__name__)}")
        ch = self._channels(layer, cache.kv_heads, D, cache.device)
        kl = cache.kv_lens(layer).long()
        T = L.block_table.shape[1] * cache.page_size if cache.layout == "paged" else L.k.shape[2]
        rows, moved = self._host_label_rows(cache, L, ch.cpu())
        st = self._label_state(rows, (cache.batch, cache.kv_heads, T, ch.shape[1]), cache.dtype, cache.device,
                               kl, ctx, layer, ragged=True)
        pat = self._topk(q.to(cache.device), st, ch, kl, T)
        n = max(int(pat.counts.max()), 1)  # no padding rows over the bus (budget > a sequence's length)
        if n < pat.indices.shape[-1]:
            pat = TokenPattern(pat.indices[..., :n].contiguous(), pat.counts, T)
        return pat, moved[0]

    def attend_offloaded(self, q: torch.Tensor, cache, layer: int, ctx: SelectContext | None = None, *,
                         scale: Optional[float] = None, next_q: Optional[torch.Tensor] = None,
                         backend: Optional[str] = None) -> torch.Tensor:
        """DoubleSparsity.attend_offloaded: one decode step of Double Sparsity-Offload (arXiv 2408.07092).

        ``layer`` of ``cache`` (a ``KVCache``) must be offloaded (``cache.offload(layer)``; new tokens
        are appended to host memory with ``cache.append``). Only the label cache stays on the device
        (in ``ctx.state["double_sparsity"][layer]``, the same state ``select`` keeps): the calibrated
        ``r`` channels of the keys appended since the last step are indexed in host memory and only
        that ``[B, Hkv, n_new, r]`` slice is copied to the device. Top-k runs on the device with the
        labels; only the selected K/V rows are fetched (``cache.prefetch``), and exact attention runs
        on them. Returns ``[B, Hq, D]``; equals ``select`` + ``sparse_decode_attention`` on the same
        cache kept resident.

        ``q``: ``[B, Hq, D]`` post-RoPE query of this layer. ``scale``: softmax scale (default
        ``ctx.scale`` or ``1/sqrt(D)``). ``backend``: passed to ``sparse_decode_attention``.

        ``next_q`` (optional) ``[B, Hq, D]``: a *predicted* query of layer ``layer + 1`` (the paper
        uses the next layer's projection of this layer's input, since adjacent layers' activations are
        similar). The next layer's top-k is chosen with it on its labels (keys up to the previous step)
        and its rows are copied right away (side CUDA stream: the copy overlaps the rest of this layer
        on the device). At layer ``layer + 1`` the exact top-k is computed with its real query and
        only the rows the speculative copy missed (including this step's new token) are fetched, so
        the result stays exact. Not overlapped: the host-side gather of the rows (CPU, synchronous),
        the label-row copy (small), and the on-demand fetch of misses. On the CPU nothing overlaps.

        Bytes moved host -> device this call are in ``ctx.h2d_bytes``: ``labels`` (new label
        rows), ``kv`` (K/V rows fetched on demand, padding rows included), ``kv_prefetched`` (rows
        copied by the previous layer's speculative prefetch for this layer), ``next_prefetch`` (rows
        copied now for the next layer), ``hits`` / ``misses`` (selected tokens found / not found in the
        speculative copy) and ``total`` (labels + kv + next_prefetch: what crossed the bus in this call).
        """
        from ..kernels.sparse_decode import sparse_decode_attention

        if ctx is None:
            ctx = SelectContext(layer=layer)
        if not isinstance(ctx, SelectContext):
            raise ValueError(f"ctx: expected a SelectContext or None, got {type(ctx).__name__}")
        if ctx.layer is not None and ctx.layer != layer:
            raise ValueError(f"ctx.layer: expected None or {layer!r} (the layer argument), got {ctx.layer!r}")
        if isinstance(q, torch.Tensor) and q.dim() == 4 and q.shape[2] == 1:
            q = q[:, :, 0]
        pat, lab_bytes = self._offload_select(q, cache, layer, ctx)
        if next_q is not None:  # validate before any copy
            if isinstance(next_q, torch.Tensor) and next_q.dim() == 4 and next_q.shape[2] == 1:
                next_q = next_q[:, :, 0]
            if not isinstance(next_q, torch.Tensor) or tuple(next_q.shape) != tuple(q.shape):
                raise ValueError(f"next_q: expected None or a tensor {tuple(q.shape)} (as q), "
                                 f"got {getattr(next_q, 'shape', type(next_q).__name__)}")
            if layer + 1 >= cache.n_layers:
                raise ValueError(f"next_q: layer {layer} is the last layer; there is no next layer to prefetch")
            self._offloaded_layer(cache, layer + 1, "next_q (layer + 1)")
            if self.channels is None or layer + 1 not in self.channels:
                raise ValueError(f"next_q: no calibrated channels for layer {layer + 1}")
        spec = ctx.state.setdefault("double_sparsity_prefetch", {}).pop(layer, None)
        stats = {"labels": lab_bytes, "kv": 0, "kv_prefetched": 0, "next_prefetch": 0, "hits": 0, "misses": 0}
        B, H = cache.batch, cache.kv_heads
        T = pat.kv_len
        if spec is not None and (spec["kv_len"] > T or bool((spec["kv_lens"] > cache.kv_lens(layer).long()).any())):
            spec = None  # the layer was rebuilt or shrunk since the speculative copy: not trusted
        if spec is not None:
            pf0, slots0 = spec["pf"].wait(), spec["slots"]  # slots0 [B, H, n0] long, -1 = not fetched
            stats["kv_prefetched"] = spec["bytes"]
            n0 = pf0.k.shape[2]
            # where each slot sits in the speculative buffer (-1: not there)
            where = torch.full((B, H, T + 1), -1, dtype=torch.long, device=cache.device)
            s0 = torch.where(slots0 >= 0, slots0, torch.full_like(slots0, T))
            where.scatter_(2, s0, torch.arange(n0, device=cache.device).expand(B, H, n0).contiguous())
            where[..., T] = -1
            kmax = pat.indices.shape[-1]
            sel = pat.indices.long()
            ok = torch.arange(kmax, device=cache.device) < pat.counts[..., None].long()
            pos = torch.gather(where, 2, sel)
            hit = ok & (pos >= 0)
            miss = ok & (pos < 0)
            stats["hits"], stats["misses"] = int(hit.sum()), int(miss.sum())
            # the misses, in sorted order, as a pattern over the cache
            key = torch.where(miss, sel, sel + T)
            midx = key.sort(-1).values
            mcnt = miss.sum(-1)
            nm = int(mcnt.max())  # rows to fetch now (padding rows beyond the widest row are not sent)
            midx = torch.where(midx >= T, torch.zeros_like(midx), midx)[..., :max(nm, 1)]
            if nm:
                pf1 = cache.prefetch(layer, TokenPattern(midx.to(torch.int32).contiguous(), mcnt.to(torch.int32), T)).wait()
                stats["kv"] = self._pf_bytes(pf1)
            else:
                pf1 = type(pf0)(pf0.k[:, :, :0], pf0.v[:, :, :0], pf0.pattern,
                                None if pf0.log_weight is None else pf0.log_weight[:, :, :0])
            # a miss's place in pf1 = its rank among the misses of its row
            rank = torch.cumsum(miss.long(), -1) - 1
            buf = torch.where(hit, pos, n0 + rank)
            buf = torch.where(ok, buf, torch.full_like(buf, 2 ** 30))
            buf = buf.sort(-1).values
            buf = torch.where(buf >= 2 ** 30, torch.zeros_like(buf), buf)
            k_all = torch.cat([pf0.k, pf1.k], 2)
            v_all = torch.cat([pf0.v, pf1.v], 2)
            lw = None
            if pf0.log_weight is not None:
                lw_all = torch.cat([pf0.log_weight, pf1.log_weight], 2)
                lw = torch.gather(lw_all, 2, buf)
            fpat = TokenPattern(buf.to(torch.int32).contiguous(), pat.counts.to(torch.int32), k_all.shape[2])
        else:
            pf = cache.prefetch(layer, pat).wait()
            stats["kv"] = self._pf_bytes(pf)
            k_all, v_all, fpat, lw = pf.k, pf.v, pf.pattern, pf.log_weight
        if next_q is not None:
            npat, nlab = self._offload_select(next_q, cache, layer + 1, ctx)
            npf = cache.prefetch(layer + 1, npat)  # asynchronous on CUDA; waited for at layer + 1
            cnt = npat.counts.long()
            nslots = torch.where(torch.arange(npat.indices.shape[-1], device=cache.device) < cnt[..., None],
                                 npat.indices.long(), torch.full_like(npat.indices, -1, dtype=torch.long))
            nb = self._pf_bytes(npf)
            ctx.state["double_sparsity_prefetch"][layer + 1] = {"pf": npf, "slots": nslots, "kv_len": npat.kv_len,
                                                                 "kv_lens": cache.kv_lens(layer + 1).long(), "bytes": nb}
            stats["labels"] += nlab
            stats["next_prefetch"] = nb
        sc = scale if scale is not None else ctx.scale
        out = sparse_decode_attention(q.to(k_all.dtype), k_all, v_all, fpat, scale=sc, log_weight=lw, backend=backend)
        stats["total"] = stats["labels"] + stats["kv"] + stats["next_prefetch"]
        ctx.h2d_bytes = stats
        ctx.label_bytes = self.label_nbytes(ctx.state, layer)
        return out

    @staticmethod
    def _pf_bytes(pf) -> int:
        n = pf.k.numel() * pf.k.element_size() + pf.v.numel() * pf.v.element_size()
        if pf.log_weight is not None:
            n += pf.log_weight.numel() * pf.log_weight.element_size()
        return n
