"""counterfactual: prompt 7 (8K prose), layer 7: gate rank of block 100 when its pooled K is taken over sub-ranges of the block."""
import os
import math, torch
from safetensors import safe_open
from sparsattn.methods.seer_attention import SeerGate, _pool_blocks
torch.set_grad_enabled(False)
gate = SeerGate.load("sparsattn/models/bundled/calibration/seer_gate")
with safe_open(os.environ.get("H9", "/tmp/h9") + "/cap_prose_8192_7.safetensors", "pt") as fh:
    qp, kp = fh.get_tensor("qp7"), fh.get_tensor("kp7")
qpool, kpool = gate.pool(qp, kp)
T = qp.shape[2]
for lo, hi, what in ((0, 64, "whole block (as shipped)"), (0, 20, "tokens 0-19 (needle sentence end + value)"), (0, 14, "tokens 0-13 (up to the value)"), (20, 64, "tokens 20-63 (the caps licence text)")):
    kb = kpool.clone()
    kb[:, :, 100] = _pool_blocks(kp[:, :, 6400 + lo:6400 + hi], hi - lo, ("max", "min", "avg"))[:, :, 0]
    lg = gate.scores_pooled(7, qpool, kb, T, T)[0, :, 127, :128]
    ranks = [int((lg[h] > lg[h, 100]).sum()) + 1 for h in range(4, 8)]
    print(f"{what}: gate rank of block 100 for heads 7.4-7.7 = {ranks} (k_row 16)")
