"""dense: exact attention, the baseline every method is measured against."""
from __future__ import annotations

from dataclasses import dataclass

from .. import patterns
from .base import FixedSetting, Method, PresetContext, SelectContext, register


@register("dense")
@dataclass
class Dense(Method):
    """Dense: every key block (causal when the context is causal); density 1.

    Args:
        block_size: block size of the returned pattern (tokens).
    """

    paper = "Attention Is All You Need (arXiv 1706.03762)"
    phase = "prefill"
    exact = True
    demo = True
    block_size: int = 128

    def __post_init__(self):
        if not isinstance(self.block_size, int) or self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size: expected a power of two >= 16, got {self.block_size!r}")

    # -- presets (evaluation tooling) -----------------------------------------------------------
    @classmethod
    def fixed_settings(cls, T: int, ctx: PresetContext) -> list:
        """Preset: dense is evaluated as it is (density 1), at the context's block size."""
        return [FixedSetting("causal (kernel)", {"block_size": ctx.block_size}, target=1.0)]

    def static_pattern_key(self, layer):
        """Preset: the causal pattern depends only on the lengths."""
        return ()

    def select(self, q, k, ctx: SelectContext | None = None):
        ctx = ctx or SelectContext()
        build = patterns.causal if ctx.causal else patterns.dense
        return build(q.shape[2], k.shape[2], block_q=self.block_size, device=q.device)
