"""core_neurons: sentence-level core neurons, their stability and the MLP run on them only (CoreInfer:
Accelerating Large Language Model Inference with Semantics-Inspired Adaptive Sparse Activation,
Wang et al., arXiv 2410.18311).

Per layer, for every prompt token the token-wise core neurons are the top ``alpha`` fraction (by value)
of its positively activated MLP neurons; the sentence-wise core neurons are the ``beta * d_ff`` neurons
that appear most often among them. Stability-guided decoding: the prompt's core neurons are fixed at
prefill and every later (decode) position of layers ``start..end`` runs ``gate``/``up``/``down`` on them only.

Measured: stability (overlap of the core set of a prompt prefix with that of the whole prompt), the
prediction from the prompt (the fraction of each continuation token's own token-wise core neurons that
lie in the prompt's core set; chance = beta), quality (held-out continuation NLL, exact passkey counts)
and speed (one decode token through the full vs the core-only MLP).

Differences from the authors' code (``wangqinsi1/CoreInfer``, read, not copied): the activation is the
gated product fed to ``down_proj`` (the authors' OPT models have a plain ReLU MLP); only the stability-
guided mode (no similarity-guided clustering); decode positions are the teacher-forced positions after
the prompt in one forward.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch

from ._common import Report, exact_count, mlp_layers, nll, progress, task_prompts
from .activations import collect

ALPHA = 0.2
BETA = 0.4


def token_core(a: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """token_core: bool ``[T, d_ff]``: per token the top ``ceil(alpha * #positive)`` positive activations."""
    pos = a > 0
    k = torch.ceil(alpha * pos.sum(-1).float()).long()  # [T]
    ranked = torch.where(pos, a, torch.full_like(a, float("-inf"))).argsort(-1, descending=True)
    keep = torch.arange(a.shape[-1])[None, :] < k[:, None]
    out = torch.zeros_like(pos)
    out.scatter_(-1, ranked, keep)
    return out & pos


def sentence_core(a: torch.Tensor, alpha: float = ALPHA, beta: float = BETA) -> torch.Tensor:
    """sentence_core: sorted neuron indices: the ``round(beta * d_ff)`` most frequent token-wise core neurons
    of ``a [T, d_ff]`` (ties: lower index)."""
    if not 0 < beta <= 1:
        raise ValueError(f"beta: expected a number in (0, 1], got {beta!r}")
    freq = token_core(a, alpha).sum(0).float()
    n = max(1, int(round(beta * a.shape[-1])))
    order = sorted(range(a.shape[-1]), key=lambda i: (-float(freq[i]), i))[:n]
    return torch.tensor(sorted(order))


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """overlap: |a & b| / |b| of two index sets."""
    return len(set(a.tolist()) & set(b.tolist())) / max(1, b.numel())


@contextlib.contextmanager
def core_mlp(model, prompt_len: int, layers: Sequence[int], alpha: float = ALPHA, beta: float = BETA, record=None):
    """core_mlp: while active, each MLP of ``layers`` computes its core neurons from positions
    ``< prompt_len`` of the forward and runs positions ``>= prompt_len`` on those neurons only."""
    mlps = mlp_layers(model)
    hs = []

    def hook(mod, args, out):
        x = args[0]
        if x.shape[1] <= prompt_len:
            return None
        P = prompt_len
        a = mod.act_fn(mod.gate_proj(x[:, :P])) * mod.up_proj(x[:, :P])
        idx = sentence_core(a[0].float(), alpha, beta).to(x.device)
        xs = x[:, P:]
        g = torch.nn.functional.linear(xs, mod.gate_proj.weight[idx], None if mod.gate_proj.bias is None else mod.gate_proj.bias[idx])
        u = torch.nn.functional.linear(xs, mod.up_proj.weight[idx], None if mod.up_proj.bias is None else mod.up_proj.bias[idx])
        d = torch.nn.functional.linear(mod.act_fn(g) * u, mod.down_proj.weight[:, idx], mod.down_proj.bias)
        out = out.clone()
        out[:, P:] = d
        if record is not None:
            record.append(idx.numel())
        return out
    try:
        for l in layers:
            hs.append(mlps[l].register_forward_hook(hook))
        yield
    finally:
        for h in hs:
            h.remove()


def mlp_speed(mlp, idx: torch.Tensor, reps_ms: float = 300) -> tuple[float, float]:
    """mlp_speed: ``(full ms, core-only ms)`` of one decode token through ``mlp`` (median, this device)."""
    from ..bench.common import time_ms

    p = next(mlp.parameters())
    x = torch.randn(1, 1, mlp.gate_proj.in_features, device=p.device, dtype=p.dtype)
    Wg, Wu, Wd = mlp.gate_proj.weight[idx].contiguous(), mlp.up_proj.weight[idx].contiguous(), \
        mlp.down_proj.weight[:, idx].contiguous()
    F = torch.nn.functional
    with torch.no_grad():
        full = time_ms(lambda: mlp(x), rep_ms=reps_ms)
        core = time_ms(lambda: F.linear(mlp.act_fn(F.linear(x, Wg)) * F.linear(x, Wu), Wd), rep_ms=reps_ms)
    return full, core


def analyze(model, tok, *, length: int = 1024, n: int = 8, prompt_tokens: int = 512, cont_tokens: int = 64,
            alpha: float = ALPHA, betas: Sequence[float] = (0.2, 0.4, 0.6), layers: Optional[Sequence[int]] = None,
            seed: int = 0, device: str = "cpu", stream: Optional[torch.Tensor] = None,
            show_progress: bool = True) -> Report:
    """analyze: stability, prediction, quality and speed of core neurons per ``beta`` -> ``Report``.

    ``layers`` (default: from a quarter of the depth to the last layer, as CoreInfer skips the first
    layers) run on core neurons; ``stream`` replaces the held-out token stream."""
    mlps = mlp_layers(model)
    L = len(mlps)
    layers = list(range(L // 4, L)) if layers is None else list(layers)
    if stream is None:
        from ..eval.perplexity import heldout_token_stream

        stream = heldout_token_stream(tok, prompt_tokens + cont_tokens, seed=seed)
    ids = stream[None, :prompt_tokens + cont_tokens]
    acts = collect(model, ids)
    base_nll = nll(model, ids)
    with torch.no_grad():
        lg0 = model(input_ids=ids, use_cache=False).logits[0, prompt_tokens - 1:-1].float()
    d_nll = float(torch.nn.functional.cross_entropy(lg0, ids[0, prompt_tokens:]))
    samples = task_prompts(tok, "passkey", length, n, seed + 3)
    base_c, N, _ = exact_count(model, samples, None, device)
    rows = []
    for beta in progress(list(betas), "core neurons", show_progress):
        stab, pred = [], []
        for l in layers:
            a = acts[l]
            full = sentence_core(a[:prompt_tokens], alpha, beta)
            for frac in (0.25, 0.5):
                stab.append(overlap(sentence_core(a[:max(1, int(frac * prompt_tokens))], alpha, beta), full))
            tc = token_core(a[prompt_tokens:], alpha)
            inside = torch.zeros(a.shape[1], dtype=torch.bool)
            inside[full] = True
            pred.append(float((tc & inside).sum() / tc.sum().clamp(min=1)))
        with core_mlp(model, prompt_tokens, layers, alpha, beta):
            lg = model(input_ids=ids, use_cache=False).logits[0, prompt_tokens - 1:-1].float()
        c_nll = float(torch.nn.functional.cross_entropy(lg, ids[0, prompt_tokens:]))
        hits = []
        for s in samples:
            with core_mlp(model, len(s.prompt_ids), layers, alpha, beta):
                c, _, _ = exact_count(model, [s], None, device)
            hits.append(c)
        idx = sentence_core(acts[layers[0]][:prompt_tokens], alpha, beta)
        full_ms, core_ms = mlp_speed(mlps[layers[0]], idx)
        rows.append({"beta": beta, "alpha": alpha, "layers": f"{layers[0]}-{layers[-1]}",
                     "stability_25": round(sum(stab[0::2]) / len(layers), 4),
                     "stability_50": round(sum(stab[1::2]) / len(layers), 4),
                     "predicted": round(sum(pred) / len(pred), 4), "chance": beta,
                     "cont_nll_dense": round(d_nll, 4), "cont_nll_core": round(c_nll, 4),
                     "passkey_dense": f"{base_c}/{N}", "passkey_core": f"{sum(hits)}/{N}",
                     "mlp_ms_full": round(full_ms, 4), "mlp_ms_core": round(core_ms, 4),
                     "mlp_speedup": round(full_ms / core_ms, 3)})
    summary = {"rows": rows, "prompt_tokens": prompt_tokens, "cont_tokens": cont_tokens, "layers": layers,
               "whole_stream_nll": base_nll, "passkey_length": length}

    def plot(path):
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
        bs = [r["beta"] for r in rows]
        a.plot(bs, [r["stability_25"] for r in rows], marker="o", label="stability (25% prefix)")
        a.plot(bs, [r["stability_50"] for r in rows], marker="o", label="stability (50% prefix)")
        a.plot(bs, [r["predicted"] for r in rows], marker="s", label="continuation core in prompt core")
        a.plot(bs, bs, ls="--", color="grey", label="chance")
        a.set_xlabel("beta (core fraction of d_ff)")
        a.legend(fontsize=7)
        a.set_title("core neurons: stability and prediction", fontsize=9)
        b.plot(bs, [r["cont_nll_core"] - r["cont_nll_dense"] for r in rows], marker="o", color="C3", label="NLL increase")
        b2 = b.twinx()
        b2.plot(bs, [r["mlp_speedup"] for r in rows], marker="s", color="C0", label="MLP speed-up")
        b.set_xlabel("beta")
        b.set_ylabel("continuation NLL increase (nats)", color="C3")
        b2.set_ylabel("decode MLP speed-up (this CPU)", color="C0")
        b.set_title("quality and speed of the core-only MLP", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    return Report("core_neurons", rows, summary,
                  ["beta", "stability_25", "stability_50", "predicted", "cont_nll_dense", "cont_nll_core",
                   "passkey_dense", "passkey_core", "mlp_speedup"],
                  f"CoreInfer core neurons (alpha {alpha}, layers {layers[0]}-{layers[-1]})", plot)
