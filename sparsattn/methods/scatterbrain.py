"""scatterbrain: Scatterbrain as a training-free drop-in for a pretrained model's prefill: exact attention
on LSH clusters plus a Performer low-rank estimate of the rest, merged by log-sum-exp without double
counting (Scatterbrain: Unifying Sparse and Low-rank Attention Approximation, arXiv 2110.15343).

Not a mask: the method computes attention itself through ``attend`` (the method contract's form for
approximations), by calling the ``scatterbrain`` mixer's core
``sparsattn.nn.mixers.scatterbrain.scatterbrain_attention`` on the given q/k/v (no projections, no
second copy of the math). With the same ``seed`` it draws the same Performer directions and LSH
hyperplanes as the mixer layer ``get_layer("scatterbrain", ..., seed=seed)``, so both give the same
output on the same q/k/v. Swap it into the last layers of a pretrained model with
``sparsattn.patch(model, method={l: "scatterbrain" for l in last_layers})``.

Causal form. The sparse support of query ``i`` is the ``cluster_size`` most recent keys ``j <= i`` of
its own LSH bucket (the mixer's ``assign="window"``, with SMYRF's XBOX norm maxima taken as running
maxima), and the low-rank part is causal linear attention (prefix sums over chunks) minus its terms
on that support. Both depend on tokens ``<= i`` only, so row ``i`` of the output does not change when
later tokens change (tested, up to rounding: the Performer key stabiliser is one maximum over all
keys, as in Performer; it cancels in the output and the lse, only rounding depends on it).

Exact attention where the paper's estimator is exact: when the sparse part covers every causal pair
(``cluster_size >= T``), nothing is left to the low-rank part and the result is exact attention
(``full_config``). A chunk of queries shorter than the keys (chunked prefill with a cache,
``Tq < Tk``) is computed exactly, as for ``hyper``; decode runs dense, as for every prefill method.
GQA key/value heads are repeated for their query groups.

Differences from the paper / authors' code (``HazyResearch/fly``, ``SBSmyrfAttention``, read and
compared, not copied), beyond those of the mixer (its module docstring: one hash round where SMYRF
uses ``n_hashes`` rounds with E2LSH buckets; angular LSH with Gray-ordered buckets; no feature
epsilon; the features are drawn once from ``seed``, never redrawn):

* causal selection: the authors cut the sorted queries and keys into equal clusters and apply the
  causal mask inside each cluster, so a query's cluster (and the XBOX norm maxima) depend on later
  tokens; here the support is the most recent same-bucket keys (above), causal by construction. The
  authors' rule is the mixer core's ``assign="rank"`` (measured by ``sparsattn.eval.approx_quality``),
  not offered here because a drop-in prefill method must be causal;
* combination: the authors add ``exp(s_ij) - phi(q_i).phi(k_j)`` on the cluster to the low-rank sums
  and clamp the normaliser at ``1e-6``; here the same estimator is computed as the lse merge of exact
  softmax on the support and the low-rank estimate on its complement (equal in exact arithmetic, no
  clamp; an empty complement contributes nothing);
* no padding of T to a multiple of the cluster size, no dropout; one set of random directions per
  head dimension shared by all layers (the authors' module holds one per layer).

Why no ``density_knob`` / ``fixed_settings``: the prefill quality driver and the methods benchmark
measure the density of a method's *pattern* (``select``), which a method that computes its output
does not return (its ``select`` is None), so a knob would only record an error there (as for
``hyper``). The cost is reported by ``attend(..., stats=...)``: exact q-k pairs and the low-rank
part in key-pair equivalents.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..nn.mixers._approx_common import repeat_kv
from ..nn.mixers._approx_lsh import lsh_projections
from ..nn.mixers._approx_performer import orthogonal_features
from ..nn.mixers.scatterbrain import scatterbrain_attention
from .base import Method, SelectContext, register

_PARTS = ("both", "sparse", "lowrank")


def _check_int(name: str, v, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")


@register("scatterbrain")
@dataclass
class ScatterbrainMethod(Method):
    """Scatterbrain: causal LSH-cluster exact attention + Performer low-rank estimate of the rest,
    computed as a prefill method (Scatterbrain: Unifying Sparse and Low-rank Attention Approximation,
    arXiv 2110.15343).

    Args:
        nb_features: Performer random features (None: Performer's ``int(D ln D)`` for head_dim D).
        cluster_size: keys of the query's own LSH bucket attended exactly (the sparse support);
            ``>= T`` is exact attention.
        lsh_num_projs: LSH hyperplanes (``2**lsh_num_projs`` buckets).
        parts: ``"both"`` (Scatterbrain), ``"sparse"`` (the LSH part alone) or ``"lowrank"`` (the
            Performer estimate alone): the paper's comparison of each part with their sum.
        chunk: chunk length of the causal prefix sums of the low-rank part.
        seed: seed of the random directions (the mixer layer's ``seed``: same seed, same output).
    """

    paper = "Scatterbrain: Unifying Sparse and Low-rank Attention Approximation (arXiv 2110.15343)"
    phase = "prefill"

    nb_features: Optional[int] = None
    cluster_size: int = 64
    lsh_num_projs: int = 7
    parts: str = "both"
    chunk: int = 64
    seed: int = 0
    _rand: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.nb_features is not None:
            _check_int("nb_features", self.nb_features, 1)
        _check_int("cluster_size", self.cluster_size, 1)
        _check_int("lsh_num_projs", self.lsh_num_projs, 1)
        _check_int("chunk", self.chunk, 1)
        _check_int("seed", self.seed, 0)
        if self.parts not in _PARTS:
            raise ValueError(f"parts: expected one of {_PARTS}, got {self.parts!r}")

    def _directions(self, D: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(Performer directions ``[m, D]``, LSH hyperplanes ``[D + 2, r]``), drawn as the mixer layer draws them."""
        key = (D, str(device))
        if key not in self._rand:
            m = self.nb_features if self.nb_features is not None else max(int(D * math.log(D)), 1)
            self._rand[key] = (orthogonal_features(m, D, self.seed).to(device),
                               lsh_projections(D + 2, self.lsh_num_projs, self.seed + 1, device))
        return self._rand[key]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Optional[SelectContext] = None,
               stats: Optional[dict] = None):
        """``(out [B, Hq, Tq, D] in q's dtype, lse [B, Hq, Tq])`` of causal Scatterbrain of q on k/v
        ``[B, Hkv, Tk, D]`` (GQA heads repeated). ``stats``: optional dict, adds ``pairs`` (exact q-k
        dot products) and ``lowrank`` (the low-rank part in key-pair equivalents), summed over batch
        and heads. ``Tq < Tk`` (chunked prefill) is exact attention.

        Raises:
            ValueError: ``ctx.causal`` False (a causal prefill method), or shapes the core refuses.
        """
        ctx = ctx if ctx is not None else SelectContext()
        if not ctx.causal:
            raise ValueError("ctx.causal: the scatterbrain method is a causal prefill method (got causal=False)")
        Hq, Tq, Tk = q.shape[1], q.shape[2], k.shape[2]
        if Tq != Tk:  # chunked prefill: exact (bottom-right aligned causal)
            from ..api import attention

            return attention(q, k, v, causal=True, scale=ctx.scale, return_lse=True)
        feats, proj = self._directions(q.shape[-1], q.device)
        return scatterbrain_attention(q, repeat_kv(k, Hq), repeat_kv(v, Hq), features=feats, lsh_proj=proj,
                                      causal=True, scale=ctx.scale, cluster_size=self.cluster_size,
                                      parts=self.parts, chunk=self.chunk, stats=stats, assign="window")

    @classmethod
    def swap_configs(cls) -> dict:
        """Preset: the setting swapped into the bundled model's last layers: clusters of 128 keys with
        the default features (D ln D) and 7 LSH projections."""
        return {"scatterbrain-c128": {"cluster_size": 128}}

    @classmethod
    def small_config(cls) -> dict:
        """Small sizes for the registry-wide tests (T = 200..600)."""
        return {"cluster_size": 16, "nb_features": 16}

    @classmethod
    def full_config(cls, q_len: int) -> dict:
        """Every causal pair kept: the sparse support covers the whole sequence (exact attention)."""
        return {"cluster_size": max(int(q_len), 1)}

    @classmethod
    def example_config(cls) -> dict:
        """A representative configuration: 128 same-bucket keys exact per query plus ``D ln D`` features."""
        return {"cluster_size": 128}
