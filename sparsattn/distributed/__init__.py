"""sparsattn.distributed: sparse context parallelism on torch.distributed (one sequence over many
ranks, each computing only the key blocks its pattern selects and receiving only those).

``context_parallel_attention(q, k, v, pattern, group=..., layout="zigzag", strategy="auto")`` with
q/k/v this rank's shard (``shard(x, layout, rank)``); strategies ``ring`` (skipping ring pass),
``fetch`` (sparse block exchange), ``ulysses`` (all-to-all over heads). See docs/distributed.md.
"""
from .attention import STRATEGIES, choose_strategy, context_parallel_attention
from .comm import CPStats
from .layout import LAYOUTS, ShardLayout, make_layout, shard, unshard
from ..kernels.merge import merge_running as lse_merge
from .subpattern import pattern_hash, rank_rows, sub_pattern

__all__ = ["context_parallel_attention", "choose_strategy", "STRATEGIES", "LAYOUTS", "ShardLayout", "make_layout",
           "shard", "unshard", "lse_merge", "sub_pattern", "rank_rows", "pattern_hash", "CPStats"]
