"""a_shape: sink tokens + local window (StreamingLLM shape, MInference's A-shape head)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .. import patterns
from ._common import check_inputs, check_int, check_pow2, clamp_budget
from .base import DensityKnob, Method, PresetContext, SelectContext, register


@register("a_shape")
@dataclass
class AShape(Method):
    """AShape: static A-shape mask, the first ``n_init`` keys plus a causal window of ``n_local``
    keys (MInference, arXiv 2407.02490; StreamingLLM, arXiv 2309.17453).

    Defaults are MInference's ``streaming_kwargs`` (n_init=128, n_local=3968; METHODS.md A1 [code]).
    Element-exact: the sink and window edges are partial blocks with tile masks. Pattern heads = 1.

    Args:
        n_init: number of initial (sink) keys, >= 0.
        n_local: causal window length in keys (the diagonal included), >= 1.
        block_size: block size of the returned pattern.
    """

    paper = "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse Attention (arXiv 2407.02490)"
    demo = True  # shown by `sparsattn demo`
    phase = "prefill"
    n_init: int = 128
    n_local: int = 3968
    block_size: int = 64
    @classmethod
    def density_knob(cls, T: int, target: float, ctx: PresetContext) -> DensityKnob:
        """Preset: sink = min(64, max(4, b / 4)) with b = target x (T + 1) / 2 kept keys per row; knob n_local."""
        b = target * (T + 1) / 2
        n_init, blk = int(min(64, max(4, b // 4))), ctx.block_size
        return DensityKnob(cls.name, "n_local", 1, T, True, True, max(1.0, b - n_init),
                           lambda x: dict(n_init=n_init, n_local=int(x), block_size=blk),
                           lambda x: f"sink{n_init}+local{int(x)}")


    def __post_init__(self):
        check_int("n_init", self.n_init, 0)
        check_int("n_local", self.n_local, 1)
        check_pow2("block_size", self.block_size)

    @classmethod
    def small_config(cls) -> dict:
        return {"n_init": 20, "n_local": 70, "block_size": 32}

    def static_pattern_key(self, layer):
        """Preset: sink + window depend only on the lengths."""
        return ()

    @classmethod
    def full_config(cls, q_len: int) -> dict:
        return {"n_init": 0, "n_local": q_len, "block_size": 32}

    def select(self, q, k, ctx: Optional[SelectContext] = None):
        check_inputs("a_shape", q, k, ctx)
        Tq, Tk = q.shape[2], k.shape[2]
        n_init = min(self.n_init, Tk)
        n_local = self.n_local
        if self.n_init + self.n_local > Tk:
            n_local = clamp_budget("a_shape", "n_init + n_local", self.n_init + self.n_local, Tk) - n_init
            n_local = max(n_local, 1)
        return patterns.sink_local(Tq, n_init, n_local, kv_len=Tk, block_q=self.block_size, device=q.device)
