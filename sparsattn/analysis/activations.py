"""activations: MLP activation sparsity, top-k thresholding and the PPL-p% sparsity (The Lazy Neuron
Phenomenon, Li et al., arXiv 2210.06313; Sparsing Law: Towards Large Language Models with Greater
Activation Sparsity, Luo et al., arXiv 2411.02335).

The activation of a gated MLP ``down(act(gate(x)) * up(x))`` is the input of ``down_proj``
(``[tokens, d_ff]``); hooks on ``down_proj`` read and edit it.

- Sparsity (Lazy Neuron): the fraction of exactly-zero entries per layer and per position bucket
  (for a ReLU MLP the zeros of the ReLU; a SiLU MLP has almost none, which is why the PPL-p% metric exists).
- Top-k (Lazy Neuron): per token keep the ``k`` largest ``|a_i|`` and zero the rest; perplexity cost.
- PPL-p% (Sparsing Law): neuron i of layer l is inactive when ``|a_i| * ||W_down[:, i]|| < t_l``; t_l is
  set so that the mean relative error of the layer's MLP output from zeroing the inactive neurons (CETT)
  equals a shared value c, and c is bisected until perplexity is ``(1 + p/100)`` x the dense one; the
  reported sparsity is the fraction of inactive neurons at that c.

Differences from the authors' code (``thunlp/SparsingLaw``, read, not copied): thresholds are fitted on a
separate calibration slice of the held-out stream and perplexity measured on the next tokens; the CETT
search is a fixed number of bisection steps inside a bracket found on a coarse grid.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch

from ._common import Report, mlp_layers, progress


@contextlib.contextmanager
def edit_activations(model, fn_by_layer: dict):
    """edit_activations: ``{layer: fn(a [B, T, d_ff], layer) -> a}`` applied to the input of each MLP's
    ``down_proj`` (read-only functions may return None); hooks removed on exit."""
    mlps = mlp_layers(model)
    hs = []
    try:
        for l, fn in fn_by_layer.items():
            def pre(mod, args, fn=fn, l=l):
                r = fn(args[0], l)
                return None if r is None else (r,) + tuple(args[1:])
            hs.append(mlps[l].down_proj.register_forward_pre_hook(pre))
        yield
    finally:
        for h in hs:
            h.remove()


def collect(model, ids: torch.Tensor) -> dict:
    """collect: ``{layer: activations [T, d_ff] (fp32)}`` of one forward over ``ids [1, T]``."""
    got = {}
    mlps = mlp_layers(model)

    def rec(a, l):
        got[l] = a[0].detach().float().clone()
    with edit_activations(model, {l: rec for l in mlps}), torch.no_grad():
        model(input_ids=ids, use_cache=False)
    return got


def zero_fraction(acts: dict, n_buckets: int = 8) -> tuple[list, list]:
    """zero_fraction: per layer the fraction of exactly-zero activations, and per (layer, position bucket)."""
    rows, pos_rows = [], []
    for l, a in sorted(acts.items()):
        z = (a == 0).float()
        rows.append({"layer": l, "zero_frac": float(z.mean()), "d_ff": a.shape[1]})
        for b, chunk in enumerate(torch.tensor_split(torch.arange(a.shape[0]), n_buckets)):
            if chunk.numel():
                pos_rows.append({"layer": l, "bucket": b, "pos_from": int(chunk[0]), "pos_to": int(chunk[-1]),
                                 "zero_frac": float(z[chunk].mean())})
    return rows, pos_rows


def _ppl(model, ids: torch.Tensor, fns: Optional[dict] = None) -> float:
    from ..eval.perplexity import perplexity

    with edit_activations(model, fns or {}):
        return perplexity(model, ids, lengths=[ids.numel()], progress=False)[ids.numel()].ppl


def topk_fn(frac: float, stats: list):
    """topk_fn: per token keep the ``ceil(frac * d_ff)`` largest ``|a|`` (Lazy Neuron top-k); records the
    kept fraction in ``stats``."""
    def fn(a, l):
        k = max(1, int(round(frac * a.shape[-1])))
        idx = a.abs().topk(k, -1).indices
        out = torch.zeros_like(a).scatter(-1, idx, a.gather(-1, idx))
        stats.append(float((out == 0).float().mean()))
        return out
    return fn


def cett_thresholds(acts: dict, mlps: dict, cett: float, steps: int = 14) -> dict:
    """cett_thresholds: ``{layer: t_l}`` so that zeroing neurons with ``|a_i| ||W_down[:, i]|| < t_l`` gives
    a mean relative MLP-output error ``||W_down a_tail|| / ||W_down a||`` of ``cett`` on ``acts`` (bisection)."""
    out = {}
    for l, a in acts.items():
        W = mlps[l].down_proj.weight.detach().float()  # [d, d_ff]
        s = a.abs() * W.norm(dim=0)[None]
        full = (a @ W.T).norm(dim=-1).clamp_min(1e-12)
        lo, hi = 0.0, float(s.max())
        for _ in range(steps):
            mid = (lo + hi) / 2
            err = float(((a * (s < mid)) @ W.T).norm(dim=-1).div(full).mean())
            lo, hi = (mid, hi) if err < cett else (lo, mid)
        out[l] = lo
    return out


def threshold_fn(t: dict, mlps: dict, stats: list):
    """threshold_fn: zero ``a_i`` where ``|a_i| ||W_down[:, i]|| < t_l``; records the zero fraction."""
    norms = {l: mlps[l].down_proj.weight.detach().float().norm(dim=0) for l in t}

    def fn(a, l):
        keep = (a.abs().float() * norms[l]) >= t[l]
        out = a * keep
        stats.append(float((out == 0).float().mean()))
        return out
    return fn


def ppl_at_cett(model, calib: dict, mlps: dict, ids: torch.Tensor, c: float) -> tuple[float, float]:
    """ppl_at_cett: ``(perplexity, sparsity)`` with every layer thresholded at CETT ``c``."""
    t = cett_thresholds(calib, mlps, c)
    st: list = []
    fn = threshold_fn(t, mlps, st)
    p = _ppl(model, ids, {l: fn for l in mlps})
    return p, sum(st) / len(st)


def analyze(model, tok, *, n_tokens: int = 2048, calib_tokens: int = 512, p_targets: Sequence[float] = (1.0, 5.0, 10.0),
            topk: Sequence[float] = (0.5, 0.25, 0.1, 0.05), cett_grid: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5),
            search_steps: int = 5, seed: int = 0, stream: Optional[torch.Tensor] = None,
            show_progress: bool = True) -> Report:
    """analyze: sparsity per layer / position, top-k perplexity cost, the CETT curve and PPL-p% -> ``Report``.

    ``stream`` (LongTensor [N]) replaces the held-out token stream (``heldout_token_stream``); its first
    ``calib_tokens`` fit the thresholds, the rest measures perplexity."""
    mlps = mlp_layers(model)
    if stream is None:
        from ..eval.perplexity import heldout_token_stream

        stream = heldout_token_stream(tok, n_tokens + calib_tokens, seed=seed)
    if stream.numel() <= calib_tokens + 1:
        raise ValueError(f"n_tokens: expected more than calib_tokens={calib_tokens} + 1 tokens, got {stream.numel()}")
    calib_ids, ids = stream[None, :calib_tokens], stream[calib_tokens:]
    acts = collect(model, ids[None])
    rows, pos_rows = zero_fraction(acts)
    calib = collect(model, calib_ids)
    base = _ppl(model, ids)
    curve = [{"kind": "dense", "param": 0.0, "ppl": base, "ppl_ratio": 1.0,
              "sparsity": sum(r["zero_frac"] for r in rows) / len(rows)}]
    for f in progress(list(topk), "top-k", show_progress):
        st: list = []
        p = _ppl(model, ids, {l: topk_fn(f, st) for l in mlps})
        curve.append({"kind": "topk", "param": f, "ppl": p, "ppl_ratio": p / base, "sparsity": sum(st) / len(st)})
    grid = []
    for c in progress(list(cett_grid), "CETT grid", show_progress):
        p, sp = ppl_at_cett(model, calib, mlps, ids, c)
        grid.append((c, p, sp))
        curve.append({"kind": "cett", "param": c, "ppl": p, "ppl_ratio": p / base, "sparsity": sp})
    ppl_p = []
    for pt in progress(list(p_targets), "PPL-p%", show_progress):
        target = 1 + pt / 100
        lo, hi = 0.0, None
        for c, p, _ in grid:
            if p / base <= target:
                lo = max(lo, c)
            elif hi is None or c < hi:
                hi = c
        hi = hi if hi is not None else 1.0
        best = (lo, None, None)
        for _ in range(search_steps):
            mid = (lo + hi) / 2
            p, sp = ppl_at_cett(model, calib, mlps, ids, mid)
            curve.append({"kind": "cett", "param": mid, "ppl": p, "ppl_ratio": p / base, "sparsity": sp})
            if p / base <= target:
                lo, best = mid, (mid, p, sp)
            else:
                hi = mid
        if best[1] is None:  # the lower bracket itself (a grid point or CETT 0)
            p, sp = ppl_at_cett(model, calib, mlps, ids, lo) if lo > 0 else (base, curve[0]["sparsity"])
            best = (lo, p, sp)
        ppl_p.append({"p": pt, "cett": best[0], "ppl": best[1], "ppl_ratio": best[1] / base, "sparsity": best[2],
                      "activation_ratio": 1 - best[2]})
    for r in rows:
        r["mean_abs"] = float(acts[r["layer"]].abs().mean())
    if ppl_p:  # where the sparsity sits at the first PPL-p% point: per layer and position, on the dense activations
        t = cett_thresholds(calib, mlps, ppl_p[0]["cett"])
        thr = {l: (a.abs() * mlps[l].down_proj.weight.detach().float().norm(dim=0)[None] < t[l]) for l, a in acts.items()}
        _, pos_t = zero_fraction({l: (~z).float() for l, z in thr.items()})
        key = f"ppl{ppl_p[0]['p']:g}_zero_frac"
        for r in rows:
            r[key] = float(thr[r["layer"]].float().mean())
        for r, rt in zip(pos_rows, pos_t):
            r[key] = rt["zero_frac"]
    summary = {"ppl_dense": base, "eval_tokens": ids.numel(), "calib_tokens": calib_tokens, "ppl_p": ppl_p,
               "curve": curve, "layers": rows}

    def plot(path):
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        L = len(rows)
        key = next((k for k in pos_rows[0] if k.startswith("ppl")), "zero_frac") if pos_rows else "zero_frac"
        for l in range(L):
            pr = [r for r in pos_rows if r["layer"] == l]
            a.plot([r["pos_from"] for r in pr], [r[key] for r in pr], marker="o", ms=3, label=f"L{l}")
        a.set_xlabel("position (bucket start)")
        a.set_ylabel("fraction of zero activations" if key == "zero_frac" else f"fraction inactive ({key[:-10]} thresholds)")
        a.set_title(f"MLP activation sparsity per layer and position ({'exact zeros' if key == 'zero_frac' else key[:-10]})",
                    fontsize=9)
        a.legend(fontsize=6, ncol=2)
        for kind, col in (("topk", "C0"), ("cett", "C3")):
            pts = sorted((r["sparsity"], r["ppl_ratio"]) for r in curve if r["kind"] == kind)
            b.plot([x for x, _ in pts], [y for _, y in pts], marker="o", color=col,
                   label="top-k" if kind == "topk" else "CETT threshold")
        for r in ppl_p:
            b.axhline(1 + r["p"] / 100, color="grey", lw=0.5, ls="--")
            b.annotate(f"PPL-{r['p']:g}%: {r['sparsity']:.2f}", (r["sparsity"], r["ppl_ratio"]), fontsize=7)
        b.set_yscale("log")
        b.set_xlabel("activation sparsity (fraction zeroed)")
        b.set_ylabel("perplexity / dense")
        b.set_title(f"perplexity cost (dense {base:.2f}, {ids.numel()} tokens)", fontsize=9)
        b.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    return Report("activations", curve, summary, ["kind", "param", "sparsity", "ppl", "ppl_ratio"],
                  "MLP activation sparsity vs perplexity (top-k, CETT thresholds)", plot,
                  extra_csv={"layers": rows, "positions": pos_rows, "ppl_p": ppl_p})
