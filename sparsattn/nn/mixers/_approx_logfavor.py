"""Log-scale FAVOR+ linear attention: Performer's low-rank estimate of softmax attention with a
stabiliser per query row and per feature, so that no row's normaliser underflows (used by the
``scatterbrain`` mixer and ``sea``'s mask estimator; Rethinking Attention with Performers,
arXiv 2009.14794).

With exponents ``a_ir`` of the queries and ``b_jr`` of the keys (``_approx_performer.favor_exponents``)
and ``m`` features, the estimate of ``exp(scale q_i . k_j)`` is ``(1/m) sum_r exp(a_ir + b_jr)``.
``favor_features`` stabilises the keys by one maximum over all keys and features; with large-norm
q/k (a trained model's) the exponents of one head spread over hundreds, so a causal row whose keys
sit far below that maximum gets a normaliser near 0 or exactly 0 in float32 (measured 2026-12-05 on
random layers with scaled-up projections, head_dim 32..128: 0.6-2 % of causal rows below 1e-19 at
logits up to ~110-120, 30-39 % at ~430-490, 3-4 % exactly 0), and the division by it sends
``num / den**2`` (inf) into the backward pass: NaN gradients.

Here every sum is kept relative to ``exp(C_i)``, ``C_i`` at least the largest ``a_ir + b_jr`` (in
log-sum-exp over ``r`` for keys of the row's own chunk) over the keys row ``i`` sees, so the row's
largest term is about 1 and its normaliser at least ``1/m``:

- non-causal: per feature ``P_r = max_j b_jr``; ``C_i = max_r (a_ir + P_r)``, and the row's sums are
  ``exp(a_ir + P_r - C_i) . sum_j exp(b_jr - P_r) [v_j]`` (every factor <= 1);
- causal, in chunks of ``chunk`` tokens: the pairs inside a chunk exactly in log scale
  (``logsumexp_r(a_ir + b_jr) - C_i``), the earlier chunks through a running state per feature kept
  relative to the running maximum ``P_r`` of the keys seen so far (rescaled by ``exp(P_old - P_new)``
  when a chunk raises it: a scan over chunks, not over tokens). A key far below ``P_r`` underflows
  only where another key the row also sees is ``e^87`` times larger in the same feature.

The stabilisers are shifts (detached); the estimate and its gradient are the same function as the
single-stabiliser form, up to rounding.
"""
from __future__ import annotations

import torch

from ._approx_common import cdiv, pad_tokens

__all__ = ["log_linear_attention", "pair_weights"]


def log_linear_attention(a: torch.Tensor, b: torch.Tensor, v: torch.Tensor, *, causal: bool, chunk: int = 64):
    """log_linear_attention: the FAVOR+ sums of every query row relative to a row stabiliser.

    Args:
        a: query exponents ``[..., T, m]``; b: key exponents ``[..., Tk, m]``; v: values ``[..., Tk, Dv]``
            (one floating dtype; ``Tk == T`` when ``causal``).
        causal: row ``i`` sums over keys ``j <= i``.
        chunk: chunk length of the causal scan.
    Returns:
        ``(num [..., T, Dv], den [..., T], C [..., T])`` with ``num_i exp(C_i) = (1/m) sum_j sum_r
        exp(a_ir + b_jr) v_j`` and ``den_i exp(C_i)`` the same without ``v``; ``den_i >= 1/m`` up to
        rounding, ``C`` detached.
    """
    m = a.shape[-1]
    if not causal:
        P = b.amax(-2, keepdim=True).detach()  # [..., 1, m]
        C = (a + P).amax(-1).detach()
        fq = torch.exp(a + P - C[..., None])
        fk = torch.exp(b - P)
        num = torch.matmul(fq, torch.matmul(fk.transpose(-1, -2), v)) / m
        den = torch.matmul(fq, fk.sum(-2)[..., None])[..., 0] / m
        return num, den, C
    lead, T, Dv = a.shape[:-2], a.shape[-2], v.shape[-1]
    n = cdiv(T, chunk)
    Tp = n * chunk
    low = torch.finfo(a.dtype).min / 4  # padded keys: exp(low - anything finite) = 0, and no inf - inf
    a_c = pad_tokens(a, Tp, 0.0).reshape(*lead, n, chunk, m)
    b_c = pad_tokens(b, Tp, low).reshape(*lead, n, chunk, m)
    v_c = pad_tokens(v, Tp, 0.0).reshape(*lead, n, chunk, Dv)
    later = ~torch.ones(chunk, chunk, dtype=torch.bool, device=a.device).tril()
    kv = torch.zeros(*lead, m, Dv, dtype=v.dtype, device=v.device)
    ks = torch.zeros(*lead, m, dtype=v.dtype, device=v.device)
    P = torch.full((*lead, m), float("-inf"), dtype=a.dtype, device=a.device)
    nums, dens, Cs = [], [], []
    for c in range(n):
        ac, bc, vc = a_c[..., c, :, :], b_c[..., c, :, :], v_c[..., c, :, :]
        pair = torch.logsumexp(ac[..., :, None, :] + bc[..., None, :, :], -1)  # [..., chunk, chunk]
        pair = pair.masked_fill(later, float("-inf"))
        C = pair.detach().amax(-1)  # the diagonal is always kept: finite
        if c:
            C = torch.maximum(C, (ac + P[..., None, :]).detach().amax(-1))
        w = torch.exp(pair - C[..., None])
        num = torch.matmul(w, vc)
        den = w.sum(-1)
        if c:  # earlier chunks through the state, relative to its running maximum P
            fq = torch.exp(ac + P[..., None, :] - C[..., None])
            num = num + torch.matmul(fq, kv)
            den = den + torch.matmul(fq, ks[..., None])[..., 0]
        nums.append(num / m)
        dens.append(den / m)
        Cs.append(C)
        P_new = torch.maximum(P, bc.detach().amax(-2))
        fk = torch.exp(bc - P_new[..., None, :])
        keep_old = torch.exp(P - P_new)  # exp(-inf) = 0 before the first chunk
        kv = kv * keep_old[..., None] + torch.matmul(fk.transpose(-1, -2), vc)
        ks = ks * keep_old + fk.sum(-2)
        P = P_new
    num = torch.stack(nums, -3).reshape(*lead, Tp, Dv)[..., :T, :]
    den = torch.stack(dens, -2).reshape(*lead, Tp)[..., :T]
    C = torch.stack(Cs, -2).reshape(*lead, Tp)[..., :T]
    return num, den, C


def pair_weights(a: torch.Tensor, b: torch.Tensor, C: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """pair_weights: ``(1/m) sum_r exp(a_r + b_r - C)`` where ``keep``, else 0, for query exponents
    ``a [..., m]`` and key exponents ``b [..., m]`` (broadcast against each other: the pairs), row
    stabilisers ``C`` and the bool ``keep``, both broadcastable to the pairs: the FAVOR+ terms of
    given pairs on ``log_linear_attention``'s scale (to subtract them from its sums). Pairs the row
    sees are <= 1; the others are masked before ``exp`` (they may exceed the float range)."""
    s = torch.logsumexp(a + b, -1).masked_fill(~keep, float("-inf"))
    return torch.exp(s - C) / a.shape[-1]
