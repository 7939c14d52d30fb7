"""Write train_ids.json.gz: the token ids (and needle metadata) of the shipped gate's training sequences, built
on the project's CPU environment exactly as ``build_cache`` builds them for the eighth session's recipe
(``--cache-lengths 2048,4096,8192 --n-retrieval 78,24,8 --n-source 4,0,0 --n-prose 40,12,8``, seed 0;
``train_cached`` calls ``build_cache`` once per length, so the depth generator and the haystack streams
restart per length). The device machine's installed files differ, so its own ``build_cache`` would train
on other text; ``cache_from_ids.py`` turns these ids into a cache there. Run from the repository root."""
import random
import sys
import time
from pathlib import Path

from sparsattn.calibrate._common import load_model
from sparsattn.calibrate._retrieval import prose_windows, retrieval_prompts
from sparsattn.train.seer_gate import token_windows

import jsongz  # this folder's saved-input reader / writer

HERE = Path(__file__).resolve().parent
RECIPE = [(2048, 78, 4, 40), (4096, 24, 0, 12), (8192, 8, 0, 8)]
SEED = 0
if len(sys.argv) > 1 and sys.argv[1] == "smoke":
    RECIPE = [(2048, 3, 1, 2)]

_, tok, _ = load_model()
out = {"recipe": RECIPE, "seed": SEED, "records": []}
for T, nr, ns, npr in RECIPE:  # build_cache(lengths=(T,), ...) as train_cached calls it
    t0 = time.time()
    rng = random.Random(f"seer-cache-{SEED}")
    hay = token_windows(tok, T, seed=10_000 + SEED)
    win = token_windows(tok, T, seed=SEED)
    pro = None
    for i in range(nr + ns + npr):
        kind = "retrieval" if i < nr else "source" if i < nr + ns else "prose"
        depth = rng.random()
        if kind == "prose" and pro is None:
            pro = prose_windows(tok, T, seed=SEED)
        rec = {"name": f"{kind}_{T}_{i:04d}", "T": T}
        if kind != "source":
            p = retrieval_prompts(tok, T, 1, seed=1000 * SEED + 7919 * T + i, depths=[depth],
                                  haystack=hay if kind == "retrieval" else pro)[0]
            P = p["prompt_len"]
            rec.update(ids=p["ids"][0].tolist(), meta={"kind": "retrieval", "T": T,
                       "haystack": "prose" if kind == "prose" else "code", "prompt_len": P,
                       "needle": list(p["needle"]), "rows": list(range(P - 1, T - 1)), "depth": depth})
        else:
            rec.update(ids=next(win)[0, :T].tolist(), meta={"kind": "source", "T": T, "haystack": "code"})
        out["records"].append(rec)
    print(T, f"{time.time() - t0:.1f}s", flush=True)
name = "train_ids_smoke.json.gz" if RECIPE[0][1] == 3 else "train_ids.json.gz"
jsongz.write(HERE / name, out)
print("wrote", HERE / name, len(out["records"]), "records")
