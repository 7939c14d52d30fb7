"""demo_speed: the demo's prefill timing -- one full forward of a long prompt, dense vs each sparse method.

Measured in the run that prints it, on the device it runs on: the unpatched model (transformers'
SDPA, dense causal) against the model patched with each method (selection included), the sparse
attention through the backend the table picks automatically (on the CPU: compiled FlexAttention
from ``flex.CPU_MIN_Q_LEN`` tokens, see ``kernels/backends.py``). FlexAttention compiles once per
input shape before the timed calls (reported as ``compile_s``; Inductor also keeps it on disk, so a
later run loads it). What ran (backend, density, fallbacks) is read from the ``PatchReport`` of
each patched forward.
"""
from __future__ import annotations

import time
from typing import Optional

import torch


def _prompt_ids(tok, T: int, seed: int = 104729) -> list[int]:
    """A passkey prompt of exactly ``T`` tokens (the demo's task, so data-dependent methods see real text)."""
    from .eval.tasks import make_samples

    s = make_samples("passkey", tok, T, 1, seed=seed, progress=False)[0]
    ids = tok(s.prompt, add_special_tokens=False)["input_ids"]
    if len(ids) < T:  # the haystack fills to the length; pad defensively by repeating it
        ids = (ids * (T // max(len(ids), 1) + 1))
    return ids[-T:]


def _forward_s(model, x: torch.Tensor) -> float:
    if x.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        model(input_ids=x, use_cache=False, logits_to_keep=1)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def warm_flex(model, T: int, block: int = 64) -> Optional[float]:
    """Compile the flex kernel for this model's head shapes at ``T`` tokens (block ``block``), if the
    table would pick flex there; returns the seconds it took (None when flex is not the choice)."""
    from . import attention, choose_backend, patterns

    m, Hq, Hkv, D = _shapes(model)
    dev = next(model.parameters()).device
    dt = next(model.parameters()).dtype
    q = torch.randn(1, Hq, T, D, device=dev, dtype=dt)
    k = torch.randn(1, Hkv, T, D, device=dev, dtype=dt)
    v = torch.randn(1, Hkv, T, D, device=dev, dtype=dt)  # not k itself: Dynamo specialises on aliased inputs
    p = patterns.sink_local(T, 64, 256, block_q=block, device=dev)
    scale = getattr(m, "scaling", None)
    with torch.no_grad():
        if choose_backend(q, p) != "flex":
            return None
        t0 = time.perf_counter()
        attention(q, k, v, p, causal=True, scale=scale)
    return time.perf_counter() - t0


def _shapes(model):
    from .integrations.hf import attention_modules

    m = next(iter(attention_modules(model).values()))
    cfg = m.config
    Hq, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    return m, Hq, Hkv, getattr(m, "head_dim", None) or cfg.hidden_size // Hq


def probe_backend(model, method, T: int) -> tuple[str, str]:
    """(backend, reason) the table picks for ``method``'s pattern at ``T`` tokens, from one selection on
    random q/k of the model's head shapes (the kernel is not run)."""
    from . import choose_backend
    from .kernels.backends import TABLE
    from .methods.base import SelectContext

    m, Hq, Hkv, D = _shapes(model)
    dev, dt = next(model.parameters()).device, next(model.parameters()).dtype
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(1, Hq, T, D, generator=g).to(dev, dt)
    k = torch.randn(1, Hkv, T, D, generator=g).to(dev, dt)
    with torch.no_grad():
        p = method.select(q, k, SelectContext(layer=0, causal=True, scale=getattr(m, "scaling", None)))
        name = choose_backend(q, p)
    if name != "reference":
        return name, ""
    refusals = [f"{b}: {TABLE['block_sparse'][b](q, pattern=p)[1]}" for b in TABLE["block_sparse"] if b != "reference"]
    return name, "; ".join(refusals)


def prefill_speed(model, tok, methods: dict, lengths, *, progress: bool = True, time_reference=None) -> dict:
    """prefill_speed: ``{(method, T): {"seconds", "speedup", "backend", "density", "fallbacks"}}`` plus
    ``{("_compile", T): seconds}``: one timed forward of a ``T``-token prompt per method and length
    (``methods``: ``{name: get_method config}``; "dense" = the unpatched model).

    On the CPU a method whose pattern only the plain-torch reference can run (token columns: no
    flex path) is not timed unless ``time_reference`` (default: only below 4096 tokens, where it
    takes seconds): its row says why (``"seconds": None``, ``"backend": "reference (not timed: ...)"``).
    """
    from .integrations.hf import patched
    from .methods import get_method, method_class

    dev = next(model.parameters()).device
    out: dict = {}
    for T in lengths:
        x = torch.tensor([_prompt_ids(tok, int(T))], dtype=torch.long, device=dev)
        blocks = {cfg.get("block_size", 64) for cfg in methods.values()}
        out[("_compile", T)] = sum(s or 0.0 for s in (warm_flex(model, T, b) for b in sorted(blocks)))
        dense_s = None
        base = next((n for n, c in methods.items() if not c and method_class(n).exact), None)
        if base is not None:  # the exact method with its defaults: the unpatched model
            dense_s = _forward_s(model, x)
            out[(base, T)] = {"seconds": dense_s, "speedup": 1.0, "backend": "sdpa", "density": 1.0, "fallbacks": 0}
            if progress:
                print(f"  prefill {T} tokens: {base} {dense_s:.1f} s", flush=True)
        for name, cfg in methods.items():
            if name == base:
                continue
            meth = get_method(name, **cfg)
            if dev.type == "cpu" and not (time_reference if time_reference is not None else T < 4096):
                be, why = probe_backend(model, meth, int(T))
                if be == "reference":
                    out[(name, T)] = {"seconds": None, "speedup": None, "backend": f"reference (not timed: {why})",
                                      "density": None, "fallbacks": 0}
                    if progress:
                        print(f"  prefill {T} tokens: {name} not timed (the reference would run it: {why})", flush=True)
                    continue
            with patched(model, method=meth) as rep:
                s = _forward_s(model, x)
            backends = sorted({b for st in rep.stats.values() for b in st.backends})
            out[(name, T)] = {"seconds": s, "speedup": None if dense_s is None else dense_s / s,
                              "backend": ",".join(backends) or "-", "density": rep.density(),
                              "fallbacks": rep.n_fallbacks}
            if progress:
                print(f"  prefill {T} tokens: {name} {s:.1f} s ({out[(name, T)]['backend']})", flush=True)
    return out


__all__ = ["prefill_speed", "probe_backend", "warm_flex"]
