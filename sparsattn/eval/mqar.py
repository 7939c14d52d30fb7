"""MQAR: multi-query associative recall, the Zoology synthetic (Arora et al., arXiv 2312.04927).

What matches Zoology's ``multiquery_ar`` generator (``zoology/data/associative_recall.py``):
- the first 2K tokens are K key/value pairs, keys drawn without replacement from [1, V/2), values
  without replacement from [V/2, V), laid out ``k1 v1 k2 v2 ...``;
- the query region (the remaining L - 2K tokens) holds each key once more, at even offsets
  ``2 * g`` from its start, where the K distinct gaps g are drawn from 0 .. (L - 2K)//2 - 1 without
  replacement with p(g) proportional to (g + 1)**(a - 1), a = ``power_a`` (0.01: mostly early);
  key i of the context goes to the i-th drawn gap;
- labels are already shifted for next-token prediction: ``labels[t]`` is the target of the
  prediction made at position t. Only query-key positions are scored, with the key's value as
  target; every other label is -100;
- every other position (including the one after a query key) is filled with uniform random tokens
  from [0, V).

What differs: randomness comes from a seeded ``torch.Generator`` (not NumPy's global state), and
the gaps are drawn with the Gumbel-top-k trick, whose distribution equals successive sampling
proportional to p; keys and values are uniform distinct draws (rejection of rows with repeats).
So the distribution matches, not the exact tensors.
"""
from __future__ import annotations

import torch

#: label value of unscored positions (``torch.nn.functional.cross_entropy``'s ignore_index)
IGNORE_INDEX = -100


def _sample_without_replacement(logits: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Gumbel-top-k: k distinct indices per row, successive sampling proportional to exp(logits)."""
    u = torch.rand(logits.shape, generator=gen, dtype=torch.float64).clamp_(1e-300, 1.0)
    gumbel = -torch.log(-torch.log(u))
    return torch.topk(logits + gumbel, k, dim=-1).indices


def _uniform_distinct(m: int, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """[m, k] ids in [0, n), distinct within each row, uniform over ordered k-tuples."""
    if k * k > 4 * n:  # many collisions expected: rank random keys instead
        return torch.topk(torch.rand(m, n, generator=gen), k, dim=-1).indices
    # iid draws, rows with a repeat drawn again: the accepted rows are uniform over distinct tuples
    out = torch.randint(0, n, (m, k), generator=gen)
    while True:
        srt = out.sort(dim=-1).values
        bad = (srt[:, 1:] == srt[:, :-1]).any(dim=-1).nonzero().flatten()
        if bad.numel() == 0:
            return out
        out[bad] = torch.randint(0, n, (bad.numel(), k), generator=gen)


def mqar(n_examples: int, seq_len: int, n_kv_pairs: int, vocab_size: int = 8192, *, power_a: float = 0.01,
         seed: int, random_non_queries: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """mqar: multi-query associative recall examples (Zoology, Arora et al., arXiv 2312.04927).

    Args:
        n_examples: number of sequences.
        seq_len: tokens per sequence L (needs L >= 4K, as in Zoology).
        n_kv_pairs: K key/value pairs per sequence.
        vocab_size: V; keys come from [1, V/2), values from [V/2, V) (needs K <= V/2 - 1).
        power_a: a of the query-gap power law p(g) ~ (g + 1)**(a - 1); 1.0 gives uniform gaps.
        seed: seeds a ``torch.Generator`` (same seed, same tensors).
        random_non_queries: fill unused positions with random tokens (Zoology's default) rather
            than 0.
    Returns:
        ``(inputs, labels)``, both LongTensor [n_examples, seq_len]. ``labels[:, t]`` is the target
        of the output at position t (no further shift: ``cross_entropy(logits[:, t], labels[:, t])``;
        do not pass them to an HF model's ``labels=``, which shifts again); -100 where unscored.
    Raises:
        ValueError: a non-positive size, seq_len < 4 * n_kv_pairs, too many pairs for the vocab,
            or power_a <= 0.
    """
    for name, v in (("n_examples", n_examples), ("seq_len", seq_len), ("n_kv_pairs", n_kv_pairs),
                    ("vocab_size", vocab_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if seq_len < 4 * n_kv_pairs:
        raise ValueError(f"seq_len: expected >= 4 * n_kv_pairs = {4 * n_kv_pairs}, got {seq_len}")
    half = vocab_size // 2
    if n_kv_pairs > half - 1 or n_kv_pairs > vocab_size - half:
        raise ValueError(f"vocab_size: {vocab_size} gives only {half - 1} distinct keys, fewer than "
                         f"n_kv_pairs={n_kv_pairs}")
    if not isinstance(power_a, (int, float)) or isinstance(power_a, bool) or power_a <= 0:
        raise ValueError(f"power_a: expected a float > 0, got {power_a!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, got {seed!r}")

    gen = torch.Generator().manual_seed(seed)
    n, L, K = n_examples, seq_len, n_kv_pairs
    ctx = 2 * K
    space = (L - ctx) // 2
    gap_logits = (power_a - 1.0) * torch.log(torch.arange(1, space + 1, dtype=torch.float64))

    inputs = torch.zeros(n, L, dtype=torch.long)
    labels = torch.full((n, L), IGNORE_INDEX, dtype=torch.long)
    # chunk over examples: memory O(chunk * space), or O(chunk * V) when keys are drawn by ranking
    dense_draw = K * K > 4 * (half - 1)
    chunk = max(1, (1 << 22) // max(space, vocab_size if dense_draw else 1))
    rows_all = torch.arange(n)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        m = e - s
        keys = 1 + _uniform_distinct(m, half - 1, K, gen)
        values = half + _uniform_distinct(m, vocab_size - half, K, gen)
        gaps = _sample_without_replacement(gap_logits.expand(m, space), K, gen)
        inputs[s:e, 0:ctx:2] = keys
        inputs[s:e, 1:ctx:2] = values
        rows = rows_all[s:e, None].expand(m, K)
        qpos = ctx + 2 * gaps
        inputs[rows, qpos] = keys
        labels[rows, qpos] = values
    if random_non_queries:
        filler = torch.randint(0, vocab_size, (n, L), generator=gen)
        used = torch.zeros(n, L, dtype=torch.bool)
        used[:, :ctx] = True
        used |= labels != IGNORE_INDEX
        inputs = torch.where(used, inputs, filler)
    return inputs, labels


def mqar_accuracy(logits_or_preds: torch.Tensor, labels: torch.Tensor) -> float:
    """mqar_accuracy: fraction of scored positions predicted right (Zoology's metric, arXiv 2312.04927).

    Args:
        logits_or_preds: logits [n, L, V] (argmax taken) or predicted ids [n, L].
        labels: [n, L] as returned by ``mqar`` (-100 = unscored).
    Raises:
        ValueError: shape mismatch or no scored position.
    """
    preds = logits_or_preds.argmax(-1) if logits_or_preds.dim() == labels.dim() + 1 else logits_or_preds
    if preds.shape != labels.shape:
        raise ValueError(f"logits_or_preds: expected [n, L(, V)] matching labels {tuple(labels.shape)}, "
                         f"got {tuple(logits_or_preds.shape)}")
    scored = labels != IGNORE_INDEX
    total = int(scored.sum())
    if total == 0:
        raise ValueError("labels: no scored position (all -100)")
    return float((preds.to(labels.device)[scored] == labels[scored]).sum()) / total
