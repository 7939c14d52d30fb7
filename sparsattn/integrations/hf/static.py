"""hf.static: attention over the slots of transformers' static caches (``StaticCache``, sliding-window
static layers) and the compiled decode step.

A static cache hands the attention function its whole pre-allocated buffer ``[B, Hkv, max_len, D]``:
key slot ``j`` holds the token at absolute position ``kv_offset + j`` and the slots after the current
token are unwritten. The mask function records ``q_offset`` / ``kv_offset`` (``MaskInfo``), from which

* ``trailing_slots``: the number of unwritten slots at the end (one host sync per forward when the
  cache keeps its length as a tensor); the attention function drops them and proceeds exactly as
  with a dynamic cache (the last key is then the last query);
* ``positional_keep`` / ``dense_decode``: the decode step of a static cache (always when the cache
  keeps its length as a tensor, and in compiled steps: no host sync, no data-dependent shape, so no
  graph break) attends one query per sequence over every slot with a boolean mask built from
  positions (causal, window, padding), by SDPA on the grouped query heads (no K/V repeat);
* ``decode_select_inputs``: a decode method in a compiled step sees the rows shifted to the front
  with their lengths; index lists are then as wide as the cache (``patterns._util.list_width``).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

from .mask import MaskInfo


def static_layout(mask) -> bool:
    """static_layout: whether ``mask`` (a ``MaskInfo``) carries the query offset needed to place the slots."""
    return isinstance(mask, MaskInfo) and mask.q_offset is not None


def trailing_slots(frame: dict, mask: MaskInfo, Tq: int, Tk: int) -> int:
    """trailing_slots: unwritten slots at the end of the keys (0 for a dynamic cache), memoised per forward.

    ``(kv_offset + Tk) - (q_offset + Tq)``; a negative value (a cache that stores fewer slots than
    tokens seen, e.g. a compressing ``SparseCache``) gives 0: nothing to drop.
    """
    qo = mask.q_offset
    if not isinstance(qo, torch.Tensor):
        return max(int(mask.kv_offset) + Tk - int(qo) - Tq, 0)
    memo = frame.setdefault("trailing", {})
    key = (id(qo), Tq, Tk)
    if key not in memo:
        memo[key] = (qo, max(int(mask.kv_offset) + Tk - int(qo) - Tq, 0))  # keep qo alive: ids stay unique
    return memo[key][1]


def positional_keep(mask: MaskInfo, B: int, Tk: int, window: Optional[int], device) -> torch.Tensor:
    """positional_keep: bool ``[B, Tk]``: the slots one decode query (at ``mask.q_offset``) may read.

    Causal (slot position <= query position), inside ``window`` when given, and not padding (the 2-D
    padding mask indexes absolute positions; positions past its end are unwritten slots).
    """
    pos = int(mask.kv_offset) + torch.arange(Tk, device=device)
    qpos = mask.q_offset
    qpos = qpos.to(device) if isinstance(qpos, torch.Tensor) else torch.tensor(int(qpos), device=device)
    keep = pos <= qpos
    if window is not None:
        keep = keep & (pos > qpos - int(window))
    keep = keep[None, :].expand(B, Tk)
    pm = mask.padding_mask
    if pm is not None:
        pm = pm.to(device=device, dtype=torch.bool)
        need = int(mask.kv_offset) + Tk
        if pm.shape[1] < need:
            pm = torch.cat([pm, pm.new_zeros(pm.shape[0], need - pm.shape[1])], dim=1)
        keep = keep & pm[:, int(mask.kv_offset):need]
    return keep


def dense_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, scale,
                 softcap=None, sinks=None) -> torch.Tensor:
    """dense_decode: exact attention of one query ``q [B, Hq, 1, D]`` over ``k, v [B, Hkv, Tk, D]``
    restricted to ``keep [B, Tk]``; returns ``[B, Hq, 1, D]`` (zeros for a row without any key).

    The query heads of a GQA group are stacked on the query axis, so K/V are read once per KV head
    and never repeated in memory. Shape-static and sync-free (used in compiled decode steps). With
    ``softcap`` / ``sinks`` (Gemma 2 / gpt-oss): the float32 masked formula of ``hf.padding``.
    """
    if softcap is not None or sinks is not None:
        from .padding import _dense_masked

        return _dense_masked(q, k, v, keep[:, None, None, :], scale, softcap, sinks)
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, Hq // Hkv, D)
    m = keep[:, None, None, :]
    any_row = keep.any(-1)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=m | ~any_row[:, None, None, None], scale=scale)
    out = out * any_row[:, None, None, None].to(out.dtype)
    return out.reshape(B, Hq, 1, v.shape[-1])


def decode_select_inputs(mask: MaskInfo, keep: torch.Tensor, Tk: int):
    """decode_select_inputs: ``(pad [B], kv_lens [B])`` for a decode method on a static buffer, sync-free.

    The sequence of row b occupies slots ``[pad[b], n)`` (``n`` = slots up to the current token,
    ``pad`` = left-padding slots before it); a method is given the rows shifted left by ``pad`` and
    ``kv_lens = n - pad`` (right-aligned, as ``SelectContext`` documents for decode). ``keep``'s
    window is not applied here (the picks are clipped to ``keep`` afterwards).
    """
    dev = keep.device
    pos = int(mask.kv_offset) + torch.arange(Tk, device=dev)
    qpos = mask.q_offset
    qpos = qpos.to(dev) if isinstance(qpos, torch.Tensor) else torch.tensor(int(qpos), device=dev)
    written = (pos <= qpos)[None, :]  # [1, Tk]
    n = written.sum(-1)  # [1]
    if mask.padding_mask is None:
        pad = torch.zeros(keep.shape[0], dtype=torch.long, device=dev)
    else:
        pm = positional_keep(dataclasses.replace(mask, q_offset=qpos), keep.shape[0], Tk, None, dev)
        pad = n - pm.sum(-1)
    return pad, (n - pad).to(torch.int32)
