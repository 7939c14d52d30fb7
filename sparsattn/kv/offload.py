"""offload: ``KVCache``'s host offload (``offload`` / ``fetch``) and asynchronous row prefetch.

``offload(layer)`` moves a layer's K/V to host memory (pinned when CUDA is available),
``prefetch(layer, pattern)`` copies only the selected rows back to the device asynchronously (a
side CUDA stream when on CUDA) and ``fetch(layer)`` brings the whole layer back. Round trips are
exact (plain copies).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..kernels.sparse_decode.reference import paged_to_contiguous
from ..patterns import TokenPattern
from ..patterns._util import _err  # the library's one error-message helper

Tensor = torch.Tensor


@dataclass
class Prefetched:
    """Prefetched: selected rows copied to the device; call ``wait()`` before use (CUDA streams).

    ``k, v``: ``[B, Hkv, n, D]``; ``pattern``: a TokenPattern over those ``n`` rows (page_size 1)
    that selects exactly the rows that were requested and valid; ``log_weight`` aligned with it.
    """

    k: Tensor
    v: Tensor
    pattern: TokenPattern
    log_weight: Optional[Tensor] = None
    event: Optional[object] = field(default=None, repr=False)

    def wait(self) -> "Prefetched":
        if self.event is not None:
            cur = torch.cuda.current_stream(self.k.device)
            cur.wait_event(self.event)
            for t in (self.k, self.v):  # allocated on the side stream, used on this one
                t.record_stream(cur)
            self.event = None
        return self


class OffloadMixin:
    """OffloadMixin: host offload of ``KVCache`` layers (see the module docstring)."""

    def offload(self, layer: int) -> None:
        """Move the layer's K/V to host memory (pinned when CUDA is available)."""
        L = self._layer(layer)
        if L.on_host:
            return
        if L.quant is not None:
            raise ValueError("layer: quantised layers are kept on the device")
        pin = torch.cuda.is_available()

        def to_host(x):
            h = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=pin)
            h.copy_(x)
            return h

        if L.store is not None:
            L.store.map(to_host, ("k", "v"))
        else:
            L.k, L.v = to_host(L.k), to_host(L.v)
        L.on_host = True

    def fetch(self, layer: int) -> None:
        """Bring an offloaded layer's K/V back to the device."""
        L = self._layer(layer)
        if not L.on_host:
            return
        if L.store is not None:
            L.store.map(lambda x: x.to(self.device), ("k", "v"))
        else:
            L.k, L.v = L.k.to(self.device), L.v.to(self.device)
        L.on_host = False

    def prefetch(self, layer: int, pattern: TokenPattern) -> Prefetched:
        """Copy the rows selected by a slot-indexed ``pattern`` (heads 1 or Hkv) of an offloaded layer
        to the device, asynchronously (on a side stream on CUDA; call ``.wait()`` before use)."""
        L = self._layer(layer)
        if not L.on_host:
            raise ValueError("layer: is not offloaded (call offload() first, or use gather())")
        kl = self.kv_lens(layer).cpu()
        tok, valid = _pattern_rows(pattern.to("cpu"), kl, self.batch, self.kv_heads)
        if self.layout == "paged":
            T = L.block_table.shape[1] * self.page_size
            kc = paged_to_contiguous(L.k, L.block_table.cpu().clamp_min(0), T)
            vc = paged_to_contiguous(L.v, L.block_table.cpu().clamp_min(0), T)
        else:
            kc = vc = None  # the store gathers (group by group when grouped)
        t = torch.where(valid, tok, torch.zeros_like(tok))
        # compact: valid rows first so that the device pattern is a prefix of each row
        order = torch.sort((~valid).to(torch.int8), dim=-1, stable=True).indices
        t = torch.gather(t, 2, order)
        cnt = valid.sum(-1)
        pin = torch.cuda.is_available()
        g = t[..., None].expand(-1, -1, -1, self.head_dim)
        sk = torch.empty(g.shape, dtype=self.dtype, pin_memory=pin)  # gathered straight into pinned memory
        sv = torch.empty(g.shape, dtype=self.dtype, pin_memory=pin)
        if kc is not None:
            torch.gather(kc, 2, g, out=sk)
            torch.gather(vc, 2, g, out=sv)
        else:
            L.store.gather(t, torch.gather(valid, 2, order), out=(sk, sv))
        lw = None
        lw_all = self.log_weights(layer) if self.layout == "contiguous" else None
        if lw_all is not None:
            lw = torch.gather(lw_all.cpu(), 2, t)
        n = max(t.shape[-1], 1)
        idx = torch.arange(n, dtype=torch.int32).expand(self.batch, tok.shape[1], n).contiguous()
        event = None
        if self.device.type == "cuda":
            if self._stream is None:
                self._stream = torch.cuda.Stream(self.device)
            with torch.cuda.stream(self._stream):
                dk = sk.to(self.device, non_blocking=True)
                dv = sv.to(self.device, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
        else:
            dk, dv = sk.clone(), sv.clone()
        pat = TokenPattern(idx.to(self.device), cnt.to(torch.int32).to(self.device), t.shape[-1])
        if lw is not None:
            lw = lw.to(self.device)
        return Prefetched(dk, dv, pat, lw, event)


def _pattern_rows(pattern: TokenPattern, kv_lens: Tensor, B: int, H: int):
    """Slot positions ``[B, H, n]`` and validity of a pattern (pages expanded; heads 1 or H)."""
    if pattern.heads not in (1, H):
        raise _err("pattern heads", f"1 or {H} (kv heads)", pattern.heads)
    if pattern.batch not in (1, B):
        raise _err("pattern batch", f"1 or {B}", pattern.batch)
    from ..kernels.sparse_decode.reference import selected_tokens

    tok, valid, _ = selected_tokens(pattern, kv_lens.to(pattern.device), pattern.kv_len, pattern.heads)
    if tok.shape[0] != B or tok.shape[1] != H:  # broadcast a shared selection to every sequence / kv head
        tok, valid = tok.expand(B, H, -1), valid.expand(B, H, -1)
    return tok, valid
