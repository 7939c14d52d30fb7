"""Shared memory of the block-sparse kernels' launches, measured by compiling them for Hopper off-GPU.

Triton's NVIDIA backend compiles a kernel for ``sm_90`` without a GPU, and the compiled kernel's
``metadata.shared`` is the shared memory its launch asks for: the number behind Triton's
``OutOfResources: shared memory`` on the GPU. ``capture_launches`` records the kernels that one
``sparsattn.attention`` forward + backward launches (their argument types, alignments, constexprs
and launch options; it runs the kernels as usual, under the interpreter on the CPU), and
``shared_memory`` compiles them in a subprocess without ``TRITON_INTERPRET`` (under the interpreter
``triton.jit`` builds interpreted functions, which cannot be compiled). The ``UPCAST`` constexpr
(bf16 computed in fp32 under the interpreter only) is set as the GPU sets it.

On an H100 (triton 3.6, 2026-12-05) the forward at head_dim 128 in bf16 asked for 425984 bytes
whenever the length was not a multiple of the block; compiling the captured launch here gives
the same number, so this check runs in CI.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

KERNELS = ("_bs_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkv_kernel")
#: the opt-in shared memory per block of an H100 / H200 (227 KB), Triton's "Hardware limit"
HOPPER_SMEM = 232448

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
    raise TypeError(f"unexpected kernel argument {type(a).__name__}")


def capture_launches(run, launch: bool = False) -> dict:
    """Run ``run()`` (a callable launching block-sparse attention) with the three kernels wrapped,
    and return ``{kernel name: {"args": [...], "kw": {...}}}`` for the first launch of each. With
    ``launch=False`` the kernels are not run (outputs stay as allocated: only the launches matter)
    and get the launch configuration ``kernel_config`` gives on CUDA (on the CPU the interpreter's
    configuration would be captured otherwise)."""
    from sparsattn.kernels import block_sparse as BS
    from sparsattn.kernels.block_sparse import triton as K

    caps: dict = {}
    cpu_config = BS.kernel_config

    def gpu_config(D, block_q, block_k, dtype, device):  # the launch configuration the GPU would get
        return cpu_config(D, block_q, block_k, dtype, torch.device("cuda"))

    class _Wrap:
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            def record(*args, **kw):
                caps.setdefault(self.name, {"args": [_arg(a) for a in args], "kw": dict(kw)})
                if launch:
                    self.fn[grid](*args, **kw)
            return record

    orig = {n: getattr(K, n) for n in KERNELS}
    try:
        for n, fn in orig.items():
            setattr(K, n, _Wrap(n, fn))
        if not launch:
            BS.kernel_config = gpu_config
        run()
    finally:
        BS.kernel_config = cpu_config
        for n, fn in orig.items():
            setattr(K, n, fn)
    return caps


def _compile_one(name: str, desc: dict, cc: int) -> int:
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    from sparsattn.kernels.block_sparse import triton as K

    fn = getattr(K, name)
    kw = dict(desc["kw"])
    kw["UPCAST"] = False  # as on the GPU
    options = {"num_warps": kw.pop("num_warps"), "num_stages": kw.pop("num_stages")}
    types = {v: k for k, v in _DTYPES.items()}
    vals = []
    for kind, *rest in desc["args"]:
        if kind == "tensor":
            t = torch.empty(64, dtype=types[rest[0]])
            vals.append(t if rest[1] else t[1:])  # keep the capture's 16-byte alignment
        else:
            vals.append(rest[0])
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


def shared_memory(launches: list, cc: int = 90, timeout: float = 600.0) -> list:
    """Compile each ``(kernel name, capture)`` of ``launches`` for ``sm_<cc>`` in a subprocess
    without ``TRITON_INTERPRET``; returns the shared memory in bytes of each."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    here = os.path.dirname(os.path.abspath(__file__))
    code = ("import json, sys; sys.path.insert(0, %r); import smem_compile as s; "
            "d = json.load(sys.stdin); print(json.dumps([s._compile_one(n, c, d['cc']) for n, c in d['launches']]))"
            % here)
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
