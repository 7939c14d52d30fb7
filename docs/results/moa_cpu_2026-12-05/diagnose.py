"""diagnose: why does MoA's 12% retrieval plan starve the heads that read the needle? (issue 21)

On the bundled model at one length (default 2048), the calibration's own passkey prompts
(``calibrate._retrieval.retrieval_prompts``, seed 0 + length, as ``fit_moa --data retrieval``):

1. the answer loss of the dense model (is it saturated?);
2. the per-head profile of ``profile_moa`` for each prompt: total effect, the effect at the needle's
   distance, and the predicted loss of span ``S`` (the suffix sum beyond ``S``);
3. the *measured* loss increase when that one head is cut to sink + span ``S`` (every other head dense),
   per head: the quantity the first-order profile stands in for;
4. which heads read the needle (dense attention mass of the answer rows on the value's tokens).

Writes ``diagnose_<length>.json``. Usage: ``python docs/results/moa_cpu_2026-12-05/diagnose.py [--length 2048]
[--n 3] [--span 32] [--sink 32]``.
"""
import argparse
import json
import math
import time
from pathlib import Path

import torch

from sparsattn.calibrate._common import load_model
from sparsattn.calibrate._retrieval import retrieval_prompts
from sparsattn.calibrate.moa import profile_moa
from sparsattn.integrations.hf import attention_modules, attention_swapped


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--span", type=int, default=32)
    ap.add_argument("--sink", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ablate", default="all", help="'all' or 'none'")
    a = ap.parse_args()
    model, tok, _ = load_model()
    for p in model.parameters():
        p.requires_grad_(False)
    N = a.length
    prompts = retrieval_prompts(tok, N, a.n, seed=a.seed + N)
    mods = attention_modules(model)
    L, H = len(mods), model.config.num_attention_heads
    state = {"cut": None, "read": None}

    def attn(module, q, k, v, mask, scaling=None, dropout=0.0, **kw):
        layer = int(module.layer_idx)
        B, Hq, T, D = q.shape
        rep = Hq // k.shape[1]
        k = k.repeat_interleave(rep, 1)
        v = v.repeat_interleave(rep, 1)
        s = torch.matmul(q, k.transpose(-1, -2)) * (scaling or D ** -0.5)
        i = torch.arange(T)[:, None]
        j = torch.arange(T)[None, :]
        keep = (j <= i)[None].expand(Hq, T, T).clone()
        if state["cut"] is not None and state["cut"][0] == layer:
            h = state["cut"][1]
            keep[h] &= (j < a.sink) | (i - j < a.span)
        A = torch.softmax(s.masked_fill(~keep, float("-inf")), -1)
        if state["read"] is not None:
            state["read"][layer] = A[0, :, state["rows"]][..., state["needle"]].sum(-1).mean(-1)
        return torch.matmul(A, v).transpose(1, 2).contiguous(), None

    def answer_loss(ids, P):
        with torch.no_grad(), attention_swapped(model, "diag_moa", attn, modules=mods):
            lg = model(input_ids=ids, use_cache=False).logits[0, P - 1:-1].float()
        return torch.nn.functional.cross_entropy(lg, ids[0, P:]).item(), torch.softmax(lg, -1).gather(
            -1, ids[0, P:, None]).squeeze(-1).tolist()

    out = {"length": N, "span": a.span, "sink": a.sink, "prompts": []}
    for p in prompts:
        t0 = time.time()
        ids, P = p["ids"], p["prompt_len"]
        with torch.no_grad():
            pred = model(input_ids=ids, use_cache=False).logits[0, P - 1:-1].argmax(-1)
        ids = torch.cat([ids[:, :P], pred[None]], 1)  # the model's own answer (as retrieval_samples)
        state.update(read={}, rows=torch.tensor(p["answer"]) - 1, needle=torch.tensor(p["needle"]))
        base, probs = answer_loss(ids, P)
        read = torch.stack([state["read"][l] for l in range(L)])  # [L, H]
        state["read"] = None
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[:, P:] = True
        prof = profile_moa(model, [(ids, mask)], sink=a.sink, take_abs=True)[..., :N]  # [L, H, N]
        prof_signed = profile_moa(model, [(ids, mask)], sink=a.sink, take_abs=False)[..., :N]
        dist = (P - 1) - p["needle"][0]  # distance of the first answer row to the first value token
        suffix = torch.flip(torch.cumsum(torch.flip(prof, [-1]), -1), [-1])
        suffix_s = torch.flip(torch.cumsum(torch.flip(prof_signed, [-1]), -1), [-1])
        rec = {"depth": p["depth"], "prompt_len": P, "needle_distance": int(dist), "dense_loss": base,
               "answer_probs": probs, "needle_mass": read.tolist(),
               "total_effect": prof.sum(-1).tolist(),
               "pred_loss_at_span": suffix[..., a.span].tolist(),
               "pred_loss_at_span_signed": suffix_s[..., a.span].tolist(),
               "effect_near_needle": prof[..., max(0, dist - 64):dist + 64].sum(-1).tolist()}
        if a.ablate == "all":
            meas = torch.zeros(L, H)
            for l in range(L):
                for h in range(H):
                    state["cut"] = (l, h)
                    meas[l, h] = answer_loss(ids, P)[0] - base
            state["cut"] = None
            rec["measured_loss_at_span"] = meas.tolist()
        out["prompts"].append(rec)
        print(f"depth {p['depth']:.2f}: dense loss {base:.4g}, {time.time() - t0:.0f} s", flush=True)
    dst = Path(__file__).parent / f"diagnose_{N}.json"
    dst.write_text(json.dumps(out) + "\n")
    print("wrote", dst)


if __name__ == "__main__":
    main()
