"""SeerAttention: a learned AttnGate picks the key blocks of block-sparse prefill attention
(SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs, arXiv 2410.13276).

The gate (one per layer) pools queries (average) and keys (max, min and average, concatenated)
over blocks of 64 tokens, projects them per head to 128 dimensions (``W_q``, ``W_k``; keys per KV
head, shared by the GQA group), applies RoPE at the blocks' first-token positions, and scores key
blocks with ``softmax(q~ k~^T / sqrt(128))`` under the causal block mask. Inference keeps a block
when its probability exceeds ``threshold`` (default 2e-3: the documented default of the
repository's ``seerattn_threshold``; its constructor literally defaults to 0.0 and the README
example uses 5e-4) or, with ``nz_ratio`` set, the top ``k = int((1 - sqrt(1 - nz_ratio)) * nk)``
blocks of every row (the repository's rule; ``nk`` = key blocks), then the causal block mask.
``last_block_dense`` makes the last *two* query-block rows dense, as the repository's
``get_sparse_attn_mask_from_*`` do. The diagonal block is always kept here (the repository does
not force it) so that no query row can end up with no key.

**What is pooled.** The paper's gate (``microsoft/SeerAttention``, ``seer_attn/attn_gate.py`` and
``prefill_sparse/llama/modeling_llama_seerattn.py``) takes the *pre-RoPE* projections
``q_proj(x)``/``k_proj(x)`` and adds its own RoPE at block positions; that is the default here
(``SeerGate.rope_input == "pre"``). The library's integration passes *post-RoPE* q/k to
``select``, so the method takes pre-RoPE tensors from ``ctx.q_pre_rope`` /
``ctx.k_pre_rope`` when an integration supplies them, and otherwise undoes the model's
rotate-half RoPE exactly with the inverse frequencies stored in the gate file (recorded from the
model at training time; queries at positions ``Tk - Tq + i``, keys at ``j``). A gate trained
with ``rope_input="post"`` pools the given q/k directly.

**Key-block overlap (``k_overlap``, a departure from the paper; default 0 = the paper).** With
``k_overlap = o > 0`` the key features of block ``j >= 1`` are max/min/avg-pooled over the keys at
positions ``[j * bs - o, (j + 1) * bs)``: the block together with the last ``o`` tokens of block
``j - 1`` (block 0 and the query features are unchanged; the feature of block ``j`` still reads no key
at or after ``(j + 1) * bs``, so it is causal-safe, and the weight shapes are the same, so a gate can
be fine-tuned from one overlap to another). Why: in issue 21's held-out prose check the gate lost the
needle in heads 7.4-7.7 where the needle sentence is cut by a key-block boundary; the max-pooled part
of the value's block still carries the needle but the min/avg parts of a block that holds only the
value and unrelated text outweigh it, and pooling that block together with the previous block's tail
raised its rank from 45/59/22 to 18/9/7 (docs/results/retrieval_prose_cpu_2026-12-05/ninth_session).
Gates trained with overlap 16 or 32 keep that prompt's readers but lose others at 4K, so the shipped
gate keeps overlap 0 (docs/results/seer_overlap_gpu_2026-12-05).

Gate weights live in a directory: ``gate.safetensors`` + ``config.json`` (model shape, layers,
block size, RoPE data); ``SeerAttention(gate_path=...)`` or ``.load_gate(path)`` loads it, and a
mismatch with the model's shape is refused naming the field. Training: ``sparsattn.train.seer_gate``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from .. import patterns
from ..calibration import read_json, read_safetensors, tensor_field, write_json
from .base import Calibrated, DensityKnob, Method, PresetContext, SelectContext, register

Tensor = torch.Tensor

GATE_FORMAT = "sparsattn.seer_gate"
GATE_VERSION = 1
_TRAIN_HINT = ("train a gate with `sparsattn calibrate seer_attention --model PATH --out seer_gate --minutes M` "
               "(older: python -m sparsattn.train.seer_gate) and pass path='seer_gate' or call "
               "SeerAttention.load('seer_gate')")


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _cos_sin(pos: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    f = pos.float()[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((f, f), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, pos: Tensor, inv_freq: Tensor, *, inverse: bool = False) -> Tensor:
    """Rotate-half RoPE (the HF Llama convention) of ``x [..., T, d]`` at positions ``pos [T]``;
    ``inverse=True`` rotates back (exact inverse)."""
    cos, sin = _cos_sin(pos, inv_freq)
    return x * cos - _rotate_half(x) * sin if inverse else x * cos + _rotate_half(x) * sin


def default_inv_freq(dim: int, theta: float) -> Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)).float()


def _pool_blocks(x: Tensor, bs: int, kinds: Sequence[str], overlap: int = 0) -> Tensor:
    """``x [B, H, T, D]`` -> float32 ``[B, H, ceil(T/bs), D * len(kinds)]`` (partial last block: valid rows only).

    Reduces x in its own dtype (mean accumulated in float32): no float32 or padded copy of x.
    ``overlap = o > 0``: block ``j >= 1`` is pooled together with the last ``o`` rows of block ``j - 1``
    (rows ``[j * bs - o, min((j + 1) * bs, T))``; ``SeerGate``'s ``k_overlap``); 0 is the plain pooling."""
    B, H, T, D = x.shape
    nfull, tail = divmod(T, bs)
    pieces = []
    for xs in (x[:, :, : nfull * bs].reshape(B, H, nfull, bs, D),
               x[:, :, nfull * bs:].reshape(B, H, 1 if tail else 0, tail, D)):
        if xs.shape[2] == 0:
            continue
        # "avg" parts hold float32 sums until the division by the block counts below
        pieces.append(torch.cat([xs.sum(3, dtype=torch.float32) if kind == "avg" else
                                 (xs.amax(3) if kind == "max" else xs.amin(3)).float() for kind in kinds], dim=-1))
    if not pieces:
        return torch.zeros(B, H, 0, D * len(kinds), dtype=torch.float32, device=x.device)
    out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)
    nb = out.shape[2]
    counts = torch.full((nb,), float(bs), device=x.device)
    if tail:
        counts[-1] = float(tail)
    if overlap and nb > 1:  # every block j >= 1 also pools the last `overlap` rows of block j - 1 (a full block)
        prev = x[:, :, : (nb - 1) * bs].reshape(B, H, nb - 1, bs, D)[:, :, :, bs - overlap:]
        for i, kind in enumerate(kinds):
            sl = slice(i * D, (i + 1) * D)
            cur = out[:, :, 1:, sl]
            if kind == "avg":
                out[:, :, 1:, sl] = cur + prev.sum(3, dtype=torch.float32)
            elif kind == "max":
                out[:, :, 1:, sl] = torch.maximum(cur, prev.amax(3).float())
            else:
                out[:, :, 1:, sl] = torch.minimum(cur, prev.amin(3).float())
        counts[1:] += overlap
    for i, kind in enumerate(kinds):
        if kind == "avg":
            out[:, :, :, i * D:(i + 1) * D] /= counts[:, None]
    return out


def check_k_overlap(k_overlap, block_size: int) -> int:
    """``k_overlap`` as an int in ``[0, block_size)``, else ValueError naming ``k_overlap``."""
    if isinstance(k_overlap, bool) or not isinstance(k_overlap, int) or not 0 <= k_overlap < block_size:
        raise ValueError(f"k_overlap: expected an int in [0, {block_size}) (tokens of the previous key block "
                         f"pooled with each block), got {k_overlap!r}")
    return k_overlap


class SeerGate(nn.Module):
    """SeerGate: the AttnGate of every gated layer (SeerAttention, arXiv 2410.13276).

    Gate type ``Qavg_Kmaxminavg``: per layer ``wq [Hq, D, hidden]`` and ``wk [Hkv, 3D, hidden]``.

    Args:
        num_q_heads, num_kv_heads, head_dim: the model's attention shape.
        layers: indices of the gated layers (an int n means ``range(n)``).
        hidden_size: gate width (128). block_size: 64.
        rope_theta: RoPE base of the gate's own block RoPE (the model's base, as the repository).
        rope_input: ``"pre"`` (pool pre-RoPE q/k, the paper) or ``"post"`` (pool q/k as given).
        head_inv_freq: the model's RoPE inverse frequencies ``[head_dim / 2]`` used to undo RoPE
            on post-RoPE inputs (default: from ``rope_theta``).
        model_info: free-form JSON-able dict saved with the gate (model path, training data...).
        k_overlap: tokens of the previous key block pooled with each key block (0 = the paper; an int in
            ``[0, block_size)``; a departure from the paper, see the module docstring).
    """

    def __init__(self, num_q_heads: int, num_kv_heads: int, head_dim: int, layers=1, *, hidden_size: int = 128,
                 block_size: int = 64, rope_theta: float = 10000.0, rope_input: str = "pre",
                 head_inv_freq: Optional[Tensor] = None, model_info: Optional[dict] = None, seed: Optional[int] = None,
                 k_overlap: int = 0):
        super().__init__()
        for name, v in (("num_q_heads", num_q_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                        ("hidden_size", hidden_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        if num_q_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads: expected a divisor of num_q_heads={num_q_heads}, got {num_kv_heads}")
        if head_dim % 2 or hidden_size % 2:
            raise ValueError(f"head_dim/hidden_size: expected even values (RoPE), got {head_dim}, {hidden_size}")
        if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size: expected a power of two >= 16, got {block_size!r}")
        if rope_input not in ("pre", "post"):
            raise ValueError(f"rope_input: expected 'pre' or 'post', got {rope_input!r}")
        self.k_overlap = check_k_overlap(k_overlap, block_size)
        if not (isinstance(rope_theta, (int, float)) and rope_theta > 0):
            raise ValueError(f"rope_theta: expected a positive number, got {rope_theta!r}")
        layers = list(range(layers)) if isinstance(layers, int) else [int(x) for x in layers]
        if not layers or len(set(layers)) != len(layers) or min(layers) < 0:
            raise ValueError(f"layers: expected distinct layer indices >= 0, got {layers}")
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.hidden_size, self.block_size = hidden_size, block_size
        self.rope_theta, self.rope_input = float(rope_theta), rope_input
        self.layers = layers
        self.model_info = dict(model_info or {})
        if head_inv_freq is None:
            head_inv_freq = default_inv_freq(head_dim, self.rope_theta)
        if tuple(head_inv_freq.shape) != (head_dim // 2,):
            raise ValueError(f"head_inv_freq: expected shape ({head_dim // 2},), got {tuple(head_inv_freq.shape)}")
        self.register_buffer("head_inv_freq", head_inv_freq.float().clone())
        self.register_buffer("gate_inv_freq", default_inv_freq(hidden_size, self.rope_theta))
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        self.wq = nn.ParameterDict()
        self.wk = nn.ParameterDict()
        for layer in layers:
            self.wq[str(layer)] = nn.Parameter(torch.randn(num_q_heads, head_dim, hidden_size, generator=gen)
                                               / math.sqrt(head_dim))
            self.wk[str(layer)] = nn.Parameter(torch.randn(num_kv_heads, 3 * head_dim, hidden_size, generator=gen)
                                               / math.sqrt(3 * head_dim))

    # -- config / files ---------------------------------------------------------------------------
    def config(self) -> dict:
        return {"format": GATE_FORMAT, "version": GATE_VERSION, "gate_type": "Qavg_Kmaxminavg",
                "num_q_heads": self.num_q_heads, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
                "layers": self.layers, "hidden_size": self.hidden_size, "block_size": self.block_size,
                "rope_theta": self.rope_theta, "rope_input": self.rope_input, "k_overlap": self.k_overlap,
                "model_info": self.model_info}

    def save(self, path, *, dtype: torch.dtype = torch.float32) -> Path:
        """Write ``path/gate.safetensors`` and ``path/config.json``; returns the directory.

        ``dtype`` stores the weights in float32 (default), bfloat16 or float16 (half the bytes; the
        gate is loaded back into float32 either way). The RoPE frequencies stay float32."""
        from safetensors.torch import save_file

        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype: expected torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {f"wq.{k}": v.detach().to(dtype).cpu().contiguous() for k, v in self.wq.items()}
        tensors.update({f"wk.{k}": v.detach().to(dtype).cpu().contiguous() for k, v in self.wk.items()})
        tensors["head_inv_freq"] = self.head_inv_freq.detach().float().cpu().contiguous()
        save_file(tensors, str(path / "gate.safetensors"))
        write_json(path / "config.json", self.config(), indent=2)
        return path

    @classmethod
    def load(cls, path, *, expect: Optional[dict] = None) -> "SeerGate":
        """Load a gate directory; ``expect`` (e.g. ``{"num_q_heads": 32, "head_dim": 128}``) must match
        the saved config, else ValueError naming the field. Both files go through
        ``sparsattn.calibration``'s checked readers: a missing, truncated or binary ``config.json``, a
        missing or mistyped field, a corrupt ``gate.safetensors`` or a missing / misshapen / non-finite
        tensor raise ValueError naming the file and the field."""
        path = Path(path)
        cfg_file, w_file = path / "config.json", path / "gate.safetensors"
        if not path.is_dir():
            raise ValueError(f"gate_path: gate directory {str(path)!r} does not exist (expected a directory with "
                             "config.json and gate.safetensors)" if not path.exists() else
                             f"gate_path: expected a directory with config.json and gate.safetensors, got the file "
                             f"{str(path)!r}")
        missing = [f.name for f in (cfg_file, w_file) if not f.is_file()]
        if missing:
            raise ValueError(f"gate_path: {' and '.join(str(path / m) for m in missing)} does not exist (a gate "
                             "directory holds config.json and gate.safetensors)")
        cfg = read_json(cfg_file, arg="gate_path", kind="gate config.json")
        fmt, ver = cfg.get("format"), cfg.get("version")
        if fmt is None or fmt.value != GATE_FORMAT or ver is None or ver.value != GATE_VERSION:
            raise ValueError(f"gate_path: {cfg_file} is not a {GATE_FORMAT} v{GATE_VERSION} file "
                             f"(format={None if fmt is None else fmt.value!r}, "
                             f"version={None if ver is None else ver.value!r})")
        cfg["gate_type"].as_str(["Qavg_Kmaxminavg"])
        ints = {name: cfg[name].as_int(1) for name in ("num_q_heads", "num_kv_heads", "head_dim", "hidden_size")}
        if ints["num_q_heads"] % ints["num_kv_heads"]:
            raise cfg["num_kv_heads"].error(f"a divisor of num_q_heads={ints['num_q_heads']}")
        for name in ("head_dim", "hidden_size"):
            if ints[name] % 2:
                raise cfg[name].error("an even integer (RoPE)")
        block_size = cfg["block_size"].as_int(16)
        if block_size & (block_size - 1):
            raise cfg["block_size"].error("a power of two >= 16")
        layers = cfg["layers"].int_list(0)
        if not layers or len(set(layers)) != len(layers):
            raise cfg["layers"].error("a non-empty list of distinct layer indices >= 0")
        rope_theta = cfg["rope_theta"].as_float(0.0, lo_open=True)
        rope_input = cfg["rope_input"].as_str(["pre", "post"])
        k_overlap = cfg["k_overlap"].as_int(0, block_size - 1) if "k_overlap" in cfg else 0  # older files: 0
        info = cfg.get("model_info")
        model_info = None if info is None else {k: f.plain() for k, f in info.as_dict().items()}
        for key, want in (expect or {}).items():
            if key in cfg and cfg[key].value != want:
                raise ValueError(f"{key}: the gate in {str(path)!r} was trained for {key}={cfg[key].value!r}, "
                                 f"the model has {want!r}")
        t = read_safetensors(w_file, arg="gate_path")
        wf = str(w_file)
        inv = tensor_field(t, "head_inv_freq", wf, (ints["head_dim"] // 2,))
        gate = cls(ints["num_q_heads"], ints["num_kv_heads"], ints["head_dim"], layers,
                   hidden_size=ints["hidden_size"], block_size=block_size, rope_theta=rope_theta,
                   rope_input=rope_input, head_inv_freq=inv, model_info=model_info, k_overlap=k_overlap)
        with torch.no_grad():
            for layer in gate.layers:
                for name, store in (("wq", gate.wq), ("wk", gate.wk)):
                    key = f"{name}.{layer}"
                    store[str(layer)].copy_(tensor_field(t, key, wf, tuple(store[str(layer)].shape)))
        return gate

    def check_shape(self, q: Tensor, k: Tensor) -> None:
        """Refuse q/k whose heads or head_dim differ from the gate's, naming the field."""
        if q.shape[1] != self.num_q_heads:
            raise ValueError(f"num_q_heads: the gate was trained for {self.num_q_heads} query heads, q has {q.shape[1]}")
        if k.shape[1] != self.num_kv_heads:
            raise ValueError(f"num_kv_heads: the gate was trained for {self.num_kv_heads} KV heads, k has {k.shape[1]}")
        if q.shape[3] != self.head_dim:
            raise ValueError(f"head_dim: the gate was trained for head_dim {self.head_dim}, q has {q.shape[3]}")

    # -- forward ----------------------------------------------------------------------------------
    def gate_inputs(self, q: Tensor, k: Tensor, extras: Optional[dict] = None) -> tuple[Tensor, Tensor]:
        """The q/k the gate pools: pre-RoPE (from ``extras`` or by undoing RoPE) or as given."""
        if self.rope_input == "post":
            return q, k
        extras = extras or {}
        if extras.get("q_pre_rope") is not None and extras.get("k_pre_rope") is not None:
            qp, kp = extras["q_pre_rope"], extras["k_pre_rope"]
            if qp.shape != q.shape or kp.shape != k.shape:
                raise ValueError(f"ctx.extras['q_pre_rope'/'k_pre_rope']: expected shapes {tuple(q.shape)} and "
                                 f"{tuple(k.shape)}, got {tuple(qp.shape)} and {tuple(kp.shape)}")
            return qp, kp
        Tq, Tk = q.shape[2], k.shape[2]
        inv = self.head_inv_freq.to(q.device)
        qpos = torch.arange(Tk - Tq, Tk, device=q.device)
        kpos = torch.arange(Tk, device=q.device)
        return apply_rope(q.float(), qpos, inv, inverse=True), apply_rope(k.float(), kpos, inv, inverse=True)

    def pool(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """The gate's block features of its inputs: float32 ``(q_avg [B, Hq, nq, D], k_maxminavg
        [B, Hkv, nk, 3D])`` (``_pool_blocks``; key blocks with the previous block's last ``k_overlap``
        tokens); ``scores_pooled`` of them equals ``scores``."""
        self.check_shape(q, k)
        bs = self.block_size
        return _pool_blocks(q, bs, ("avg",)), _pool_blocks(k, bs, ("max", "min", "avg"), self.k_overlap)

    def scores(self, layer: int, q: Tensor, k: Tensor, *, causal: bool = True) -> Tensor:
        """Gate logits float32 ``[B, Hq, nq, nk]`` for the gate inputs ``q [B, Hq, Tq, D]``,
        ``k [B, Hkv, Tk, D]``; blocks entirely above the (bottom-right) diagonal are ``-inf``."""
        if str(layer) not in self.wq:
            raise ValueError(f"layer: the gate has no weights for layer {layer} (gated layers: {self.layers})")
        qpool, kpool = self.pool(q, k)
        return self.scores_pooled(layer, qpool, kpool, q.shape[2], k.shape[2], causal=causal)

    def scores_pooled(self, layer: int, qpool: Tensor, kpool: Tensor, Tq: int, Tk: int, *,
                      causal: bool = True) -> Tensor:
        """Gate logits from block features (``pool``): ``qpool [B, Hq, ceil(Tq/bs), D]``, ``kpool
        [B, Hkv, ceil(Tk/bs), 3D]`` of ``Tq`` query and ``Tk`` key tokens -> float32 ``[B, Hq, nq, nk]``
        (what the training cache stores: the pooled features are fixed functions of the frozen model)."""
        key = str(layer)
        if key not in self.wq:
            raise ValueError(f"layer: the gate has no weights for layer {layer} (gated layers: {self.layers})")
        bs = self.block_size
        if qpool.shape[2] != -(-Tq // bs) or kpool.shape[2] != -(-Tk // bs):
            raise ValueError(f"qpool/kpool: expected {-(-Tq // bs)} query and {-(-Tk // bs)} key blocks "
                             f"(Tq={Tq}, Tk={Tk}), got {qpool.shape[2]} and {kpool.shape[2]}")
        wq, wk = self.wq[key], self.wk[key]
        qp = torch.einsum("bhnd,hde->bhne", qpool.to(wq.dtype), wq)
        kp = torch.einsum("bhnd,hde->bhne", kpool.to(wk.dtype), wk)
        nq, nk = qp.shape[2], kp.shape[2]
        off = Tk - Tq
        dev = qpool.device
        inv = self.gate_inv_freq.to(dev)
        qpos = off + torch.arange(nq, device=dev) * bs
        kpos = torch.arange(nk, device=dev) * bs
        qp = apply_rope(qp, qpos, inv)
        kp = apply_rope(kp, kpos, inv).repeat_interleave(self.num_q_heads // self.num_kv_heads, dim=1)
        s = torch.matmul(qp, kp.transpose(-1, -2)) / math.sqrt(self.hidden_size)
        if causal:
            s = s.masked_fill(~causal_block_mask(Tq, Tk, bs, dev), float("-inf"))
        return s.float()


def nz_topk(nz_ratio: float, n_kv_blocks: int) -> int:
    """Blocks per row in top-k mode: ``max(1, int((1 - sqrt(1 - nz_ratio)) * n_kv_blocks))`` (the repository's rule)."""
    return max(1, int((1.0 - math.sqrt(1.0 - nz_ratio)) * n_kv_blocks))


def causal_block_mask(Tq: int, Tk: int, bs: int, device=None) -> Tensor:
    """bool ``[nq, nk]``: key blocks holding at least one key at or below the diagonal of the block."""
    nq, nk = -(-Tq // bs), -(-Tk // bs)
    last_row = torch.clamp((torch.arange(nq, device=device) + 1) * bs, max=Tq) - 1
    return (torch.arange(nk, device=device)[None, :] * bs) <= (last_row + Tk - Tq)[:, None]


def diagonal_block_mask(Tq: int, Tk: int, bs: int, device=None) -> Tensor:
    """bool ``[nq, nk]``: key blocks crossing the diagonal of each query block (always kept)."""
    nq, nk = -(-Tq // bs), -(-Tk // bs)
    r0 = torch.arange(nq, device=device) * bs + Tk - Tq
    r1 = torch.clamp((torch.arange(nq, device=device) + 1) * bs, max=Tq) - 1 + Tk - Tq
    c0 = torch.arange(nk, device=device) * bs
    c1 = torch.clamp(c0 + bs, max=Tk) - 1
    return (c0[None, :] <= r1[:, None]) & (c1[None, :] >= r0[:, None])


@register("seer_attention")
@dataclass
class SeerAttention(Calibrated, Method):
    """SeerAttention: learned AttnGate -> block-sparse prefill (arXiv 2410.13276).

    Args:
        threshold: keep blocks whose gate probability exceeds it (default 2e-3, ``seerattn_threshold``).
        nz_ratio: if set (0 < r <= 1), top-k mode instead: ``int((1 - sqrt(1 - r)) * nk)`` blocks per row.
        topk_rule: how top-k mode sizes a row: ``"constant"`` (the repository's rule above: the same
            ``k`` for every query-block row, so the last rows of a long prompt keep the smallest share
            of their keys) or ``"row"`` (a departure: each row keeps ``ceil(r * its causal blocks)``,
            the same share of every row; ``r`` is then the density of the row).
        last_block_dense: the last two query-block rows keep every causal block (True).
        gate_path: deprecated alias of ``path`` (kept for older code; mirrors ``path``).
        path: directory of a trained gate (``save`` / ``SeerGate.save``; trained by
            ``sparsattn calibrate seer_attention``); None = load later.
    Needs a trained gate (``needs = ("gate",)``); ``select`` raises ValueError until it has one.
    """

    paper = "SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs (arXiv 2410.13276)"
    phase = "prefill"
    trainable = True
    needs = ("gate",)

    threshold: float = 2e-3
    nz_ratio: Optional[float] = None
    topk_rule: str = "constant"
    last_block_dense: bool = True
    gate_path: Optional[str] = None
    path: Optional[str] = None
    _gate: Optional[SeerGate] = field(default=None, repr=False, compare=False)
    calibration_kind = "directory"
    @classmethod
    def density_knob(cls, T: int, target: float, ctx: PresetContext) -> DensityKnob:
        """Preset: the gate ``ctx.calibration("seer_attention")``, top-k mode, last_block_dense=False;
        knob nz_ratio (guess 1 - (1 - target / 2)^2)."""
        gate = ctx.calibration(cls.name)
        if gate is None:
            raise ValueError("seer_gate: expected the SeerAttention gate directory, got None")
        return DensityKnob(cls.name, "nz_ratio", 1e-3, 1.0, False, True, 1.0 - (1.0 - target / 2) ** 2,
                           lambda x: dict(gate_path=gate, nz_ratio=round(float(x), 5), last_block_dense=False),
                           lambda x: f"nz{float(x):.3f}")

    @classmethod
    def density_variants(cls, T: int, target: float, ctx: PresetContext) -> dict:
        """Preset: ``threshold``: the gate ``ctx.calibration("seer_attention")`` in threshold mode (the
        paper's default mode), ``last_block_dense=False``; knob the threshold in [1e-4, 0.3] (density
        decreasing in it; guess 4e-3 / target, 0.03 at 12%). ``row``: top-k mode with
        ``topk_rule="row"`` (every row keeps the same share of its causal blocks); knob nz_ratio."""
        gate = ctx.calibration(cls.name)
        if gate is None:
            raise ValueError("seer_gate: expected the SeerAttention gate directory, got None")
        return {"threshold": DensityKnob(cls.name, "threshold", 1e-4, 0.3, False, False, min(0.3, 4e-3 / target),
                                         lambda x: dict(gate_path=gate, threshold=float(f"{float(x):.4g}"),
                                                        last_block_dense=False),
                                         lambda x: f"thr{float(x):.3g}"),
                "row": DensityKnob(cls.name, "nz_ratio", 1e-3, 1.0, False, True, target,
                                   lambda x: dict(gate_path=gate, nz_ratio=round(float(x), 5), topk_rule="row",
                                                  last_block_dense=False),
                                   lambda x: f"row{float(x):.3f}")}


    def __post_init__(self):
        if not isinstance(self.threshold, (int, float)) or not (0.0 <= self.threshold < 1.0):
            raise ValueError(f"threshold: expected a float in [0, 1), got {self.threshold!r}")
        if self.nz_ratio is not None and (not isinstance(self.nz_ratio, (int, float)) or not (0 < self.nz_ratio <= 1)):
            raise ValueError(f"nz_ratio: expected None or a float in (0, 1], got {self.nz_ratio!r}")
        if not isinstance(self.last_block_dense, bool):
            raise ValueError(f"last_block_dense: expected a bool, got {self.last_block_dense!r}")
        if self.topk_rule not in ("constant", "row"):
            raise ValueError(f"topk_rule: expected 'constant' or 'row', got {self.topk_rule!r}")
        if self.gate_path is not None:
            if self.path is not None and self.path != self.gate_path:
                raise ValueError(f"gate_path/path: gate_path is a deprecated alias of path; got both "
                                 f"({self.gate_path!r} and {self.path!r})")
            self.path = self.gate_path
        self._load_path()

    # -- fitting ----------------------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return self._gate is not None

    @property
    def gate(self) -> SeerGate:
        if self._gate is None:
            raise ValueError(f"seer_attention: no trained AttnGate loaded; {_TRAIN_HINT}")
        return self._gate

    def load_gate(self, path, *, expect: Optional[dict] = None) -> "SeerAttention":
        """Deprecated alias of ``load`` on an instance (``expect``: gate config values to check)."""
        return self.load(path, expect_shape=expect)

    def _read_calibration(self, path: str, *, expect_shape=None) -> None:
        """Read a gate directory (``config.json`` + ``gate.safetensors``) through ``SeerGate.load``;
        ``expect_shape``: a dict of gate config values it must record (``SeerGate.load``'s ``expect``)."""
        self._gate = SeerGate.load(path, expect=expect_shape)
        self.gate_path = path

    @classmethod
    def fit(cls, data, *, path: Optional[str] = None, **config) -> "SeerAttention":
        """fit: an instance using the trained gate ``data`` (a ``SeerGate``), saved to ``path`` when given.
        Training the gate on a model's q/k is model-level: ``sparsattn.calibrate.seer_attention``."""
        if not isinstance(data, SeerGate):
            raise ValueError(f"data: expected a trained SeerGate (train one with `sparsattn calibrate "
                             f"seer_attention`), got {type(data).__name__}")
        inst = cls(**config).set_gate(data)
        if path is not None:
            inst.path = inst.gate_path = inst.save(path)
        return inst

    def save(self, path) -> str:
        """save: write the gate directory (``config.json`` + ``gate.safetensors``); returns its path."""
        return str(self.gate.save(path))

    @classmethod
    def random_calibration(cls, path, *, q_heads: int, kv_heads: int, head_dim: int, layers: int = 1,
                           seed: int = 0) -> str:
        """Preset: a randomly initialised gate on post-RoPE inputs (costs the same as a trained one)."""
        return str(SeerGate(q_heads, kv_heads, head_dim, layers, rope_input="post", seed=seed).save(path))

    def set_gate(self, gate: SeerGate) -> "SeerAttention":
        if not isinstance(gate, SeerGate):
            raise ValueError(f"gate: expected a SeerGate, got {type(gate).__name__}")
        self._gate = gate
        return self

    @property
    def needs_pre_rope(self) -> bool:
        """Asks the HF integration for pre-RoPE q/k in ``ctx.q_pre_rope`` / ``ctx.k_pre_rope`` (gates trained on pre-RoPE inputs)."""
        return self._gate is None or self._gate.rope_input == "pre"

    # -- selection --------------------------------------------------------------------------------
    def block_probs(self, q: Tensor, k: Tensor, ctx: Optional[SelectContext] = None) -> Tensor:
        """Gate probabilities float32 ``[B, Hq, nq, nk]`` (rows sum to 1 over causal blocks)."""
        return torch.softmax(self.block_logits(q, k, ctx), dim=-1)

    def block_logits(self, q: Tensor, k: Tensor, ctx: Optional[SelectContext] = None) -> Tensor:
        """Gate logits float32 ``[B, Hq, nq, nk]`` (``-inf`` above the causal diagonal)."""
        ctx = ctx or SelectContext()
        gate = self.gate
        layer = ctx.layer
        if layer is None:
            if len(gate.layers) != 1:
                raise ValueError(f"ctx.layer: expected a layer index (the gate covers layers {gate.layers}), got None")
            layer = gate.layers[0]
        gate.check_shape(q, k)
        if gate.head_inv_freq.device != q.device:
            gate.to(q.device)
        with torch.no_grad():
            qi, ki = gate.gate_inputs(q, k, ctx.extras)
            return gate.scores(layer, qi, ki, causal=ctx.causal)

    def select(self, q: Tensor, k: Tensor, ctx: Optional[SelectContext] = None):
        ctx = ctx or SelectContext()
        if q.dim() != 4 or k.dim() != 4:
            raise ValueError(f"q/k: expected 4-D tensors [batch, heads, tokens, head_dim], got {tuple(q.shape)}, {tuple(k.shape)}")
        if k.shape[2] < q.shape[2]:
            raise ValueError(f"k tokens: expected >= q tokens ({q.shape[2]}), got {k.shape[2]}")
        Tq, Tk = q.shape[2], k.shape[2]
        bs = self.gate.block_size
        if ctx.causal:
            allowed = causal_block_mask(Tq, Tk, bs, q.device)
        else:
            allowed = torch.ones(-(-Tq // bs), -(-Tk // bs), dtype=torch.bool, device=q.device)
        diag = diagonal_block_mask(Tq, Tk, bs, q.device)
        if self.nz_ratio is None:
            keep = self.block_probs(q, k, ctx) > self.threshold
        else:
            # top-k of the logits = top-k of the probabilities (softmax is monotonic), scattered into
            # the block mask: no softmax and no full sort of the [nq, nk] scores
            logits = self.block_logits(q, k, ctx)
            keep = torch.zeros(logits.shape, dtype=torch.bool, device=q.device)
            if self.topk_rule == "constant":
                kk = min(nz_topk(self.nz_ratio, logits.shape[-1]), logits.shape[-1])
                keep.scatter_(-1, torch.topk(logits.masked_fill_(~allowed, float("-inf")), kk, dim=-1).indices, True)
            else:  # "row": ceil(r * causal blocks) of each row, ranks beyond a row's own k dropped
                k_row = torch.ceil(self.nz_ratio * allowed.sum(-1).double()).clamp_min(1).long()  # [nq]
                kk = int(k_row.max())
                top = torch.topk(logits.masked_fill_(~allowed, float("-inf")), kk, dim=-1).indices
                take = torch.arange(kk, device=q.device)[None, :] < k_row[:, None]  # [nq, kk]
                keep.scatter_(-1, top, take.expand_as(top))
        keep = (keep | diag) & allowed
        if self.last_block_dense:
            keep[:, :, -2:, :] = allowed[-2:]
        return patterns.from_block_mask(keep, block_size=bs, q_len=Tq, kv_len=Tk, causal=ctx.causal)
