import sys, glob, math, json, torch
import os
from safetensors import safe_open
from sparsattn.methods.seer_attention import SeerGate, apply_rope, _pool_blocks, causal_block_mask
from sparsattn.kernels.attn_pool import attn_pool
torch.set_grad_enabled(False)
gate_dir = sys.argv[1]; files = sys.argv[2:]
gate = SeerGate.load(gate_dir)
NZ = 0.12
res = []
def rank_of(row, idx):  # 1-based rank of best of idx blocks in row (desc)
    best = max(float(row[i]) for i in idx)
    return int((row > best).sum()) + 1
for f in files:
    with safe_open(f, "pt") as fh:
        t = {k: fh.get_tensor(k) for k in fh.keys()}; scale = float(fh.metadata()["scale"])
    needle, rows = t["needle"], t["rows"]
    nb = sorted(set((needle // 64).tolist())); qbs = sorted(set((rows // 64).tolist()))
    for l in (6, 7):
        q, k, qp, kp = t[f"q{l}"], t[f"k{l}"], t[f"qp{l}"], t[f"kp{l}"]
        T = q.shape[2]
        kf = k.repeat_interleave(4, 1)
        s = (q[0][:, rows] @ kf[0].transpose(-1, -2)) * scale
        s = s.masked_fill(torch.arange(T)[None, None, :] > rows[None, :, None], -float("inf"))
        p = s.softmax(-1)
        mass = p[..., needle].sum(-1).mean(-1)  # [H]
        logits = gate.scores(l, qp, kp)[0]  # [H, nq, nk]
        tgt = attn_pool(q, k, block_size=64, scale=scale)[0]
        # answer-row-only pooled q
        qa = qp[:, :, rows].float().mean(2, keepdim=True)  # [1,H,1,D]
        for h in range(8):
            if mass[h] < 0.5: continue
            for qb in qbs:
                ncaus = qb + 1
                krow = math.ceil(NZ * ncaus)
                lg = logits[h, qb, :ncaus]
                pr = lg.softmax(-1)
                rk = rank_of(lg, nb)
                tg = tgt[h, qb, :ncaus]
                tg8 = tg.pow(8); tg8 = tg8 / tg8.sum()
                # answer rows only block-max
                am = p[h].view(len(rows), -1)
                pad = (-T) % 64
                amax = torch.nn.functional.pad(am, (0, pad)).view(len(rows), -1, 64).amax(-1).amax(0)[:ncaus]
                # gate logits with q pooled on answer rows only
                wq, wk = gate.wq[str(l)], gate.wk[str(l)]
                qpool = qa[0, h, 0] @ wq[h]
                qpos = torch.tensor([(qb) * 64]); inv = gate.gate_inv_freq
                qr = apply_rope(qpool[None], qpos, inv)
                kpool = _pool_blocks(kp, 64, ("max", "min", "avg"))[0, h // 4]  # [nk, 3D]
                D = kp.shape[-1]
                kpos = torch.arange(kpool.shape[0]) * 64
                parts = {}
                for j, nm in enumerate(("max", "min", "avg")):
                    kk = apply_rope(kpool[:, j*D:(j+1)*D] @ wk[h//4][j*D:(j+1)*D], kpos, inv)
                    qfull = apply_rope((qp[0, h, qb*64:(qb+1)*64].float().mean(0) @ wq[h])[None], qpos, inv)
                    parts[nm] = (qfull @ kk.T / math.sqrt(128))[0, :ncaus]
                la = (qr @ apply_rope(kpool @ wk[h//4], kpos, inv).T / math.sqrt(128))[0, :ncaus]
                d = {"file": f.split("cap_")[1], "layer": l, "head": h, "mass": round(float(mass[h]), 3), "qb": qb,
                     "needle_blocks": nb, "k_row": krow, "gate_rank": rk,
                     "gate_prob": round(float(max(pr[i] for i in nb)), 5),
                     "gate_top": lg.topk(5).indices.tolist(),
                     "row_recall": round(len(set(lg.topk(krow).indices.tolist()) & set(tg.topk(krow).indices.tolist())) / krow, 3),
                     "teacher_rank": rank_of(tg, nb), "teacher_val": round(float(max(tg[i] for i in nb)), 4),
                     "teacher_p8_share": round(float(sum(tg8[i] for i in nb)), 3),
                     "teacher_top": tg.topk(5).indices.tolist(),
                     "answer_rows_blockmax_rank": rank_of(amax, nb),
                     "gate_rank_answer_q": rank_of(la, nb),
                     "part_rank": {nm: rank_of(v, nb) for nm, v in parts.items()},
                     "part_logit_needle_minus_median": {nm: round(float(max(v[i] for i in nb) - v[:-1].median()), 2) for nm, v in parts.items()}}
                res.append(d)
                print(json.dumps(d), flush=True)
