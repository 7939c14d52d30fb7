"""Shared helpers of the decode-method tests: planted-needle caches and dense comparisons."""
import torch

from sparsattn.kernels.block_sparse.reference import dense_reference
from sparsattn.kernels.sparse_decode import sparse_decode_attention


def needle_case(B=2, Hkv=2, G=4, T=2048, D=64, pos=(700, 1300), strength=6.0, seed=0):
    """Random K/V plus, per sequence, one key at ``pos[b]`` strongly aligned with the query heads."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(B, Hkv, 1, D, generator=gen)
    q = (u + 0.3 * torch.randn(B, Hkv, G, D, generator=gen)).reshape(B, Hkv * G, D)
    k = torch.randn(B, Hkv, T, D, generator=gen)
    v = torch.randn(B, Hkv, T, D, generator=gen)
    for b in range(B):
        k[b, :, pos[b] % T] = strength * u[b, :, 0]
    return q, k, v, [p % T for p in pos[:B]]


def selects(pattern, b, h, token):
    return bool(pattern.to_token_mask()[b, h, token])


def assert_equals_dense(q, k, v, pattern, kv_lens=None, backend="reference"):
    out = sparse_decode_attention(q, k, v, pattern, kv_lens=kv_lens, backend=backend)
    for b in range(q.shape[0]):
        L = k.shape[2] if kv_lens is None else int(kv_lens[b])
        ref, _ = dense_reference(q[b:b + 1, :, None], k[b:b + 1, :, :L], v[b:b + 1, :, :L])
        assert torch.allclose(out[b].double(), ref[0, :, 0], atol=1e-5), (b, (out[b].double() - ref[0, :, 0]).abs().max())
