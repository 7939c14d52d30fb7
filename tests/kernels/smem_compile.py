"""Shared memory of the library's Triton launches, measured by compiling them for Hopper off-GPU.

Triton's NVIDIA backend compiles a kernel for ``sm_90`` without a GPU, and the compiled kernel's
``metadata.shared`` is the shared memory its launch asks for: the number behind Triton's
``OutOfResources: shared memory`` on the GPU. ``capture_launches`` records the launches a callable
makes (argument types and 16-byte alignment, constexprs, launch options) without running them,
and ``shared_memory`` compiles them in a subprocess without ``TRITON_INTERPRET`` (under the
interpreter ``triton.jit`` builds interpreted functions, which cannot be compiled).

What the interpreter changes is set back as the GPU has it: the block-sparse launch configuration
(``kernel_config`` on CUDA) while capturing, and at compile time the interpreter-only constexprs
(``UPCAST`` off, ``PREC`` "tf32" and ``IEEE`` off below float32). On an H100 (triton 3.6,
2026-12-05) the block-sparse forward at head_dim 128 in bf16 asked for 425984 bytes whenever a length
was not a multiple of the block; compiling the captured launch here gives that same number.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import torch

#: the opt-in shared memory per block of an H100 / H200 (227 KB), Triton's "Hardware limit"
HOPPER_SMEM = 232448
#: (module, kernel attribute) of every Triton kernel; "_kernel()" marks a module whose kernel is
#: built on first use by its ``_kernel()`` function
KERNELS = {
    "block_sparse": ("sparsattn.kernels.block_sparse.triton", ("_bs_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkv_kernel")),
    "sparse_decode": ("sparsattn.kernels.sparse_decode.triton", ("_decode_kernel", "_merge_kernel")),
    "estimate": ("sparsattn.kernels.estimate.triton", ("_lastq_lse_kernel", "_lastq_vs_kernel")),
    "unit_scores": ("sparsattn.kernels.unit_scores.triton", ("_bound_kernel", "_label_kernel")),
    "lightning": ("sparsattn.kernels.lightning.triton", ("_kernel()",)),
    "attn_pool": ("sparsattn.kernels.attn_pool.triton", ("_kernel()",)),
}

_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
           torch.int32: "i32", torch.int64: "i64", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
           torch.bool: "i1"}


def _arg(a):
    if isinstance(a, torch.Tensor):
        return ["tensor", _DTYPES[a.dtype], a.data_ptr() % 16 == 0]
    if isinstance(a, bool):
        return ["bool", a]
    if isinstance(a, int):
        return ["int", a]
    if isinstance(a, float):
        return ["float", a]
    if a is None:
        return ["none", None]
    raise TypeError(f"unexpected kernel argument {type(a).__name__}")


def capture_launches(run, family: str) -> list:
    """Run ``run()`` with the kernels of ``family`` (a key of ``KERNELS``) replaced by recorders and
    return ``[(module, kernel, {"args": [...], "kw": {...}}), ...]``: every distinct launch, not run
    (outputs stay as allocated; only the launches matter)."""
    from sparsattn.kernels import block_sparse as BS

    mod_name, names = KERNELS[family]
    mod = importlib.import_module(mod_name)
    seen: list = []

    def recorder(name):
        class _Rec:
            def __getitem__(self, grid):
                def record(*args, **kw):
                    entry = (mod_name, name, {"args": [_arg(a) for a in args], "kw": dict(kw)})
                    if entry not in seen:
                        seen.append(entry)
                return record
        return _Rec()

    cpu_config = BS.kernel_config

    def gpu_config(D, block_q, block_k, dtype, device):  # the block-sparse configuration on CUDA
        return cpu_config(D, block_q, block_k, dtype, torch.device("cuda"))

    orig = {n: getattr(mod, n.rstrip("()")) for n in names}
    try:
        for n in names:
            rec = recorder(n)
            setattr(mod, n.rstrip("()"), (lambda r=rec: r) if n.endswith("()") else rec)
        BS.kernel_config = gpu_config
        run()
    finally:
        BS.kernel_config = cpu_config
        for n, fn in orig.items():
            setattr(mod, n.rstrip("()"), fn)
    return seen


def _compile_one(mod_name: str, name: str, desc: dict, cc: int) -> int:
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    mod = importlib.import_module(mod_name)
    fn = mod._kernel() if name.endswith("()") else getattr(mod, name)
    kw = dict(desc["kw"])
    types = {v: k for k, v in _DTYPES.items()}
    vals = []
    for kind, *rest in desc["args"]:
        if kind == "tensor":
            t = torch.empty(64, dtype=types[rest[0]])
            vals.append(t if rest[1] else t[1:])  # keep the capture's 16-byte alignment
        else:
            vals.append(rest[0])
    low = next((v.dtype for v in vals if isinstance(v, torch.Tensor) and v.is_floating_point()), torch.float32)
    low = low in (torch.float16, torch.bfloat16)
    # the interpreter-only constexprs, as the GPU sets them
    if "UPCAST" in kw:
        kw["UPCAST"] = False
    if "PREC" in kw and low:
        kw["PREC"] = "tf32"
    if "IEEE" in kw:
        kw["IEEE"] = not low
    options = {"num_warps": kw.pop("num_warps", 4), "num_stages": kw.pop("num_stages", 3)}
    vals += [kw[n] for n in fn.arg_names[len(vals):]]
    sig, consts, attrs = {}, {}, {}
    for i, (p, v) in enumerate(zip(fn.params, vals)):
        if p.is_constexpr:
            sig[p.name], consts[p.name] = "constexpr", v
            continue
        ty, attr = native_specialize_impl(CUDABackend, v, False, True, True)
        sig[p.name] = ty
        if ty == "constexpr":
            consts[p.name] = v
        if isinstance(attr, str) and attr:
            attrs[(i,)] = CUDABackend.parse_attr(attr)
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    return int(triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options).metadata.shared)


def shared_memory(launches: list, cc: int = 90, timeout: float = 900.0) -> list:
    """Compile each ``(module, kernel, capture)`` of ``launches`` for ``sm_<cc>`` in a subprocess
    without ``TRITON_INTERPRET``; returns the shared memory in bytes of each."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    here = os.path.dirname(os.path.abspath(__file__))
    code = ("import json, sys; sys.path.insert(0, %r); import smem_compile as s; d = json.load(sys.stdin); "
            "print(json.dumps([s._compile_one(m, n, c, d['cc']) for m, n, c in d['launches']]))" % here)
    res = subprocess.run([sys.executable, "-c", code], input=json.dumps({"launches": launches, "cc": cc}),
                         capture_output=True, text=True, env=env, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def nvidia_backend_available() -> bool:
    """Whether this triton can compile for an NVIDIA target (its NVIDIA backend and ptxas ship with it)."""
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception:
        return False
    return True


def over_budget(launches: list, sizes: list) -> list:
    """``(module.kernel constexprs, bytes)`` of every launch above ``HOPPER_SMEM``."""
    return [(f"{m.rsplit('.', 2)[-2]}.{n} {c['kw']}", s) for (m, n, c), s in zip(launches, sizes) if s > HOPPER_SMEM]
