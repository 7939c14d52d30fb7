import sys, math, json, torch
import os
from collections import defaultdict
from sparsattn.methods.seer_attention import SeerGate
from sparsattn.calibrate.seer_attention import load_cache
torch.set_grad_enabled(False)
gate = SeerGate.load(sys.argv[1]); recs = load_cache(sys.argv[2]) if len(sys.argv) > 2 else load_cache("/tmp/seer/cache")
NZ = 0.12
stat = defaultdict(lambda: [0, 0])  # (kind,T,layer) -> kept, strong
miss = []
for r in recs:
    m = r["meta"]
    if m.get("kind") != "retrieval": continue
    hay = m.get("haystack", "code"); T = m["T"]
    qbs = sorted({x // 64 for x in m["rows"]}); nb = sorted({x // 64 for x in m["needle"]})
    for l in (6, 7):
        f = r["layers"][l]; read = r["read"][l]
        g = gate.scores_pooled(l, f["q"], f["k"], f["Tq"], f["Tk"])[0]
        for h in range(8):
            if read[h] < 0.5: continue
            ok = True; rks = []
            for qb in qbs:
                row = g[h, qb, :qb + 1]
                best = max(float(row[i]) for i in nb if i <= qb)
                rk = int((row > best).sum()) + 1
                krow = math.ceil(NZ * (qb + 1))
                diag = any(i == qb for i in nb)
                rks.append((rk, krow))
                ok = ok and (rk <= krow or diag)
            s = stat[(hay, T, l)]; s[0] += ok; s[1] += 1
            if not ok: miss.append((r["path"].split("/")[-1], l, h, rks))
for k in sorted(stat): print(k, stat[k])
print(len(miss), "misses; layer-7 ones:", [x for x in miss if x[1] == 7][:40])
