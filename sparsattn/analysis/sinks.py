"""sinks: Hidden attention sinks and the Attention Calibration Technique, ACT (Unveiling and Harnessing
Hidden Attention Sinks: Training-Free Attention Calibration for Enhancing LLMs, Yu et al., arXiv 2406.15765).

Per (layer, head), the mean attention a column receives, ``a_j = sum_i A_ij / #(rows that can attend j)``
(causal: ``T - j`` rows); a sink is a column ``j > 0`` with ``a_j > alpha`` (the first token, the
well-known sink, is reported apart and never calibrated). Columns that fewer than ``MIN_ROWS`` rows
can attend (the last tokens of the input) are not candidates: the paper's mean over a handful of
rows there measures local attention, not a sink (our addition; the authors' code has no such rule).

ACT (per calibrated head, at inference, no training): compute the sinks of the head's own attention
matrix on the current input, multiply each row's sink entries by ``beta`` and give the removed mass
``(1 - beta) * sum_{j in S} A_ij`` to the row's non-sink entries in proportion to their weights.
Head selection (offline, as the paper's calibration script): a head is kept when calibrating it alone
raises the mean log-probability of the gold answers on a validation set of other seeds.

Differences from the authors' code (``GATECH-EIC/ACT``, read, not copied): heads are searched only
among those where sinks beyond the first token were found (the paper sweeps all heads of layers
2-30); the validation signal is the gold answer's log-probability (the paper uses accuracy on 900
samples); tasks are the project's passkey / multi-key / variable tracking, scored exactly.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._common import Edit, Report, attention_layers, attention_rows, exact_count, progress, task_prompts

ALPHA = 0.1
BETA = 0.4
#: a column attended by fewer rows than this is not a sink candidate: its mean over a handful of
#: rows measures local attention (the last tokens), not a sink
MIN_ROWS = 32


def column_mean(p: torch.Tensor) -> torch.Tensor:
    """column_mean: ``a_j`` ``[..., Tk]`` of causal attention ``p [..., Tq, Tk]`` (rows aligned bottom-right):
    the column sum divided by the number of rows that can attend key j."""
    Tq, Tk = p.shape[-2], p.shape[-1]
    j = torch.arange(Tk, device=p.device)
    n_rows = (Tq - (j - (Tk - Tq)).clamp(min=0)).clamp(min=1, max=Tq)
    return p.sum(-2) / n_rows.to(p.dtype)


def sink_mask(p: torch.Tensor, alpha: float = ALPHA, min_rows: int = MIN_ROWS) -> torch.Tensor:
    """sink_mask: bool ``[..., Tk]``: columns with ``a_j > alpha``, the first column excluded, and only
    columns that at least ``min_rows`` query rows can attend (capped at a quarter of the rows)."""
    Tq, Tk = p.shape[-2], p.shape[-1]
    s = column_mean(p) > alpha
    s[..., 0] = False
    need = min(int(min_rows), max(1, Tq // 4))
    j = torch.arange(Tk, device=p.device)
    s &= (Tq - (j - (Tk - Tq)).clamp(min=0)) >= need
    return s


def act_calibrate(p: torch.Tensor, heads: Sequence[int], alpha: float = ALPHA, beta: float = BETA) -> torch.Tensor:
    """act_calibrate: ACT on the query heads ``heads`` of ``p [B, H, Tq, Tk]``: sink entries x ``beta``,
    the removed mass redistributed over non-sink entries in proportion; rows still sum to 1."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta: expected a number in [0, 1], got {beta!r}")
    out = p.clone()
    hs = list(heads)
    ph = p[:, hs]
    S = sink_mask(ph, alpha)[:, :, None, :]  # [B, h, 1, Tk]
    removed = (ph * S).sum(-1, keepdim=True) * (1 - beta)
    rest = (ph * ~S).sum(-1, keepdim=True)
    share = torch.where(rest > 0, removed / rest.clamp_min(1e-30), torch.zeros_like(rest))
    new = torch.where(S, ph * beta, ph * (1 + share))
    new = torch.where(rest > 0, new, ph)  # a row with only sinks keeps its attention
    out[:, hs] = new
    return out


def act_edits(heads: Sequence[tuple], alpha: float = ALPHA, beta: float = BETA) -> dict:
    """act_edits: ``[(layer, head)]`` -> ``{layer: Edit(probs=ACT on those heads)}`` for ``edit_attention``."""
    by: dict = {}
    for l, h in heads:
        by.setdefault(int(l), []).append(int(h))
    return {l: Edit(probs=lambda p, hs=tuple(sorted(h)): act_calibrate(p, hs, alpha, beta)) for l, h in by.items()}


def find_sinks(model, ids: torch.Tensor, alpha: float = ALPHA, top: int = 3) -> list:
    """find_sinks: one row per (layer, head) of ``model`` on ``ids [1, T]``: first-token mean attention,
    the number of sinks beyond the first token, their positions (up to ``top``, strongest first) and mass."""
    from ..capture import capture_qkv

    mods = attention_layers(model)
    cap = capture_qkv(model, ids)
    rows = []
    for l in sorted(mods):
        q, k, _ = cap[l]
        p = attention_rows(q, k, float(mods[l].scaling))[0]  # [H, T, T]
        a = column_mean(p)
        sm = sink_mask(p, alpha)
        for h in range(p.shape[0]):
            s = torch.where(sm[h], a[h], torch.zeros_like(a[h]))
            pos = sm[h].nonzero().flatten()
            order = pos[s[pos].argsort(descending=True)][:top].tolist()
            rows.append({"layer": l, "head": h, "first_token": round(float(a[h, 0]), 4), "n_sinks": int(pos.numel()),
                         "sink_positions": " ".join(map(str, order)),
                         "sink_tokens": " ".join(str(int(ids[0, j])) for j in order),
                         "sink_mass": round(float(a[h, pos].sum()), 4) if pos.numel() else 0.0,
                         "max_sink": round(float(s.max()), 4)})
    return rows


def _logprob(model, samples, edits) -> float:
    from ._common import edit_attention

    tot = 0.0
    with edit_attention(model, edits or {}):
        for s in samples:
            ids = torch.tensor([list(s.prompt_ids) + list(s.answer_ids)])
            n = len(s.answer_ids)
            lg = model(input_ids=ids, use_cache=False, logits_to_keep=n + 1).logits[0, :n].float()
            tot += float(torch.log_softmax(lg, -1).gather(-1, torch.tensor(list(s.answer_ids))[:, None]).sum())
    return tot / len(samples)


def search_heads(model, val: list, candidates: Sequence[tuple], alpha: float = ALPHA, beta: float = BETA,
                 show_progress: bool = True) -> tuple[list, list]:
    """search_heads: the candidates whose calibration alone raises the mean gold-answer log-probability on
    ``val`` (ACT's offline head search) -> ``(kept heads, rows)``."""
    base = _logprob(model, val, None)
    kept, rows = [], []
    for l, h in progress(list(candidates), "ACT head search", show_progress):
        lp = _logprob(model, val, act_edits([(l, h)], alpha, beta))
        rows.append({"layer": l, "head": h, "delta_logprob": round(lp - base, 4), "kept": lp > base})
        if lp > base:
            kept.append((l, h))
    return kept, rows


def analyze(model, tok, *, tasks: Sequence[str] = ("passkey", "multikey_needle", "variable_tracking"),
            length: int = 1024, n: int = 8, n_val: int = 2, alpha: float = ALPHA, beta: float = BETA, seed: int = 0,
            device: str = "cpu", max_candidates: Optional[int] = 16, show_progress: bool = True) -> Report:
    """analyze: sinks per head on a passkey prompt, ACT's head search on ``n_val`` validation prompts per
    task, and exact counts per task without ACT, with ACT on the searched heads and on every sink head."""
    probe = task_prompts(tok, tasks[0], length, 1, seed + 100)[0]
    sink_rows = find_sinks(model, torch.tensor([probe.prompt_ids]), alpha)
    cands = sorted(((r["layer"], r["head"]) for r in sink_rows if r["n_sinks"] > 0),
                   key=lambda lh: -next(r["sink_mass"] for r in sink_rows if (r["layer"], r["head"]) == lh))
    if max_candidates is not None:
        cands = cands[:max_candidates]
    val = [s for t in tasks for s in task_prompts(tok, t, length, n_val, seed + 200)]
    kept, search_rows = search_heads(model, val, cands, alpha, beta, show_progress) if cands else ([], [])
    settings = [("baseline", None), ("ACT searched heads", act_edits(kept, alpha, beta) if kept else None),
                ("ACT all sink heads", act_edits(cands, alpha, beta) if cands else None)]
    acc_rows = []
    for t in progress(list(tasks), "ACT accuracy", show_progress):
        ss = task_prompts(tok, t, length, n, seed)
        for name, ed in settings:
            if name != "baseline" and ed is None:
                continue
            c, N, hits = exact_count(model, ss, ed, device)
            acc_rows.append({"task": t, "setting": name, "correct": c, "n": N, "accuracy": round(100.0 * c / N, 1),
                             "per_sample": "".join(map(str, hits))})
    n_heads = len(sink_rows)
    summary = {"alpha": alpha, "beta": beta, "length": length, "n_heads": n_heads,
               "heads_with_sinks": len([r for r in sink_rows if r["n_sinks"] > 0]), "candidates": cands,
               "act_heads": kept, "accuracy": acc_rows, "search": search_rows}

    def plot(path):
        import matplotlib.pyplot as plt

        L = max(r["layer"] for r in sink_rows) + 1
        H = max(r["head"] for r in sink_rows) + 1
        grid = torch.zeros(L, H)
        for r in sink_rows:
            grid[r["layer"], r["head"]] = r["sink_mass"]
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        im = a.imshow(grid.numpy(), cmap="magma", aspect="auto")
        a.set_xlabel("head")
        a.set_ylabel("layer")
        a.set_title(f"mean attention on sinks beyond token 0 (alpha {alpha})", fontsize=9)
        fig.colorbar(im, ax=a)
        labels = [f"{r['task'][:8]}\n{r['setting'].replace('ACT ', '')}" for r in acc_rows]
        b.bar(range(len(acc_rows)), [r["accuracy"] for r in acc_rows],
              color=[{"baseline": "grey", "ACT searched heads": "C3"}.get(r["setting"], "C0") for r in acc_rows])
        b.set_xticks(range(len(acc_rows)), labels, fontsize=6)
        for i, r in enumerate(acc_rows):
            b.text(i, r["accuracy"] + 1, f"{r['correct']}/{r['n']}", ha="center", fontsize=7)
        b.set_ylim(0, 110)
        b.set_title(f"exact accuracy @ {length} (beta {beta})", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    sink_rows = sorted(sink_rows, key=lambda r: (-r["sink_mass"], r["layer"], r["head"]))
    return Report("sinks", sink_rows, summary,
                  ["layer", "head", "first_token", "n_sinks", "sink_positions", "sink_mass", "max_sink"],
                  f"attention sinks beyond the first token (alpha {alpha})", plot,
                  extra_csv={"act_accuracy": acc_rows, "act_search": search_rows})
