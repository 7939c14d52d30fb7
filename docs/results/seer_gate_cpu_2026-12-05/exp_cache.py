"""Train/validate SeerAttention gates on a build_cache folder (issue 21 experiments; see README.md).

Validation = cache files whose index % 4 == 3; prints cache_metrics of the shipped gate and of the
trained one (validation and training split). Not part of the library."""
import sys, json, time, copy, argparse, torch
from sparsattn.calibrate.seer_attention import load_cache, cache_metrics, answer_row_weights, cached_batches
from sparsattn.methods.seer_attention import SeerGate
from sparsattn.train.seer_gate import train_gate
from sparsattn.calibrate._common import shipped_dir
ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=2000); ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--init", default="shipped"); ap.add_argument("--w", type=float, default=1.0)
ap.add_argument("--drop", type=float, default=0.25); ap.add_argument("--hidden", type=int, default=128)
ap.add_argument("--only", default=None); ap.add_argument("--save", default=None); ap.add_argument("--tag", default="")
ap.add_argument("--pow", type=float, default=1.0); ap.add_argument("--nmax", type=int, default=24); ap.add_argument("--bs", type=int, default=1); ap.add_argument("--cache", default="/tmp/seer/cache"); ap.add_argument("--wd", type=float, default=0.0)
a = ap.parse_args()
import glob
def idx(r): return int(r.rsplit("_",1)[1].split(".")[0])
ap2 = a
files = [f for f in sorted(glob.glob(a.cache + "/*.safetensors")) if idx(f) < ap2.nmax]
recs = load_cache(files)
def idx(r): return int(r["path"].rsplit("_",1)[1].split(".")[0])
val = [r for r in recs if idx(r) % 4 == 3]
tr = [r for r in recs if idx(r) % 4 != 3]
if a.only: tr = [r for r in tr if a.only in r["path"]]
print(len(tr), "train", len(val), "val", flush=True)
shipped = SeerGate.load(str(shipped_dir() / "seer_gate"))
def show(g, name):
    out = {}
    for T in (2048, 4096):
        v = [r for r in val if r["meta"]["T"] == T]
        if not v: continue
        m = cache_metrics(g, v)
        ns = sum(x[0] for x in m["needle"].values()); nn_ = sum(x[1] for x in m["needle"].values())
        os_ = sum(x[0] for x in m["oracle_needle"].values())
        out[T] = m
        print(f"{name} T={T} recall {list(m['block_recall'].values())} needle {ns}/{nn_} oracle {os_}/{nn_} "
              f"per-layer {[tuple(x) for x in m['needle'].values()]}", flush=True)
    return out
if a.init == "shipped":
    g = copy.deepcopy(shipped)
    show(g, "shipped")
else:
    g = SeerGate(shipped.num_q_heads, shipped.num_kv_heads, shipped.head_dim, shipped.layers, hidden_size=a.hidden,
                 rope_theta=shipped.rope_theta, head_inv_freq=shipped.head_inv_freq, seed=0)
answer_row_weights(tr, a.w)
t0 = time.time()
losses = train_gate(g, cached_batches(tr, batch_size=a.bs), steps=a.steps, lr=a.lr, warmup=min(50, a.steps), drop_first=a.drop,
                    weight_decay=a.wd, target_power=a.pow, log=None)
print(f"trained {len(losses)} steps in {time.time()-t0:.0f}s loss {sum(losses[:50])/50:.4f} -> {sum(losses[-50:])/50:.4f}")
res = show(g, f"trained{a.tag}")
val_ = val; val = tr; show(g, "TRAINSET"); val = val_
if a.save: g.save(a.save)
