"""Issue 21's retrieval check (``python -m sparsattn.eval.retrieval_check``, same flags) on the prompts
saved in prompts.json.gz (the project's CPU environment's held-out prompts; see make_prompts_file.py)
instead of prompts rebuilt from the running machine's installed files. A prompt set missing from the
file is an error, not a silent rebuild."""
import sys
from pathlib import Path

import sparsattn.eval.prefill_quality as pq
from sparsattn.eval import retrieval_check

import jsongz  # this folder's saved-input reader / writer

PROMPTS = jsongz.read(Path(__file__).resolve().parent / "prompts.json.gz")


def saved_prompts(tok, task, T, n, seed, haystack="noise"):
    """make_prompts from prompts.json.gz (same signature); ValueError naming the missing key."""
    key = f"{haystack}|{T}|{n}|{seed}"
    if task != "passkey" or key not in PROMPTS:
        raise ValueError(f"prompts.json.gz: no prompt set {key!r} for task {task!r}; have {sorted(PROMPTS)}")
    out = [pq.PromptSample(p["task"], p["depth"], list(p["prompt_ids"]), list(p["answer_ids"]), p["answer"])
           for p in PROMPTS[key]]
    print(f"[check.py] using saved prompts {key} ({len(out)})", flush=True)
    return out


pq.make_prompts = saved_prompts
if __name__ == "__main__":
    raise SystemExit(retrieval_check.main(sys.argv[1:]))
