"""needle coverage (driver's needle_coverage) of SeerAttention with a gate on captured held-out prompts (layers 6-7)."""
import os
import sys, glob, math, json, torch
from safetensors import safe_open
from sparsattn.methods.seer_attention import SeerAttention
from sparsattn.eval.prefill_capture import select_context
from sparsattn.eval.needle import needle_coverage
torch.set_grad_enabled(False)
gate_dir, spec = sys.argv[1], sys.argv[2]; files = sys.argv[3:]
if spec.startswith("row"):
    m = SeerAttention(path=gate_dir, nz_ratio=float(spec[3:]), topk_rule="row", last_block_dense=False)
else:
    m = SeerAttention(path=gate_dir, threshold=float(spec[3:]), last_block_dense=False)
tot = [0, 0, 0, 0]; misses = []; dens = []
for f in files:
    with safe_open(f, "pt") as fh:
        t = {k: fh.get_tensor(k) for k in fh.keys()}; scale = float(fh.metadata()["scale"])
    layers, pats = {}, {}
    for l in (6, 7):
        q, k, v, qp, kp = (t[f"{n}{l}"] for n in ("q", "k", "v", "qp", "kp"))
        layers[l] = (q, k)
        pats[l] = m.select(q, k, select_context(m, l, q, k, v, qp, kp, scale, {}))
        dens.append(float(pats[l].density))
    nc = needle_coverage(layers, pats, t["rows"].tolist(), t["needle"].tolist(), scales={6: scale, 7: scale})
    for h in nc["heads"]:
        tot[0] += h["kept"]; tot[1] += 1
        if h["mass"] >= 0.5:
            tot[2] += h["kept"]; tot[3] += 1
            if not h["kept"]: misses.append((f.split("cap_")[1].split(".")[0], f"{h['layer']}.{h['head']}", round(h["mass"], 2), round(h["kept_fraction"], 2)))
print(json.dumps({"gate": gate_dir, "spec": spec, "n": len(files), "kept_reading_l67": tot[:2], "strong": tot[2:], "density_l67": round(sum(dens)/len(dens), 4), "strong_misses": misses}))
