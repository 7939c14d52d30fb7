"""Reproduce the shared-memory failure HyperAttention's exact blocks hit on the GPU (issue 13).

On an H100 (2026-12-05) ``hyper`` at width 256 (head_dim 128) under bf16 autocast asked the
block-sparse forward for 416 KB of shared memory through ``_approx_common.exact_lse``'s kernel path;
since then that path is taken only for head_dim <= 64, and the launch configuration of the failing
call was never captured. This script runs the approximation mixers (``hyper``, ``scatterbrain``,
``combiner``) on CUDA under bf16 autocast, in training and evaluation mode, with every
``exact_lse`` call also sent through the kernel path regardless of head_dim, and records for each
distinct call the shapes, dtypes, the pattern's blocks, ``kernel_config`` and the kernel's result
(max error against the torch path, or the error message). JSON lines on stdout and in ``--out``.

    python scripts/gpu_hyper_smem_repro.py --out repro.jsonl
"""
from __future__ import annotations

import argparse
import json


def main() -> int:
    import torch

    from sparsattn.api import _default_pattern, attention
    from sparsattn.kernels.block_sparse import kernel_config
    from sparsattn.nn import get_layer
    from sparsattn.nn.mixers import _approx_common, combiner, hyper, scatterbrain

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--widths", type=int, nargs="+", default=[256, 128])
    p.add_argument("--heads", type=int, nargs="+", default=[2, 1])
    p.add_argument("--lens", type=int, nargs="+", default=[256, 512])
    p.add_argument("--device", default="cuda", help="cuda; cpu checks the script itself (no kernel rows)")
    a = p.parse_args()
    dev = torch.device(a.device)
    original = _approx_common.exact_lse
    seen: dict = {}
    out = open(a.out, "w")

    def probe(q, k, v, *, scale, causal, keep=None):
        res = original(q, k, v, scale=scale, causal=causal, keep=keep)
        if not q.is_cuda or keep is not None or q.dtype == torch.float64:
            return res
        key = (tuple(q.shape), tuple(k.shape), str(q.dtype), str(k.dtype), bool(causal))
        if key in seen:
            return res
        D = q.shape[-1]
        pat = _default_pattern(q.shape[-2], k.shape[-2], causal, q.device, D)
        row = dict(q=list(q.shape), k=list(k.shape), q_dtype=str(q.dtype), k_dtype=str(k.dtype), causal=bool(causal),
                   block_q=pat.block_q, block_k=pat.block_k,
                   cfg=kernel_config(D, pat.block_q, pat.block_k, q.dtype, q.device), grad=torch.is_grad_enabled())
        try:
            with torch.no_grad():
                flat = lambda t: t.detach().reshape(1, -1, *t.shape[-2:])  # noqa: E731
                o, lse = attention(flat(q), flat(k.to(q.dtype)), flat(v.to(q.dtype)), causal=causal, scale=scale,
                                   return_lse=True)
                torch.cuda.synchronize()
            row["ok"] = True
            row["max_err"] = float((o.float().reshape(res[0].shape) - res[0].float()).abs().max())
        except Exception as e:  # the point of the probe
            row["ok"] = False
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        seen[key] = row
        line = json.dumps(row)
        print(line, flush=True)
        out.write(line + "\n")
        out.flush()
        return res

    for mod in (_approx_common, hyper, scatterbrain, combiner):
        if hasattr(mod, "exact_lse"):
            mod.exact_lse = probe
    for name in ("hyper", "scatterbrain", "combiner"):
        for width, heads in zip(a.widths, a.heads):
            for T in a.lens:
                try:
                    layer = get_layer(name, width, heads, **getattr(type(get_layer(name, width, heads)), "presets",
                                                                     {}).get("mqar", {})).to(dev)
                except Exception as e:
                    print(json.dumps(dict(layer=name, error=f"{type(e).__name__}: {e}"[:200])), flush=True)
                    continue
                x = torch.randn(4, T, width, device=dev)
                for train in (True, False):
                    layer.train(train)
                    print(json.dumps(dict(layer=name, width=width, heads=heads, T=T, train=train)), flush=True)
                    with torch.autocast(dev.type, dtype=torch.bfloat16), torch.set_grad_enabled(train):
                        y = layer(x)
                        if train:
                            y.float().square().mean().backward()
    out.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
