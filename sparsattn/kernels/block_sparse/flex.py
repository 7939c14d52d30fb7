"""FlexAttention backend: a BlockPattern run by compiled ``flex_attention`` on CUDA and on the CPU
(FlexAttention, Dong et al., "Flex Attention: A Programming Model for Generating Optimized Attention
Kernels", arXiv 2412.05496).

Serves as a second backend on CUDA (and the baseline the Triton kernel is measured against), and
as the fast CPU backend: ``torch.compile(flex_attention)`` generates a C++ kernel for the CPU that
skips the blocks a ``BlockMask`` leaves out, so its time follows the density (the plain-torch
reference does not, and dense SDPA computes every causal pair).

How a pattern becomes a ``BlockMask`` (``block_mask``, cached on the pattern per (batch, heads)):
the block lists are FlexAttention's own (``kv_num_blocks/kv_indices`` = partial blocks,
``full_kv_*`` = full blocks), widened to the number of key blocks and expanded to the query heads
(a pattern per KV head serves its GQA group). Partial blocks are masked by ONE ``mask_mod``
function for every pattern: a dense table of tile ids per (batch, head, query block, key block)
looks the element up in the pattern's tile bank (an all-true tile for blocks without a tile and
full blocks, an all-false tile for blocks not listed, padded to a power of two of tiles), ANDed with the causal diagonal at an offset held in a
tensor. The tensors are graph inputs, so patterns of the same shape reuse one compiled kernel
(FlexAttention recompiles for every new ``mask_mod`` function object; see docs/PERF notes).

``softcap`` (Gemma 2) is a ``score_mod`` (``cap * tanh(score / cap)`` on the scaled score; the cap
is a tensor, one compiled kernel for any value). ``sinks`` (gpt-oss) need the log-sum-exp:
``out * sigmoid(lse - sink)`` and ``lse' = logaddexp(lse, sink)``; on CUDA only (the CPU kernel of
torch 2.11-2.13 has no ``return_lse``, see ``flex_can_run`` in ``kernels.backends``).

On the CPU, compiled Flex runs inference only (no autograd), float32, without ``return_lse``;
every new input shape compiles once (tens of seconds on 2 cores; Inductor caches it on disk for
later processes), so ``kernels.backends`` chooses it automatically only from
``CPU_MIN_Q_LEN`` query tokens and refuses it after ``CPU_MAX_SHAPES`` distinct shapes in a process.
To share compiles, causal inputs are padded at the end to a multiple of ``CPU_PAD_TO`` tokens
(``cpu_pad``) and tile banks have at least ``MIN_BANK`` tiles.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ...patterns import BlockPattern

#: the CPU rule of the backend table (``kernels.backends.flex_can_run``): Flex is chosen automatically
#: on the CPU from this many query tokens (below, its per-shape compile and fixed cost do not pay;
#: measured in docs/results/cpu_flex_2026-12-05, see docs/kernels.md)
CPU_MIN_Q_LEN = 2048
#: distinct input shapes compiled for the CPU in one process before Flex is refused (Dynamo's
#: recompile limit is 8 per function; past it Flex would run unfused and materialise T x T scores)
CPU_MAX_SHAPES = 6

#: on the CPU, causal inputs are padded at the end to a multiple of this many tokens (rows and keys
#: alike, so the causal offset is kept; the padded rows are dropped), so that prompts of nearby
#: lengths share one compiled kernel instead of compiling one each
CPU_PAD_TO = 1024
#: the smallest tile bank (tiles of the pattern + all-true + all-false, padded): most patterns then
#: have the same bank shape, hence one compile per input shape for every method
MIN_BANK = 8

_COMPILED: dict = {}
_CPU_SHAPES: set = set()
_CPU_BROKEN: dict = {}


def compiled_flex():
    """The process-wide ``torch.compile``d ``flex_attention`` (built on first use; shapes are static)."""
    if "fn" not in _COMPILED:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED["fn"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["fn"]


def cpu_pad(pattern: BlockPattern) -> int:
    """Tokens appended to q and k/v on the CPU: up to a multiple of ``CPU_PAD_TO`` for causal patterns
    (appended rows and keys never reach a real row: key ``j`` is read by row ``i`` only when
    ``j <= i + kv_len - q_len``), none for other patterns."""
    if not pattern.causal:
        return 0
    return -pattern.q_len % CPU_PAD_TO


def cpu_shape_key(q: torch.Tensor, k: torch.Tensor, pattern: BlockPattern, softcap: bool) -> tuple:
    """The key under which compiled Flex specialises a CPU call (one compile per distinct key)."""
    pad = cpu_pad(pattern)
    return (q.shape[0], q.shape[1], q.shape[2] + pad, q.shape[3], k.shape[1], k.shape[2] + pad, q.dtype,
            pattern.block_q, pattern.block_k, pattern.batch, _bank_size(pattern), bool(softcap))


def cpu_shapes_left() -> int:
    """How many more distinct input shapes may be compiled for the CPU in this process."""
    return CPU_MAX_SHAPES - len(_CPU_SHAPES)


def cpu_shape_known(key: tuple) -> bool:
    """Whether a CPU shape key was compiled already in this process."""
    return key in _CPU_SHAPES


def _bank_size(p: BlockPattern) -> int:
    """Tiles in the Flex tile bank: the pattern's tiles + an all-true and an all-false tile, padded to a
    power of two (all-false) so that patterns of one shape share a compiled kernel."""
    n = (0 if p.mask_bank is None else p.mask_bank.shape[0]) + 2
    return max(MIN_BANK, 1 << max(0, (n - 1).bit_length()))


def _mask_mod(ids: torch.Tensor, bank: torch.Tensor, off: torch.Tensor, bq: int, bk: int):
    """The one element mask of partial blocks: tile lookup AND the causal diagonal (offset ``off``).
    ``ids [B|1, H, nq, nk]`` (int32), ``bank [n, bq, bk]`` (bool), ``off`` a 0-d int tensor."""
    single_b = ids.shape[0] == 1

    def mask_mod(b, h, q_idx, kv_idx):
        t = ids[0 if single_b else b, h, q_idx // bq, kv_idx // bk]
        return bank[t, q_idx % bq, kv_idx % bk] & (kv_idx <= q_idx + off)

    return mask_mod


def _expand_heads(t: torch.Tensor, H: int) -> torch.Tensor:
    h = t.shape[1]
    if h == H:
        return t.contiguous()
    if h == 1:
        return t.expand(t.shape[0], H, *t.shape[2:]).contiguous()
    return t.repeat_interleave(H // h, dim=1).contiguous()


def _build_block_mask(p: BlockPattern, n_heads: int, pad: int = 0):
    from torch.nn.attention.flex_attention import BlockMask

    if p.columns is not None:
        raise ValueError("pattern.columns: a FlexAttention BlockMask has no column path; "
                         "use the triton or reference backend for patterns with columns")
    if pad and not p.causal:
        raise ValueError(f"pad: only causal patterns are padded, got pad={pad} for a non-causal pattern")
    bq, bk = p.block_q, p.block_k
    nq, nk = -(-(p.q_len + pad) // bq), -(-(p.kv_len + pad) // bk)  # blocks of the padded lengths
    dev = p.device
    n_tiles = _bank_size(p)
    n_own = 0 if p.mask_bank is None else p.mask_bank.shape[0]
    ones = torch.ones(1, bq, bk, dtype=torch.bool, device=dev)
    zeros = torch.zeros(n_tiles - n_own - 1, bq, bk, dtype=torch.bool, device=dev)
    # bank = [pattern tiles..., all-true, all-false...]: listed blocks without a tile (and full blocks)
    # read the all-true tile, blocks not listed an all-false one (the compiled kernel skips them; the
    # eager path evaluates mask_mod everywhere, so they must read False)
    bank = torch.cat(([p.mask_bank.to(torch.bool)] if p.mask_bank is not None else []) + [ones, zeros])
    state, ids = p._tiles_dense()
    ids = torch.where(ids < 0, n_own, ids)
    ids = torch.where(state == 2, n_own, ids)
    ids = torch.where(state == 0, n_own + 1, ids).to(torch.int32)
    ids = torch.nn.functional.pad(ids, (0, nk - ids.shape[-1], 0, nq - ids.shape[-2]), value=n_own + 1)
    ids = _expand_heads(ids, n_heads)
    # causal: keys up to q + (kv_len - q_len); otherwise an offset no key exceeds
    off = torch.tensor(p.kv_len - p.q_len if p.causal else p.kv_len, dtype=torch.int32, device=dev)

    def widen(t):  # Flex expects index lists as wide as the number of key blocks (and appended query blocks)
        t = torch.nn.functional.pad(t, (0, nk - t.shape[-1])) if t.shape[-1] < nk else t[..., :nk]
        return _expand_heads(torch.nn.functional.pad(t, (0, 0, 0, nq - t.shape[-2])), n_heads)

    def counts(t):  # appended query blocks compute nothing
        return _expand_heads(torch.nn.functional.pad(t, (0, nq - t.shape[-1])), n_heads)

    return BlockMask.from_kv_blocks(
        counts(p.kv_num_blocks), widen(p.kv_indices), counts(p.full_kv_num_blocks), widen(p.full_kv_indices),
        BLOCK_SIZE=(bq, bk), mask_mod=_mask_mod(ids, bank, off, bq, bk),
        seq_lengths=(p.q_len + pad, p.kv_len + pad))


def block_mask(pattern: BlockPattern, n_heads: int, pad: int = 0):
    """block_mask: the FlexAttention ``BlockMask`` of ``pattern`` for ``n_heads`` query heads, for q and
    k/v with ``pad`` tokens appended (causal patterns only; see ``cpu_pad``), cached on the pattern.
    Raises ValueError for a pattern with columns (no column path in Flex)."""
    if pattern.heads not in (1, n_heads) and n_heads % pattern.heads:
        raise ValueError(f"pattern heads: expected 1 or a divisor of {n_heads}, got {pattern.heads}")
    return pattern.derived(f"flex_block_mask_h{n_heads}_p{pad}", lambda: _build_block_mask(pattern, n_heads, pad))


def _softcap_mod(cap: torch.Tensor):
    def score_mod(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    return score_mod


def flex_block_sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockPattern, *,
                      scale: Optional[float] = None, softcap: Optional[float] = None,
                      sinks: Optional[torch.Tensor] = None, need_lse: bool = True):
    """flex_block_sparse: attention on ``pattern`` via compiled FlexAttention; returns (out, lse).

    q ``[B, Hq, Tq, D]``, k/v ``[B, Hkv, Tk, D]`` (GQA by ``enable_gqa``). ``lse`` is the natural
    log-sum-exp (float32; ``-inf`` for rows with no key, where ``out`` is 0), or None on the CPU,
    whose compiled kernel returns none (``need_lse=True`` there raises ValueError). ``softcap``:
    ``cap * tanh(score / cap)`` on the scaled scores; ``sinks [Hq]``: learned sink logits (CUDA).
    """
    cpu = q.device.type == "cpu"
    if cpu:
        if need_lse:
            raise ValueError("return_lse: compiled FlexAttention on the CPU returns no log-sum-exp; "
                             "use backend='reference' for the lse on the CPU")
        if sinks is not None:
            raise ValueError("sinks: the flex backend needs the log-sum-exp for learned sinks, which compiled "
                             "FlexAttention on the CPU does not return; use backend='reference'")
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            raise ValueError("q/k/v: compiled FlexAttention on the CPU runs inference only (no backward); "
                             "use backend='reference' or torch.no_grad()")
    pad = cpu_pad(pattern) if cpu else 0
    bm = block_mask(pattern, q.shape[1], pad)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    gqa = q.shape[1] != k.shape[1]
    kw = dict(block_mask=bm, scale=scale, enable_gqa=gqa)
    if softcap is not None:
        kw["score_mod"] = _softcap_mod(torch.tensor(float(softcap), dtype=torch.float32, device=q.device))
    if cpu:
        _CPU_SHAPES.add(cpu_shape_key(q, k, pattern, softcap is not None))
        Tq = q.shape[2]
        # contiguous, padded copies: Dynamo specialises on strides, and the attention modules hand over
        # transposed views -- without the copy the first call from a model recompiles (tens of seconds)
        q0, k0, v0 = q, k, v
        if pad:
            q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        else:
            q, k, v = (t.contiguous() for t in (q, k, v))
        try:
            out = compiled_flex()(q, k, v, **kw)
        except Exception as e:  # noqa: BLE001 - Inductor could not build the CPU kernel on this machine
            return _cpu_compile_failed(e, q0, k0, v0, pattern, scale, softcap), None
        return (out[:, :, :Tq] if pad else out), None
    out, lse = compiled_flex()(q, k, v, return_lse=True, **kw)
    return apply_sinks(out, lse.float(), sinks)


def _cpu_compile_failed(e: Exception, q, k, v, pattern, scale, softcap):
    """The CPU kernel did not compile (e.g. no Python headers or a compiler error): remember why (the
    backend table then refuses flex on the CPU for the rest of the process), warn once, and compute
    this call with the plain-torch reference (the same result)."""
    import logging

    from .reference import block_sparse_reference

    first = _CPU_BROKEN.get("reason") is None
    _CPU_BROKEN["reason"] = f"compiling FlexAttention for the CPU failed in this process ({type(e).__name__}: " \
                            f"{str(e).splitlines()[0][:200] if str(e) else ''})"
    if first:
        logging.getLogger("sparsattn").warning("sparsattn block_sparse: %s; the reference backend runs instead",
                                               _CPU_BROKEN["reason"])
    extra = {} if softcap is None else {"softcap": softcap}
    return block_sparse_reference(q, k, v, pattern, scale=scale, **extra)[0]


def cpu_broken():
    """Why compiled Flex cannot run on the CPU in this process (None: it can, or was not tried)."""
    return _CPU_BROKEN.get("reason")


def apply_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: Optional[torch.Tensor]):
    """apply_sinks: ``(out, lse)`` of attention over the keys -> with learned sink logits ``sinks [Hq]``
    in the denominator: ``out * sigmoid(lse - sink)``, ``lse' = logaddexp(lse, sink)`` (a row with no
    key: zeros and ``lse' = sink``). ``sinks=None`` returns the inputs."""
    if sinks is None:
        return out, lse
    sk = sinks.float().view(1, -1, 1)
    keep = torch.where(sk == float("-inf"), torch.ones_like(lse), torch.sigmoid(lse - sk))  # -inf: no sink
    out = (out.float() * keep[..., None]).to(out.dtype)
    return out, torch.logaddexp(lse, sk.expand_as(lse))


__all__ = ["apply_sinks", "CPU_MAX_SHAPES", "CPU_MIN_Q_LEN", "CPU_PAD_TO", "MIN_BANK", "cpu_pad", "cpu_broken", "block_mask", "compiled_flex", "cpu_shape_key", "cpu_shapes_left",
           "flex_block_sparse"]
