"""train_context_parallel: train a small causal language model whose every sequence is sharded over
the ranks (sparse context parallelism, arXiv 2302.06218; ring / fetch / Ulysses exchange), with
plain DDP for the weights and a static sparse pattern (sink + sliding window).

The task is a synthetic copy task: each sequence is random tokens that repeat with a fixed period,
so a token can be predicted from the one ``period`` positions back: the window of the pattern
covers the period, so the sparse model can learn it, and the loss falls from ln(vocab) towards 0
for the repeated part.

CPU (gloo, spawned processes)::

    OMP_NUM_THREADS=1 python examples/train_context_parallel.py --world 2 --steps 60

torchrun (one process per GPU, NCCL)::

    torchrun --nproc-per-node 2 examples/train_context_parallel.py --steps 200 --seq-len 65536
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from sparsattn import attention, patterns
from sparsattn.distributed import context_parallel_attention, make_layout, shard


def rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``x [B, H, L, d]`` at global positions ``pos [L]``."""
    d = x.shape[-1] // 2
    inv = 1.0 / (10000 ** (torch.arange(d, device=x.device, dtype=torch.float32) / d))
    ang = pos.float()[:, None] * inv[None]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


class Block(nn.Module):
    """Pre-norm transformer block; attention through ``attend(q, k, v)``."""

    def __init__(self, dim: int, heads: int, kv_heads: int):
        super().__init__()
        self.h, self.hkv, self.d = heads, kv_heads, dim // heads
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.d, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, positions, attend):
        B, L, _ = x.shape
        q, k, v = self.qkv(self.n1(x)).split([self.h * self.d, self.hkv * self.d, self.hkv * self.d], -1)
        q, k, v = (t.view(B, L, -1, self.d).transpose(1, 2) for t in (q, k, v))
        q, k = rope(q, positions), rope(k, positions)
        a = attend(q.contiguous(), k.contiguous(), v.contiguous())
        x = x + self.o(a.transpose(1, 2).reshape(B, L, -1))
        return x + self.mlp(self.n2(x))


class TinyLM(nn.Module):
    """Token embeddings, blocks with rotary positions (the shard's global positions), head."""

    def __init__(self, vocab: int, dim: int, heads: int, kv_heads: int, layers: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens, positions, attend):
        x = self.tok(tokens)
        for b in self.blocks:
            x = b(x, positions, attend)
        return self.head(self.norm(x))


def batch(step: int, args) -> torch.Tensor:
    """The same full batch on every rank (seeded by step): random tokens repeating every period."""
    g = torch.Generator().manual_seed(1000 + step)
    base = torch.randint(0, args.vocab, (args.batch, args.period), generator=g)
    return base.repeat(1, -(-args.seq_len // args.period))[:, : args.seq_len]


def train(rank: int, world: int, args, init: str | None) -> None:
    """One rank: its shard of every sequence, DDP over the weights, context-parallel attention."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel as DDP

    if init is not None:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=120))
    cuda = torch.cuda.is_available() and init is None
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("cp",))  # the context-parallel group
    weights_group = dist.new_group(backend="nccl" if cuda else "gloo")  # DDP's all-reduce apart from CP
    torch.manual_seed(0)
    T = args.seq_len
    pat = patterns.sink_local(T, args.block, args.window, block_q=args.block, device=device)
    layout = make_layout(args.layout, T, world, args.block)
    positions = layout.positions(rank, device)
    model = TinyLM(args.vocab, args.dim, args.heads, args.kv_heads, args.layers).to(device)
    ddp = DDP(model, process_group=weights_group)
    opt = torch.optim.AdamW(ddp.parameters(), lr=args.lr)
    backend = "reference" if device.type == "cpu" else None

    def cp_attend(q, k, v):
        return context_parallel_attention(q, k, v, pat, group=mesh, layout=layout, strategy=args.strategy,
                                          backend=backend)

    n_tok = torch.tensor([0.0], device=device)
    t0 = time.perf_counter()
    for step in range(args.steps):
        full = batch(step, args).to(device)
        tokens = shard(full, layout, rank, dim=1)
        # next-token targets at global positions; the last position of the sequence has none,
        # and the first period cannot be predicted (it is never seen before)
        nxt = torch.cat([full[:, 1:], torch.full_like(full[:, :1], -100)], 1)
        nxt[:, : args.period - 1] = -100
        target = shard(nxt, layout, rank, dim=1)
        logits = ddp(tokens, positions, cp_attend)
        loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100, reduction="sum")
        n_tok[0] = float((target != -100).sum())
        dist.all_reduce(n_tok, group=weights_group)
        # DDP averages gradients over ranks: scale so the result is the gradient of the global mean
        (loss_sum * world / n_tok[0]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == 0 and args.check:
            check_against_single_process(model, full, pat, args, device, rank, world, cp_attend, layout)
        if step % args.log_every == 0 or step == args.steps - 1:
            ls = loss_sum.detach().clone()
            dist.all_reduce(ls, group=weights_group)
            if rank == 0:
                print(f"step {step:4d}  loss {float(ls) / float(n_tok[0]):.4f}  (ln vocab {math.log(args.vocab):.2f})"
                      f"  {time.perf_counter() - t0:.1f}s", flush=True)
    dist.destroy_process_group()


@torch.no_grad()
def check_against_single_process(model, full, pat, args, device, rank, world, cp_attend, layout) -> None:
    """The sharded forward equals the single-process forward on the whole sequence."""
    backend = "reference" if device.type == "cpu" else None
    ref = model(full, torch.arange(full.shape[1], device=device),
                lambda q, k, v: attention(q, k, v, pat, backend=backend))
    got = model(shard(full, layout, rank, dim=1), layout.positions(rank, device), cp_attend)
    err = (got - shard(ref, layout, rank, dim=1)).abs().max()
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(f"check: max |logits(context parallel) - logits(single process)| = {float(err):.2e}", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=2, help="spawned gloo processes (ignored under torchrun)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--period", type=int, default=40)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--layout", default="zigzag")
    ap.add_argument("--strategy", default="auto")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--check", action="store_true", help="compare with the single-process forward at step 0")
    args = ap.parse_args(argv)
    if "RANK" in os.environ:  # torchrun
        cuda = torch.cuda.is_available()
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=300))
        train(dist.get_rank(), dist.get_world_size(), args, None)
        return
    import torch.multiprocessing as mp

    fd, path = tempfile.mkstemp(prefix="cp_train_")
    os.close(fd)
    os.unlink(path)
    mp.spawn(train, args=(args.world, args, f"file://{path}"), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
