"""minference: MInference 1.0's dynamic patterns (vertical-slash, block-sparse) and its offline
per-head pattern search (arXiv 2407.02490). The A-shape head type lives in ``a_shape.py``.

Registered names:

* ``vertical_slash``: online vertical + slash estimate from the last 64 queries;
* ``block_sparse``: top-k key blocks from mean-pooled q/k;
* ``minference``: per-head pattern types chosen offline by ``search_patterns`` / ``MInference.fit``
  (saved as calibration JSON) and estimated online per head.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from .. import patterns
from ..calibration import Field, ModelShape, read_calibration, save_calibration
from ..kernels import estimate
from ._vs_cover import vertical_slash_cover
from ._common import calibrated_layer, check_inputs, check_int, check_pow2, clamp_budget, kv_heads_for, merge_heads
from .base import Calibrated, DensityKnob, FixedSetting, Method, PresetContext, SelectContext, register

PAPER = "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse Attention (arXiv 2407.02490)"


@register("vertical_slash")
@dataclass
class VerticalSlash(Method):
    """VerticalSlash: per head, the top ``v_size`` key columns and top ``s_size`` diagonals estimated
    from the attention of the last ``last_q`` queries (MInference, arXiv 2407.02490).

    Estimate (O(last_q·N)): ``Â = softmax(Q[-last_q:] Kᵀ·scale)`` with the causal mask; vertical
    score = column sums of Â, slash score = sums along each diagonal. The first ``n_sink`` columns
    and the ``n_local`` nearest diagonals are forced in (as the official kernel: 30 and 100),
    counted in ``v_size`` / ``s_size``; a budget smaller than its forced entries keeps the nearest
    ones (columns ``0..v_size-1``, diagonals ``0..s_size-1``: a contiguous local band), where the
    official code's single top-k over inf scores keeps an arbitrary subset in tie order.
    Coverage as MInference's PIT kernel (``_vs_cover.vertical_slash_cover``): a slash is read, in
    each query block, through one unaligned window of ``block_size`` keys; verticals outside the
    windows go through the pattern's exact column path (a key block covered in part by the
    windows that also holds a vertical is computed whole; merged windows are not widened to a
    whole window as the authors' index conversion does). Query heads are scored against their GQA
    key head; pattern heads = query heads.

    Defaults (checked against ``microsoft/MInference`` ``minference_forward.py``): last_q=64,
    v_size=1000, s_size=6096 (the default head config), 30 sink columns, 100 local diagonals,
    block 64. (The official code also raises v_size to >= 30 and s_size to >= 50; here the sizes
    are taken as given, the forced sinks/local diagonals counting in them.)

    Args:
        v_size, s_size: numbers of vertical lines / slash lines (clamped to the context, warned).
        last_q: number of trailing queries of the estimate.
        n_sink: leading key columns always kept.
        n_local: nearest diagonals always kept (>= 1: the diagonal itself).
        block_size: block size of the returned pattern.
    """

    paper = PAPER
    demo = True  # shown by `sparsattn demo`
    phase = "prefill"
    v_size: int = 1000
    s_size: int = 6096
    last_q: int = 64
    n_sink: int = 30
    n_local: int = 100
    block_size: int = 64
    @classmethod
    def density_knob(cls, T: int, target: float, ctx: PresetContext) -> DensityKnob:
        """Preset: n_local = min(64, max(8, b / 8)) forced diagonals plus round(b / 400) estimated slashes
        (slashes are block-granular: one distant slash costs one to two key blocks per row, hence few);
        knob v_size (exact columns, which take the rest of the budget), n_sink = min(30, v)."""
        b = target * (T + 1) / 2
        n_local = int(min(64, max(8, round(b / 8))))
        s_size, blk = n_local + int(round(b / 400)), ctx.block_size

        def cfg(x):
            v = int(x)
            return dict(v_size=v, s_size=s_size, last_q=64, n_sink=min(30, v), n_local=n_local, block_size=blk)
        return DensityKnob(cls.name, "v_size", 1, T, True, True, max(1.0, b - 1.5 * n_local - 96 * (s_size - n_local)),
                           cfg, lambda x: f"v{int(x)}/s{s_size}(local{n_local})")


    def __post_init__(self):
        check_int("v_size", self.v_size, 0)
        check_int("s_size", self.s_size, 1)
        check_int("last_q", self.last_q, 1)
        check_int("n_sink", self.n_sink, 0)
        check_int("n_local", self.n_local, 1)
        check_pow2("block_size", self.block_size)

    @classmethod
    def small_config(cls) -> dict:
        return {"v_size": 40, "s_size": 24, "last_q": 16, "n_sink": 4, "n_local": 8, "block_size": 32}

    @classmethod
    def full_config(cls, q_len: int) -> dict:
        return {"v_size": 0, "s_size": q_len, "last_q": 16, "n_sink": 0, "n_local": q_len, "block_size": 32}

    def select(self, q, k, ctx: Optional[SelectContext] = None):
        ctx = ctx or SelectContext()
        check_inputs("vertical_slash", q, k, ctx)
        Tq, Tk = q.shape[2], k.shape[2]
        v_size = clamp_budget("vertical_slash", "v_size", self.v_size, Tk)
        s_size = clamp_budget("vertical_slash", "s_size", self.s_size, Tk)
        vert, slash = estimate.vertical_slash_scores(q, k, self.last_q, scale=ctx.scale)
        vi = _forced_then_topk(vert, self.n_sink, v_size)
        si = _forced_then_topk(slash, self.n_local, s_size)
        return vertical_slash_cover(Tq, Tk, vi.to(torch.int32), si.to(torch.int32), block_size=self.block_size)


def _forced_then_topk(score: torch.Tensor, n_forced: int, size: int) -> torch.Tensor:
    """The first ``min(n_forced, size)`` entries (nearest first: columns 0, 1, ... or diagonals 0, 1,
    ...), then the top ``size - n_forced`` of the others by ``score [B, H, n]`` -> long ``[B, H, size]``.
    (MInference sets the forced entries to inf before one top-k, so a budget below them keeps an
    arbitrary subset in top-k tie order; here the nearest ones, a contiguous band.)"""
    B, H, n = score.shape
    n_f = min(n_forced, size, n)
    forced = torch.arange(n_f, device=score.device).expand(B, H, n_f)
    rest = size - n_f
    if rest <= 0:
        return forced
    others = score.clone()
    others[..., :n_forced] = float("-inf")
    return torch.cat([forced, torch.topk(others, min(rest, n), dim=-1).indices], -1)


@register("block_sparse")
@dataclass
class BlockSparse(Method):
    """BlockSparse: per head and query block, the ``top_k`` key blocks with the highest mean-pooled
    score ``q̄ k̄ᵀ`` (MInference, arXiv 2407.02490), the first block and the diagonal block(s) always
    kept (counted in ``top_k``; a row whose forced blocks outnumber ``top_k`` keeps them all: with
    ``Tq < Tk`` a query block's diagonal can cross two key blocks, so 1 to 3 forced blocks). The
    authors' ``_build_block_index`` forces nothing (plain top-k of the causal block scores).
    Estimate memory (N/block)² per head; pattern heads = query heads.

    Defaults (``microsoft/MInference``): block 64, top_k = 100.
    """

    paper = PAPER
    demo = True  # shown by `sparsattn demo`
    phase = "prefill"
    top_k: int = 100
    block_size: int = 64
    @classmethod
    def density_knob(cls, T: int, target: float, ctx: PresetContext) -> DensityKnob:
        """Preset: knob top_k key blocks (block ``ctx.block_size``)."""
        blk = ctx.block_size
        nk = -(-T // blk)
        return DensityKnob(cls.name, "top_k", 2, max(2, nk), True, True, max(2.0, target * nk / 2),
                           lambda x: dict(top_k=int(x), block_size=blk), lambda x: f"top{int(x)}")


    def __post_init__(self):
        check_int("top_k", self.top_k, 1)
        check_pow2("block_size", self.block_size)

    @classmethod
    def small_config(cls) -> dict:
        return {"top_k": 4, "block_size": 32}

    @classmethod
    def full_config(cls, q_len: int) -> dict:
        return {"top_k": -(-q_len // 32), "block_size": 32}

    def select(self, q, k, ctx: Optional[SelectContext] = None):
        ctx = ctx or SelectContext()
        check_inputs("block_sparse", q, k, ctx)
        Tq, Tk = q.shape[2], k.shape[2]
        bs = self.block_size
        nq, nk = -(-Tq // bs), -(-Tk // bs)
        top_k = clamp_budget("block_sparse", "top_k", self.top_k, nk)
        dev = q.device
        rows = torch.arange(nq, device=dev)
        forced = [torch.zeros_like(rows), estimate.diagonal_block(Tq, Tk, bs, bs, dev)]
        if Tk != Tq:  # the first row's diagonal may sit one block earlier
            forced.append(torch.clamp((rows * bs + Tk - Tq) // bs, min=0))
        allowed = estimate.causal_block_mask(Tq, Tk, bs, bs, dev)
        # forced blocks are never cut by the budget: a row keeps max(top_k, its forced blocks), so
        # every query row keeps its own key even at top_k=1 (the forced blocks of a row number 1 to 3)
        kk = min(len(forced), nk)
        if top_k < kk:
            fm = torch.zeros(nq, nk, dtype=torch.bool, device=dev)
            for f in forced:
                fm[rows, f] = True
            per_row = torch.clamp((fm & allowed).sum(-1), min=top_k)
        scale = 1.0 / math.sqrt(q.shape[-1]) if ctx.scale is None else ctx.scale
        B, Hq, Hkv, D = q.shape[0], q.shape[1], k.shape[1], q.shape[3]
        G = Hq // Hkv
        # pooled in float32, scored in the model's dtype as MInference does (16-bit inputs: half the
        # bytes through the matmul, masking and top-k, which dominate index building at 128K)
        sdt = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.float32
        qp = estimate.pool_blocks(q, bs).to(sdt).view(B, Hkv, G * nq, D)
        kp = estimate.pool_blocks(k, bs).to(sdt)
        # KV heads in chunks of at most 2**27 scores: one batched matmul + top-k per chunk
        step = max(1, (1 << 27) // max(1, B * G * nq * nk))
        idx_parts = []
        for h0 in range(0, Hkv, step):
            s = torch.matmul(qp[:, h0:h0 + step], kp[:, h0:h0 + step].transpose(-1, -2)).view(B, -1, nq, nk)
            s.mul_(scale)
            for f in forced:  # the first and the diagonal block(s) always kept, counted in top_k
                s[:, :, rows, f] = float("inf")
            s.masked_fill_(~allowed, float("-inf"))
            if top_k >= kk:
                val, idx = torch.topk(s, top_k, dim=-1, sorted=False)
            else:  # top_k below the forced blocks of some row: take them all (sorted: forced first), trim the rest
                val, idx = torch.topk(s, kk, dim=-1, sorted=True)
                val = val.masked_fill(torch.arange(kk, device=dev) >= per_row[:, None], float("-inf"))
            idx_parts.append(torch.where(val > float("-inf"), idx, -1))
            del s
        idx = torch.cat(idx_parts, 1) if len(idx_parts) > 1 else idx_parts[0]
        return patterns.from_topk_blocks(idx, q_len=Tq, kv_len=Tk, block_size=bs, causal=True)


# ----------------------------------------------------------------------------------------------
# offline per-head search
# ----------------------------------------------------------------------------------------------

#: MInference's search grid (``search_pattern`` in the official repo: A-shape (100 sinks, 800 local);
#: VS (30, 800), (100, 750), (500, 700), (3500, 100), plus (1000, 4096) from ``search_pattern_v2``;
#: block-sparse top-k 100). Sizes are for long (>= 8k) calibration prompts; pass your own for short ones.
DEFAULT_CANDIDATES: tuple = (
    {"type": "a_shape", "n_init": 100, "n_local": 800},
    {"type": "vertical_slash", "v_size": 30, "s_size": 800},
    {"type": "vertical_slash", "v_size": 100, "s_size": 750},
    {"type": "vertical_slash", "v_size": 500, "s_size": 700},
    {"type": "vertical_slash", "v_size": 3500, "s_size": 100},
    {"type": "vertical_slash", "v_size": 1000, "s_size": 4096},
    {"type": "block_sparse", "top_k": 100},
)

_TYPES = {"a_shape": ("n_init", "n_local"), "vertical_slash": ("v_size", "s_size"), "block_sparse": ("top_k",)}


def _check_candidate(c: Any, where: str = "candidates") -> dict:
    if not isinstance(c, dict) or c.get("type") not in _TYPES:
        raise ValueError(f"{where}: expected a dict with 'type' in {sorted(_TYPES)}, got {c!r}")
    for f in _TYPES[c["type"]]:
        if f not in c:
            raise ValueError(f"{where}: {c['type']} candidate needs field {f!r}, got {c!r}")
        check_int(f"{where}.{f}", c[f], 0 if f in ("n_init", "v_size") else 1)
    return {"type": c["type"], **{f: int(c[f]) for f in _TYPES[c["type"]]}}


def build_head_method(entry: dict, *, block_size: int = 64, last_q: int = 64) -> Method:
    """The online method for one head's plan entry ``{"type": ..., sizes...}``."""
    c = _check_candidate(entry, "entry")
    if c["type"] == "a_shape":
        from .a_shape import AShape

        return AShape(n_init=c["n_init"], n_local=c["n_local"], block_size=block_size)
    if c["type"] == "vertical_slash":
        return VerticalSlash(v_size=c["v_size"], s_size=c["s_size"], last_q=last_q, block_size=block_size)
    return BlockSparse(top_k=c["top_k"], block_size=block_size)


def attention_recall(q: torch.Tensor, k: torch.Tensor, pattern: patterns.BlockPattern, *,
                     scale: Optional[float] = None, rows_from: int = 0, max_chunk_elems: int = 1 << 24) -> torch.Tensor:
    """attention_recall: per query head, the mean over query rows (``>= rows_from``) of the exact
    causal attention mass that ``pattern`` keeps -> float64 ``[Hq]`` (averaged over the batch).

    Chunked over query blocks: memory O(chunk·N) per head (the search is offline, time O(N²)).
    """
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    bq = pattern.block_q
    nq = pattern.n_q_blocks
    step = max(1, max_chunk_elems // max(1, B * Hq * bq * Tk))
    tot = torch.zeros(Hq, dtype=torch.float64, device=q.device)
    n_rows = 0
    j = torch.arange(Tk, device=q.device)
    for qb0 in range(0, nq, step):
        qb1 = min(nq, qb0 + step)
        r0, r1 = qb0 * bq, min(Tq, qb1 * bq)
        lo = max(r0, rows_from)
        if lo >= r1:
            continue
        qc = q[:, :, r0:r1].float().view(B, Hkv, G, r1 - r0, D)
        s = torch.matmul(qc, k.float()[:, :, None].transpose(-1, -2)).reshape(B, Hq, r1 - r0, Tk) * scale
        rows = torch.arange(r0, r1, device=q.device) + (Tk - Tq)
        s = s.masked_fill(j[None, :] > rows[:, None], float("-inf"))
        p = torch.softmax(s, -1)
        for b in range(B):
            m = pattern.mask_rows(b if pattern.batch > 1 else 0, qb0, qb1)  # [Hp, rows, Tk]
            if m.shape[0] != Hq:
                m = m.repeat_interleave(Hq // m.shape[0], 0) if m.shape[0] > 1 else m.expand(Hq, -1, -1)
            kept = (p[b] * m).sum(-1)[:, lo - r0:]
            tot += kept.double().sum(-1)
        n_rows += B * (r1 - lo)
    return tot / max(n_rows, 1)


def _head_density(p: patterns.BlockPattern, Hq: int) -> torch.Tensor:
    comp, ref = p.pair_counts()
    d = (comp / ref.clamp_min(1)).mean(0)  # [H]
    return d.expand(Hq) if d.shape[0] == 1 else d.repeat_interleave(Hq // d.shape[0])


def search_patterns(captured: dict, candidates: Optional[Sequence[dict]] = None, budget: Optional[float] = None, *,
                    block_size: int = 64, last_q: int = 64, rows_from=0, scale: Optional[float] = None) -> dict:
    """search_patterns: MInference's offline kernel-aware search, per (layer, query head).

    Args:
        captured: ``{layer: (q, k[, v])}`` calibration tensors (post-RoPE), q ``[B, Hq, T, D]``,
            k ``[B, Hkv, T, D]``.
        candidates: list of ``{"type": "a_shape"|"vertical_slash"|"block_sparse", sizes...}``
            (default ``DEFAULT_CANDIDATES``, meant for calibration prompts of >= 8k tokens).
        budget: optional maximum density (computed pairs / causal pairs) per head; candidates above
            it are skipped (if none fits, the sparsest candidate is kept). Pass candidates of
            roughly equal FLOPs, as MInference does, or a budget.
        rows_from: score only query rows >= this (MInference scores rows from 2500 on); a sequence of
            starts scores the mean of the recalls from each (e.g. ``(T // 4, T - 64)``: all late rows
            and, as much, the last rows of a retrieval prompt, the question and answer that read the
            needle, which an average over every row hardly weighs).
    Returns:
        ``{layer: {head: {"type", sizes..., "score": recall, "density": density}}}`` where score is
        the attention mass the candidate keeps (mean over rows), the search criterion.
    """
    if not isinstance(captured, dict) or not captured:
        raise ValueError("captured: expected a non-empty dict {layer: (q, k, v)}")
    cands = [_check_candidate(c) for c in (DEFAULT_CANDIDATES if candidates is None else candidates)]
    if not cands:
        raise ValueError("candidates: expected at least one candidate")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1):
        raise ValueError(f"budget: expected None or a density in (0, 1], got {budget!r}")
    starts = [rows_from] if isinstance(rows_from, int) else list(rows_from)
    if not starts or any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in starts):
        raise ValueError(f"rows_from: expected an int >= 0 or a non-empty sequence of them, got {rows_from!r}")
    plan: dict = {}
    for layer in sorted(captured, key=int):
        t = captured[layer]
        if not isinstance(t, (tuple, list)) or len(t) < 2:
            raise ValueError(f"captured[{layer}]: expected a tuple (q, k[, v]), got {type(t).__name__}")
        q, k = t[0], t[1]
        check_inputs("search_patterns", q, k, None)
        Hq = q.shape[1]
        rec, den = [], []
        for c in cands:
            m = build_head_method(c, block_size=block_size, last_q=last_q)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # candidates larger than a short calibration prompt are fine
                p = m.select(q, k, SelectContext(layer=int(layer), scale=scale))
            rec.append(torch.stack([attention_recall(q, k, p, scale=scale, rows_from=r) for r in starts]).mean(0))
            den.append(_head_density(p, Hq).double())
        rec_t, den_t = torch.stack(rec), torch.stack(den)  # [C, Hq]
        layer_plan = {}
        for h in range(Hq):
            r, d = rec_t[:, h], den_t[:, h]
            ok = torch.ones_like(r, dtype=torch.bool) if budget is None else d <= budget + 1e-9
            if ok.any():
                best = int(torch.where(ok, r, torch.full_like(r, -1.0)).argmax())
            else:
                best = int(d.argmin())
            layer_plan[h] = {**cands[best], "score": float(r[best]), "density": float(d[best])}
        plan[int(layer)] = layer_plan
    return plan


@register("minference")
@dataclass
class MInference(Calibrated, Method):
    """MInference: per-head pattern types (A-shape / vertical-slash / block-sparse) fixed offline by
    a kernel-aware search, sparse indices estimated online per head (arXiv 2407.02490).

    Needs a calibration: ``MInference.fit(captured {layer: (q, k, v)}, candidates=..., budget=...,
    path=...)`` (runs ``search_patterns`` and saves JSON) or ``get_method("minference", path=...)``
    / ``MInference.load(path)``. The file records the model shape; another shape is refused.
    ``select`` needs ``ctx.layer``. Pattern heads = query heads (per-head types assembled into one
    pattern).

    Args:
        path: calibration JSON to load (None: unfitted until ``fit``).
        block_size: block size of every head's pattern.
        last_q: trailing queries of the vertical-slash estimate.
    """

    paper = PAPER
    phase = "prefill"
    needs = ("calibration",)
    path: Optional[str] = None
    block_size: int = 64
    last_q: int = 64
    _plan: Optional[dict] = field(default=None, repr=False, compare=False)
    _shape: Optional[ModelShape] = field(default=None, repr=False, compare=False)

    @classmethod
    def fixed_settings(cls, T: int, ctx: PresetContext) -> list:
        """Preset: the plan ``ctx.calibration("minference")`` fixes the budget (evaluated as it is)."""
        path = ctx.calibration(cls.name)
        return [] if path is None else [FixedSetting("shipped plan", {"path": path})]

    def __post_init__(self):
        check_pow2("block_size", self.block_size)
        check_int("last_q", self.last_q, 1)
        self._load_path()

    def _read_calibration(self, path: str, *, expect_shape=None) -> None:
        cal = read_calibration(path, method="minference", expect_shape=expect_shape)
        self._set(cal.shape, cal.data)

    def _set(self, shape: ModelShape, data) -> None:
        """Install a plan ``{layer: {head: entry}}`` read through ``sparsattn.calibration.Field``
        (a file's ``data``, or a fitted dict): every error names the file and the field."""
        if not isinstance(data, Field):
            data = Field(data, "minference plan", "data")
        plan = {}
        for layer, heads in data.int_keys(0, shape.num_layers).items():
            entries = heads.int_keys(0, shape.num_heads)
            if sorted(entries) != list(range(shape.num_heads)):
                raise heads.error(f"entries for heads 0..{shape.num_heads - 1}", f"heads {sorted(entries)}")
            plan[layer] = {}
            for h, e in entries.items():
                typ = e["type"].as_str(sorted(_TYPES))
                entry = {"type": typ}
                for f in _TYPES[typ]:
                    entry[f] = e[f].as_int(0 if f in ("n_init", "v_size") else 1)
                for f in ("score", "density"):
                    entry[f] = e.get(f).as_float(finite=False) if e.get(f) is not None else float("nan")
                plan[layer][h] = entry
        self._plan, self._shape = plan, shape

    @property
    def is_fitted(self) -> bool:
        return self._plan is not None

    @property
    def plan(self) -> dict:
        """``{layer: {head: entry}}`` (a copy)."""
        return {l: {h: dict(e) for h, e in hs.items()} for l, hs in (self._plan or {}).items()}

    @classmethod
    def fit(cls, captured: dict, candidates: Optional[Sequence[dict]] = None, budget: Optional[float] = None, *,
            path: Optional[str] = None, num_layers: Optional[int] = None, block_size: int = 64, last_q: int = 64,
            rows_from=0, scale: Optional[float] = None) -> "MInference":
        """fit: run ``search_patterns`` on ``captured`` and return a fitted instance (saved to ``path`` if given)."""
        inst = cls(block_size=block_size, last_q=last_q)
        plan = search_patterns(captured, candidates, budget, block_size=block_size, last_q=last_q,
                               rows_from=rows_from, scale=scale)
        inst._set(ModelShape.from_captured(captured, num_layers), plan)
        if path is not None:
            inst.path = inst.save(path)
        return inst

    def save(self, path) -> str:
        """save: write the plan as calibration JSON (``{layer: {head: entry}}`` + model shape)."""
        self._require_fit()
        data = {str(l): {str(h): e for h, e in hs.items()} for l, hs in self._plan.items()}
        return save_calibration(path, "minference", self._shape, data,
                                {"block_size": self.block_size, "last_q": self.last_q})

    def _require_fit(self):
        if self._plan is None:
            raise RuntimeError("minference: not fitted; run MInference.fit(captured={layer: (q, k, v)}, "
                               "candidates=..., budget=..., path='minference.json') on calibration q/k/v, or "
                               "load a calibration with get_method('minference', path='minference.json')")

    def select(self, q, k, ctx: Optional[SelectContext] = None):
        ctx = ctx or SelectContext()
        self._require_fit()
        layer = calibrated_layer("minference", q, k, ctx, self._shape, self._plan,
                                 f"minference calibration {self.path or '(fitted)'}")
        Hq, Hkv = q.shape[1], k.shape[1]
        groups: dict = {}
        for h, e in self._plan[layer].items():
            key = tuple((f, e[f]) for f in ("type",) + _TYPES[e["type"]])
            groups.setdefault(key, []).append(h)
        parts = []
        for key, heads in groups.items():
            m = build_head_method(dict(key), block_size=self.block_size, last_q=self.last_q)
            hq = torch.tensor(heads, device=q.device)
            hk = torch.tensor(kv_heads_for(heads, Hq, Hkv), device=q.device)
            parts.append((heads, m.select(q[:, hq], k[:, hk], ctx)))
        return merge_heads(parts, Hq)
