"""razor: RazorAttention's retrieval-head split for prefill (arXiv 2407.15891).

Retrieval heads (echo + induction heads, found data-free on repeated random tokens) keep dense
attention; every other head keeps ``n_sink`` sink tokens and a local window of
``max(min_window, N / compression)`` keys.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch

from .. import patterns
from ..calibration import Field, ModelShape, read_calibration, save_calibration
from ._common import calibrated_layer, check_inputs, check_int, check_pow2, merge_heads
from .base import Calibrated, DensityKnob, Method, PresetContext, SelectContext, register

PAPER = "RazorAttention: Efficient KV Cache Compression Through Retrieval Heads (arXiv 2407.15891)"


def repeated_random_tokens(vocab: int, n: int, repeats: int, seed: int = 0, *, low: int = 0) -> torch.Tensor:
    """repeated_random_tokens: ``n`` random token ids in ``[low, vocab)`` (distinct when ``n`` allows)
    repeated ``repeats`` times -> long ``[n * repeats]`` (RazorAttention's data-free probe input)."""
    check_int("vocab", vocab, 1)
    check_int("low", low, 0, vocab - 1)
    check_int("n", n, 2)
    check_int("repeats", repeats, 2)
    g = torch.Generator().manual_seed(int(seed))
    span = vocab - low
    seg = torch.randperm(span, generator=g)[:n] if n <= span else torch.randint(0, span, (n,), generator=g)
    return (seg + low).repeat(repeats)


def echo_induction_scores(q: torch.Tensor, k: torch.Tensor, period: int, *, scale: Optional[float] = None,
                          max_chunk_elems: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor]:
    """echo_induction_scores: per query head, the mean causal attention (over queries after the first
    repetition and the batch) to previous occurrences of the current token (echo) and to the
    tokens that followed them (induction), for q/k captured on a sequence repeating every
    ``period`` tokens -> ``(echo float64 [Hq], induction float64 [Hq])``."""
    check_inputs("echo_induction_scores", q, k, None)
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q tokens: expected the same number as k ({k.shape[2]}), got {T}")
    check_int("period", period, 2, T - 1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    rows_per = max(1, max_chunk_elems // max(1, B * Hq * T))
    echo = torch.zeros(Hq, dtype=torch.float64, device=q.device)
    ind = torch.zeros(Hq, dtype=torch.float64, device=q.device)
    j = torch.arange(T, device=q.device)
    kf = k.float()[:, :, None]
    for r0 in range(period, T, rows_per):
        r1 = min(T, r0 + rows_per)
        i = torch.arange(r0, r1, device=q.device)[:, None]
        s = torch.matmul(q[:, :, r0:r1].float().view(B, Hkv, G, r1 - r0, D), kf.transpose(-1, -2))
        s = s.reshape(B, Hq, r1 - r0, T) * scale
        s = s.masked_fill(j[None, :] > i, float("-inf"))
        p = torch.softmax(s, -1)
        dist = i - j[None, :]
        em = (dist > 0) & (dist % period == 0)
        im = (dist + 1 >= period) & ((dist + 1) % period == 0)
        echo += (p * em).sum((-1, -2)).double().sum(0)
        ind += (p * im).sum((-1, -2)).double().sum(0)
    n = B * (T - period)
    return echo / n, ind / n


#: the fewest recent keys (besides the sink) ``dense_head_count`` leaves every non-retrieval head
AIM_MIN_WINDOW = 32


def sink_window_density(T: int, n_sink: int, window: int) -> float:
    """sink_window_density: the density (kept / causal pairs) of one head keeping the first ``n_sink``
    keys and the ``window`` most recent ones (the query included) in every row of a causal ``T x T``
    attention: rows with at most ``n_sink + window`` keys keep them all."""
    check_int("T", T, 1)
    check_int("n_sink", n_sink, 0)
    check_int("window", window, 1)
    m = min(T, n_sink + window)
    return (m * (m + 1) / 2 + (T - m) * m) / (T * (T + 1) / 2)


def dense_head_count(T: int, target: float, n_heads: int, n_cal: int, *, n_sink: int = 4,
                     min_window: int = AIM_MIN_WINDOW) -> int:
    """dense_head_count: how many retrieval heads RazorAttention keeps dense at density ``target`` and
    length ``T`` (the density preset's rule): a dense head costs 1 (the whole causal region), every
    other head ``c = sink_window_density(T, n_sink, min_window)``, so the most dense heads that leave
    every other head at least ``n_sink + min_window`` keys per row are
    ``n = floor(n_heads x (target - c) / (1 - c))``; clipped to ``[1, n_cal]`` (the calibration's
    own retrieval heads: a head it did not find retrieving is never made dense to fill the budget).
    E.g. 64 heads, ``n_cal = 6``: 6 at 12% and 4K or 8K, 5 at 10% and 4K, 2 at 5% and 4K."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
        raise ValueError(f"target: expected a density in (0, 1], got {target!r}")
    check_int("n_heads", n_heads, 1)
    check_int("n_cal", n_cal, 1, n_heads)
    c = sink_window_density(T, n_sink, min_window)
    n = math.floor(n_heads * (target - c) / (1 - c) + 1e-9) if c < 1 else 0
    return max(1, min(n_cal, n))


@register("razor")
@dataclass
class RazorAttention(Calibrated, Method):
    """RazorAttention: retrieval heads (top echo + top induction heads) dense, other heads
    ``n_sink`` sink tokens + a local window of ``max(min_window, ceil(N / compression))`` keys
    (RazorAttention, arXiv 2407.15891), applied to prefill attention.

    Fit (data-free, RoPE models): feed ``repeated_random_tokens(vocab, n, repeats)`` to the model,
    capture q/k per layer and call ``RazorAttention.fit({layer: (q, k)}, period=n, path=...)``:
    echo/induction scores per head (``echo_induction_scores``), then the top ``echo_fraction`` of
    all heads by echo score plus the top ``induction_fraction`` by induction score are retrieval
    heads (saved as calibration JSON with the model shape). ``select`` needs ``ctx.layer``.
    Pattern heads = query heads.

    The paper compresses the KV cache after prefill; its compensation token (mean of the dropped
    keys/values, weighted by their count) is not a mask and belongs to the KV-cache policy, so it
    is not part of this prefill pattern. ALiBi models (heads chosen from their slopes) are out of scope.

    Defaults, all unverified against the paper (no official code; METHODS.md B5 [mem]):
    compression C=5, min_window S0=4000, n_sink N0=4, echo_fraction=0.01, induction_fraction=0.14
    (about 15% retrieval heads).
    """

    paper = PAPER
    phase = "prefill"
    needs = ("calibration",)
    path: Optional[str] = None
    n_sink: int = 4
    compression: float = 5.0
    min_window: int = 4000
    echo_fraction: float = 0.01
    induction_fraction: float = 0.14
    block_size: int = 64
    _heads: Optional[dict] = field(default=None, repr=False, compare=False)
    _scores: Optional[dict] = field(default=None, repr=False, compare=False)
    _shape: Optional[ModelShape] = field(default=None, repr=False, compare=False)
    @classmethod
    def density_knob(cls, T: int, target: float, ctx: PresetContext) -> DensityKnob:
        """Preset: the retrieval heads of ``ctx.calibration("razor")`` keep every key, the others sink 4
        + a window: the knob (guess from the retrieval-head fraction of ``ctx.n_layers x ctx.n_heads``).
        With ``ctx.work_dir``, only the ``dense_head_count(T, target, heads, n_cal)`` best-scored of the
        file's ``n_cal`` retrieval heads stay dense (``razor_subset``, written under ``work_dir``)."""
        path = ctx.calibration(cls.name)
        if path is None:
            raise ValueError("razor_path: expected a razor calibration JSON, got None")
        if ctx.work_dir is not None:  # keep the top-n heads by score, n from razor's own density
            n_cal = sum(len(h) for h in cls(path=path).retrieval_heads.values())
            if n_cal:
                n_top = dense_head_count(T, target, ctx.n_layers * ctx.n_heads, n_cal)
                path = razor_subset(path, n_top, os.path.join(ctx.work_dir, "calibration", f"razor_top{n_top}.json"))
        n_ret = sum(len(h) for h in cls(path=path).retrieval_heads.values())  # the checked loader
        frac = n_ret / (ctx.n_layers * ctx.n_heads)
        guess = max(1.0, (target - frac) / max(1e-6, 1 - frac) * (T + 1) / 2 - 4)
        blk = ctx.block_size
        return DensityKnob(cls.name, "window", 1, T, True, True, guess,
                           lambda x: dict(path=path, n_sink=4, min_window=int(x), compression=float(T), block_size=blk),
                           lambda x: f"{n_ret} ret. heads, sink4+win{int(x)}")


    def static_pattern_key(self, layer):
        """Preset: retrieval heads and windows depend only on the layer and the lengths."""
        return (layer,)

    def __post_init__(self):
        check_int("n_sink", self.n_sink, 0)
        check_int("min_window", self.min_window, 1)
        if isinstance(self.compression, bool) or not isinstance(self.compression, (int, float)) or \
                not self.compression >= 1:
            raise ValueError(f"compression: expected a number >= 1, got {self.compression!r}")
        for name in ("echo_fraction", "induction_fraction"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ValueError(f"{name}: expected a number in [0, 1], got {v!r}")
        check_pow2("block_size", self.block_size)
        self._load_path()

    def _read_calibration(self, path: str, *, expect_shape=None) -> None:
        cal = read_calibration(path, method="razor", expect_shape=expect_shape)
        self._set(cal.shape, cal.data)

    def _set(self, shape: ModelShape, data) -> None:
        """Install ``{layer: {"retrieval_heads": [...], "echo": [...], "induction": [...]}}`` read
        through ``sparsattn.calibration.Field`` (errors name the file and the field)."""
        if not isinstance(data, Field):
            data = Field(data, "razor calibration", "data")
        heads, scores = {}, {}
        for layer, d in data.int_keys(0, shape.num_layers).items():
            hs = d["retrieval_heads"].int_list(0, shape.num_heads - 1)
            if len(set(hs)) != len(hs):
                raise d["retrieval_heads"].error("distinct head indices")
            heads[layer] = sorted(hs)
            scores[layer] = {name: (d.get(name).float_list(shape.num_heads) if d.get(name) is not None else [])
                             for name in ("echo", "induction")}
        self._heads, self._scores, self._shape = heads, scores, shape

    @property
    def is_fitted(self) -> bool:
        return self._heads is not None

    @property
    def retrieval_heads(self) -> dict:
        """``{layer: [retrieval query heads]}``."""
        return {l: list(h) for l, h in (self._heads or {}).items()}

    @property
    def scores(self) -> dict:
        """``{layer: {"echo": [per head], "induction": [per head]}}``."""
        return {l: {k: list(v) for k, v in d.items()} for l, d in (self._scores or {}).items()}

    @classmethod
    def fit(cls, captured: dict, period: int, *, path: Optional[str] = None, num_layers: Optional[int] = None,
            scale: Optional[float] = None, **config) -> "RazorAttention":
        """fit: score heads on q/k captured from a repeated random-token input (``{layer: (q, k, ...)}``,
        the sequence repeating every ``period`` tokens) and pick retrieval heads; saved to ``path`` if given."""
        inst = cls(**config)
        if not isinstance(captured, dict) or not captured:
            raise ValueError("captured: expected a non-empty dict {layer: (q, k)}")
        sc = {}
        for layer in sorted(captured, key=int):
            t = captured[layer]
            if not isinstance(t, (tuple, list)) or len(t) < 2:
                raise ValueError(f"captured[{layer}]: expected a tuple (q, k[, v])")
            e, i = echo_induction_scores(t[0], t[1], period, scale=scale)
            sc[int(layer)] = (e, i)
        shape = ModelShape.from_captured(captured, num_layers)
        layers = sorted(sc)
        E = torch.stack([sc[l][0] for l in layers])  # [L, H]
        I = torch.stack([sc[l][1] for l in layers])
        n = E.numel()
        pick = torch.zeros(n, dtype=torch.bool)
        for frac, s in ((inst.echo_fraction, E), (inst.induction_fraction, I)):
            m = min(n, max(1, round(frac * n))) if frac > 0 else 0
            if m:
                pick[torch.topk(s.flatten(), m).indices] = True
        pick = pick.view(E.shape)
        data = {str(l): {"retrieval_heads": pick[a].nonzero().flatten().tolist(),
                         "echo": E[a].tolist(), "induction": I[a].tolist()} for a, l in enumerate(layers)}
        inst._set(shape, data)
        if path is not None:
            inst.path = inst.save(path)
        return inst

    def save(self, path) -> str:
        """save: write retrieval heads and scores as calibration JSON with the model shape."""
        self._require_fit()
        data = {str(l): {"retrieval_heads": self._heads[l], **self._scores[l]} for l in self._heads}
        return save_calibration(path, "razor", self._shape, data,
                                {"echo_fraction": self.echo_fraction, "induction_fraction": self.induction_fraction})

    def _require_fit(self):
        if self._heads is None:
            raise RuntimeError("razor: not fitted; capture q/k per layer on repeated_random_tokens(vocab, n, repeats) "
                               "and run RazorAttention.fit({layer: (q, k)}, period=n, path='razor.json'), or load "
                               "one with get_method('razor', path='razor.json')")

    def window(self, kv_len: int) -> int:
        """Local window of non-retrieval heads for ``kv_len`` keys: ``max(min_window, ceil(kv_len / C))``."""
        return max(self.min_window, math.ceil(kv_len / self.compression))

    def select(self, q, k, ctx: Optional[SelectContext] = None):
        ctx = ctx or SelectContext()
        self._require_fit()
        layer = calibrated_layer("razor", q, k, ctx, self._shape, self._heads,
                                 f"razor calibration {self.path or '(fitted)'}")
        Hq, Tq, Tk = q.shape[1], q.shape[2], k.shape[2]
        ret = self._heads[layer]
        rest = [h for h in range(Hq) if h not in set(ret)]
        w = self.window(Tk)
        if rest and self.n_sink + w >= Tk:
            warnings.warn(f"razor: n_sink + window = {self.n_sink + w} covers the whole context ({Tk} tokens); "
                          "non-retrieval heads are dense", stacklevel=2)
        parts = []
        if ret:
            parts.append((ret, patterns.causal(Tq, Tk, block_q=self.block_size, device=q.device)))
        if rest:
            parts.append((rest, patterns.sink_local(Tq, min(self.n_sink, Tk), min(w, Tk), kv_len=Tk,
                                                    block_q=self.block_size, device=q.device)))
        return merge_heads(parts, Hq)


def razor_subset(src: str, n_heads: int, out_path: str) -> str:
    """razor_subset: a copy of the razor calibration ``src`` keeping as retrieval heads the ``n_heads``
    (layer, head) pairs with the highest retrieval-head score (arXiv 2404.15574; ``data.<layer>.retrieval``,
    written by ``sparsattn calibrate razor --source retrieval``) or, in a file without them, induction
    score (the scores stored in ``src``); written to
    ``out_path`` (same format, model shape and scores; ``config.derived_from`` records the source).
    The density preset's rule (``RazorAttention.density_knob`` with a ``work_dir``)."""
    with open(src) as f:
        doc = json.load(f)
    pairs = []
    by = "retrieval" if all(d.get("retrieval") for d in doc["data"].values()) else "induction"
    for layer, d in doc["data"].items():
        ind = d.get(by) or []
        if not ind:
            raise ValueError(f"{src}: layer {layer} has no retrieval or induction scores to rank heads by")
        pairs += [(float(s), int(layer), h) for h, s in enumerate(ind)]
    if isinstance(n_heads, bool) or not isinstance(n_heads, int) or not 1 <= n_heads <= len(pairs):
        raise ValueError(f"n_heads: expected 1..{len(pairs)}, got {n_heads}")
    keep = sorted(pairs, reverse=True)[:n_heads]
    for layer, d in doc["data"].items():
        d["retrieval_heads"] = sorted(h for _, l, h in keep if str(l) == str(layer))
    doc["config"] = dict(doc.get("config") or {}, derived_from=os.path.basename(src),
                         rule=f"top {n_heads} heads by {by} score")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        f.write(json.dumps(doc, indent=1) + "\n")
    return str(out_path)
