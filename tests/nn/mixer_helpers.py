"""Shared checks of the mixer tests (not a test module): a CPU training smoke run that only the
mixer can make succeed, and a causality probe."""
import torch
from torch import nn

from sparsattn.nn import get_layer


def train_smoke(name: str, steps: int = 40, dim: int = 32, heads: int = 2, lr: float = 1e-2, **config) -> tuple:
    """Train only the mixer (embedding and read-out frozen at random values) to predict the previous
    token (vocab 8, 24 tokens, one fixed batch of 16). Returns (first loss, last loss): the loss can
    fall only through the mixer's parameters and gradients."""
    torch.manual_seed(0)
    V, T = 8, 24
    emb, head = nn.Embedding(V, dim), nn.Linear(dim, V)
    for p in list(emb.parameters()) + list(head.parameters()):
        p.requires_grad_(False)
    mixer = get_layer(name, dim, heads, **config)
    opt = torch.optim.Adam(mixer.parameters(), lr=lr)
    x = torch.randint(0, V, (16, T))
    y = torch.cat([torch.full((16, 1), -100), x[:, :-1]], 1)
    losses = []
    for _ in range(steps):
        logits = head(mixer(emb(x)))
        loss = nn.functional.cross_entropy(logits.reshape(-1, V), y.reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses[0], losses[-1]


def future_leak(layer, x: torch.Tensor, t: int) -> float:
    """Largest change of the outputs before position ``t`` when the input at ``t`` changes (0 for a
    causal layer)."""
    with torch.no_grad():
        y0 = layer(x)
        x2 = x.clone()
        x2[:, t] += 1.0
        y1 = layer(x2)
    return float((y1[:, :t] - y0[:, :t]).abs().max())
