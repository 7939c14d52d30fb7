"""Shared checks of the issue-12 layer tests (not a test module): float64 dense-masked references,
output and gradient comparison, a tiny training task, a causality probe."""
import copy
import os
import math

import pytest
import torch
from torch import nn

from sparsattn.nn import get_layer
from sparsattn.nn.base import attention_backend


def masked_ref(q, k, v, mask, scale=None):
    """float64 softmax attention of q/k/v ``[B, h, T, d]`` under a bool mask ``[..., T, T]``; rows
    without keys give zeros."""
    q, k, v = q.double(), k.double(), v.double()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1)
    p = torch.nan_to_num(p, nan=0.0)
    return p @ v


def compare_with_reference(layer, x, ref_fn, atol=2e-5, backend="reference"):
    """Run ``layer`` (float32) and ``ref_fn(layer64, x64)`` (a float64 copy) on ``x``; compare the
    outputs and the gradients of a random projection of them with respect to ``x`` and every
    parameter. Returns the largest absolute output difference."""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1" and x.device.type == "cpu":
        pytest.skip("the Triton path on CPU tensors needs the interpreter (tests/conftest.py sets it on "
                    "machines without CUDA; on a GPU machine the kernel tests run Triton on CUDA)")
    layer64 = copy.deepcopy(layer).double()
    x32 = x.clone().float().requires_grad_(True)
    x64 = x.clone().double().requires_grad_(True)
    with attention_backend(backend):
        y32 = layer(x32)
    y64 = ref_fn(layer64, x64)
    assert y32.shape == y64.shape == x.shape
    assert torch.isfinite(y32).all()
    w = torch.randn(y64.shape, dtype=torch.float64)
    (y32 * w.float()).sum().backward()
    (y64 * w).sum().backward()
    err = float((y32.detach().double() - y64.detach()).abs().max())
    scale = float(y64.detach().abs().max()) + 1e-6
    assert err <= atol * max(1.0, scale), f"output differs by {err}"
    gx = float((x32.grad.double() - x64.grad).abs().max())
    assert gx <= atol * max(1.0, float(x64.grad.abs().max())) * 10, f"grad x differs by {gx}"
    for (n, p32), (_, p64) in zip(layer.named_parameters(), layer64.named_parameters()):
        if p64.grad is None:
            assert p32.grad is None or float(p32.grad.abs().max()) == 0.0, n
            continue
        g = float((p32.grad.double() - p64.grad).abs().max())
        assert g <= atol * 10 * max(1.0, float(p64.grad.abs().max())), f"grad {n} differs by {g}"
    return err


def train_falls(name, shape, steps=20, dim=32, heads=2, lr=1e-2, **config):
    """Train ``name`` (with a learned positional embedding; token embedding and read-out frozen at
    random values) on one fixed batch to predict the previous token in token order (vocab 8) for
    ``steps`` Adam steps; return (first, last) task loss. ``extra_loss`` is added to the training
    loss. ``shape``: the token grid (``(T,)`` or ``(H, W)``). Only attention can move a neighbour's
    token into a position, so the loss falls only through the layer."""
    torch.manual_seed(0)
    V = 8
    emb, head = nn.Embedding(V, dim), nn.Linear(dim, V)
    for p in list(emb.parameters()) + list(head.parameters()):
        p.requires_grad_(False)
    layer = get_layer(name, dim, heads, **config)
    N = math.prod(shape)
    pos = nn.Parameter(torch.zeros(N, dim))
    opt = torch.optim.Adam(list(layer.parameters()) + [pos], lr=lr)
    B = 8
    tok = torch.randint(0, V, (B, N))
    y = torch.cat([torch.full((B, 1), -100), tok[:, :-1]], 1)
    losses = []
    with attention_backend("reference"):
        for _ in range(steps):
            h = (emb(tok) + pos).view(B, *shape, dim)
            logits = head(layer(h).reshape(B, N, dim))
            loss = nn.functional.cross_entropy(logits.reshape(-1, V), y.reshape(-1), ignore_index=-100)
            extra = layer.extra_loss()
            total = loss + extra if extra is not None else loss
            opt.zero_grad()
            total.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return losses[0], losses[-1]


def future_leak(layer, x, t):
    """Largest change of the outputs before token ``t`` (dim 1) when the input at ``t`` changes."""
    with torch.no_grad(), attention_backend("reference"):
        y0 = layer(x)
        x2 = x.clone()
        x2[:, t] += 1.0
        y1 = layer(x2)
    return float((y1[:, :t] - y0[:, :t]).abs().max())
