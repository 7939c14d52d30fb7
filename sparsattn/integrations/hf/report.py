"""hf.report: what a patched model ran -- per layer and head the density reached, the time spent
selecting, the kernel backend, and every fallback to dense attention with its reason.

``with sparsattn.patched(model, method=...) as report:`` yields a ``PatchReport``; ``report.summary()``
prints one table (rich when installed, plain text otherwise) and returns it as text. A plain
``patch(model, ...)`` keeps a report too (``report_of(model)``), recording fallbacks only; the
context manager also records densities and selection times (``detailed``).

Fallbacks: the first fallback to dense attention of a patch (a "run") is logged as a WARNING on the
``sparsattn.integrations.hf`` logger, naming the layer and the reason; later ones at DEBUG. Every
fallback is counted in the report by (layer, phase, reason).

Densities: prefill = computed / causal query-key pairs of the pattern handed to the kernel (after
the layer's sliding window, if any), per query head, mean over the batch (``BlockPattern.pair_counts``);
decode = tokens read / cached tokens per query head (``TokenPattern``). Selection time = wall time of
the method's ``select`` (CUDA synchronised before and after, so it is the selection's own time).
Nothing is recorded while ``torch.compile`` traces (the compiled graph must not call back into Python).
"""
from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch

log = logging.getLogger(__package__)


@dataclass
class LayerStats:
    """LayerStats: what one (layer, phase) ran, accumulated over calls.

    Attributes:
        layer: attention layer index.
        phase: "prefill" or "decode".
        method: the layer's method (``describe()`` of its choice).
        backends: kernel backend name -> calls that used it.
        calls: selections recorded.
        head_density: per query head, the sum over calls of the density reached (``densities`` divides).
        seconds: total selection time.
        tokens: the largest (queries, keys) seen.
    """

    layer: int
    phase: str
    method: str
    backends: dict = field(default_factory=dict)
    calls: int = 0
    head_density: list = field(default_factory=list)
    seconds: float = 0.0
    tokens: tuple = (0, 0)

    @property
    def densities(self) -> list[float]:
        """Mean density per query head over the recorded calls."""
        return [d / self.calls for d in self.head_density] if self.calls else []

    @property
    def density(self) -> Optional[float]:
        """Mean density over heads and calls (None before any call)."""
        d = self.densities
        return sum(d) / len(d) if d else None


@dataclass
class Fallback:
    """Fallback: a (layer, phase, reason) that ran dense attention instead of the method, and how often."""

    layer: int
    phase: str
    reason: str
    count: int = 0
    tokens: tuple = (0, 0)


def _per_head(comp_ref, n_heads: int) -> list[float]:
    """[B, H] computed/reference pairs -> per query head mean over the batch (H is 1, Hkv or Hq)."""
    comp, ref = comp_ref
    dens = (comp / ref.clamp_min(1)).mean(0)  # [H]
    H = dens.shape[0]
    if n_heads % H:
        raise ValueError(f"pattern heads: expected a divisor of {n_heads} query heads, got {H}")
    return dens.repeat_interleave(n_heads // H).tolist()


def token_density(tp, n_heads: int) -> list[float]:
    """Per query head, tokens read / cached tokens of a decode ``TokenPattern`` (mean over the batch)."""
    read = (tp.counts.double() * tp.page_size).clamp(max=max(tp.kv_len, 1))
    ref = torch.full_like(read, float(max(tp.kv_len, 1)))
    return _per_head((read, ref), n_heads)


class PatchReport:
    """PatchReport: per layer and head what a patched model ran (see the module docstring).

    Attributes:
        model: the patched model (None once it is gone).
        detailed: record densities and selection times (the context manager sets it; fallbacks are
            always recorded).
        stats: ``{(layer, phase): LayerStats}``.
        fallbacks: ``{(layer, phase, reason): Fallback}``.
    """

    def __init__(self, model=None, detailed: bool = False):
        self._model = None if model is None else weakref.ref(model)
        self.detailed = detailed
        self.stats: dict = {}
        self.fallbacks: dict = {}
        self._warned = False

    @property
    def model(self):
        """The patched model (None once it is gone)."""
        return None if self._model is None else self._model()

    # -- recording (called by the attention forward) -----------------------------------------------
    def clock(self, x: torch.Tensor) -> Optional[float]:
        """A start time for ``selected`` (None when nothing is to be recorded)."""
        if not self.detailed or torch.compiler.is_compiling():
            return None
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        return time.perf_counter()

    def selected(self, layer: int, phase: str, method: str, pattern, t0: Optional[float], n_heads: int,
                 backend: Optional[str], tokens: tuple) -> None:
        """Record one selection: ``pattern`` (a BlockPattern, a TokenPattern, or None = dense) of
        ``method`` on ``layer``, started at ``t0`` (from ``clock``; None: not recorded)."""
        if t0 is None or torch.compiler.is_compiling():
            return
        dev = getattr(pattern, "device", None)
        if dev is not None and dev.type == "cuda":
            torch.cuda.synchronize(dev)
        secs = time.perf_counter() - t0
        if pattern is None:
            dens = [1.0] * n_heads
        elif hasattr(pattern, "pair_counts"):
            dens = _per_head(pattern.pair_counts(), n_heads)
        else:
            dens = token_density(pattern, n_heads)
        st = self.stats.get((layer, phase))
        if st is None:
            st = self.stats[(layer, phase)] = LayerStats(layer, phase, method, head_density=[0.0] * n_heads)
        if len(st.head_density) != len(dens):
            st.head_density = [0.0] * len(dens)
            st.calls, st.seconds = 0, 0.0
        st.calls += 1
        st.head_density = [a + b for a, b in zip(st.head_density, dens)]
        st.seconds += secs
        st.tokens = tuple(max(a, b) for a, b in zip(st.tokens, tokens))
        be = backend or "auto"
        st.backends[be] = st.backends.get(be, 0) + 1

    def fallback(self, layer: int, phase: str, reason: str, tokens: tuple = (0, 0)) -> None:
        """Record a fallback to dense attention; the first of this report is a WARNING, later ones DEBUG."""
        if torch.compiler.is_compiling():
            return
        key = (layer, phase, reason)
        fb = self.fallbacks.get(key)
        if fb is None:
            fb = self.fallbacks[key] = Fallback(layer, phase, reason)
        fb.count += 1
        fb.tokens = tuple(max(a, b) for a, b in zip(fb.tokens, tokens))
        level = logging.DEBUG if self._warned else logging.WARNING
        self._warned = True
        log.log(level, "sparsattn layer %d (%s, %d queries x %d keys): %s: dense attention fallback%s", layer, phase,
                tokens[0], tokens[1], reason,
                "" if level == logging.DEBUG else " (the first of this patch; later ones are logged at DEBUG, "
                                                  "all are counted in the patch report)")

    # -- reading ------------------------------------------------------------------------------------
    @property
    def n_fallbacks(self) -> int:
        """Total fallbacks to dense recorded."""
        return sum(f.count for f in self.fallbacks.values())

    def density(self, layer: Optional[int] = None, phase: str = "prefill") -> Optional[float]:
        """Mean density reached (over heads and calls) of one layer, or of all layers (None: no record)."""
        sts = [s for (l, p), s in self.stats.items() if p == phase and (layer is None or l == layer) and s.calls]
        if not sts:
            return None
        return sum(s.density for s in sts) / len(sts)

    def rows(self) -> list[dict]:
        """One dict per (layer, phase): method, backend(s), calls, tokens, density (mean, min and max
        over heads), per-head densities, selection ms per call, fallbacks."""
        out = []
        fb_by = {}
        for f in self.fallbacks.values():
            fb_by.setdefault((f.layer, f.phase), []).append(f)
        keys = sorted(set(self.stats) | set(fb_by))
        for key in keys:
            st = self.stats.get(key)
            fbs = fb_by.get(key, [])
            d = st.densities if st else []
            out.append({
                "layer": key[0], "phase": key[1], "method": st.method if st else "",
                "backend": ",".join(st.backends) if st else "",
                "calls": st.calls if st else 0,
                "tokens": "x".join(str(t) for t in st.tokens) if st else "",
                "density": st.density if st else None,
                "head min": min(d) if d else None, "head max": max(d) if d else None,
                "heads": d,
                "select ms": 1e3 * st.seconds / st.calls if st and st.calls else None,
                "fallbacks": sum(f.count for f in fbs),
            })
        return out

    def summary(self, file=None, per_head: bool = True) -> str:
        """Print the report (rich table when rich is installed, plain text otherwise) and return it as text.

        ``per_head``: a column with every head's density (two decimals)."""
        rows = self.rows()
        cols = ["layer", "phase", "method", "backend", "calls", "tokens", "density", "head min", "head max",
                "select ms", "fallbacks"] + (["heads"] if per_head else [])

        def fmt(c, v):
            if v is None:
                return "-"
            if c == "heads":
                return " ".join(f"{x:.2f}" for x in v)
            if c in ("density", "head min", "head max"):
                return f"{v:.3f}"
            if c == "select ms":
                return f"{v:.1f}"
            return str(v)

        cells = [[fmt(c, r[c]) for c in cols] for r in rows]
        title = f"sparsattn patch report: {len(rows)} layer/phase rows, {self.n_fallbacks} fallback(s) to dense"
        notes = [f"fallback: layer {f.layer} ({f.phase}) x{f.count}: {f.reason}"
                 for f in sorted(self.fallbacks.values(), key=lambda f: (f.layer, f.phase, f.reason))]
        if not self.detailed:
            notes.append("densities and selection times are recorded under sparsattn.patched(...) "
                         "(or with report.detailed = True)")
        text = _plain(title, cols, cells, notes)
        try:
            import rich  # noqa: F401
        except ImportError:
            print(text, file=file)
            return text
        _rich(title, cols, cells, notes, file)
        return text

    def __repr__(self) -> str:
        d = self.density()
        return (f"PatchReport(layers={len({k[0] for k in self.stats})}, density={'-' if d is None else f'{d:.3f}'}, "
                f"fallbacks={self.n_fallbacks})")


def _plain(title: str, cols: list, cells: list, notes: list) -> str:
    w = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]
    lines = [title, "  ".join(c.ljust(w[i]) for i, c in enumerate(cols)), "  ".join("-" * x for x in w)]
    lines += ["  ".join(r[i].ljust(w[i]) for i in range(len(cols))).rstrip() for r in cells]
    lines += notes
    return "\n".join(lines)


def _rich(title: str, cols: list, cells: list, notes: list, file) -> None:
    from rich.console import Console
    from rich.table import Table

    import shutil

    t = Table(title=title)
    for c in cols:
        t.add_column(c, justify="left" if c in ("phase", "method", "backend", "heads") else "right", no_wrap=True)
    for r in cells:
        t.add_row(*r)
    # never squeeze cells into ellipses (rich's default width off a terminal is 80 columns)
    need = sum(max([len(c)] + [len(r[i]) for r in cells]) + 3 for i, c in enumerate(cols)) + 1
    con = Console(file=file, width=max(need, shutil.get_terminal_size((80, 24)).columns))
    con.print(t)
    for n in notes:
        con.print(n, markup=False, highlight=False)


def report_of(model) -> Optional[PatchReport]:
    """report_of: the ``PatchReport`` of a patched model (None when it is not patched)."""
    p = getattr(model, "_sparsattn_patch", None)
    return None if p is None else getattr(p, "report", None)


def binding_report(binding) -> Optional[PatchReport]:
    """The report of the patch owning a layer binding (None when the patch is gone)."""
    p = binding.patch_ref()
    return None if p is None else getattr(p, "report", None)


def selection_clock(binding, x: torch.Tensor) -> Optional[float]:
    """The start time of a selection on a layer binding (None: its report records no details)."""
    if torch.compiler.is_compiling():  # nothing is recorded in a compiled graph (checked before any Python state)
        return None
    rep = binding_report(binding)
    return None if rep is None else rep.clock(x)


def _backend_of(binding, phase: str, pattern, q: torch.Tensor, q_lens, kv_lens) -> str:
    """The kernel backend the table picks for these inputs (the binding's requested one, or the automatic choice)."""
    be = binding._be()
    try:
        if phase == "decode":
            from ...kernels import backends

            return backends.choose("sparse_decode", q, be if be in ("triton", "reference") else None)
        from ...api import choose_backend

        return choose_backend(q, pattern, backend=be, varlen=q_lens is not None or kv_lens is not None)
    except (ValueError, RuntimeError) as e:  # the kernel call itself raises the same error
        return f"{be or 'auto'} ({e})"


def note_selection(binding, phase: str, pattern, t0: Optional[float], q: torch.Tensor, tokens: tuple, *,
                   q_lens=None, kv_lens=None) -> None:
    """Record a selection of a layer binding started at ``t0`` (``selection_clock``; None: nothing to record)."""
    if t0 is None:
        return
    rep = binding_report(binding)
    choice = binding.prefill if phase == "prefill" else binding.decode
    if rep is None or choice is None:
        return
    rep.selected(binding.index, phase, choice.describe(), pattern, t0, q.shape[1],
                 _backend_of(binding, phase, pattern, q, q_lens, kv_lens), tokens)


def note_fallback(binding, reason: str, tokens: tuple) -> None:
    """Record (and log) a fallback to dense attention of a layer binding; phase from the query count."""
    if torch.compiler.is_compiling():
        return
    phase = "decode" if tokens[0] == 1 and tokens[1] > 1 else "prefill"
    rep = binding_report(binding)
    if rep is None:
        log.debug("sparsattn layer %d: %s: dense attention fallback", binding.index, reason)
        return
    rep.fallback(binding.index, phase, reason, tokens)


__all__ = ["PatchReport", "LayerStats", "Fallback", "report_of", "note_fallback", "note_selection", "selection_clock",
           "token_density"]
