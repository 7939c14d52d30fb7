"""jrt: Just read twice: JRT-RNN (prefix linear attention, encoder-decoder) and JRT-Prompt (the
context repeated) (Just read twice: closing the recall gap for recurrent language models, Arora et
al., arXiv 2407.05483)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ...kernels.lightning import lightning_attention
from ..base import Layer, register_layer
from ._mixer_util import check_common, check_float, check_int, check_x, cost_vs_dense, heads_merge, heads_split

IGNORE_INDEX = -100


def taylor_features(x: torch.Tensor) -> torch.Tensor:
    """taylor_features: Based's 2nd-order Taylor feature map ``[1, x / d^(1/4), vec(x x^T) / (sqrt(2) d^(1/2))]``
    of ``x [..., d]`` -> ``[..., 1 + d + d^2]``, so that ``phi(q) . phi(k) = 1 + z + z^2 / 2`` with
    ``z = q . k / sqrt(d)`` (always >= 1/2: every normaliser is positive)."""
    d = x.shape[-1]
    x2 = (x[..., :, None] * x[..., None, :]).flatten(-2) / (math.sqrt(2.0) * math.sqrt(d))
    return torch.cat([torch.ones_like(x[..., :1]), x / d ** 0.25, x2], dim=-1)


def _flops(T: int, M: int, f: int, E: int, form: str) -> float:
    """Per-head FLOPs of one sequence in ``form`` (``"quadratic"``: kernel values ``1 + z + z^2/2``
    of raw q.k over causal pairs and the prefix; ``"chunked"``: Taylor features ``F = 1 + f + f^2``
    through the chunked linear form, 64-token chunks)."""
    if form == "quadratic":
        return 2.0 * (T * (T + 1) / 2 + T * M) * (f + E + 1)
    Fd, c = 1 + f + f * f, min(64, T)
    return 2.0 * T * c * (Fd + E + 1) + 4.0 * T * Fd * (E + 1) + 2.0 * M * Fd * (E + 1) + 2.0 * T * Fd * (E + 1)


def choose_form(T: int, M: int, f: int, E: int) -> str:
    """The cheaper exact form for these sizes (the quadratic one only up to 2048 tokens, for memory)."""
    if T <= 2048 and _flops(T, M, f, E, "quadratic") <= _flops(T, M, f, E, "chunked"):
        return "quadratic"
    return "chunked"


def prefix_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_enc: torch.Tensor,
                            v_enc: torch.Tensor, prefix_len: int, eps: float = 1e-12, form: Optional[str] = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """prefix_linear_attention: JRT-RNN's encoder-decoder linear attention with Based's Taylor
    kernel (arXiv 2407.05483).

    Raw (pre-feature-map) ``q, k, k_enc [B, H, T, f]``, values ``v, v_enc [B, H, T, E]`` (only the
    first ``M = min(prefix_len, T)`` encoder positions are read). With ``phi = taylor_features``,
    for every position t:
    ``num_t = phi(q_t)^T (sum_{j<M} phi(k^enc_j) v^enc_j^T + sum_{s<=t} phi(k_s) v_s^T)``,
    ``den_t`` the same with ``v = 1``; returns ``(num / (den + eps), lse = log(den + eps))``: the
    encoder term is non-causal over the prefix, the decoder term causal over the whole sequence
    (as the authors' ``parallel_forward``). ``lse`` is the log normaliser of these positive kernel
    weights (``phi(q).phi(k) >= 1/2``), so the output merges with exact softmax attention parts
    by log-sum-exp.

    ``form``: ``"chunked"`` (features through the chunked Lightning form with no decay, a ones
    column appended to v giving the denominator in the same pass: linear in T),
    ``"quadratic"`` (the kernel values ``1 + z + z^2/2`` of ``z = q.k / sqrt(f)`` over causal
    pairs and the prefix, never building features: cheaper for short sequences, Based's
    parallel training form) or None (the cheaper, ``choose_form``). Both are exact; computed in
    float32 (float64 for float64 inputs).
    """
    if form not in (None, "chunked", "quadratic"):
        raise ValueError(f"form: expected None, 'chunked' or 'quadratic', got {form!r}")
    acc = torch.float64 if v.dtype == torch.float64 else torch.float32
    B, H, T, f = q.shape
    E = v.shape[-1]
    M = min(int(prefix_len), T)
    form = form or choose_form(T, M, f, E)
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    ke, ve = k_enc[:, :, :M].to(acc), v_enc[:, :, :M].to(acc)
    if form == "quadratic":
        def kern(a, b):
            z = (a @ b.transpose(-1, -2)) / math.sqrt(f)
            return 1.0 + z + 0.5 * z * z
        A = kern(q, k).tril()
        num, den = A @ v, A.sum(-1)
        if M > 0:
            Ae = kern(q, ke)
            num, den = num + Ae @ ve, den + Ae.sum(-1)
    else:
        fq, fk = taylor_features(q), taylor_features(k)
        va = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
        zero = torch.zeros(H, dtype=torch.float32, device=v.device)
        res = lightning_attention(fq, fk, va, zero, scale=1.0, backend="torch")
        if M > 0:
            state = taylor_features(ke).transpose(-1, -2) @ torch.cat([ve, torch.ones_like(ve[..., :1])], dim=-1)
            res = res + fq @ state
        num, den = res[..., :-1], res[..., -1]
    den = den + eps
    return num / den[..., None], torch.log(den)


@register_layer("jrt")
class JRTRNN(Layer):
    """JRTRNN: prefix linear attention, an encoder-decoder recurrent layer: non-causal linear
    attention over a prefix of ``prefix_len`` tokens (separate encoder key/value projections), causal
    linear attention over the whole sequence (JRT-RNN, Just read twice, arXiv 2407.05483).

    ``x [B, T, dim] -> [B, T, dim]``; per head, ``q, k`` are projected to ``feature_dim`` and mapped
    by Based's Taylor features (``1 + feature_dim + feature_dim^2`` dims), ``v`` keeps ``dim/heads``;
    output ``W_o prefix_linear_attention(...)`` (exact; the quadratic kernel form for short
    sequences, the chunked feature form for long ones). ``forward(x, prefix_len=None)`` overrides the
    prefix length per call; ``forward_with_lse`` also returns the log normaliser ``[B, H, T]``
    (merge with exact attention by log-sum-exp). Decode (``step``): after the prefix the state is
    ``[B, H, F, d+1]`` whatever the length.

    Hyper-parameters (authors' code defaults): ``feature_dim`` = 16, ``eps`` = 1e-12;
    ``prefix_len`` = 1024 (the paper's encoder length for its language models; for MQAR set it to
    the context region, 2 x the number of key-value pairs, in the run's layer config).

    Differences from the paper: the paper's JRT-RNN model is a Based hybrid (this layer plus short
    convolutions and sliding-window attention layers); here the layer stands alone and hybrids are
    built with the harness's per-block mixer list. Training uses the ordinary next-token loss with
    whatever labels the task gives (the paper's prefix-LM objective scores only the decoder
    region; MQAR's labels already score only queries after the prefix). No fused kernel: the
    linear form is the chunked torch Lightning form (the feature dimension 273 is over the Triton
    kernel's 256 limit).

    JRT-Prompt (the other half of the paper) is a data transform usable with any causal mixer:
    ``jrt_prompt(inputs, labels, context_len)``.
    """

    paper = "Just read twice: closing the recall gap for recurrent language models (arXiv 2407.05483)"
    kind = "mixer"
    causal_modes = (True,)
    presets = {"default": {}, "mqar": {}}

    def __init__(self, dim: int, heads: int, causal: bool = True, feature_dim: int = 16, prefix_len: int = 1024,
                 eps: float = 1e-12):
        super().__init__()
        check_common(dim, heads, causal)
        check_int("feature_dim", feature_dim)
        check_int("prefix_len", prefix_len, 0)
        check_float("eps", eps, 0.0, lo_open=True)
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.feature_dim, self.prefix_len, self.eps = feature_dim, prefix_len, eps
        f = feature_dim * heads
        self.proj = nn.Linear(dim, 3 * f + 2 * dim, bias=False)  # q, k, k_enc | v, v_enc
        self.out_proj = nn.Linear(dim, dim, bias=False)

    def _project(self, x: torch.Tensor):
        f = self.feature_dim * self.heads
        q, k, ke, v, ve = self.proj(x).split([f, f, f, self.dim, self.dim], dim=-1)
        sp = lambda t: heads_split(t, self.heads)  # noqa: E731
        return sp(q), sp(k), sp(ke), sp(v), sp(ve)

    def _prefix(self, prefix_len: Optional[int]) -> int:
        if prefix_len is None:
            return self.prefix_len
        return check_int("prefix_len", prefix_len, 0)

    def forward_with_lse(self, x: torch.Tensor, prefix_len: Optional[int] = None):
        """``(out [B, H, T, d], lse [B, H, T])`` of the heads before the output projection."""
        check_x(x, self.dim)
        q, k, ke, v, ve = self._project(x)
        return prefix_linear_attention(q, k, v, ke, ve, self._prefix(prefix_len), self.eps)

    def forward(self, x: torch.Tensor, prefix_len: Optional[int] = None) -> torch.Tensor:
        """Parallel form over ``x [B, T, dim]`` with the first ``prefix_len`` tokens as the encoder
        region (default: the constructor's)."""
        o, _ = self.forward_with_lse(x, prefix_len)
        return self.out_proj(heads_merge(o.to(x.dtype)))

    def prefill(self, x: torch.Tensor, prefix_len: Optional[int] = None):
        """Parallel form over a prompt, and the decode state after it: ``(y [B, T, dim],
        state = (kv [B, H, F, d], k_sum [B, H, F]))``."""
        y = self.forward(x, prefix_len)
        q, k, ke, v, ve = self._project(x)
        fk, fke = taylor_features(k), taylor_features(ke)
        M = min(self._prefix(prefix_len), x.shape[1])
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        kv = fk.to(acc).transpose(-1, -2) @ v.to(acc) + fke[:, :, :M].to(acc).transpose(-1, -2) @ ve[:, :, :M].to(acc)
        ks = fk.to(acc).sum(2) + fke[:, :, :M].to(acc).sum(2)
        return y, (kv, ks)

    def step(self, x_t: torch.Tensor, state: tuple) -> tuple[torch.Tensor, tuple]:
        """Decode one token ``x_t [B, dim]`` after a ``prefill`` state -> ``(y_t [B, dim], state)``."""
        x3 = x_t[:, None] if x_t.dim() == 2 else x_t
        check_x(x3, self.dim)
        if x3.shape[1] != 1:
            raise ValueError(f"x_t: expected one token [B, dim] or [B, 1, dim], got {tuple(x_t.shape)}")
        q, k, _, v, _ = self._project(x3)
        fq, fk = taylor_features(q), taylor_features(k)
        kv, ks = state
        kv = kv + fk[:, :, 0, :, None].to(kv.dtype) * v[:, :, 0, None, :].to(kv.dtype)
        ks = ks + fk[:, :, 0].to(ks.dtype)
        q = fq[:, :, 0].to(kv.dtype)
        o = torch.einsum("bhf,bhfe->bhe", q, kv) / ((q * ks).sum(-1) + self.eps)[..., None]
        return self.out_proj(heads_merge(o[:, :, None].to(x3.dtype)))[:, 0], (kv, ks)

    def cost(self, T: int) -> dict[str, float]:
        """FLOPs of the form ``forward`` uses at ``T`` (``choose_form``: the quadratic kernel form for
        short sequences, the chunked feature form beyond), summed over heads."""
        check_int("T", T)
        M = min(self.prefix_len, T)
        form = choose_form(T, M, self.feature_dim, self.head_dim)
        return cost_vs_dense(self.heads * _flops(T, M, self.feature_dim, self.head_dim, form), T, self.dim)


def jrt_prompt(inputs: torch.Tensor, labels: torch.Tensor, context_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """jrt_prompt: JRT-Prompt, the context read twice (Just read twice, arXiv 2407.05483).

    inputs/labels ``[n, L]`` (labels already aligned with the output positions, -100 = unscored,
    as ``sparsattn.eval.mqar`` returns them) -> ``[n, L + context_len]``: the first ``context_len``
    tokens, then the original sequence. Labels of the first copy are -100 (the model reads it, it is
    not asked about it); the original labels follow unchanged. Any causal mixer can train and be
    scored on the result.
    """
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 2:
        raise ValueError(f"inputs: expected a 2-d tensor [n, L], got {getattr(inputs, 'shape', type(inputs).__name__)}")
    if not isinstance(labels, torch.Tensor) or labels.shape != inputs.shape:
        raise ValueError(f"labels: expected shape {tuple(inputs.shape)} (as inputs), got "
                         f"{getattr(labels, 'shape', type(labels).__name__)}")
    check_int("context_len", context_len, 0)
    if context_len > inputs.shape[1]:
        raise ValueError(f"context_len: expected <= {inputs.shape[1]} (the sequence length), got {context_len}")
    first = inputs[:, :context_len]
    ign = torch.full_like(labels[:, :context_len], IGNORE_INDEX)
    return torch.cat([first, inputs], dim=1), torch.cat([ign, labels], dim=1)


__all__ = ["JRTRNN", "jrt_prompt", "prefix_linear_attention", "taylor_features"]
