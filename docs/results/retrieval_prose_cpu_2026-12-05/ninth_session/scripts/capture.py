import sys, time, torch
import os
from safetensors.torch import save_file
torch.set_grad_enabled(False)
from sparsattn.calibrate._common import load_model
from sparsattn.eval.prefill_quality import make_prompts
from sparsattn.eval.prefill_capture import capture_prompt
from sparsattn.eval.prefill_needle import needle_positions
model, tok, _ = load_model()
hay = sys.argv[1]; L = int(sys.argv[2]); idx = [int(x) for x in sys.argv[3].split(",")]
samples = make_prompts(tok, "passkey", L, 10, 2112, hay)
for i in idx:
    t0 = time.time()
    s = samples[i]
    needle, rows = needle_positions(tok, s.prompt_ids, s.answer_ids)
    ids = torch.tensor([list(s.prompt_ids) + list(s.answer_ids)])
    cap = capture_prompt(model, ids)
    out = {"needle": torch.tensor(needle), "rows": torch.tensor(rows)}
    for l in (6, 7):
        q, k, v, qp, kp = cap.layers[l]
        out.update({f"q{l}": q.contiguous(), f"k{l}": k.contiguous(), f"qp{l}": qp.contiguous(), f"kp{l}": kp.contiguous(), f"v{l}": v.contiguous()})
    save_file(out, os.environ.get("H9", "/tmp/h9") + f"/cap_{hay}_{L}_{i}.safetensors", metadata={"scale": str(cap.scales[7])})
    print(i, ids.shape, needle, rows, round(time.time()-t0,1), flush=True)
