"""streaming_llm: attention sinks + recent window, the position-only decode baseline."""
from __future__ import annotations

from dataclasses import dataclass

from ._select import decode_inputs, mask_to_pattern, sink_window_mask
from .base import Method, PresetContext, SelectContext, register


@register("streaming_llm")
@dataclass
class StreamingLLM(Method):
    """StreamingLLM: keep the first ``n_sink`` tokens and the last ``window`` tokens (Efficient Streaming
    Language Models with Attention Sinks, arXiv 2309.17453).

    ``select(q [B, Hq, (1,) D], k_cache [B, Hkv, T, D], ctx) -> TokenPattern [B, Hkv]`` (positions
    only; q is not read). ``ctx.kv_lens`` gives per-sequence valid lengths. Defaults: 4
    sinks (the paper), a 2000-token window (the repository's example ``recent_size``, unverified).
    """

    paper = "Efficient Streaming Language Models with Attention Sinks (arXiv 2309.17453)"
    phase = "decode"
    n_sink: int = 4
    window: int = 2000
    @classmethod
    def budget_config(cls, budget_tokens: int, ctx: PresetContext) -> dict:
        """Preset: B tokens = ``n_sink = min(4, B // 2)`` sinks + a window of the rest."""
        B = int(budget_tokens)
        n_sink = min(4, B // 2)
        return {"n_sink": n_sink, "window": max(1, B - n_sink)}


    def __post_init__(self):
        if not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise ValueError(f"n_sink: expected an int >= 0, got {self.n_sink!r}")
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window: expected an int >= 1, got {self.window!r}")

    def select(self, q, k, ctx: SelectContext | None = None):
        q, k, kl = decode_inputs(q, k, ctx)
        B, Hkv, T = k.shape[0], k.shape[1], k.shape[2]
        return mask_to_pattern(sink_window_mask(B, Hkv, T, kl, self.n_sink, self.window), T)
