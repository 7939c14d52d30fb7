"""Patterns: the one shared vocabulary between sparse-attention methods and kernels.

A method looks at q/k and returns a pattern; a kernel computes attention on exactly the pattern.

``BlockPattern`` (prefill and training) lists, per (batch, head, query block), the key blocks to
compute, split into *full* blocks (every element computed, only sequence bounds apply) and
*partial* blocks (an element mask applies: the causal diagonal, and optionally a tile from a
small deduplicated ``mask_bank`` for sliding-window edges, neighborhoods, sinks that are not
block-aligned...). Optionally it carries ``columns``: individual key columns outside the chosen
blocks (MInference's vertical lines), computed by the kernel's column path.

Semantics of the element mask of a ``BlockPattern`` (what ``to_dense_mask`` returns and what every
kernel computes), for query row ``i`` and key ``j`` of sequence ``b`` with lengths ``Lq, Lk``:

* ``i < Lq`` and ``j < Lk`` (sequence bounds), and
* if ``causal``: ``j <= i + (Lk - Lq)`` (bottom-right aligned, as flash-attention), and
* ``j``'s block is a full block of ``i``'s query block, or a partial block whose bank tile (if
  any) is true at ``(i % block_q, j % block_k)``; or ``j`` is one of the ``columns`` of the head
  and ``j``'s block is not listed (full or partial) for ``i``'s query block.

Note that ``causal`` applies to full blocks too: a full block must lie entirely on or below the
diagonal; ``validate()`` checks this.

``TokenPattern`` (decode, vertical columns) lists per (batch, head) sorted int32 token (or page)
indices with counts.

Density = computed (query, key) pairs / causal pairs (when causal) or / all pairs.

Package layout (one home per concept): ``token`` (TokenPattern), ``block`` (BlockPattern),
``algebra`` (union / intersection, tile deduplication, per-head merging), ``predicates`` (the
public predicate builder ``from_predicate`` with composable ``Mask`` predicates ``and_``, ``or_``,
``not_``, ``causal_mask``, ``sliding_window_mask``, ``sink_mask``, ``sink_window_mask`` and the one
sink + recent-window rule ``sink_or_recent``), ``constructors`` (static patterns), ``conversions``
(from block / dense / top-k / FlexAttention masks), ``plot``.
"""
from __future__ import annotations

from ._util import _cdiv, _err
from .algebra import _HASH_P, _assemble, _unique_tiles, combine, merge_heads
from .block import (BlockPattern, _broadcast_heads, _causal_mask_mod, _lists_from_sel, _sel_from_lists,
                    _transpose_lists)
from .constructors import (_int_tensor, _neighborhood, _neighborhood_pred, _neighborhood_window, a_shape, causal,
                           dense, dilated, neighborhood_1d, neighborhood_2d, neighborhood_3d, sink_local,
                           sliding_window, strided_shards, vertical_slash)
from .conversions import _compact_sorted, from_block_mask, from_dense_mask, from_flex_block_mask, from_topk_blocks
from .plot import plot
from .predicates import (Mask, _block_grid, _check_lengths, _expand_bh, _from_predicate, _takes_head, and_,
                         causal_mask, from_predicate, mask_mod, not_, or_, sink_mask, sink_or_recent,
                         sink_window_mask, sliding_window_mask)
from .token import TokenPattern

__all__ = [
    "BlockPattern",
    "TokenPattern",
    "dense",
    "causal",
    "sliding_window",
    "sink_local",
    "a_shape",
    "dilated",
    "strided_shards",
    "vertical_slash",
    "neighborhood_1d",
    "neighborhood_2d",
    "neighborhood_3d",
    "from_block_mask",
    "from_dense_mask",
    "from_flex_block_mask",
    "from_topk_blocks",
    "plot",
    "Mask",
    "mask_mod",
    "and_",
    "or_",
    "not_",
    "causal_mask",
    "sliding_window_mask",
    "sink_mask",
    "sink_window_mask",
    "sink_or_recent",
    "from_predicate",
    "combine",
    "merge_heads",
]
