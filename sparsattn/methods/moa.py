"""MoA: Mixture of Attention Spans, per-head elastic sliding windows found by gradient profiling
(MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression, arXiv 2406.14909).

Each head ``h`` of each layer keeps the first ``sink`` keys plus a causal window of
``span_h(N) = alpha_h + beta_h * N`` keys, ``N`` = key length (rounded, clipped to
``[min_span, N]``). The window is exact at token granularity: partial tiles at the window edge and
the sink boundary are element-masked tiles of the BlockPattern (``patterns._from_predicate``), so
``select`` computes exactly ``sink | (0 <= i - j < span_h)``.

Fitting (``sparsattn.calibrate.moa.fit_moa``, above ``methods/``: it drives a whole HF model) has
two steps:

1. **Profiling** (``sparsattn.calibrate.moa.profile_moa``): calibration sequences whose answers the
   dense model itself generated (``data="copy"``: a long context, then a snippet of it, the model
   greedily continues; ``data="retrieval"``: passkey prompts, the answer the model's own reading of
   the value), loss on the answer tokens only. An explicit (quadratic) attention function records
   every attention matrix ``A`` of every layer and, from ``G = dL/dA`` (backward hook), the
   predicted loss change of masking each entry, with the softmax renormalisation (MoA's
   ``effect``): ``E_ij = -A_ij (G_ij - sum_j' G_ij' A_ij') / (1 - A_ij)`` (first row ``-G A``),
   ``|E|`` (``take_abs``, MoA's choice, the default) or signed. Entries are summed along diagonals
   ``d = i - j`` (sink columns excluded, they are always kept), so the loss of a span ``s`` is
   ``|sum_{d >= s}|``: one ``[L, H, N]`` profile per length.
2. **Search** (``search_plan``): one ``(alpha, beta)`` per head minimising the summed predicted
   loss subject to ``mean density <= bound`` at *each* length (``budget``, or per-length
   ``bounds``; optionally at unprofiled ``extend_lengths`` too, with no loss there or, with
   ``extend_loss="relative"``, the longest profile stretched to that length). Solved by Lagrangian
   relaxation (one multiplier per length, each found by bisection; the relaxed problem splits into
   a per-head argmin), a greedy repair when the bisections cycle, a greedy fill of the remaining
   slack, and passes that try each head's lowest-loss candidate (all-or-nothing heads, such as
   the ones that read a needle from anywhere in the context, defeat the greedy steps). Why not the
   exact DP: a multiple-choice knapsack DP handles one budget; with one constraint per length the
   DP state is a tuple of budgets (exponential in the number of lengths). (No Gurobi here.)

The plan is a calibration JSON (``sparsattn.calibration``) with the model shape; other shapes are
refused naming the field. A file may hold plans for several budgets (``MoA(path, budget=...)``).

Provenance and differences from the authors' code (``thu-nics/MoA``, read, not copied): the effect
formula (``1/(1 - A)``, first row) follows ``MoA/models/llama/modify_llama_profile.py``, ``|E|``
included. Kept differences: (1) effects are summed per token distance, exact for token-level
windows (the authors sum 64 x 64 blocks and band masks in blocks); (2) density is the causal
density (kept / causal pairs), the authors bound the KV share ``span / N``; (3) the search is the
Lagrangian + greedy steps above, the authors solve a MILP with Gurobi and validate several Pareto
plans; (4) ``normalize`` ("head" / "layer") and ``extend_lengths`` with per-length ``bounds`` are
the authors' ``elastic_generate.py`` options ``--normalize_by_head`` / ``--normalize_by_layer`` /
``--extend_length`` / ``--density_bounds``; the signed effect (``take_abs=False``),
``extend_loss="relative"`` and ``profile_moa(per_sample="share")`` are this library's additions
(issue 21: on passkey data, ``|E|`` summed over diffuse heads outweighs the heads that read the
needle; see docs/results/moa_cpu_2026-12-05); (5) candidates are clipped to ``[min_span, N]``
instead of filtered; (6) plans are per query head (the authors' pipeline converts a GQA model to MHA
first, also per query head; ``elastic_generate.py --num_key_value_groups`` instead takes a group's
max); sink and ``min_span`` defaults (64) are not the authors' (one 64-token
global block). Only the prefill side is implemented (MoA's per-head window KV cache for decode
is not).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .. import patterns
from ..calibration import ModelShape, read_calibration, save_calibration
from .base import Calibrated, FixedSetting, Method, PresetContext, SelectContext, register

Tensor = torch.Tensor
_FIT_HINT = ("fit a plan with `sparsattn calibrate moa --model PATH --out PLAN.json` (or "
             "sparsattn.calibrate.moa.fit_moa(model, tokenizer, budget=0.5, out_path=PLAN.json)) and pass "
             "path=PLAN.json (or call MoA.load(PLAN.json))")


def spans_for(alpha: Tensor, beta: Tensor, n: int, min_span: int = 1) -> Tensor:
    """Per-head span ``clip(round(alpha + beta * n), min_span, n)`` as int64."""
    s = torch.round(alpha.double() + beta.double() * n).long()
    return s.clamp(min=min(min_span, n), max=max(n, 1))


def span_density(span: Tensor, sink: int, n: int) -> Tensor:
    """Causal density (kept pairs / causal pairs) of sink + window ``span`` at length ``n`` (any shape)."""
    i = torch.arange(n, dtype=torch.float64)
    s = span.double()[..., None]
    row = torch.minimum(i + 1, s) + torch.clamp(torch.minimum(torch.tensor(float(sink), dtype=torch.float64),
                                                              i + 1 - s), min=0)
    return row.sum(-1) / (n * (n + 1) / 2)


def candidate_grid(lengths: Sequence[int], alpha_step: int = 1024, n_beta: int = 9) -> tuple[Tensor, Tensor]:
    """MoA's grid: alpha in ``[-min_len, max_len]`` every ``alpha_step``; beta ``linspace(0, 1, n_beta)``."""
    lo, hi = -min(lengths), max(lengths)
    alphas = torch.arange(lo, hi + 1, alpha_step, dtype=torch.float64)
    betas = torch.linspace(0, 1, n_beta, dtype=torch.float64)
    a, b = torch.meshgrid(alphas, betas, indexing="ij")
    return a.reshape(-1), b.reshape(-1)


def search_plan(loss: Tensor, density: Tensor, budget, *, iters: int = 60, rounds: int = 3) -> tuple[Tensor, dict]:
    """search_plan: choose one candidate per head (multiple-choice knapsack, Lagrangian relaxation).

    Args:
        loss: ``[n_len, n_heads, n_cand]`` predicted loss increase of each candidate at each length.
        density: ``[n_len, n_heads, n_cand]`` density of each candidate (in [0, 1]).
        budget: bound on the mean density over heads, at every length (a float), or one bound per
            length (a sequence of ``n_len`` floats).
    Returns:
        ``(choice [n_heads] int64, info)``; info has the per-length mean density, the total loss,
        the multipliers, ``feasible`` (False only if even the sparsest choice breaks the budget,
        in which case the sparsest candidates are returned) and ``repaired`` (the cyclic bisection
        ended over budget and the choice was repaired greedily). The slack left is filled greedily,
        from the Lagrangian choice and from the sparsest one; the lower loss is kept. Then up to
        ``rounds`` passes over the heads try each head's lowest-loss candidate (the budget repaired
        on the other heads, the slack refilled) and keep every trial that lowers the total loss.
    """
    if loss.shape != density.shape or loss.dim() != 3:
        raise ValueError(f"loss/density: expected equal shapes [n_len, n_heads, n_cand], got "
                         f"{tuple(loss.shape)} and {tuple(density.shape)}")
    n_len, H, C = loss.shape
    bs = [budget] * n_len if isinstance(budget, (int, float)) and not isinstance(budget, bool) else list(budget)
    if len(bs) != n_len or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 < b <= 1 for b in bs):
        raise ValueError(f"budget: expected a float in (0, 1] or {n_len} of them, got {budget!r}")
    bound = torch.tensor(bs, dtype=torch.float64)
    loss, density = loss.double(), density.double()
    cost = loss.sum(0)  # [H, C]
    heads = torch.arange(H)

    def pick(lam: Tensor) -> Tensor:
        obj = cost + (lam[:, None, None] * density).sum(0)
        # ties: prefer the sparser candidate (sum of densities), then the lower index
        obj = obj + 1e-12 * density.sum(0)
        return obj.argmin(-1)

    def dens_of(ch: Tensor) -> Tensor:
        return density[:, heads, ch].mean(-1)  # [n_len]

    lam = torch.zeros(n_len, dtype=torch.float64)
    ch = pick(lam)
    scale = float(cost.abs().max()) * H + 1.0
    for _ in range(4 * n_len + 4):  # cyclic bisection on the violated lengths
        d = dens_of(ch)
        viol = (d > bound + 1e-12).nonzero().flatten()
        if viol.numel() == 0:
            break
        l = int(viol[(d[viol] - bound[viol]).argmax()])
        lo, hi = float(lam[l]), float(lam[l]) + 1.0
        while True:
            lam2 = lam.clone()
            lam2[l] = hi
            if dens_of(pick(lam2))[l] <= bound[l] + 1e-12 or hi > 1e6 * scale:
                break
            lo, hi = hi, hi * 2
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            lam2 = lam.clone()
            lam2[l] = mid
            if dens_of(pick(lam2))[l] <= bound[l] + 1e-12:
                hi = mid
            else:
                lo = mid
        lam[l] = hi
        ch = pick(lam)
    def fill(ch: Tensor) -> Tensor:  # greedy: best loss decrease per density increase while every budget holds
        while True:
            cur_d = dens_of(ch)
            gain = cost[heads, ch][:, None] - cost  # [H, C]
            new_d = cur_d[:, None, None] + (density - density[:, heads, ch][..., None]) / H  # [n_len, H, C]
            ok = (new_d <= bound[:, None, None] + 1e-12).all(0) & (gain > 0)
            if not ok.any():
                return ch
            extra = (new_d - cur_d[:, None, None]).clamp_min(0).sum(0) + 1e-15
            score = torch.where(ok, gain / extra, torch.full_like(gain, -1.0))
            h, c = divmod(int(score.argmax()), C)
            ch = ch.clone()
            ch[h] = c

    def repair(ch: Tensor, frozen: int = -1) -> Tensor:  # greedy: least loss increase per density removed
        for _ in range(H * C):  # from the violated lengths, denser at none (head ``frozen`` kept as it is)
            cur_d = dens_of(ch)
            over = (cur_d > bound + 1e-12).double()  # [n_len]
            if not over.any():
                break
            saved = ((density[:, heads, ch][..., None] - density) * over[:, None, None]).sum(0)  # [H, C]
            worse = cost - cost[heads, ch][:, None]
            no_denser = (density <= density[:, heads, ch][..., None] + 1e-15).all(0)  # monotone: no cycling
            score = torch.where((saved > 1e-15) & no_denser, worse.clamp_min(0) / saved.clamp_min(1e-15),
                                torch.full_like(worse, float("inf")))
            if frozen >= 0:
                score[frozen] = float("inf")
            if not torch.isfinite(score).any():
                break
            h, c = divmod(int(score.argmin()), C)
            ch = ch.clone()
            ch[h] = c
        return ch

    # the per-length bisections can cycle (raising one length's multiplier moves heads to candidates
    # that are denser at another length): the last choice is then repaired greedily
    repaired = not bool((dens_of(ch) <= bound + 1e-12).all())
    if repaired:
        ch = repair(ch)
    sparsest = density.sum(0).argmin(-1)
    feasible = bool((dens_of(ch) <= bound + 1e-12).all())
    if not feasible:  # not even the repair: the sparsest candidates (by summed density) as the fallback
        ch = sparsest
        feasible = bool((dens_of(ch) <= bound + 1e-12).all())
    if feasible:  # fill the slack; a fill from the sparsest plan too, the better of the two kept
        total = lambda c: float(cost[heads, c].sum())  # noqa: E731
        ch = fill(ch)
        alt = fill(sparsest)
        if total(alt) < total(ch) - 1e-12:
            ch = alt
        # all-or-nothing heads (a head that reads from anywhere in the context loses nearly all of its
        # effect below the full span) defeat both greedy passes: try giving each head its lowest-loss
        # candidate, repairing the budget on the others and refilling; keep what lowers the loss
        best_c = (cost + 1e-12 * density.sum(0)).argmin(-1)
        for _ in range(rounds):
            improved = False
            for h in range(H):
                if int(ch[h]) == int(best_c[h]):
                    continue
                trial = ch.clone()
                trial[h] = best_c[h]
                trial = repair(trial, frozen=h)
                if bool((dens_of(trial) <= bound + 1e-12).all()):
                    trial = fill(trial)
                    if total(trial) < total(ch) - 1e-12:
                        ch, improved = trial, True
            if not improved:
                break
    return ch, {"density": dens_of(ch).tolist(), "loss": float(cost[heads, ch].sum()),
                "multipliers": lam.tolist(), "feasible": feasible, "repaired": repaired}


@register("moa")
@dataclass
class MoA(Calibrated, Method):
    """MoA: per-head elastic sink + sliding window, span = alpha_h + beta_h * N (arXiv 2406.14909).

    Args:
        plan_path: deprecated alias of ``path`` (kept for older code; mirrors ``path``).
        block_size: block size of the returned patterns (64).
        path: calibration JSON (``save`` / ``fit`` / ``sparsattn calibrate moa``); None = fit or load later.
        budget: which of the file's plans to use, by the budget it was fitted at (``info.budget``);
            None = the file's first (default) plan. A file may carry plans for several budgets (MoA
            produces one plan per density bound): ``data`` holds the default plan and ``data.plans``
            the others (files without ``plans`` hold one plan, as before).
    The plan records ``sink`` (default 64 tokens when fitting) and ``min_span``. ``fit`` searches
    the plan from per-length profiles; ``sparsattn.calibrate.moa.fit_moa`` profiles a model first.
    """

    paper = "MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression (arXiv 2406.14909)"
    phase = "prefill"
    trainable = False
    needs = ("calibration",)

    plan_path: Optional[str] = None
    block_size: int = 64
    path: Optional[str] = None
    budget: Optional[float] = None
    _plan: Optional[dict] = field(default=None, repr=False, compare=False)
    _plans: list = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self):
        bs = self.block_size
        if not isinstance(bs, int) or bs < 16 or bs & (bs - 1):
            raise ValueError(f"block_size: expected a power of two >= 16, got {bs!r}")
        b = self.budget
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b <= 1):
            raise ValueError(f"budget: expected None or a float in (0, 1], got {b!r}")
        if self.plan_path is not None:
            if self.path is not None and self.path != self.plan_path:
                raise ValueError(f"plan_path/path: plan_path is a deprecated alias of path; got both "
                                 f"({self.plan_path!r} and {self.path!r})")
            self.path = self.plan_path
        self._load_path()

    # -- presets (evaluation tooling) -----------------------------------------------------------
    @classmethod
    def fixed_settings(cls, T: int, ctx: PresetContext) -> list:
        """Preset: each plan of ``ctx.calibration("moa")`` fixes a budget (evaluated as it is; the label
        gives the budget it was fitted at; the file's default plan first)."""
        path = ctx.calibration(cls.name)
        if path is None:
            return []
        out = []
        for i, p in enumerate(cls(path=path).plans):
            b = p["info"].get("budget")
            cfg = {"path": path} if i == 0 else {"path": path, "budget": float(b)}
            out.append(FixedSetting("shipped plan" + ("" if b is None else f" (b{float(b):g})"), cfg))
        return out

    def static_pattern_key(self, layer):
        """Preset: a head's span depends only on its layer's plan and the length."""
        return (layer,)

    # -- plan -------------------------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return self._plan is not None

    @property
    def plan(self) -> dict:
        if self._plan is None:
            raise ValueError(f"moa: no span plan loaded; {_FIT_HINT}")
        return self._plan

    def set_plan(self, shape, alpha, beta, *, sink: int = 64, min_span: int = 64, info: Optional[dict] = None) -> "MoA":
        """Install a plan: ``alpha``/``beta`` ``[num_layers][num_heads]`` for ``shape`` (ModelShape or dict)."""
        shape = shape if isinstance(shape, ModelShape) else ModelShape.from_dict(shape)
        a = torch.as_tensor(alpha, dtype=torch.float64)
        b = torch.as_tensor(beta, dtype=torch.float64)
        want = (shape.num_layers, shape.num_heads)
        for name, t in (("alpha", a), ("beta", b)):
            if tuple(t.shape) != want:
                raise ValueError(f"{name}: expected [num_layers={want[0]}][num_heads={want[1]}] values, got {tuple(t.shape)}")
            if not torch.isfinite(t).all():
                raise ValueError(f"{name}: expected finite values")
        if not isinstance(sink, int) or sink < 0:
            raise ValueError(f"sink: expected an int >= 0, got {sink!r}")
        if not isinstance(min_span, int) or min_span < 1:
            raise ValueError(f"min_span: expected an int >= 1, got {min_span!r}")
        self._plan = {"shape": shape, "alpha": a, "beta": b, "sink": sink, "min_span": min_span, "info": dict(info or {})}
        self._plans = [self._plan]
        return self

    @property
    def plans(self) -> list:
        """All plans held (the file's default first); ``plan`` is the one in use."""
        self.plan  # noqa: B018  (raises the fit hint when empty)
        return list(self._plans)

    @property
    def budgets(self) -> list:
        """The budgets (``info.budget``, None where absent) of ``plans``, in order."""
        return [p["info"].get("budget") for p in self.plans]

    def add_plan(self, other: "MoA", *, default: bool = False) -> "MoA":
        """add_plan: hold ``other``'s plan in use next to this one's (same model shape; a held plan
        of the same budget is replaced); ``default``: make it the first (default) plan. The plan in
        use does not change unless it was replaced. Returns self."""
        new = other.plan
        if not isinstance(new["info"].get("budget"), (int, float)):
            raise ValueError("other: expected a plan whose info records its budget")
        if self._plan is None:
            self._plan, self._plans = new, [new]
            return self
        if new["shape"] != self.plan["shape"]:
            raise ValueError(f"other: expected a plan for {self.plan['shape']}, got {new['shape']}")
        b = float(new["info"]["budget"])
        same = lambda p: isinstance(p["info"].get("budget"), (int, float)) and abs(float(p["info"]["budget"]) - b) < 1e-9  # noqa: E731
        if same(self._plan):
            self._plan = new
        rest = [p for p in self._plans if not same(p)]
        self._plans = [new] + rest if default else rest + [new]
        return self

    def _choose(self, source: str) -> None:
        """Put the plan of ``self.budget`` in use (None: the first); ValueError naming the budgets held."""
        if self.budget is None:
            self._plan = self._plans[0]
            return
        for p in self._plans:
            b = p["info"].get("budget")
            if isinstance(b, (int, float)) and abs(float(b) - float(self.budget)) < 1e-9:
                self._plan = p
                return
        raise ValueError(f"budget: {source} holds plans for budgets {[p['info'].get('budget') for p in self._plans]}, "
                         f"not {self.budget!r}")

    @classmethod
    def fit(cls, data, *, budget: float, path: Optional[str] = None, sink: int = 64, min_span: int = 64,
            alpha_step: int = 1024, n_beta: int = 9, info: Optional[dict] = None, normalize: Optional[str] = None,
            extend_lengths: Sequence[int] = (), bounds: Optional[dict] = None, extend_loss: str = "none",
            full_heads: Sequence[int] = (), **config) -> "MoA":
        """fit: search the span plan from profiles and return a fitted instance (saved to ``path`` if given).

        ``data``: ``{"shape": ModelShape (or its dict), "profiles": {n: Tensor [L, Hq, n]}}``: per
        profiled length ``n``, the masking effect summed per query-key distance (what
        ``sparsattn.calibrate.moa.profile_moa`` measures on a model), ``|E|`` (MoA) or signed (then a
        span's loss is the absolute value of the signed sum beyond it). Candidates: ``candidate_grid``
        over the lengths; each head's loss of span ``s`` = the effect beyond ``s``; ``search_plan``
        under mean density ``budget``. ``info`` is stored with the plan.

        ``normalize``: None (the raw effects), ``"head"`` (each head's profile divided by its total at
        each length, so every head's loss runs from 1 at the shortest span to 0 at the full one) or
        ``"layer"`` (each layer's profiles divided by the layer's total): the authors' optimiser
        options ``--normalize_by_head`` / ``--normalize_by_layer``. ``extend_lengths``: lengths beyond
        the profiled ones where the plan must also meet ``budget`` (no loss term there; the authors'
        ``--extend_length`` density bounds), so the elastic rule cannot grow past the budget at the
        lengths it is used at. ``bounds``: ``{length: density}`` overriding ``budget`` at those
        (profiled or extended) lengths (the authors' ``--density_bounds``, one per length): e.g. looser
        bounds at short profiled lengths, where the sink and the shortest span alone exceed a 10%
        budget; ``budget`` then names the plan and bounds the other lengths. ``extend_loss``: the loss
        term at the extended lengths: ``"none"`` (density bounds only: a head whose effect reaches the
        far end of every profiled context is then as well served, by the loss, with a constant span as
        with a growing one, and the bound picks the constant one) or ``"relative"`` (the longest
        profile stretched to the extended length, i.e. the effect stays at the same *relative*
        distance, as a needle at a given depth does: the loss of span ``s`` at length ``n`` is the
        longest profiled length ``N``'s loss of span ``ceil(s N / n)``). ``full_heads``: flat head indices
        (``layer * num_heads + head``) that must keep every key at every length (a departure from
        MoA, off when empty: ``calibrate.moa``'s ``keep_readers`` passes the heads that read the
        calibration needles): their shorter candidates carry a loss above any other choice.
        """
        if not isinstance(data, dict) or "shape" not in data or "profiles" not in data:
            raise ValueError("data: expected {'shape': ModelShape, 'profiles': {length: Tensor [L, H, n]}}")
        shape = data["shape"] if isinstance(data["shape"], ModelShape) else ModelShape.from_dict(data["shape"])
        profiles = data["profiles"]
        if not isinstance(profiles, dict) or not profiles:
            raise ValueError("data['profiles']: expected a non-empty {length: Tensor [L, H, length]}")
        lengths = sorted(int(n) for n in profiles)
        if normalize not in (None, "head", "layer"):
            raise ValueError(f"normalize: expected None, 'head' or 'layer', got {normalize!r}")
        if extend_loss not in ("none", "relative"):
            raise ValueError(f"extend_loss: expected 'none' or 'relative', got {extend_loss!r}")
        ext = sorted({int(n) for n in extend_lengths} - set(lengths))
        if any(n < 1 for n in ext):
            raise ValueError(f"extend_lengths: expected positive lengths, got {list(extend_lengths)}")
        alphas, betas = candidate_grid(lengths, alpha_step, n_beta)
        losses, dens = [], []
        LH = shape.num_layers * shape.num_heads
        for n in lengths:
            prof = profiles[n]
            if not isinstance(prof, Tensor) or tuple(prof.shape) != (shape.num_layers, shape.num_heads, n):
                got = tuple(prof.shape) if isinstance(prof, Tensor) else type(prof).__name__
                raise ValueError(f"data['profiles'][{n}]: expected a tensor [L={shape.num_layers}, "
                                 f"H={shape.num_heads}, {n}], got {got}")
            prof = prof.double()
            if normalize is not None:  # a head (layer) with no effect at all stays all-zero
                tot = prof.sum(-1, keepdim=True).abs() if normalize == "head" else prof.sum((-1, -2), keepdim=True).abs()
                prof = prof / torch.where(tot > 0, tot, torch.ones_like(tot))
            # loss of span s = |suffix[s]| (a signed profile: the first-order loss change of masking
            # every distance >= s, in absolute value; an |E| profile: the usual nonnegative sum)
            suffix = torch.flip(torch.cumsum(torch.flip(prof, [-1]), -1), [-1]).abs()
            suffix = torch.cat([suffix, torch.zeros(*suffix.shape[:-1], 1, dtype=suffix.dtype)], -1)
            last_suffix = suffix  # the longest profiled length's (lengths are sorted)
            sp = spans_for(alphas, betas, n, min_span)  # [C]
            losses.append(suffix[..., sp].reshape(-1, sp.numel()))  # [L*H, C]
            dens.append(span_density(sp, sink, n)[None].expand(LH, -1))
        for n in ext:  # density bound, and with extend_loss="relative" the stretched longest profile
            sp = spans_for(alphas, betas, n, min_span)
            if extend_loss == "relative":
                N = lengths[-1]
                idx = torch.clamp(torch.ceil(sp.double() * N / n).long(), 0, N)
                losses.append(last_suffix[..., idx].reshape(-1, sp.numel()))
            else:
                losses.append(torch.zeros(LH, sp.numel(), dtype=torch.float64))
            dens.append(span_density(sp, sink, n)[None].expand(LH, -1))
        full = sorted({int(i) for i in full_heads})
        if any(not 0 <= i < LH for i in full):
            raise ValueError(f"full_heads: expected flat head indices in [0, {LH}), got {list(full_heads)}")
        if full:  # every shorter span of these heads costs more than all other losses together
            big = 1.0 + 1e3 * float(sum(x.abs().sum() for x in losses))
            for x, n in zip(losses, lengths + ext):
                short = spans_for(alphas, betas, n, min_span) < n
                x[full] = x[full] + big * short.to(x.dtype)[None]
        bounds = {int(k): float(v) for k, v in (bounds or {}).items()}
        if set(bounds) - set(lengths) - set(ext):
            raise ValueError(f"bounds: expected lengths among {lengths + ext}, got {sorted(bounds)}")
        choice, found = search_plan(torch.stack(losses), torch.stack(dens), [bounds.get(n, budget) for n in lengths + ext])
        a = alphas[choice].view(shape.num_layers, shape.num_heads)
        b = betas[choice].view(shape.num_layers, shape.num_heads)
        found.update({"lengths": lengths, "budget": budget})
        if full:
            found["full_heads"] = [[i // shape.num_heads, i % shape.num_heads] for i in full]
        if ext or normalize is not None or bounds:  # (density then lists the profiled lengths first, then these)
            found.update({"extend_lengths": ext, "normalize": normalize, "extend_loss": extend_loss,
                          "bounds": {str(n): bounds.get(n, budget) for n in lengths + ext}})
        found.update(info or {})
        inst = cls(**config).set_plan(shape, a.tolist(), b.tolist(), sink=sink, min_span=min_span, info=found)
        if path is not None:
            inst.path = inst.plan_path = inst.save(path)
        return inst

    def save(self, path) -> str:
        """save: write the plans as calibration JSON with the model shape: the default plan's ``alpha`` /
        ``beta`` ``[num_layers][num_heads]``, ``sink``, ``min_span``, ``info`` at the top of ``data``, any
        further plans (other budgets) as a list of the same objects under ``data.plans``; returns the path."""
        return self.save_plan(path)

    def save_plan(self, path) -> str:
        """Deprecated alias of ``save``: write the plans as calibration JSON (``alpha``/``beta`` ``[num_layers][num_heads]``, ``sink``,
        ``min_span``, ``info``; further plans under ``plans``) with the model shape; returns the path."""
        plans = self.plans
        one = lambda p: {"alpha": p["alpha"].tolist(), "beta": p["beta"].tolist(), "sink": p["sink"],  # noqa: E731
                         "min_span": p["min_span"], "info": p["info"]}
        data = one(plans[0])
        if len(plans) > 1:
            data["plans"] = [one(p) for p in plans[1:]]
        return save_calibration(path, "moa", plans[0]["shape"], data, config={"block_size": self.block_size})

    def load_plan(self, path, *, expect_shape=None) -> "MoA":
        """Deprecated alias of ``load`` on an instance: read a plan written by ``save`` / ``fit``."""
        return self.load(path, expect_shape=expect_shape)

    def _read_calibration(self, path: str, *, expect_shape=None) -> None:
        """Read a plan written by ``save``; every field is checked through ``sparsattn.calibration``
        (ValueError naming the file and the field, e.g. ``data.alpha[3][1]``)."""
        cal = read_calibration(path, method="moa", expect_shape=expect_shape)
        d, L, H = cal.data, cal.shape.num_layers, cal.shape.num_heads

        def one(f, need_budget: bool) -> dict:
            info = f.get("info")
            info = None if info is None else {k: x.plain() for k, x in info.as_dict().items()}
            if need_budget:
                f["info"]["budget"].as_float(0.0, 1.0, lo_open=True)
            return MoA().set_plan(cal.shape, f["alpha"].float_matrix(L, H), f["beta"].float_matrix(L, H),
                                  sink=f["sink"].as_int(0), min_span=f["min_span"].as_int(1), info=info).plan

        plans = [one(d, False)] + [one(f, True) for f in (d["plans"].as_list() if "plans" in d else [])]
        self._plans = plans
        self._choose(cal.path)
        self.plan_path = cal.path

    # -- selection --------------------------------------------------------------------------------
    def spans(self, layer: int, n: int) -> Tensor:
        p = self.plan
        return spans_for(p["alpha"][layer], p["beta"][layer], n, p["min_span"])

    def select(self, q: Tensor, k: Tensor, ctx: Optional[SelectContext] = None):
        ctx = ctx or SelectContext()
        p = self.plan
        if q.dim() != 4 or k.dim() != 4:
            raise ValueError(f"q/k: expected 4-D tensors [batch, heads, tokens, head_dim], got {tuple(q.shape)}, {tuple(k.shape)}")
        layer = ctx.layer
        if layer is None:
            if p["shape"].num_layers != 1:
                raise ValueError(f"ctx.layer: expected a layer index (the plan covers {p['shape'].num_layers} layers), got None")
            layer = 0
        p["shape"].check_qk(q, k, layer, source="moa plan")
        Tq, Tk = q.shape[2], k.shape[2]
        if Tk < Tq:
            raise ValueError(f"k tokens: expected >= q tokens ({Tq}), got {Tk}")
        span = self.spans(int(layer), Tk).to(q.device)
        return sink_window_pattern(Tq, Tk, span, p["sink"], block_size=self.block_size, causal=ctx.causal,
                                   device=q.device)


def sink_window_pattern(q_len: int, kv_len: int, span: Tensor, sink: int, *, block_size: int = 64,
                        causal: bool = True, device=None) -> patterns.BlockPattern:
    """Per-head sink + window BlockPattern ``[1, H, ...]``: key ``j`` of row ``i`` (offset
    ``o = kv_len - q_len``) kept iff ``j < sink`` or ``0 <= i + o - j < span_h`` (``|i + o - j| <
    span_h`` when not causal). Causal: the library's sink + recent-window rule
    (``patterns.sink_or_recent`` with ``length = i + o + 1``, ``window = span_h``). Exact at token level
    (edge tiles in the mask bank)."""
    H = span.shape[0]
    sp = span.to(device=device, dtype=torch.long)
    off = kv_len - q_len
    s3 = sp[:, None, None]  # [H, 1, 1]

    if causal:
        def pred(r, c, h):
            return patterns.sink_or_recent(c, r + off + 1, sink, sp[h])

        def anyp(r0, r1, c0, c1):
            return (c0 < sink) | ((r0 + off - c1) < s3)

        def fullp(r0, r1, c0, c1):
            return (c1 < sink) | ((r1 + off - c0) < s3)
    else:
        def pred(r, c, h):
            return (c < sink) | ((r + off - c).abs() < sp[h])

        def anyp(r0, r1, c0, c1):
            gap = torch.clamp(torch.maximum(r0 + off - c1, c0 - r1 - off), min=0)
            return (c0 < sink) | (gap < s3)

        def fullp(r0, r1, c0, c1):
            far = torch.maximum((r1 + off - c0).abs(), (c1 - r0 - off).abs())
            return (c1 < sink) | (far < s3)

    return patterns._from_predicate(pred, fullp, anyp, q_len, kv_len, block_size, block_size, causal, device,
                                    heads=H)
