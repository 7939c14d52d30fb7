"""Derive an overlap-K training cache from an overlap-0 ``build_cache`` folder of the same sequences (CPU
shortcut): only the pooled keys depend on ``k_overlap``, so each record's ``k.L`` is recomputed from a
capture of its token ids (train_ids.json.gz) and ``q.L``, ``t.L`` (the attn_pool target, the expensive part)
and ``read.L`` are copied. The first record's overlap-0 keys are checked against the source cache.
Usage: python cpu_overlap_cache.py IDS_JSON SRC_CACHE DST_CACHE K_OVERLAP"""
import json
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sparsattn.calibrate._common import load_model
from sparsattn.methods.seer_attention import _pool_blocks
from sparsattn.train.seer_gate import capture_for_gate

import jsongz  # this folder's saved-input reader / writer

ids_json, src, dst, K = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
torch.set_grad_enabled(False)
model, _, _ = load_model()
dst.mkdir(parents=True, exist_ok=True)
t0 = time.time()
recs = jsongz.read(ids_json)["records"]
for i, r in enumerate(recs):
    out = dst / f"{r['name']}.safetensors"
    if out.is_file():
        continue
    with safe_open(str(src / f"{r['name']}.safetensors"), "pt") as fh:
        meta = json.loads(fh.metadata()["meta"])
        t = {k: fh.get_tensor(k) for k in fh.keys()}
    assert all(meta.get(k) == v for k, v in r["meta"].items() if k not in ("haystack", "depth")), r["name"]
    cap = capture_for_gate(model, torch.tensor([r["ids"]]), sorted(int(k.split(".")[1]) for k in t if k[:2] == "k."))
    for l, tup in cap.items():
        kp = tup[3]
        if i == 0:
            torch.testing.assert_close(_pool_blocks(kp, 64, ("max", "min", "avg")), t[f"k.{l}"])
        t[f"k.{l}"] = _pool_blocks(kp, 64, ("max", "min", "avg"), K)
    meta["k_overlap"] = K
    save_file({k: v.contiguous() for k, v in t.items()}, str(out), metadata={"meta": json.dumps(meta)})
    if i % 20 == 0 or i == len(recs) - 1:
        print(f"{i + 1}/{len(recs)} {r['name']} {time.time() - t0:.0f}s", flush=True)
