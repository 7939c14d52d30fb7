"""ANN: an attention-aware graph index over keys for maximum-inner-product retrieval (host memory).

RetrievalAttention (arXiv 2409.10516) observes that decode queries are out of distribution for an
index built from keys alone, and builds the key graph from real queries instead (a RoarGraph-style
projection of the query->key bipartite graph). This module implements that idea in numpy:

1. every prefill query is linked to its exact top-``knn`` keys (inner product);
2. projection: in each query's list, the best key is connected both ways to the others, so keys
   that answer the same queries become neighbours; each key keeps its ``degree`` most frequent
   neighbours;
3. keys no query linked are linked both ways to their nearest query-linked keys; keys appended
   later are inserted like in a navigable small-world graph (a graph search with the key itself
   finds its nearest keys, linked both ways);
4. search: best-first beam search of width ``ef`` from fixed entry points, by inner product.

It is a plain, obviously-correct implementation for moderate sizes (tests, CPU offload studies),
not a tuned one.
"""
from __future__ import annotations

import heapq
from typing import Optional

import numpy as np


class AttentionAwareIndex:
    """AttentionAwareIndex: inner-product graph index over keys linked through real queries.

    Args:
        dim: key dimension. degree: neighbours kept per key (default 32). knn: keys linked per
        query when building (default 32). ef_construction: beam width of insertions (default 64).
    """

    def __init__(self, dim: int, *, degree: int = 32, knn: int = 32, ef_construction: int = 64, seed: int = 0):
        for name, v in (("dim", dim), ("degree", degree), ("knn", knn), ("ef_construction", ef_construction)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        self.dim, self.degree, self.knn, self.efc = dim, degree, knn, ef_construction
        self.x = np.zeros((0, dim), dtype=np.float32)
        self.ids = np.zeros(0, dtype=np.int64)
        self.adj: list[list[int]] = []
        self.entry: list[int] = []
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.ids)

    # ------------------------------------------------------------------ build
    def build(self, keys: np.ndarray, ids: np.ndarray, queries: Optional[np.ndarray] = None) -> "AttentionAwareIndex":
        """Index ``keys [N, dim]`` with labels ``ids [N]``, linking them through ``queries [Nq, dim]``."""
        keys = np.ascontiguousarray(keys, dtype=np.float32)
        if keys.ndim != 2 or keys.shape[1] != self.dim or len(ids) != len(keys):
            raise ValueError(f"keys: expected [N, {self.dim}] with len(ids) == N, got {keys.shape}, {len(ids)}")
        n0 = len(self.ids)
        if n0:
            raise ValueError("build: the index is not empty; use add() to extend it")
        self.x = keys
        self.ids = np.asarray(ids, dtype=np.int64)
        N = len(keys)
        self.adj = [[] for _ in range(N)]
        linked = np.zeros(N, dtype=bool)
        if queries is not None and len(queries) and N > 1:
            q = np.ascontiguousarray(queries, dtype=np.float32)
            kk = min(self.knn, N)
            src, dst = [], []
            for a in range(0, len(q), 1024):
                s = q[a:a + 1024] @ keys.T
                top = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
                order = np.argsort(-np.take_along_axis(s, top, 1), axis=1)
                top = np.take_along_axis(top, order, 1)
                piv = np.repeat(top[:, :1], kk - 1, axis=1).ravel()
                oth = top[:, 1:].ravel()
                src += [piv, oth]
                dst += [oth, piv]
            src, dst = np.concatenate(src), np.concatenate(dst)
            pairs, counts = np.unique(np.stack([src, dst], 1), axis=0, return_counts=True)
            order = np.lexsort((-counts, pairs[:, 0]))
            pairs = pairs[order]
            for s_, d_ in pairs:
                if len(self.adj[s_]) < self.degree:
                    self.adj[s_].append(int(d_))
            linked[np.unique(src)] = True
            deg = np.array([len(a) for a in self.adj])
            self.entry = [int(i) for i in np.argsort(-deg)[:4]]
        unl = np.flatnonzero(~linked)
        lin = np.flatnonzero(linked)
        if len(lin) and len(unl):
            # keys no query reached: linked both ways to their nearest query-linked keys (exact, batched)
            m = min(max(1, self.degree // 2), len(lin))
            for a in range(0, len(unl), 1024):
                u = unl[a:a + 1024]
                s = keys[u] @ keys[lin].T
                top = lin[np.argpartition(-s, m - 1, axis=1)[:, :m]]
                for ui, row in zip(u.tolist(), top.tolist()):
                    self.adj[ui] = row
                    for j in row:
                        if len(self.adj[j]) < 2 * self.degree:  # reverse links may exceed degree
                            self.adj[j].append(ui)
        else:  # no queries: a navigable small-world graph by insertion
            for i in unl:
                self._insert(int(i))
        return self

    def add(self, keys: np.ndarray, ids: np.ndarray) -> None:
        """Append keys (e.g. tokens leaving the recent window) by graph insertion."""
        keys = np.ascontiguousarray(keys, dtype=np.float32).reshape(-1, self.dim)
        if len(keys) == 0:
            return
        n0 = len(self.ids)
        self.x = np.concatenate([self.x, keys]) if n0 else keys
        self.ids = np.concatenate([self.ids, np.asarray(ids, dtype=np.int64)])
        self.adj += [[] for _ in range(len(keys))]
        for i in range(n0, len(self.ids)):
            self._insert(i)

    def _insert(self, i: int) -> None:
        if not self.entry or self.entry == [i]:
            self.entry = [i]
            return
        found = self._search_internal(self.x[i], self.efc, exclude=i)
        nbs = [j for _, j in found[: self.degree]]
        self.adj[i] = list(dict.fromkeys(self.adj[i] + nbs))[: self.degree]
        for j in nbs:
            a = self.adj[j]
            if i in a:
                continue
            if len(a) < self.degree:
                a.append(i)
            else:  # replace j's least similar neighbour if i is closer
                sims = self.x[a] @ self.x[j]
                w = int(np.argmin(sims))
                if float(self.x[i] @ self.x[j]) > float(sims[w]):
                    a[w] = i
        if len(self.entry) < 4:
            self.entry.append(i)

    # ------------------------------------------------------------------ search
    def _search_internal(self, q: np.ndarray, ef: int, exclude: int = -1) -> list[tuple[float, int]]:
        """Best-first beam search; returns [(ip, node)] sorted by decreasing inner product."""
        visited = set(self.entry)
        visited.add(exclude)
        ent = [e for e in self.entry if e != exclude]
        if not ent:
            return []
        sims = self.x[ent] @ q
        cand = [(-float(s), e) for s, e in zip(sims, ent)]  # max-heap by ip
        heapq.heapify(cand)
        res = [(float(s), e) for s, e in zip(sims, ent)]  # min-heap of the best ef
        heapq.heapify(res)
        while len(res) > ef:
            heapq.heappop(res)
        while cand:
            neg, c = heapq.heappop(cand)
            if len(res) >= ef and -neg < res[0][0]:
                break
            nb = [j for j in self.adj[c] if j not in visited]
            if not nb:
                continue
            visited.update(nb)
            s = self.x[nb] @ q
            for sj, j in zip(s.tolist(), nb):
                if len(res) < ef or sj > res[0][0]:
                    heapq.heappush(cand, (-sj, j))
                    heapq.heappush(res, (sj, j))
                    if len(res) > ef:
                        heapq.heappop(res)
        return sorted(res, reverse=True)

    def search(self, q: np.ndarray, k: int, ef: int = 64) -> np.ndarray:
        """Labels of (approximately) the ``k`` keys with the largest inner product with ``q [dim]``."""
        if len(self.ids) == 0 or k <= 0:
            return np.zeros(0, dtype=np.int64)
        found = self._search_internal(np.asarray(q, dtype=np.float32), max(ef, k))
        return self.ids[[j for _, j in found[:k]]]


__all__ = ["AttentionAwareIndex"]
