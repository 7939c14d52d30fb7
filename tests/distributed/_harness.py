"""Spawn helper for the distributed tests: ``world`` processes on gloo (CPU), one process group per
spawn shared by every case, results returned through a queue, a hard deadline (a hung rank fails
the test instead of hanging it)."""
from __future__ import annotations

import datetime
import os
import tempfile
import time
import traceback

import torch.multiprocessing as mp


def _entry(rank: int, world: int, init_file: str, fn, args: tuple, queue, pg_timeout_s: float):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=pg_timeout_s))
        res = fn(rank, world, *args)
        queue.put((rank, "ok", res))
    except BaseException:  # reported to the parent, which fails the test
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def run_ranks(fn, world: int, *args, deadline_s: float = 120.0, pg_timeout_s: float = 30.0,
              wait_for=None) -> dict:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned processes; return ``{rank: (status, result)}``.

    Processes still alive at the deadline are killed and reported as ``("hung", None)``; with
    ``wait_for`` (ranks), the others are killed as soon as those ranks have reported.
    """
    need = set(range(world) if wait_for is None else wait_for)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    fd, init_file = tempfile.mkstemp(prefix="sparsattn_pg_")
    os.close(fd)
    os.unlink(init_file)
    procs = [ctx.Process(target=_entry, args=(r, world, init_file, fn, args, queue, pg_timeout_s), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    out: dict = {}
    end = time.monotonic() + deadline_s
    while not need <= set(out) and time.monotonic() < end:
        try:
            rank, status, res = queue.get(timeout=0.5)
            out[rank] = (status, res)
        except Exception:
            if all(not p.is_alive() for p in procs) and queue.empty():
                break
    for r, p in enumerate(procs):
        p.join(timeout=max(0.1, min(2.0, end - time.monotonic())) if r in need else 0.1)
        if p.is_alive():
            p.kill()
            p.join()
        out.setdefault(r, ("hung" if p.exitcode is None or p.exitcode < 0 else f"exit {p.exitcode}", None))
    try:
        os.unlink(init_file)
    except OSError:
        pass
    return out
