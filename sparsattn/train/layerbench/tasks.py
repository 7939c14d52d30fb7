"""Tasks of the layer harness: MQAR (Zoology), LRA ListOps and LRA Pathfinder, as tensors.

``make_task(name, seq_len, n_train=..., n_test=..., seed=...) -> TaskData``. The held-out split is
generated with its own seed (``seed`` + 7919 for the test set), so train and test never share a
generator stream. ``kind == "lm"`` tasks score per position (labels -100 elsewhere, Zoology's
MQAR); ``kind == "cls"`` tasks classify the whole sequence (mean over non-pad positions).
"""
from __future__ import annotations

import importlib
import inspect
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch

TASKS = ("mqar", "listops", "pathfinder")

#: Zoology's (sequence length -> key/value pairs) of the MQAR figure (EVAL.md section 2)
MQAR_PAIRS = {64: 4, 128: 8, 256: 16, 512: 64}
MQAR_VOCAB = 8192
TEST_SEED_OFFSET = 7919


@dataclass
class TaskData:
    """TaskData: one task's train and held-out tensors and what the model needs to know of it.

    ``x_*`` LongTensor ``[n, T]`` (pixels are levels 0..255); ``y_*`` ``[n, T]`` (lm, -100 unscored)
    or ``[n]`` (cls). ``grid`` is ``(H, W)`` for images; ``pad_id`` marks padding for pooling;
    ``prefix_len`` is the context prefix a prefix (encoder-decoder) layer may read non-causally
    (MQAR: the 2K key-value tokens, which carry no label), None when the task has none.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    vocab: int
    n_out: int
    kind: str
    causal: bool
    seq_len: int
    grid: Optional[tuple] = None
    pad_id: Optional[int] = None
    info: str = ""
    prefix_len: Optional[int] = None


def mqar_pairs(seq_len: int) -> int:
    """mqar_pairs: Zoology's K for ``seq_len`` (64:4, 128:8, 256:16, 512:64), else ``seq_len // 16``."""
    return MQAR_PAIRS.get(seq_len, max(1, seq_len // 16))


def _mqar(seq_len, n_train, n_test, seed, vocab=None):
    from ...eval.mqar import mqar

    K = mqar_pairs(seq_len)
    V = MQAR_VOCAB if vocab is None else vocab
    xtr, ytr = mqar(n_train, seq_len, K, V, seed=seed)
    xte, yte = mqar(n_test, seq_len, K, V, seed=seed + TEST_SEED_OFFSET)
    return TaskData("mqar", xtr, ytr, xte, yte, V, V, "lm", True, seq_len, info=f"Zoology MQAR, K={K} pairs, V={V}",
                    prefix_len=2 * K)


def _listops(seq_len, n_train, n_test, seed, vocab=None):
    from ...eval.listops import PAD_ID, VOCAB, listops_dataset

    if seq_len < 8:
        raise ValueError(f"seq_len: ListOps needs >= 8 tokens, got {seq_len}")
    # LRA: lengths 500-2000 at seq_len 2000; shorter grids keep the same ratio (min = seq_len / 4)
    lo = max(5, seq_len // 4)
    xtr, ytr = listops_dataset(n_train, min_len=lo, max_len=seq_len, seed=seed)
    xte, yte = listops_dataset(n_test, min_len=lo, max_len=seq_len, seed=seed + TEST_SEED_OFFSET)
    return TaskData("listops", xtr, ytr, xte, yte, len(VOCAB), 10, "cls", False, seq_len, pad_id=PAD_ID,
                    info=f"LRA ListOps, lengths {lo}-{seq_len}")


def _pathfinder(seq_len, n_train, n_test, seed, vocab=None):
    try:
        mod = importlib.import_module("sparsattn.eval.pathfinder")
    except ImportError as e:
        raise ValueError(f"task: 'pathfinder' needs sparsattn.eval.pathfinder ({e})") from None
    fn = getattr(mod, "pathfinder_dataset", None)
    if fn is None:
        raise ValueError("task: sparsattn.eval.pathfinder has no pathfinder_dataset(n, *, seed, ...) function")
    side = int(round(seq_len ** 0.5))
    if side * side != seq_len:
        raise ValueError(f"seq_len: Pathfinder images are square; expected a square number of pixels (1024 = 32x32), "
                         f"got {seq_len}")
    kw = {}
    params = inspect.signature(fn).parameters
    for name in ("size", "image_size", "resolution", "side"):
        if name in params:
            kw[name] = side
            break
    xs = []
    for n, s in ((n_train, seed), (n_test, seed + TEST_SEED_OFFSET)):
        img, lab = fn(n, seed=s, **kw)
        img = torch.as_tensor(img)
        if img.dim() == 4 and img.shape[1] == 1:
            img = img[:, 0]
        if img.dim() != 3 or tuple(img.shape[1:]) != (side, side):
            raise ValueError(f"pathfinder_dataset: expected images [n, {side}, {side}], got {tuple(img.shape)}")
        if img.is_floating_point():  # [0, 1] floats -> 256 levels
            img = (img.clamp(0, 1) * 255).round()
        xs.append((img.long().clamp(0, 255).reshape(n, -1), torch.as_tensor(lab).long().reshape(n)))
    (xtr, ytr), (xte, yte) = xs
    return TaskData("pathfinder", xtr, ytr, xte, yte, 256, 2, "cls", False, seq_len, grid=(side, side),
                    info=f"LRA Pathfinder-{side}")


def make_task(name: str, seq_len: int, *, n_train: int, n_test: int, seed: int, vocab: Optional[int] = None) -> TaskData:
    """make_task: the train and held-out data of ``name`` (``mqar``, ``listops``, ``pathfinder``).

    Args:
        seq_len: tokens per sequence (MQAR: Zoology's K for it; ListOps: lengths seq_len/4..seq_len,
            padded; Pathfinder: a square number of pixels, 1024 = 32x32).
        n_train, n_test: example counts; seed: data seed (test uses seed + 7919).
        vocab: MQAR only, the vocabulary (default Zoology's 8192).
    The last two data sets are kept in memory (same arguments, same object: treat it as read-only).

    Raises:
        ValueError: unknown task, bad sizes, or a missing Pathfinder generator.
    """
    if name not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {name!r}")
    for arg, v in (("seq_len", seq_len), ("n_train", n_train), ("n_test", n_test)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{arg}: expected a positive int, got {v!r}")
    if vocab is not None and name != "mqar":
        raise ValueError(f"vocab: only the MQAR task takes a vocabulary size, got vocab={vocab} for {name!r}")
    key = (name, seq_len, n_train, n_test, seed, vocab)
    if key in _CACHE:  # a grid trains many layers on the same data: generate it once per process
        _CACHE.move_to_end(key)
        return _CACHE[key]
    data = {"mqar": _mqar, "listops": _listops, "pathfinder": _pathfinder}[name](seq_len, n_train, n_test, seed, vocab)
    _CACHE[key] = data
    while len(_CACHE) > 2:
        _CACHE.popitem(last=False)
    return data


_CACHE: "OrderedDict[tuple, TaskData]" = OrderedDict()
