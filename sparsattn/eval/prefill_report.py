"""Outputs of the prefill quality driver: the per-setting summary, the markdown table, the Pareto
and speed-up plots, and reading the methods benchmark's speed CSV."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from ._harness import save_figure



if TYPE_CHECKING:
    from .prefill_settings import Setting

# ----------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------

def _f(x, nd: int = 4):
    """``x`` rounded to ``nd`` digits, or "" when it is not a finite number (table cells)."""
    return round(float(x), nd) if isinstance(x, (int, float)) and math.isfinite(float(x)) else ""


def _num(x) -> Optional[float]:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def summarize(settings: list[Setting], passkey: list[dict], fid: dict, lengths: Sequence[int], fid_length: int,
              speed: Optional[dict] = None) -> list[dict]:
    """One row per (method, target): fidelity at ``fid_length`` and passkey per length (and speed-up when known)."""
    keys: list = []
    for s in settings:
        if s.key not in keys:
            keys.append(s.key)
    pk = {(r["method"], r["target"], int(r["length"])): r for r in passkey if r.get("task", "passkey") == "passkey"}
    base = {int(r["length"]): r for r in passkey if r["method"] == "sdpa_dense" and r.get("task", "passkey") == "passkey"}
    out = []
    ref = {"method": "sdpa_dense", "target": "reference", "setting": "unpatched model (transformers SDPA)",
           "density": 1.0, "recall": 1.0, "topk_recall": 1.0, "rel_error": 0.0, "min_layer_recall": 1.0}
    for L in lengths:
        if L in base:
            ref[f"acc_{L}"] = _f(base[L]["acc"], 1)
            ref[f"tok_acc_{L}"] = _f(base[L]["token_acc"], 1)
            ref[f"density_pk_{L}"] = 1.0
    accs = [_num(ref.get(f"acc_{L}")) for L in lengths]
    accs = [a for a in accs if a is not None]
    ref["acc_mean"] = _f(sum(accs) / len(accs), 1) if accs else ""
    _needle_summary(ref, base, lengths)
    out.append(ref)
    for key in keys:
        name, tgt = key
        fs = next((s for s in settings if s.key == key and s.length == fid_length), None)
        r = {"method": name, "target": tgt, "setting": fs.label if fs else "",
             "target_met": "" if fs is None or fs.target_met is None else bool(fs.target_met)}
        f = fid.get(key)
        if f:
            r.update({"density": _f(f["density"]), "recall": _f(f["recall"]), "topk_recall": _f(f["topk_recall"]),
                      "rel_error": _f(f["rel_error"]), "min_layer_recall": _f(f["min_layer_recall"])})
        accs = []
        for L in lengths:
            p = pk.get((name, tgt, L))
            if p is None:
                continue
            r[f"acc_{L}"] = _f(p["acc"], 1) if p.get("acc") not in (None, "") else ""
            r[f"tok_acc_{L}"] = _f(p["token_acc"], 1) if p.get("token_acc") not in (None, "") else ""
            r[f"density_pk_{L}"] = _f(p["density"]) if p.get("density") not in (None, "") else ""
            if _num(p.get("acc")) is not None:
                accs.append(float(p["acc"]))
        r["acc_mean"] = _f(sum(accs) / len(accs), 1) if accs else ""
        dens_pk = [_num(r.get(f"density_pk_{L}")) for L in lengths]
        dens_pk = [x for x in dens_pk if x is not None]
        r["density_pk_mean"] = _f(sum(dens_pk) / len(dens_pk)) if dens_pk else ""
        _needle_summary(r, {L: pk[(name, tgt, L)] for L in lengths if (name, tgt, L) in pk}, lengths)
        if speed:
            sp = speed.get(name)
            if sp:
                for T, v in sorted(sp.items()):
                    r[f"speedup_{T}"] = _f(v, 3)
        errs = sorted({s.error for s in settings if s.key == key and s.error} |
                      {p.get("error", "") for (m_, t_, _), p in pk.items() if (m_, t_) == key and p.get("error")})
        r["error"] = "; ".join(errs)[:300]
        out.append(r)
    return out


def needle_last(rows: list[dict]) -> list[str]:
    """needle_last: the CSV columns of ``rows`` (union, first-seen order) with the needle-coverage and
    diagnostic columns (``needle_*``, ``diag_*``) moved to the end, so the other columns keep their order."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    late = [k for k in keys if k.startswith(("needle_", "diag_"))]
    return [k for k in keys if k not in late] + late


def _needle_summary(r: dict, by_length: dict, lengths: Sequence[int]) -> None:
    """Add ``needle_kept_{L}``, ``needle_reading_{L}``, ``needle_cov_{L}`` and ``needle_cov_mean`` (kept /
    reading heads pooled over lengths) to summary row ``r`` from the passkey rows ``{L: row}`` that
    carry a needle coverage (nothing when none does)."""
    kept = reading = 0
    for L in lengths:
        p = by_length.get(L)
        if p is None or _num(p.get("needle_reading")) is None:
            continue
        k, n = int(float(p["needle_kept"])), int(float(p["needle_reading"]))
        r[f"needle_kept_{L}"], r[f"needle_reading_{L}"] = k, n
        r[f"needle_cov_{L}"] = _f(k / n, 4) if n else ""
        kept, reading = kept + k, reading + n
    if reading:
        r["needle_cov_mean"] = _f(kept / reading, 4)


def write_table(summary: list[dict], path: Path, lengths: Sequence[int], fid_length: int, header: str = "") -> str:
    """write_table: the summary as a markdown table (paste-ready for docs/methods.md); returns the text."""
    cols = ["method", "target", "setting (at fid. length)", f"density (fid., {fid_length})", "attn recall",
            "min layer recall", "top-10 recall", "rel. out. err"]
    cols += [f"passkey {L} (%) [density]" for L in lengths] + ["mean passkey (%)"]
    needle = [L for L in lengths if any(_num(r.get(f"needle_reading_{L}")) is not None for r in summary)]
    cols += [f"needle kept {L} (heads)" for L in needle]
    lines = [header.rstrip("\n"), ""] if header.strip() else []
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def g(r, k, fmt="{:.3f}"):
        v = _num(r.get(k))
        return fmt.format(v) if v is not None else "-"
    for r in summary:
        tgt = str(r["target"]) + (" (not met)" if str(r.get("target_met")) == "False" else "")
        cells = [f"`{r['method']}`", tgt, str(r.get("setting", "")), g(r, "density"), g(r, "recall"),
                 g(r, "min_layer_recall"), g(r, "topk_recall"), g(r, "rel_error")]
        for L in lengths:
            a = g(r, f"acc_{L}", "{:.0f}")
            d = g(r, f"density_pk_{L}")
            cells.append(f"{a} [{d}]" if a != "-" else "not run")
        cells.append(g(r, "acc_mean", "{:.1f}"))
        for L in needle:
            n = _num(r.get(f"needle_reading_{L}"))
            cells.append(f"{int(float(r[f'needle_kept_{L}']))}/{int(n)}" if n is not None else "-")
        if r.get("error"):
            cells[2] += " (error, see CSV)"
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    Path(path).write_text(text)
    return text


def _plt():
    from ._harness import pyplot

    return pyplot()


def _frontier(pts: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Upper-left Pareto frontier (lower density, higher value)."""
    best, out = -math.inf, []
    for x, y in sorted(pts):
        if y > best:
            out.append((x, y))
            best = y
    return out


def plot_pareto(summary: list[dict], path: Path, lengths: Sequence[int], title: str = "") -> Path:
    """plot_pareto: passkey accuracy (mean over lengths) vs passkey density, attention recall vs density,
    and (when the passkey runs measured it) needle coverage vs passkey density."""
    plt = _plt()
    needle = any(_num(r.get("needle_cov_mean")) is not None for r in summary if r["method"] != "sdpa_dense")
    fig, axes = plt.subplots(1, 3 if needle else 2, figsize=(19.5 if needle else 13, 5.2))
    methods = [m for m in dict.fromkeys(r["method"] for r in summary) if m != "sdpa_dense"]
    cmap = plt.get_cmap("tab20")
    marks = "os^Dv<>pPX*hH8d"
    panels = ((axes[0], "density_pk_mean", "acc_mean", "teacher-forced passkey accuracy (%), mean over lengths",
               "density in the passkey forwards (mean over layers, samples, lengths)"),
              (axes[1], "density", "recall", "attention recall (mean over layers)",
               "density on the fidelity prompt (mean over layers)"))
    if needle:
        panels += ((axes[2], "density_pk_mean", "needle_cov_mean",
                    "needle coverage (share of reading heads kept)",
                    "density in the passkey forwards (mean over layers, samples, lengths)"),)
    for ax, xk, yk, ylab, xlab in panels:
        pts = []
        for i, m in enumerate(methods):
            rs = [(float(r[xk]), float(r[yk])) for r in summary if r["method"] == m
                  and _num(r.get(xk)) is not None and _num(r.get(yk)) is not None]
            if not rs:
                continue
            rs.sort()
            pts += rs
            ax.plot([x for x, _ in rs], [y for _, y in rs], marker=marks[i % len(marks)], ls="-", lw=0.8, ms=7,
                    color=cmap(i % 20), label=m, alpha=0.85)
        fr = _frontier(pts)
        if fr:
            ax.step([x for x, _ in fr], [y for _, y in fr], where="post", color="0.4", lw=1.5, ls="--",
                    label="Pareto frontier", zorder=0)
        ref = next((r for r in summary if r["method"] == "sdpa_dense"), None)
        if ref is not None and _num(ref.get(yk)) is not None:
            ax.axhline(float(ref[yk]), color="k", lw=0.8, ls=":", label="dense (SDPA)")
        ax.set_xscale("log")
        ax.set_xlabel(xlab)
        ax.set_ylabel(ylab)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylim(-5, 105)
    if needle:
        axes[2].set_ylim(-0.05, 1.05)
    axes[1].legend(fontsize=8, loc="lower right", ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def read_speed(path) -> dict:
    """``{method: {T: speedup_end_to_end}}`` from a ``python -m sparsattn.bench.methods`` CSV (rows with errors skipped)."""
    out: dict = {}
    with open(path, newline="") as f:
        rd = csv.DictReader(f)
        need = {"T", "method", "speedup_end_to_end"}
        if not need <= set(rd.fieldnames or []):
            raise ValueError(f"speed: expected a CSV with columns {sorted(need)}, got {rd.fieldnames}")
        for r in rd:
            v = _num(r.get("speedup_end_to_end"))
            if v is None:
                continue
            out.setdefault(r["method"], {})[int(float(r["T"]))] = v
    return out


def plot_speedup(summary: list[dict], speed: dict, path: Path, title: str = "") -> Optional[Path]:
    """plot_speedup: passkey accuracy and attention recall (lowest target density per method) vs the
    benchmark's end-to-end speed-up over cuDNN dense, one marker per benchmark length."""
    plt = _plt()
    rows = {}
    for r in summary:
        t = _num(r.get("target"))
        if r["method"] in speed and t is not None and t < 1:
            if r["method"] not in rows or t < _num(rows[r["method"]]["target"]):
                rows[r["method"]] = r
    if not rows:
        return None
    Ts = sorted({T for m in rows for T in speed[m]})
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    marks = "os^Dv"
    for ax, yk, ylab in ((axes[0], "acc_mean", "teacher-forced passkey accuracy (%), mean over lengths"),
                         (axes[1], "recall", "attention recall (mean over layers)")):
        for j, T in enumerate(Ts):
            pts = [(speed[m][T], float(r[yk]), m) for m, r in rows.items() if T in speed[m] and _num(r.get(yk)) is not None]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marks[j % len(marks)], s=50,
                       label=f"speed-up at T={T}")
            for x, y, m in pts:
                ax.annotate(m, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axvline(1.0, color="k", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("end-to-end speed-up vs cuDNN dense SDPA (index building + sparse attention)")
        ax.set_ylabel(ylab)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0].set_ylim(-5, 105)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
