"""Backends: one table saying which implementation of every kernel family may run, and why not.

NATTEN-style dispatch: each backend of each family is a ``can_run(x, **extra) -> (ok, reason)``
predicate; ``choose(family, x, requested)`` walks the family's order and returns the first backend
that can run. One rule for every family (block_sparse, sparse_decode, estimate, attn_pool,
unit_scores, lightning):

* **Triton** can run on a CUDA device of compute capability >= 8.0, or on the CPU when the Triton
  interpreter is on (``TRITON_INTERPRET=1`` set before triton was imported) -- one predicate,
  ``triton_can_run``, for every family. With ``requested=None`` it is chosen on CUDA; on the CPU
  the interpreter is the default for block_sparse and sparse_decode (how the tests exercise those
  kernels through the library) and runs the families in ``INTERPRETER_ON_REQUEST`` only when asked
  for (their CPU callers train or score in loops).
* the **reference** (plain torch) always runs; a family may list other backends (``flex``).
* **flex** (block_sparse; compiled FlexAttention, ``kernels/block_sparse/flex.py``) runs on CUDA, and
  on the CPU for float32 inference without lse or sinks (``flex_can_run``). Chosen automatically
  on the CPU (before the reference) only from ``flex.CPU_MIN_Q_LEN`` query tokens (``flex_cpu_auto``:
  each new shape compiles once, which does not pay for short inputs); asked for, it runs any length.
* Every refusal is logged on the ``sparsattn`` logger at DEBUG with its reason; when a backend that
  was *asked for* cannot run, ``choose`` raises a ValueError with the reason -- unless
  ``fallback=True``, where the first such fall-back in the process for that (family, backend) is a
  WARNING (later ones DEBUG) and the next backend in the order is used.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from typing import Callable, Optional

import torch

log = logging.getLogger("sparsattn")

_HAS_TRITON = importlib.util.find_spec("triton") is not None
_CAP: dict = {}
_WARNED: set = set()


def _log(level: int, msg: str, *args) -> None:
    """Log unless torch.compile is tracing (Dynamo cannot trace logging calls; the choice is the same)."""
    if torch.compiler.is_compiling():
        return
    log.log(level, msg, *args)


def interpreter_on() -> bool:
    """interpreter_on: whether ``TRITON_INTERPRET=1`` is set in the environment."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_ACTIVE: list = []


def _interpreter_active() -> tuple[bool, str]:
    if not _ACTIVE:  # decided once per process (triton decorates its library at import)
        _ACTIVE.append(_probe_interpreter())
    return _ACTIVE[0]


def _probe_interpreter() -> tuple[bool, str]:
    try:
        import triton.language as tl
    except Exception as e:  # pragma: no cover - triton is a dependency
        return False, f"triton is not importable ({e})"
    if type(tl.sum).__name__ != "InterpretedFunction":
        return False, ("TRITON_INTERPRET=1 was set after triton was imported (Triton decides when its "
                       "library functions are decorated): set it before importing triton")
    return True, "TRITON_INTERPRET=1 on the CPU"


def triton_can_run(x: torch.Tensor, **extra) -> tuple[bool, str]:
    """triton_can_run: (ok, reason) for a Triton kernel on ``x``'s device -- the one CPU/interpreter rule."""
    if not _HAS_TRITON:  # pragma: no cover
        return False, "triton is not installed"
    if x.is_cuda:
        if x.device not in _CAP:
            _CAP[x.device] = torch.cuda.get_device_capability(x.device)[0]
        if _CAP[x.device] < 8:
            return False, "needs a GPU of compute capability >= 8.0"
        return True, "cuda device"
    if x.device.type == "cpu" and interpreter_on():
        return _interpreter_active()
    return False, f"device {x.device.type} (triton needs CUDA, or TRITON_INTERPRET=1 on the CPU)"


def reference_can_run(x: torch.Tensor, **extra) -> tuple[bool, str]:
    """reference_can_run: the plain torch reference always runs."""
    return True, "always available"


_CXX: dict = {}


def _cpp_compiler() -> Optional[str]:
    """A C++ compiler for torch.compile's CPU code (Inductor reads ``CXX``, else looks for c++/g++/clang++);
    looked up once per process and ``CXX`` value."""
    import shutil

    env = os.environ.get("CXX") or ""
    if env not in _CXX:
        found = None
        for c in ([env] if env else []) + ["c++", "g++", "clang++"]:
            found = shutil.which(c)
            if found:
                break
        _CXX[env] = found
    return _CXX[env]


def _flex_cpu_platform() -> tuple[bool, str]:
    """Inductor's own CPU FlexAttention condition (torch 2.11-2.13): AVX2, not macOS, no XPU, and
    ``ATEN_CPU_CAPABILITY`` not forced to "default"."""
    import sys

    try:
        avx2 = bool(torch.cpu._is_avx2_supported())
    except Exception:  # noqa: BLE001 - a torch without the probe: let Inductor decide at compile time
        avx2 = True
    if not avx2 or os.environ.get("ATEN_CPU_CAPABILITY") == "default":
        return False, "compiled FlexAttention on the CPU needs AVX2 (and ATEN_CPU_CAPABILITY not 'default')"
    if sys.platform == "darwin":
        return False, "compiled FlexAttention on the CPU is not supported on macOS"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return False, "compiled FlexAttention on the CPU is not supported when an XPU is present"
    return True, "avx2"


def flex_can_run(x: torch.Tensor, pattern=None, varlen: bool = False, softcap=None, sinks=None,
                 need_lse: bool = False, **extra) -> tuple[bool, str]:
    """flex_can_run: compiled FlexAttention runs block-sparse attention without columns or varlen, on
    CUDA, or on the CPU for float32 inference without lse or sinks (its CPU kernel returns no lse),
    with a C++ compiler, within ``flex.CPU_MAX_SHAPES`` compiled shapes per process. Whether the CPU
    path is chosen *automatically* is ``flex_cpu_auto``'s rule (length)."""
    if pattern is not None and pattern.columns is not None:
        return False, "pattern has columns (no column path in FlexAttention)"
    if varlen:
        return False, "per-sequence lengths are not supported by the flex backend"
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except Exception as e:
        return False, f"FlexAttention is not available ({e})"
    if x.is_cuda:
        return True, "cuda device, no columns"
    if x.device.type != "cpu":
        return False, f"device {x.device.type} (flex runs on CUDA or the CPU)"
    if x.dtype != torch.float32:
        return False, f"dtype {x.dtype} on the CPU (the CPU flex path is used and tested for float32 only)"
    if need_lse:
        return False, "the lse was asked for: compiled FlexAttention on the CPU returns none (torch <= 2.13)"
    if sinks is not None:
        return False, "learned sinks need the lse, which compiled FlexAttention on the CPU does not return"
    if torch.is_grad_enabled() and x.requires_grad:
        return False, "gradients needed: compiled FlexAttention on the CPU runs inference only"
    if _cpp_compiler() is None:
        return False, "no C++ compiler (c++, g++, clang++ or $CXX) for torch.compile on the CPU"
    ok, why = _flex_cpu_platform()
    if not ok:
        return False, why
    from .block_sparse import flex as _flex

    if _flex.cpu_broken():
        return False, _flex.cpu_broken()
    if _flex.cpu_shapes_left() <= 0 and pattern is not None and x.dim() == 4:
        return False, (f"{_flex.CPU_MAX_SHAPES} input shapes compiled for the CPU in this process already "
                       "(past the recompile limit Flex would run unfused)")
    return True, "cpu, float32 inference (compiled FlexAttention)"


def flex_cpu_auto(x: torch.Tensor, pattern=None, **extra) -> tuple[bool, str]:
    """flex_cpu_auto: whether the CPU flex path is chosen without being asked for: from
    ``flex.CPU_MIN_Q_LEN`` query tokens (below, the per-shape compile and fixed cost lose to the
    reference and to dense SDPA; measured in docs/results/cpu_flex_2026-12-05)."""
    from .block_sparse import flex as _flex

    T = pattern.q_len if pattern is not None else (x.shape[-2] if x.dim() >= 2 else 0)
    if T < _flex.CPU_MIN_Q_LEN:
        return False, f"{T} query tokens < {_flex.CPU_MIN_Q_LEN} (flex is chosen on the CPU from that length)"
    return True, f"cpu, {T} query tokens >= {_flex.CPU_MIN_Q_LEN}"


def estimate_triton_can_run(x: torch.Tensor, q_len: Optional[int] = None, kv_len: Optional[int] = None,
                            probs: bool = False, **extra) -> tuple[bool, str]:
    """estimate_triton_can_run: the streaming vertical/slash kernel needs ``q_len <= kv_len`` and no
    precomputed ``probs`` (with probs the sums are all that is left: the reference does them)."""
    if probs:
        return False, "probs given (only the sums are left to do)"
    if q_len is not None and kv_len is not None and q_len > kv_len:
        return False, f"q_len {q_len} > kv_len {kv_len}"
    return triton_can_run(x)


#: family -> ordered {backend name: can_run predicate}; the first that can run is the default
TABLE: dict[str, dict[str, Callable[..., tuple[bool, str]]]] = {
    "block_sparse": {"triton": triton_can_run, "flex": flex_can_run, "reference": reference_can_run},
    "sparse_decode": {"triton": triton_can_run, "reference": reference_can_run},
    "estimate": {"triton": estimate_triton_can_run, "reference": reference_can_run},
    "attn_pool": {"triton": triton_can_run, "reference": reference_can_run},
    "unit_scores": {"triton": triton_can_run, "reference": reference_can_run},
    "lightning": {"triton": triton_can_run, "torch": reference_can_run},
}


#: families whose *default* stays off the Triton interpreter on the CPU (the interpreter runs them only
#: when ``backend="triton"`` is asked for): their CPU callers train or score in loops (the lightning
#: mixer, SeerAttention's gate distillation through attn_pool, decode scoring, MInference's estimate).
#: Measured 2026-12-05 on the shared 2-core CPU: with the interpreter as every family's default,
#: tests/methods/test_seer_attention.py::test_training_lowers_loss_and_recovers_planted_blocks took
#: 75.2 s instead of 4.3 s (its tests and those of nn/test_lightning, quest, double_sparsity and
#: minference still passed). The reason is logged like any other refusal.
INTERPRETER_ON_REQUEST = frozenset({"estimate", "attn_pool", "unit_scores", "lightning"})


def can_run(family: str, backend: str, x: torch.Tensor, **extra) -> tuple[bool, str]:
    """can_run: (ok, reason) for ``backend`` of kernel ``family`` on inputs like ``x``."""
    if family not in TABLE:
        raise ValueError(f"family: expected one of {sorted(TABLE)}, got {family!r}")
    fams = TABLE[family]
    if backend not in fams:
        raise ValueError(f"backend: expected one of {list(fams)} or None for {family}, got {backend!r}")
    return fams[backend](x, **extra)


def choose(family: str, x: torch.Tensor, requested: Optional[str] = None, *, fallback: bool = False,
           **extra) -> str:
    """choose: the backend of ``family`` that runs on ``x`` (see the module docstring for the rule).

    ``requested``: a backend name or None (the first in the family's order that can run). A
    requested backend that cannot run raises ``ValueError('backend: ...')`` with the reason, or with
    ``fallback=True`` logs a WARNING the first time in the process and uses the default choice.
    """
    if family not in TABLE:
        raise ValueError(f"family: expected one of {sorted(TABLE)}, got {family!r}")
    fams = TABLE[family]
    if requested is not None:
        if requested not in fams:
            raise ValueError(f"backend: expected one of {list(fams)} or None for {family}, got {requested!r}")
        ok, why = fams[requested](x, **extra)
        if ok:
            _log(logging.DEBUG, "sparsattn %s backend %s chosen (requested): %s", family, requested, why)
            return requested
        _log(logging.DEBUG, "sparsattn %s backend %s refused: %s", family, requested, why)
        if not fallback:
            raise ValueError(f"backend: {requested!r} cannot run these inputs: {why}")
        key = (family, requested)
        level = logging.DEBUG if key in _WARNED else logging.WARNING
        _WARNED.add(key)
        _log(level, "sparsattn %s: requested backend %s cannot run (%s); falling back", family, requested, why)
    for name, pred in fams.items():
        if name == "flex" and not x.is_cuda:  # the length rule first: cheap, and traceable (decode steps)
            ok, why = flex_cpu_auto(x, **extra)
            if ok:
                ok, why = pred(x, **extra)
        else:
            ok, why = pred(x, **extra)
        if ok and name == "triton" and family in INTERPRETER_ON_REQUEST and not x.is_cuda:
            ok, why = False, f"the {family} kernel runs in the interpreter only on request (backend='triton')"
        if ok:
            _log(logging.DEBUG, "sparsattn %s backend %s chosen: %s", family, name, why)
            return name
        _log(logging.DEBUG, "sparsattn %s backend %s refused: %s", family, name, why)
    raise RuntimeError(f"{family}: no backend can run")  # pragma: no cover (the reference always can)


def describe(device=None, *, tokens: int = 4096, head_dim: int = 64) -> list[dict]:
    """describe: per family and backend, whether it can run on ``device`` (default: cuda when available,
    else cpu) for float32 inputs of ``tokens`` query tokens, why, and which backend is the automatic
    choice there (what ``sparsattn list`` prints)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.zeros(1, 1, tokens, head_dim, device=device)
    rows = []
    for family, fams in TABLE.items():
        try:
            chosen = choose(family, x)
        except RuntimeError:  # pragma: no cover (the reference always runs)
            chosen = None
        for name, pred in fams.items():
            ok, why = pred(x)
            if ok and name == "triton" and family in INTERPRETER_ON_REQUEST and not x.is_cuda:
                why += f"; on the CPU only on request (backend='triton')"
            if ok and name == "flex" and not x.is_cuda:
                auto, awhy = flex_cpu_auto(x)
                why += "; " + ("chosen automatically" if auto else "not automatic") + f" ({awhy})"
            rows.append({"family": family, "backend": name, "can_run": ok, "default": name == chosen, "reason": why})
    return rows


__all__ = ["describe", "INTERPRETER_ON_REQUEST", "TABLE", "can_run", "choose", "estimate_triton_can_run", "flex_can_run", "flex_cpu_auto", "interpreter_on", "reference_can_run", "triton_can_run"]
