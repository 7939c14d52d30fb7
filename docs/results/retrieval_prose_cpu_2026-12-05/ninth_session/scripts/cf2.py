"""counterfactual: prompt 7 (8K prose), layer 7: gate rank of block 100 when its 64-token pooling window is shifted left (the needle sentence starts in block 99)."""
import os
import torch
from safetensors import safe_open
from sparsattn.methods.seer_attention import SeerGate, _pool_blocks
torch.set_grad_enabled(False)
gate = SeerGate.load("sparsattn/models/bundled/calibration/seer_gate")
for f, b in ((os.environ.get("H9", "/tmp/h9") + "/cap_prose_8192_7.safetensors", 100), (os.environ.get("H9", "/tmp/h9") + "/cap_prose_4096_1.safetensors", 5), (os.environ.get("H9", "/tmp/h9") + "/cap_prose_4096_6.safetensors", 45)):
    with safe_open(f, "pt") as fh:
        qp, kp = fh.get_tensor("qp7"), fh.get_tensor("kp7")
    qpool, kpool = gate.pool(qp, kp)
    T = qp.shape[2]; nq = kpool.shape[2]
    for sh in (0, 8, 16, 24, 32, 40):
        kb = kpool.clone()
        kb[:, :, b] = _pool_blocks(kp[:, :, b * 64 - sh:b * 64 - sh + 64], 64, ("max", "min", "avg"))[:, :, 0]
        lg = gate.scores_pooled(7, qpool, kb, T, T)[0, :, nq - 1, :nq]
        print(f.split("cap_")[1], f"window shifted left by {sh}: ranks 7.4-7.7 =", [int((lg[h] > lg[h, b]).sum()) + 1 for h in range(4, 8)])
