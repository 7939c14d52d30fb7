"""MoA's per-head sink + window pattern is the library's one sink + recent-window rule
(``sparsattn.patterns.sink_or_recent``) at token level, on random odd shapes (issue 11)."""
import torch

from sparsattn.methods.moa import sink_window_pattern
from sparsattn.patterns import sink_or_recent


def _rule(q_len, kv_len, span, sink):
    """Reference: key j of query row i (bottom-right aligned position q = i + kv_len - q_len) is kept iff
    it is causal (j <= q) and a sink or in the last span_h positions up to q (``sink_or_recent``)."""
    q = torch.arange(q_len)[:, None] + (kv_len - q_len)
    j = torch.arange(kv_len)[None, :]
    keep = sink_or_recent(j[None], (q + 1)[None], sink, span[:, None, None])  # [H, q_len, kv_len]
    return keep & (j <= q)[None]


def test_sink_window_pattern_is_sink_or_recent_on_random_shapes():
    gen = torch.Generator().manual_seed(11)
    for _ in range(12):
        q_len = int(torch.randint(1, 90, (1,), generator=gen))
        kv_len = q_len + int(torch.randint(0, 70, (1,), generator=gen))
        H = int(torch.randint(1, 5, (1,), generator=gen))
        span = torch.randint(1, kv_len + 3, (H,), generator=gen)
        sink = int(torch.randint(0, 9, (1,), generator=gen))
        bs = [16, 32, 64][int(torch.randint(0, 3, (1,), generator=gen))]
        got = sink_window_pattern(q_len, kv_len, span, sink, block_size=bs).to_dense_mask()[0]
        want = _rule(q_len, kv_len, span, sink)
        assert got.shape == want.shape
        assert torch.equal(got, want), (q_len, kv_len, span.tolist(), sink, bs)
