"""The model the harness trains around any registered layer: embedding, blocks, head.

``LayerModel(mixers, dim, heads, ...)``: token (or pixel) embedding + learned positions, one block
per entry of ``mixers`` (pre-norm: ``x + mixer(norm(x))`` then, with ``mlp``, ``x + mlp(norm(x))``),
a final norm and a linear head. 1-D layers see ``[B, T, dim]``; 2-D layers (``layout == "2d"``)
see the same hidden states as ``[B, H, W, dim]`` (needs ``grid=(H, W)`` with ``H * W == T``), so
hybrids of 1-D and 2-D layers work too.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from ...nn import get_layer, hyper_parameters, layer_class

MixerSpec = Union[str, tuple]


def _spec(m: MixerSpec) -> tuple[str, dict]:
    if isinstance(m, str):
        return m, {}
    if isinstance(m, (tuple, list)) and len(m) == 2 and isinstance(m[0], str) and isinstance(m[1], dict):
        return m[0], dict(m[1])
    raise ValueError(f"mixers: expected a layer name or (name, config dict) per block, got {m!r}")


def build_mixer(name: str, dim: int, heads: int, config: dict, *, causal: bool, index: int, n_layers: int,
                grid: Optional[tuple] = None, max_len: Optional[int] = None,
                prefix_len: Optional[int] = None) -> nn.Module:
    """build_mixer: ``get_layer(name, dim, heads, **config)`` with the harness's conventions:
    ``causal`` is passed when the layer takes it (non-causal tasks use ``causal=False`` where the
    layer supports it, else its causal form), ``layer_index``/``n_layers`` when the layer takes them
    (model-building helpers such as MASFormer), ``grid`` for 2-D layers that take it, ``l_max`` (the
    task's length, Zoology's convention for convolution filters) and ``prefix_len`` (the task's
    context prefix, e.g. MQAR's key-value region, for prefix / encoder-decoder layers such as JRT-RNN)
    when the layer takes them and the config does not set them."""
    hp = hyper_parameters(name)
    cls = layer_class(name)
    cfg = dict(config)
    if "causal" in hp and "causal" not in cfg:
        modes = tuple(getattr(cls, "causal_modes", (True, False)))
        cfg["causal"] = causal if causal in modes else modes[0]
    if "layer_index" in hp and "layer_index" not in cfg:
        cfg["layer_index"] = index
    if "n_layers" in hp and "n_layers" not in cfg:
        cfg["n_layers"] = n_layers
    if "l_max" in hp and "l_max" not in cfg and max_len is not None:
        cfg["l_max"] = max_len
    if "prefix_len" in hp and "prefix_len" not in cfg and prefix_len is not None:
        cfg["prefix_len"] = prefix_len
    return get_layer(name, dim, heads, **cfg)


class Block(nn.Module):
    """Block: ``x + mixer(norm(x))`` and, with ``mlp``, ``x + mlp(norm(x))`` (pre-norm)."""

    def __init__(self, mixer: nn.Module, dim: int, *, mlp: bool, mlp_ratio: int, dropout: float,
                 grid: Optional[tuple]):
        super().__init__()
        self.mixer = mixer
        self.norm1 = nn.LayerNorm(dim)
        self.is_2d = getattr(mixer, "layout", "1d") == "2d"
        if self.is_2d and grid is None:
            raise ValueError(f"grid: layer {getattr(mixer, 'name', mixer)!r} is 2-D and needs the task's image grid")
        self.grid = grid
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, mlp_ratio * dim), nn.GELU(),
                                 nn.Linear(mlp_ratio * dim, dim)) if mlp else None
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        if self.is_2d:
            B, T, D = h.shape
            y = self.mixer(h.reshape(B, self.grid[0], self.grid[1], D)).reshape(B, T, D)
        else:
            y = self.mixer(h)
        x = x + self.drop(y)
        if self.mlp is not None:
            x = x + self.drop(self.mlp(x))
        return x


class LayerModel(nn.Module):
    """LayerModel: a small model around registered layers (module docstring).

    Args:
        mixers: one entry per block, a registered layer name or ``(name, config)``.
        dim, heads: model width and heads of every mixer.
        vocab: input vocabulary (tokens, or 256 pixel levels).
        max_len: positions of the learned positional embedding.
        n_out: output classes (``vocab`` for MQAR's next-token head, 10 for ListOps...).
        causal: the task's direction (passed to layers that take ``causal``).
        mlp, mlp_ratio, dropout: block options (Zoology's MQAR models have no MLP).
        grid: ``(H, W)`` of image tasks (2-D layers).
        layer_config: hyper-parameters applied to every block whose entry is a bare name.
        prefix_len: the task's context prefix (``TaskData.prefix_len``), given to layers taking it.
    """

    def __init__(self, mixers: Sequence[MixerSpec], dim: int, heads: int, *, vocab: int, max_len: int, n_out: int,
                 causal: bool, mlp: bool = True, mlp_ratio: int = 4, dropout: float = 0.0,
                 grid: Optional[tuple] = None, layer_config: Optional[dict] = None,
                 prefix_len: Optional[int] = None):
        super().__init__()
        if not mixers:
            raise ValueError("mixers: expected at least one block")
        specs = [_spec(m) for m in mixers]
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.max_len = max_len
        blocks = []
        for i, (name, cfg) in enumerate(specs):
            cfg = {**(layer_config or {}), **cfg} if isinstance(mixers[i], str) else cfg
            m = build_mixer(name, dim, heads, cfg, causal=causal, index=i, n_layers=len(specs), grid=grid,
                            max_len=max_len, prefix_len=prefix_len)
            blocks.append(Block(m, dim, mlp=mlp, mlp_ratio=mlp_ratio, dropout=dropout, grid=grid))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_out)
        self.drop = nn.Dropout(dropout)

    def mixers(self) -> list[nn.Module]:
        """The blocks' layers, in order."""
        return [b.mixer for b in self.blocks]

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """Final normed hidden states ``[B, T, dim]`` of token ids ``[B, T]``."""
        T = ids.shape[1]
        if T > self.max_len:
            raise ValueError(f"ids: {T} tokens exceed the model's max_len={self.max_len}")
        x = self.drop(self.embed(ids) + self.pos[:T])
        for b in self.blocks:
            x = b(x)
        return self.norm(x)

    def extra_loss(self) -> Optional[torch.Tensor]:
        """Sum of the layers' ``extra_loss()`` of the last forward (None when no layer has one)."""
        out = None
        for m in self.mixers():
            fn = getattr(m, "extra_loss", None)
            e = fn() if fn is not None else None
            if e is not None:
                out = e if out is None else out + e
        return out

    def cost(self, T: int) -> dict:
        """Model attention cost at ``T`` tokens: mean density, summed flops (and the mean of any
        ``train_density`` a layer reports) over the blocks whose layer has ``cost``."""
        dens, tdens, flops = [], [], 0.0
        for m in self.mixers():
            if not hasattr(m, "cost"):
                continue
            c = m.cost(T)
            if c.get("density") is not None:
                dens.append(float(c["density"]))
                tdens.append(float(c.get("train_density", c["density"])))
            flops += float(c.get("flops") or 0.0)
        mean = lambda v: sum(v) / len(v) if v else None  # noqa: E731
        return {"density": mean(dens), "train_density": mean(tdens), "flops": flops}
