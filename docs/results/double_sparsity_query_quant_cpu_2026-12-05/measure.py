"""Double Sparsity 4-bit labels on the bundled model: quantised vs full-precision query (issue 10).

Channels (r = 64 / 8 = 8 per KV head) calibrated on one held-out passkey prompt (seed 12345, 2K
tokens). For the last 32 positions of 2 passkey prompts (seed 7, 2K tokens) taken as decode queries
(keys up to the position), every layer and query head: top-10 recall of the selection (budget 64
tokens) against exact q.k, with head_reduce 'max' (default: one list per KV head) and 'none' (one
list per query head, the authors' selection). Run: OMP_NUM_THREADS=1 python measure.py
(output.txt: 2026-12-05, shared 2-core CPU under load, 82 s)."""
import math, sys, time, torch
torch.set_num_threads(1)
from sparsattn.evaluate import load_model
from sparsattn.eval.tasks import make_samples, encode_ids
from sparsattn.capture import capture_qkv
from sparsattn.methods import get_method
from sparsattn.methods.base import SelectContext

t0 = time.time()
model, tok, _ = load_model(None, device="cpu")
def cap(seed, n):
    out = []
    for s in make_samples("passkey", tok, 2048, n, seed=seed, progress=False):
        ids = torch.tensor([encode_ids(tok, s.prompt)])
        with torch.no_grad():
            out.append(capture_qkv(model, ids))
    return out
calib = cap(12345, 1)[0]
L = len(calib)
evals = cap(7, 2)
res = {}
for qq in (True, False):
    for red in ("max", "none"):
        m = get_method("double_sparsity", token_budget=64, label_bits=4, quantize_query=qq, head_reduce=red)
        m.calibrate([calib[l][0].float() for l in range(L)], [calib[l][1].float() for l in range(L)])
        rec = []
        for cap_ in evals:
            for l in range(L):
                q, k = cap_[l][0].float(), cap_[l][1].float()
                T = q.shape[2]
                G = q.shape[1] // k.shape[1]
                for t in range(T - 32, T):
                    qt, kt = q[:, :, t], k[:, :, : t + 1]
                    p = m.select(qt, kt, SelectContext(layer=l))
                    exact = torch.einsum("bhd,bhtd->bht", qt, kt.repeat_interleave(G, 1))
                    top = exact.topk(10, -1).indices  # [1, Hq, 10]
                    for h in range(q.shape[1]):
                        row = h if red == "none" else h // G
                        sel = set(p.indices[0, row, : int(p.counts[0, row])].tolist())
                        rec.append(sum(int(i) in sel for i in top[0, h]) / 10)
        res[(qq, red)] = sum(rec) / len(rec)
        print(f"quantize_query={qq} head_reduce={red}: top-10 recall {res[(qq, red)]:.4f} over {len(rec)} (query, head)", flush=True)
print(f"seconds {time.time() - t0:.0f}")
