"""train.batches: deterministic training batches (``BatchMaker``) and their ``DataLoader`` stream (``BatchStream``).

``BatchMaker``: batches ``tokens[B, L+1]`` (int32) and ``groups[B, L+1]`` (uint8, the loss group of
each token as a *target*): 0 ignored, 1 language modelling (corpus text, code haystack lines), 2
retrieval answer. Batch ``i`` depends only on ``(seed, L, i)``. ``BatchStream``: an
``IterableDataset`` over ``BatchMaker`` for a ``DataLoader`` with worker processes (worker w makes
batches w, w + W, ...: the loader's round robin keeps the order).
"""
from __future__ import annotations

import random

import numpy as np

from .corpus import GROUP_IGNORE, GROUP_LM, Corpus, _seed_of
from .retrieval import RetrievalTasks


class BatchMaker:
    """BatchMaker: deterministic training batches of ``batch_size`` sequences of ``seq_len + 1`` tokens.

    A fraction ``retrieval_share`` (rounded per batch, at least one sequence when > 0) of the rows
    are synthetic retrieval samples, the rest corpus windows (loss group 1 on every target except
    BOS). Rows are shuffled so the position of synthetic rows varies.
    """

    def __init__(self, corpus: Corpus, tasks: RetrievalTasks | None, *, seq_len: int, batch_size: int,
                 retrieval_share: float, seed: int, bos_id: int):
        if seq_len < 16 or batch_size < 1:
            raise ValueError(f"seq_len, batch_size: expected >= 16 and >= 1, got {seq_len}, {batch_size}")
        if not 0.0 <= retrieval_share <= 1.0:
            raise ValueError(f"retrieval_share: expected a float in [0, 1], got {retrieval_share}")
        if retrieval_share > 0 and tasks is None:
            raise ValueError("tasks: needed when retrieval_share > 0")
        self.corpus, self.tasks = corpus, tasks
        self.seq_len, self.batch_size, self.share, self.seed = seq_len, batch_size, retrieval_share, seed
        self.bos_id = int(bos_id)

    def batch(self, index: int) -> dict:
        s = _seed_of("batch", self.seed, self.seq_len, index)
        rng = random.Random(s)
        nprng = np.random.default_rng(s)
        n = self.seq_len + 1
        tokens = np.empty((self.batch_size, n), dtype=np.int32)
        groups = np.empty((self.batch_size, n), dtype=np.uint8)
        n_syn = int(round(self.share * self.batch_size))
        if self.share > 0:
            n_syn = max(1, n_syn)
        rows = list(range(self.batch_size))
        rng.shuffle(rows)
        for j, r in enumerate(rows):
            if j < n_syn:
                smp = self.tasks.sample(rng, nprng, n)
                tokens[r], groups[r] = smp.ids, smp.groups
            else:
                tokens[r] = self.corpus.window(nprng, n)
                groups[r] = GROUP_LM
                groups[r][tokens[r] == self.bos_id] = GROUP_IGNORE
        groups[:, 0] = GROUP_IGNORE  # never a target
        return {"tokens": tokens, "groups": groups}


try:  # torch is a dependency of the package; the import is here so numpy-only use stays possible
    from torch.utils.data import IterableDataset as _IterableDataset
except ImportError:  # pragma: no cover
    _IterableDataset = object


class BatchStream(_IterableDataset):
    """BatchStream: infinite stream of ``BatchMaker`` batches as torch tensors for a ``DataLoader``.

    With W workers, worker w yields batches w, w + W, w + 2W, ...; the loader's round robin then
    delivers batches 0, 1, 2, ... in order (deterministic). Use ``batch_size=None`` in the loader.
    ``tokenizer_json`` (``Tokenizer.to_str()``) rebuilds the tokenizer inside each worker.
    """

    def __init__(self, corpus: Corpus, tokenizer_json: str, *, seq_len: int, batch_size: int,
                 retrieval_share: float, seed: int, bos_id: int, eos_id: int, mix: dict | None = None,
                 start: int = 0):
        self.corpus, self.tokenizer_json = corpus, tokenizer_json
        self.kw = dict(seq_len=seq_len, batch_size=batch_size, retrieval_share=retrieval_share, seed=seed)
        self.bos_id, self.eos_id, self.mix, self.start = bos_id, eos_id, mix, start

    def maker(self) -> BatchMaker:
        from tokenizers import Tokenizer

        raw = Tokenizer.from_str(self.tokenizer_json)
        tasks = RetrievalTasks(raw, self.corpus, bos_id=self.bos_id, eos_id=self.eos_id, mix=self.mix)
        return BatchMaker(self.corpus, tasks, bos_id=self.bos_id, **self.kw)

    def __iter__(self):
        import torch

        info = torch.utils.data.get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        maker = self.maker()
        i = self.start + wid
        while True:
            b = maker.batch(i)
            yield {k: torch.from_numpy(v) for k, v in b.items()}
            i += nw
