"""Communication for context parallelism on torch.distributed: process group / DeviceMesh
resolution, batched point-to-point steps (``batch_isend_irecv``), ``all_to_all_single``, waits with
a timeout, the cross-rank pattern check, and per-call statistics (bytes moved, compute vs wait).

Nothing here is a communication layer of its own: every transfer is a torch.distributed op on the
given group; a wait that passes its timeout, or a peer that died, raises instead of hanging.
"""
from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0


@dataclass
class CPStats:
    """CPStats: what one or more context-parallel calls did on this rank.

    ``bytes_sent`` / ``bytes_recv``: payload bytes of every point-to-point or all-to-all transfer;
    ``compute_s``: time in attention kernels and merges; ``wait_s``: time blocked on communication
    (the part not hidden behind computation); ``steps``: communication steps posted. With
    ``sync=True`` CUDA is synchronised around each timed region (exact split, less overlap).
    """

    bytes_sent: int = 0
    bytes_recv: int = 0
    compute_s: float = 0.0
    wait_s: float = 0.0
    steps: int = 0
    sync: bool = False
    strategy: str = ""
    notes: dict = field(default_factory=dict)

    def reset(self) -> None:
        """Zero the counters (keeps ``sync``)."""
        self.bytes_sent = self.bytes_recv = self.steps = 0
        self.compute_s = self.wait_s = 0.0
        self.notes = {}


def resolve_group(group):
    """The ProcessGroup of ``group``: a ProcessGroup, a 1-D DeviceMesh, or None (the default group)."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group: torch.distributed is not initialised (call init_process_group first)")
    if group is None:
        return dist.group.WORLD
    if hasattr(group, "get_group") and hasattr(group, "ndim"):  # DeviceMesh
        if group.ndim != 1:
            raise ValueError(f"group: expected a 1-D DeviceMesh (the context-parallel dimension), got {group.ndim}-D")
        return group.get_group()
    if isinstance(group, dist.ProcessGroup):
        return group
    raise ValueError(f"group: expected a ProcessGroup, a 1-D DeviceMesh or None, got {type(group).__name__}")


class _Pending(list):
    """Works of one posted step, holding their tensors until the step is waited on."""

    keep: list = []


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Comm:
    """Comm: rank, world, timeout and statistics of one context-parallel call on a process group."""

    def __init__(self, group, timeout_s: Optional[float], stats: Optional[CPStats], device: torch.device):
        self.group = resolve_group(group)
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        self.timeout = datetime.timedelta(seconds=DEFAULT_TIMEOUT_S if timeout_s is None else float(timeout_s))
        self.stats = stats if stats is not None else CPStats()
        self.device = device
        self._t0 = 0.0

    # -- timing -----------------------------------------------------------------------------------
    def _sync(self) -> None:
        if self.stats.sync and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def compute_start(self) -> None:
        """Start timing a compute region."""
        self._sync()
        self._t0 = time.perf_counter()

    def compute_end(self) -> None:
        """End a compute region and add it to ``stats.compute_s``."""
        self._sync()
        self.stats.compute_s += time.perf_counter() - self._t0

    # -- point to point -----------------------------------------------------------------------------
    def post(self, sends: Sequence[tuple[int, torch.Tensor]], recvs: Sequence[tuple[int, torch.Tensor]],
             tag: int = 0) -> list:
        """Post one step of transfers: ``sends`` / ``recvs`` are ``(group rank, tensor)``; empty
        tensors are skipped (both sides know the sizes); ``tag`` keeps steps apart on backends that
        match by tag. Returns the works to ``wait`` on."""
        ops, keep = [], []
        for peer, t in sends:
            if t.numel():
                ops.append(dist.P2POp(dist.isend, t.contiguous(), group=self.group, tag=tag, group_peer=peer))
                self.stats.bytes_sent += _nbytes(t)
        for peer, t in recvs:
            if t.numel():
                ops.append(dist.P2POp(dist.irecv, t, group=self.group, tag=tag, group_peer=peer))
                self.stats.bytes_recv += _nbytes(t)
        if not ops:
            return []
        self.stats.steps += 1
        works = _Pending(dist.batch_isend_irecv(ops))
        works.keep = [op.tensor for op in ops]  # alive until waited on
        return works

    def _wait_one(self, w, what: str) -> None:
        # CPU backends (gloo): block at most the timeout. CUDA (NCCL): wait() orders the current
        # stream after the transfer without blocking the host; the group's own timeout (set at
        # init_process_group / new_group, enforced by NCCL's watchdog) turns a hang into an error.
        ok = w.wait() if self.device.type == "cuda" else w.wait(self.timeout)
        if ok is False:
            raise RuntimeError(f"sparsattn.distributed: rank {self.rank}: {what} did not complete "
                               f"within {self.timeout.total_seconds():.0f} s")

    def wait(self, works: list) -> None:
        """Wait for posted works, at most the timeout each; the time blocked goes to ``wait_s``."""
        if not works:
            return
        t0 = time.perf_counter()
        for w in works:
            self._wait_one(w, "a transfer")
        self._sync()
        self.stats.wait_s += time.perf_counter() - t0

    # -- collectives --------------------------------------------------------------------------------
    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list, in_splits: list) -> None:
        """``all_to_all_single`` along dim 0 with split sizes, waited with the timeout."""
        t0 = time.perf_counter()
        per = inp[0].numel() * inp.element_size() if inp.dim() and inp.shape[0] else 0
        self.stats.bytes_sent += per * (sum(in_splits) - in_splits[self.rank])
        per_o = out[0].numel() * out.element_size() if out.dim() and out.shape[0] else 0
        self.stats.bytes_recv += per_o * (sum(out_splits) - out_splits[self.rank])
        self.stats.steps += 1
        w = dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group, async_op=True)
        self._wait_one(w, "all_to_all")
        self._sync()
        self.stats.wait_s += time.perf_counter() - t0

    def check_same(self, values: Sequence[int], what: str) -> None:
        """All-gather a few int64 values and raise ValueError on every rank if any rank differs."""
        t = torch.tensor(list(values), dtype=torch.int64, device=self.device)
        got = [torch.empty_like(t) for _ in range(self.world)]
        w = dist.all_gather(got, t, group=self.group, async_op=True)
        self._wait_one(w, f"the {what} check (a rank failed or did not call)")
        rows = [g.tolist() for g in got]
        bad = [r for r in range(self.world) if rows[r] != rows[0]]
        if bad:
            raise ValueError(f"pattern: the {what} differs across ranks (ranks {bad} differ from rank 0: "
                             f"{rows[bad[0]]} vs {rows[0]}); every rank must pass the same global pattern")
