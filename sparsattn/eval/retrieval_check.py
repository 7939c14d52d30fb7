"""retrieval_check: do the calibrated methods retrieve? Issue 21's check (teacher-forced passkey and needle
coverage on held-out haystacks, every method aimed at one density) as runs of the prefill quality driver,
with no method named in code (the successor of ``python -m sparsattn.calibrate.check``).

Protocol: ``python -m sparsattn.eval.prefill_quality --haystack prose --seed 2112 --lengths L --densities D
--n N --fidelity off --refit off [--calibrations DIR]``: ``N`` passkey prompts in prose lines of the
installation's documentation (``sparsattn.data.prose``: neither source code nor a training template,
never seen in training or calibration; ``--haystack code`` uses lines of the held-out source files,
the protocol of the fifth session's tables), the answer decided by the sparse prefill (one
teacher-forced forward), every method aimed at density ``D`` by its own presets (``density_knob``,
``density_variants``, ``fixed_settings``: calibrated plans run as they are and their density is
recorded), and the needle coverage of every setting (``sparsattn.eval.needle``: heads whose answer rows
put >= ``threshold`` of their dense attention on the value's tokens, kept when the pattern keeps half
of it). A calibration module's declared ``diagnostics`` (SeerAttention's gate block recall against the
oracle, top-k mode) come with the rows.

Specs (``--methods``): ``name[:variant][@label]``: ``name`` a registered prefill method; ``variant`` one
of its ``density_variants`` (e.g. ``seer_attention:threshold``, ``oracle_topk:uniform``) or ``d<density>``
(aimed at that density instead of ``--target``); ``label`` a calibration folder given by ``--cal-dirs
label=DIR`` (default ``shipped``: the bundled model's). Each (label, density) group is one driver run in
``OUT/check_<L><tag>/<label>_d<density>/``; the rows of all groups are merged into
``OUT/check_<L><tag>.json`` / ``.csv`` (one row per spec, plus the unpatched baseline).

CLI: ``python -m sparsattn.eval.retrieval_check --out DIR [--length 4096] [--n 10] [--target 0.1]
[--methods ...] [--cal-dirs label=DIR,...] [--threshold 0.1] [--haystack prose|code|noise] [--tag T]``; ``--plot JSON... --out PNG``
draws passkey and needle coverage per row.
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path
from typing import Optional, Sequence

from ..bench.common import write_csv
from .prefill_quality import HELDOUT_SEED

__all__ = ["parse_spec", "plan_runs", "run", "plot", "main"]


def parse_spec(spec: str, target: float, cal_dirs: dict) -> tuple[str, float, str]:
    """parse_spec: ``name[:variant][@label]`` -> ``(driver method spec, density, label)``; a ``d<x>`` variant
    sets the density. Raises ValueError naming the spec for an unknown label or a bad density."""
    name, _, label = str(spec).partition("@")
    label = label or "shipped"
    if label not in cal_dirs:
        raise ValueError(f"methods: {spec!r} names calibration folder {label!r}; known: {sorted(cal_dirs)}")
    base, _, var = name.partition(":")
    if var[:1] == "d" and var[1:2].isdigit():
        try:
            d = float(var[1:])
        except ValueError:
            raise ValueError(f"methods: {spec!r}: expected d<density>, got {var!r}") from None
        if not 0 < d < 1:
            raise ValueError(f"methods: {spec!r}: expected a density in (0, 1), got {d}")
        return base, d, label
    return name, float(target), label


def plan_runs(specs: Sequence[str], target: float, cal_dirs: dict) -> dict:
    """plan_runs: ``{(label, density): [driver method specs]}``, one driver run per group (order kept)."""
    from .prefill_settings import check_method_specs

    out: dict = {}
    for spec in specs:
        m, d, label = parse_spec(spec, target, cal_dirs)
        check_method_specs([m])
        out.setdefault((label, d), [])
        if m not in out[(label, d)]:
            out[(label, d)].append(m)
    return out


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run(out_dir, *, length: int = 4096, n: int = 10, target: float = 0.1, methods: Sequence[str] = (),
        cal_dirs: Optional[dict] = None, threshold: float = 0.1, keep: float = 0.5, tag: str = "",
        seed: int = HELDOUT_SEED, haystack: str = "prose", device: str = "cpu") -> list[dict]:
    """run: the driver runs of ``plan_runs`` and the merged rows (see the module docstring)."""
    from . import prefill_quality as pq

    from ..calibrate import shipped_dir

    if not methods:
        raise ValueError("methods: expected at least one spec name[:variant][@label]")
    cal_dirs = dict({"shipped": str(shipped_dir())}, **(cal_dirs or {}))
    out_dir = Path(out_dir)
    stem = f"check_{length}{tag}"
    plan = plan_runs(methods, target, cal_dirs)
    rows: list[dict] = []
    described = {"code": "code (held-out source files)", "prose": "prose (documentation text, sparsattn.data.prose)"}
    doc = {"rows": rows, "protocol": {"haystack": described.get(haystack, haystack), "seed": seed, "threshold": threshold, "keep": keep,
                                      "cal_dirs": cal_dirs, "target": target, "runs": {}},
           "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    for (label, d), ms in plan.items():
        sub = out_dir / stem / f"{label}_d{d:g}"
        pq.run(sub, device=device, lengths=[length], densities=[d], n=n, methods=ms, refit=False, fidelity=False,
               haystack=haystack, seed=seed, needle=True, needle_threshold=threshold, needle_keep=keep,
               calibrations=None if label == "shipped" else cal_dirs[label])
        doc["protocol"]["runs"][f"{label}_d{d:g}"] = str(sub)
        needle = {(r["method"], r["target"], r["setting"]): r
                  for r in json.loads((sub / "needle.json").read_text())["rows"]} if (sub / "needle.json").is_file() else {}
        for r in _read(sub / "passkey.csv"):
            if r["method"] == "sdpa_dense" and any(x["method"] == "sdpa_dense" for x in rows):
                continue
            nd = needle.get((r["method"], r["target"], r["setting"]), {})
            nread, nkept = int(r.get("needle_reading") or 0), int(r.get("needle_kept") or 0)
            row = {"method": r["method"] + ("" if label == "shipped" or r["method"] == "sdpa_dense" else f"@{label}"),
                   "length": length, "target": r["target"], "n": int(r["n"]),
                   "correct": round(float(r["acc"]) * int(r["n"]) / 100) if r.get("acc") not in (None, "") else None,
                   "density": float(r["density"]) if r.get("density") not in (None, "") else None,
                   "setting": r["setting"], "reading_heads_per_prompt": round(nread / int(r["n"]), 2),
                   "needle_kept": nkept, "needle_reading": nread,
                   "coverage": round(nkept / nread, 4) if nread else float("nan"),
                   "mean_kept_fraction": float(r["needle_kept_fraction"]) if r.get("needle_kept_fraction") else float("nan"),
                   "by_depth": r.get("by_depth", "").replace(" ", ""), "error": r.get("error", ""),
                   "diagnostics": nd.get("diagnostics", {}),
                   "heads": [[(h[0], h[1], h[4]) for h in s["heads"]] for s in nd.get("samples", [])]}
            rows.append(row)
        (out_dir / f"{stem}.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
        write_csv([{k: v for k, v in r.items() if k not in ("heads", "diagnostics")} for r in rows],
                  out_dir / f"{stem}.csv")
    return rows


def plot(json_paths: Sequence[str], out_png: str) -> str:
    """plot: passkey accuracy and needle coverage per row (bars) of one or more ``check_*.json`` runs,
    one panel per run, the density written above each bar pair -> ``out_png``."""
    from ._harness import pyplot, save_figure

    plt = pyplot()
    docs = [json.loads(Path(p).read_text()) for p in json_paths]
    fig, axes = plt.subplots(1, len(docs), figsize=(5.5 * len(docs), 3.8), squeeze=False)
    for ax, p, doc in zip(axes[0], json_paths, docs):
        rows = doc["rows"]
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [(r["correct"] or 0) / r["n"] for r in rows], 0.4, label="passkey (teacher-forced)")
        ax.bar([i + 0.2 for i in x], [0 if r["coverage"] != r["coverage"] else r["coverage"] for r in rows], 0.4,
               label="needle coverage")
        for i, r in zip(x, rows):
            if r.get("density") is not None:
                ax.text(i, 1.03, f"{r['density']:.2f}", ha="center", fontsize=7)
        names = [r["method"] for r in rows]  # a method with several settings (MoA's plans) names its setting
        labels = [f"{n}\n{r.get('setting', '')}" if names.count(n) > 1 else n for n, r in zip(names, rows)]
        ax.set_xticks(list(x), labels, rotation=35, ha="right", rotation_mode="anchor", fontsize=7)
        ax.set_ylim(0, 1.12)
        ax.set_title(f"{Path(p).stem} (T={rows[0]['length']}, n={rows[0]['n']}; density above bars)", fontsize=8)
    axes[0][0].legend(fontsize=7, loc="lower left", framealpha=0.9)
    fig.tight_layout()
    return str(save_figure(fig, out_png, dpi=110))


def main(argv=None) -> int:
    """main: ``python -m sparsattn.eval.retrieval_check`` (the flags of ``python -m sparsattn.calibrate.check``;
    ``--coverage-only`` and ``--recall-for`` are accepted and ignored: every row gets the passkey run, and
    every SeerAttention setting in top-k mode its gate block recall)."""
    p = argparse.ArgumentParser(prog="python -m sparsattn.eval.retrieval_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--target", type=float, default=0.1)
    p.add_argument("--methods", default="", help="comma list of specs name[:variant][@label]")
    p.add_argument("--cal-dirs", default="", help="label=DIR,... calibration folders for specs NAME@label")
    p.add_argument("--threshold", type=float, default=0.1, help="needle-reading threshold (attention share)")
    p.add_argument("--tag", default="")
    p.add_argument("--device", default="cpu")
    p.add_argument("--haystack", choices=("prose", "code", "noise"), default="prose",
                   help="passkey haystack: prose (default: documentation text never seen in training), code "
                        "(held-out source lines) or noise")
    p.add_argument("--coverage-only", default="", help=argparse.SUPPRESS)
    p.add_argument("--recall-for", default=None, help=argparse.SUPPRESS)
    p.add_argument("--plot", nargs="+", default=None, help="only plot these check_*.json files to OUT (a .png)")
    a = p.parse_args(argv)
    if a.plot:
        print(plot(a.plot, a.out))
        return 0
    import torch

    torch.set_grad_enabled(False)
    cal = dict(x.split("=", 1) for x in a.cal_dirs.split(",") if x)
    run(a.out, length=a.length, n=a.n, target=a.target, methods=[m for m in a.methods.split(",") if m],
        cal_dirs=cal, threshold=a.threshold, tag=a.tag, device=a.device, haystack=a.haystack)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
