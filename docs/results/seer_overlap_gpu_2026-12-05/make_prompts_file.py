"""Write prompts.json.gz: the token ids of issue 21's held-out check prompts as ``make_prompts`` builds them on
the project's CPU environment (prose and source haystacks depend on the installed packages, so the
device machine would build other prompts), so that the GPU run measures exactly the prompts of the
eighth and ninth sessions' tables. Keys: ``haystack|length|n|seed`` (the check's 10 prompts, seed 2112,
and the density search's calibration prompt, n 1, seed CAL_SEED). Run from the repository root:
``python docs/results/seer_overlap_gpu_2026-12-05/make_prompts_file.py``."""
import platform
import sys
import time
from pathlib import Path

import torch
import transformers

from sparsattn.calibrate._common import load_model
from sparsattn.eval.prefill_quality import CAL_SEED, HELDOUT_SEED, make_prompts

import jsongz  # this folder's saved-input reader / writer

HERE = Path(__file__).resolve().parent
SETS = [("prose", 4096), ("prose", 8192), ("code", 4096), ("code", 8192)]
SMOKE = [("prose", 2048, 2), ("code", 2048, 2)]

_, tok, _ = load_model()
out = {"_env": {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0],
                "machine": platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}}
for hay, L, n in [(h, L, 10) for h, L in SETS] + SMOKE:
    for nn, seed in ((n, HELDOUT_SEED), (1, CAL_SEED)):
        t0 = time.time()
        ps = make_prompts(tok, "passkey", L, nn, seed, hay)
        out[f"{hay}|{L}|{nn}|{seed}"] = [{"task": p.task, "depth": p.depth, "prompt_ids": list(p.prompt_ids),
                                          "answer_ids": list(p.answer_ids), "answer": p.answer} for p in ps]
        print(hay, L, nn, seed, f"{time.time() - t0:.1f}s", flush=True)
jsongz.write(HERE / "prompts.json.gz", out)
print("wrote", HERE / "prompts.json.gz")
