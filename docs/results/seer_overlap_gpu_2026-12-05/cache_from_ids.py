"""Build a SeerAttention training cache (``build_cache``'s files, via ``calibrate.seer_attention.cache_record``)
from the saved token ids of train_ids.json.gz (the shipped gate's training sequences as the project's CPU
environment builds them; make_train_ids.py), for a gate with key-block overlap K_OVERLAP.
``sparsattn calibrate seer_attention --cache CACHE_DIR`` then trains on these files (it finds them by name
and skips their capture). Usage: python cache_from_ids.py IDS_JSON CACHE_DIR K_OVERLAP DEVICE"""
import sys
import time
from pathlib import Path

import torch

from sparsattn.calibrate._common import load_model
from sparsattn.calibrate.seer_attention import cache_record
from sparsattn.train.seer_gate import gate_for_model

import jsongz  # this folder's saved-input reader / writer

ids_json, cache_dir, k_overlap, device = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_grad_enabled(False)
model, _, _ = load_model(device=device)  # float32, as the calibration loads it
gate = gate_for_model(model, rope_input="pre", k_overlap=k_overlap)
cache_dir.mkdir(parents=True, exist_ok=True)
t0 = time.time()
recs = jsongz.read(ids_json)["records"]
for i, r in enumerate(recs):
    path = cache_dir / f"{r['name']}.safetensors"
    if not path.is_file():
        cache_record(model, gate, torch.tensor([r["ids"]], dtype=torch.long), r["meta"], path)
    if i % 25 == 0 or i == len(recs) - 1:
        print(f"[cache_from_ids] {i + 1}/{len(recs)} {r['name']} {time.time() - t0:.1f}s", flush=True)
