"""Which block-sparse launch configurations fit an SM's shared memory (GPU only; the data behind kernel_config).

For every dtype x head_dim x length, runs ``sparsattn.attention`` (dense causal pattern, the default
block size for that head_dim) forward without gradients and forward + backward, with the default
launch configuration (``kernel_config``), and records success or Triton's ``OutOfResources`` message
(it names the shared memory required); causal square and non-causal rectangular problems (HyperAttention's
off-diagonal blocks are ``n x m``). For each failure it then tries smaller forward / backward
tiles and stages through ``SPARSATTN_FWD_CONFIG`` / ``SPARSATTN_BWD_CONFIG`` and records which fit
and what they asked for. Every successful output is compared with the torch reference (max error).

    python scripts/gpu_kernel_smem_probe.py --out probe.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time


def _try(fn):
    try:
        return fn(), ""
    except Exception as e:  # recorded, the probe goes on
        return None, f"{type(e).__name__}: {str(e)[:240]}"


def main() -> int:
    import torch

    from sparsattn.api import _default_pattern, attention
    from sparsattn.kernels.block_sparse import kernel_config
    from sparsattn.kernels.block_sparse.reference import block_sparse_reference

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--dims", type=int, nargs="+", default=[128, 64, 256, 96, 192, 32])
    p.add_argument("--lens", type=int, nargs="+", default=[200, 1000])
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32", "float16"])
    p.add_argument("--device", default="cuda", help="cuda; cpu with TRITON_INTERPRET=1 checks the script itself")
    a = p.parse_args()
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows = []
    t0 = time.time()
    fwd_alts = [(64, 4, 2), (32, 4, 2), (32, 4, 1), (16, 4, 1)]
    bwd_alts = [(32, 64, 4, 1), (32, 32, 4, 1), (16, 32, 4, 1)]
    # bf16 first (the failing case seen, under autocast), the widest heads first; the JSON is
    # rewritten after every row so that a run cut by its time limit keeps what it measured
    cases = [(getattr(torch, name), D, T, Tk, causal) for name in a.dtypes for D in a.dims for T in a.lens
             for Tk, causal in ((T, True), (T // 2 + 37, False))]
    for dtype, D, T, Tk, causal in cases:
        g = torch.Generator(device=dev.type).manual_seed(D * 1000 + T)
        q = torch.randn(1, 2, T, D, device=dev, generator=g).to(dtype)
        k, v = (torch.randn(1, 2, Tk, D, device=dev, generator=g).to(dtype) for _ in range(2))
        pat = _default_pattern(T, Tk, causal, dev, D)
        cfg = kernel_config(D, pat.block_q, pat.block_k, dtype, dev)
        ref, _ = block_sparse_reference(q.double(), k.double(), v.double(), pat, scale=D ** -0.5)

        def fwd():
            with torch.no_grad():
                o = attention(q, k, v, causal=causal, backend="triton")
            sync()
            return float((o.double() - ref).abs().max())

        def bwd():
            qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
            o = attention(qq, kk, vv, causal=causal, backend="triton")
            o.float().square().sum().backward()
            sync()
            return float(qq.grad.float().abs().max())

        fwd_fit = None  # a forward configuration that ran, for the backward checks (they run the forward first)
        for kind, fn, alts, var in (("fwd", fwd, fwd_alts, "SPARSATTN_FWD_CONFIG"),
                                    ("bwd", bwd, bwd_alts, "SPARSATTN_BWD_CONFIG")):
            if kind == "bwd" and fwd_fit is not None:
                os.environ["SPARSATTN_FWD_CONFIG"] = ",".join(map(str, fwd_fit))
            val, err = _try(fn)
            row = dict(dtype=str(dtype).split(".")[-1], D=D, T=T, Tk=Tk, causal=causal, block_q=pat.block_q,
                       block_k=pat.block_k, kind=kind, cfg=cfg, ok=not err, value=val, error=err, alternatives=[])
            if err:
                for alt in alts:
                    os.environ[var] = ",".join(map(str, alt))
                    v2, e2 = _try(fn)
                    m = re.search(r"Required: (\d+)", e2)
                    row["alternatives"].append(dict(config=alt, ok=not e2, value=v2,
                                                    required=int(m.group(1)) if m else None, error=e2[:160]))
                    del os.environ[var]
                    if kind == "fwd" and not e2 and fwd_fit is None:
                        fwd_fit = alt
            if kind == "bwd":
                row["fwd_config_used"] = fwd_fit
                os.environ.pop("SPARSATTN_FWD_CONFIG", None)
            rows.append(row)
            with open(a.out, "w") as f:
                json.dump(dict(gpu=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", torch=torch.__version__, rows=rows,
                               seconds=round(time.time() - t0, 1)), f, indent=1)
            print(f"{row['dtype']:>8s} D={D:3d} T={T:4d} Tk={Tk:4d} causal={causal} {kind} cfg={cfg} "
                  f"ok={row['ok']} {val} {err[:120]}"
                  + "".join(f"\n      alt {x['config']}: ok={x['ok']} req={x['required']}"
                            for x in row["alternatives"]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
