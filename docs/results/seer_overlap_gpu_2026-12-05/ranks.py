"""Gate rank of the needle's key block (answer rows' query block, 1 = first) for chosen strong readers of the
ninth session's captured check prompts (``capture.py``'s files, H9 folder), per gate.
Usage: python ranks.py H9 GATE_DIR[=label] ... ; prints one markdown row per (prompt, head)."""
import sys

import torch
from safetensors import safe_open

from sparsattn.methods.seer_attention import SeerGate

torch.set_grad_enabled(False)
CASES = [("prose_8192_7", 7, h) for h in (4, 5, 6, 7)] + [("prose_4096_1", 7, 7), ("prose_4096_6", 7, 4)] + \
        [("prose_4096_3", 6, 1), ("prose_4096_3", 6, 2), ("prose_4096_3", 7, 4)] + [("prose_4096_5", 7, h) for h in (4, 5, 6, 7)]
h9, gates = sys.argv[1], [(a.split("=")[0], a.split("=")[-1]) for a in sys.argv[2:]]
loaded = [(lab, SeerGate.load(d)) for d, lab in gates]
print("| prompt, head | k_row | " + " | ".join(lab for lab, _ in loaded) + " |")
print("| --- | --- | " + " | ".join("---" for _ in loaded) + " |")
cache = {}
for name, layer, head in CASES:
    if name not in cache:
        with safe_open(f"{h9}/cap_{name}.safetensors", "pt") as fh:
            cache[name] = {k: fh.get_tensor(k) for k in fh.keys()}
    t = cache[name]
    nb = sorted(set((t["needle"] // 64).tolist()))
    qb = int(t["rows"].max()) // 64
    ranks = []
    for _, g in loaded:
        lg = g.scores(layer, t[f"qp{layer}"], t[f"kp{layer}"])[0, head, qb, : qb + 1]
        best = max(float(lg[i]) for i in nb)
        ranks.append(str(int((lg > best).sum()) + 1))
    k_row = -(-12 * (qb + 1) // 100)
    print(f"| {name.split('_', 1)[1]}, {layer}.{head} | {k_row} | " + " | ".join(ranks) + " |")
