"""Fidelity of a sparse attention pattern against dense attention on the same q/k/v.

Metrics (all in fp32, chunked over query rows so memory is O(chunk * T) per kv-head group):
- attention recall: dense softmax mass inside the kept set, mean over query rows (the criterion
  MInference uses to choose per-head patterns, Jiang et al., arXiv 2407.02490);
- top-k recall: of the k keys with the highest dense attention, the fraction kept (Quest's
  "top-10 recall", Tang et al., arXiv 2406.10774);
- relative output error ||O_sparse - O_dense|| / ||O_dense||, where O_sparse is exact softmax
  attention restricted to the kept set, and the count of elements with |difference| > threshold;
- density: kept (query, key) pairs / causal pairs (or / all pairs when not causal).

The kept set of a row is ``mask & causal``: mask entries above the causal diagonal are ignored.
Causal alignment is bottom-right (query i of Tq sits at key position Tk - Tq + i), which is the
usual convention for decode and chunked prefill; with Tq == Tk it is the ordinary causal mask.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Union

import torch

MaskLike = Union[torch.Tensor, Callable[[int, int], torch.Tensor], Any]


@dataclass
class FidelityReport:
    """FidelityReport: per-query-head fidelity of a sparse pattern (batch aggregated).

    Attributes (tensors [Hq] on the CPU):
        recall: mean dense attention mass kept per row.
        topk_recall: mean fraction of each row's top-k dense keys kept.
        rel_error: ||O_sparse - O_dense||_F / ||O_dense||_F over batch, rows and head_dim.
        n_large_error: number of output elements with |O_sparse - O_dense| > threshold.
        density: kept pairs / causal (or all) pairs.
        err_sq, ref_sq: sum of squared differences / of squared dense outputs (for pooling heads
            or layers exactly).
    Scalars: ``topk``, ``threshold``, ``causal``, ``shape`` = (B, Hq, Hkv, Tq, Tk, D).
    """
    recall: torch.Tensor
    topk_recall: torch.Tensor
    rel_error: torch.Tensor
    n_large_error: torch.Tensor
    density: torch.Tensor
    err_sq: torch.Tensor
    ref_sq: torch.Tensor
    topk: int
    threshold: float
    causal: bool
    shape: tuple

    def summary(self) -> dict:
        """summary: head-averaged metrics as plain floats.

        ``rel_error`` pools all heads (||diff|| / ||dense|| over the whole output);
        ``rel_error_head_mean`` averages the per-head ratios; ``n_large_error`` is the total count.
        """
        ref = float(self.ref_sq.sum())
        err = float(self.err_sq.sum())
        return {
            "recall": float(self.recall.mean()),
            "topk_recall": float(self.topk_recall.mean()),
            "rel_error": _safe_ratio(math.sqrt(err), math.sqrt(ref)),
            "rel_error_head_mean": float(self.rel_error.mean()),
            "n_large_error": int(self.n_large_error.sum()),
            "n_elements": int(self.shape[0] * self.shape[1] * self.shape[3] * self.shape[5]),
            "density": float(self.density.mean()),
            "topk": self.topk,
            "threshold": self.threshold,
        }

    def to_rows(self, layer: int | str | None = None, **extra: Any) -> list[dict]:
        """to_rows: one dict per query head (``layer``, ``head``, the metrics, then ``extra`` columns) for CSV."""
        rows = []
        for h in range(self.recall.numel()):
            row = {"layer": layer, "head": h,
                   "recall": float(self.recall[h]), "topk_recall": float(self.topk_recall[h]),
                   "rel_error": float(self.rel_error[h]), "n_large_error": int(self.n_large_error[h]),
                   "density": float(self.density[h])}
            row.update(extra)
            rows.append(row)
        return rows


def _safe_ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return 0.0 if num == 0 else float("inf")


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor [batch, heads, tokens, head_dim], "
                             f"got {getattr(t, 'shape', type(t).__name__)}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating dtype, got {t.dtype}")
    B, Hq, Tq, D = q.shape
    Bk, Hkv, Tk, Dk = k.shape
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"v: expected batch/heads/tokens {tuple(k.shape[:3])} like k, got {tuple(v.shape)}")
    if Bk != B or Dk != D:
        raise ValueError(f"k: expected batch {B} and head_dim {D} like q, got {tuple(k.shape)}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"k: kv heads ({Hkv}) must divide query heads ({Hq})")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"k, v: expected device {q.device} like q, got {k.device}, {v.device}")
    if min(B, Hq, Tq, Tk, D) == 0:
        raise ValueError(f"q, k: empty shape {tuple(q.shape)}, {tuple(k.shape)}")
    return B, Hq, Hkv, Tq, Tk, D


def _as_provider(mask: MaskLike, B: int, Hq: int, Hkv: int, Tq: int, Tk: int,
                 device: torch.device) -> Callable[[int, int], torch.Tensor]:
    """Normalise a mask tensor / row callable / pattern into rows(q0, q1) -> bool [Bm, Hm, q1-q0, Tk]."""
    if hasattr(mask, "to_dense_mask") and not isinstance(mask, torch.Tensor):
        mask = mask.to_dense_mask()

    def norm(m: Any, q0: int, q1: int) -> torch.Tensor:
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise ValueError(f"mask: expected a bool tensor, got "
                             f"{getattr(m, 'dtype', type(m).__name__)}")
        if m.dim() < 2 or m.dim() > 4:
            raise ValueError(f"mask: expected 2 to 4 dims [.., Tq, Tk], got shape {tuple(m.shape)}")
        while m.dim() < 4:
            m = m.unsqueeze(0)
        Bm, Hm, R, C = m.shape
        if R != q1 - q0 or C != Tk or Bm not in (1, B) or Hm not in (1, Hkv, Hq):
            raise ValueError(f"mask: rows {q0}:{q1} must have shape broadcastable to "
                             f"[{B}, {Hq} (or {Hkv} kv heads), {q1 - q0}, {Tk}], got {tuple(m.shape)}")
        return m.to(device)

    if isinstance(mask, torch.Tensor):
        full = mask
        norm(full[..., :0, :] if full.dim() >= 2 else full, 0, 0)  # validate once, cheaply
        if full.shape[-2] != Tq:
            raise ValueError(f"mask: expected {Tq} query rows, got shape {tuple(full.shape)}")
        return lambda q0, q1: norm(full[..., q0:q1, :], q0, q1)
    if callable(mask):
        return lambda q0, q1: norm(mask(q0, q1), q0, q1)
    raise ValueError(f"mask: expected a bool tensor, a callable (q_start, q_end) -> bool rows, or an "
                     f"object with to_dense_mask(), got {type(mask).__name__}")


def _head_slice(m: torch.Tensor, kv: int, G: int, Hq: int, Hkv: int) -> torch.Tensor:
    """Mask rows [Bm, Hm, R, Tk] -> the rows of kv head ``kv``'s query group, [Bm, G or 1, R, Tk]."""
    Hm = m.shape[1]
    if Hm == Hq:
        return m[:, kv * G:(kv + 1) * G]
    if Hm == Hkv and Hkv > 1:
        return m[:, kv:kv + 1]
    return m


def attention_fidelity(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: MaskLike, *,
                       causal: bool = True, scale: float | None = None, topk: int = 10,
                       threshold: float = 5e-3, chunk_size: int | None = None,
                       progress: bool = False) -> FidelityReport:
    """attention_fidelity: recall, top-k recall, output error and density of a sparse mask vs dense attention.

    (Attention recall: MInference, arXiv 2407.02490; top-k recall: Quest, arXiv 2406.10774.)

    Args:
        q: [B, Hq, Tq, D]; k, v: [B, Hkv, Tk, D] (v may have another head_dim); GQA: query head h
            reads kv head h // (Hq // Hkv). Any float dtype; computed in fp32.
        mask: which (query, key) pairs the sparse method computes, as
            - a bool tensor broadcastable to [B, Hq, Tq, Tk] (a head dim of Hkv is also accepted and
              shared by each kv head's query group), or
            - a callable ``mask_fn(q_start, q_end) -> bool [.., q_end - q_start, Tk]`` with the same
              leading dims, called once per row chunk (no T x T mask is ever built), or
            - an object with ``to_dense_mask()`` (a pattern).
        causal: apply the causal mask (bottom-right aligned; needs Tq <= Tk).
        scale: softmax scale, default 1/sqrt(D).
        topk: k of the top-k recall (rows with fewer allowed keys use all of them).
        threshold: |O_sparse - O_dense| above which an element counts as a large error.
        chunk_size: query rows per step; default keeps each fp32 score block near 16M elements.
        progress: show a tqdm bar over row chunks.
    Returns:
        ``FidelityReport`` with per-head tensors [Hq].
    Raises:
        ValueError: bad shapes/dtypes/devices, non-finite inputs, a malformed mask, Tq > Tk when
            causal, or a bad ``topk`` / ``chunk_size``.
    """
    B, Hq, Hkv, Tq, Tk, D = _check_qkv(q, k, v)
    if causal and Tq > Tk:
        raise ValueError(f"q: causal attention needs Tq <= Tk, got Tq={Tq}, Tk={Tk}")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk: expected a positive int, got {topk!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: contains NaN or inf")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    G = Hq // Hkv
    dev = q.device
    rows = _as_provider(mask, B, Hq, Hkv, Tq, Tk, dev)
    if chunk_size is None:
        chunk_size = max(1, min(Tq, (1 << 24) // max(1, B * G * Tk)))
    offset = Tk - Tq  # bottom-right causal alignment

    f64 = dict(dtype=torch.float64, device=dev)
    recall_sum = torch.zeros(Hq, **f64)
    topk_sum = torch.zeros(Hq, **f64)
    err_sq = torch.zeros(Hq, **f64)
    ref_sq = torch.zeros(Hq, **f64)
    n_large = torch.zeros(Hq, dtype=torch.int64, device=dev)
    kept = torch.zeros(Hq, dtype=torch.int64, device=dev)

    starts = range(0, Tq, chunk_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="fidelity", leave=False)
    for q0 in starts:
        q1 = min(Tq, q0 + chunk_size)
        R = q1 - q0
        kend = offset + q1 if causal else Tk  # keys beyond the chunk's last row are never allowed
        pos = torch.arange(q0, q1, device=dev)[:, None] + offset
        kidx = torch.arange(kend, device=dev)[None, :]
        allowed = (kidx <= pos) if causal else torch.ones(R, kend, dtype=torch.bool, device=dev)
        n_allowed = allowed.sum(-1)  # [R]
        k_eff = n_allowed.clamp(max=topk)  # [R]
        kk = min(topk, kend)
        m_rows = rows(q0, q1)[..., :kend]
        for h in range(Hkv):
            hs = slice(h * G, (h + 1) * G)
            qh = q[:, hs, q0:q1].float()                      # [B, G, R, D]
            kh = k[:, h:h + 1, :kend].float()                 # [B, 1, Tk', D]
            vh = v[:, h:h + 1, :kend].float()
            s = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # [B, G, R, Tk']
            keep = _head_slice(m_rows, h, G, Hq, Hkv) & allowed  # broadcast -> [B?, G?, R, Tk']
            keep = keep.expand(B, G, R, kend)

            s_dense = s.masked_fill(~allowed, float("-inf"))
            p = torch.softmax(s_dense, dim=-1)                # every row has >= 1 allowed key
            o_dense = torch.matmul(p, vh)

            recall_sum[hs] += (p * keep).sum(-1).sum(dim=(0, 2)).double()

            top = torch.topk(p.masked_fill(~allowed, -1.0), kk, dim=-1).indices
            hit = keep.gather(-1, top)                        # [B, G, R, kk]
            within = torch.arange(kk, device=dev)[None, :] < k_eff[:, None]  # [R, kk]
            frac = (hit & within).sum(-1).double() / k_eff.double()
            topk_sum[hs] += frac.sum(dim=(0, 2))

            s_sparse = s.masked_fill(~keep, float("-inf"))
            mx = s_sparse.amax(-1, keepdim=True)
            mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
            e = torch.exp(s_sparse - mx)                      # exp(-inf) = 0 outside the kept set
            den = e.sum(-1, keepdim=True)
            p_sparse = e / torch.where(den > 0, den, torch.ones_like(den))  # empty rows -> 0 output
            o_sparse = torch.matmul(p_sparse, vh)

            diff = o_sparse - o_dense
            err_sq[hs] += diff.double().pow(2).sum(dim=(0, 2, 3))
            ref_sq[hs] += o_dense.double().pow(2).sum(dim=(0, 2, 3))
            n_large[hs] += (diff.abs() > threshold).sum(dim=(0, 2, 3))
            kept[hs] += keep.sum(dim=(0, 2, 3))

    n_rows = B * Tq
    if causal:
        pairs = B * (Tq * offset + Tq * (Tq + 1) // 2)
    else:
        pairs = B * Tq * Tk
    rel = torch.tensor([_safe_ratio(math.sqrt(e_), math.sqrt(r_)) for e_, r_ in
                        zip(err_sq.tolist(), ref_sq.tolist())], dtype=torch.float64)
    return FidelityReport(
        recall=(recall_sum / n_rows).cpu(),
        topk_recall=(topk_sum / n_rows).cpu(),
        rel_error=rel,
        n_large_error=n_large.cpu(),
        density=(kept.double() / pairs).cpu(),
        err_sq=err_sq.cpu(),
        ref_sq=ref_sq.cpu(),
        topk=topk,
        threshold=float(threshold),
        causal=bool(causal),
        shape=(B, Hq, Hkv, Tq, Tk, D),
    )
