"""decode_run: the decode quality driver's runs: split a passkey prompt before its question, prefill
the part before it densely once, then feed the question token by token through the decode path of a
method (``sparsattn.patched(model, decode=method)``) with one ``SelectRecorder`` measuring top-k recall,
and generate the answer greedily."""
from __future__ import annotations

import contextlib
import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..methods.base import Method, SelectContext
from .recorder import SelectRecorder
from .tasks import QUESTION_TEMPLATE, Sample, encode_ids

__all__ = ["split_prompt", "prefill", "DecodeResult", "decode_run", "AllTokens"]


def split_prompt(tokenizer: Any, sample: Sample) -> tuple[list[int], int]:
    """split_prompt: ``(ids, n_prefill)``: the prompt's token ids and how many precede its question.

    The question is ``"\\n" + QUESTION_TEMPLATE.format(key=...)`` at the end of a passkey prompt;
    ``ids[:n_prefill]`` is the longest prefix shared by the tokenisation of the prompt and of the
    text before the question (a token merged across the boundary goes to the question part).
    Raises:
        ValueError: the prompt does not end with the passkey question, or nothing precedes it.
    """
    key = sample.meta.get("key")
    q = "\n" + QUESTION_TEMPLATE.format(key=key) if key is not None else None
    if q is None or not sample.prompt.endswith(q):
        raise ValueError("sample: expected a passkey prompt ending with its question "
                         f"({QUESTION_TEMPLATE[:40]!r}...), got one ending {sample.prompt[-60:]!r}")
    ids = encode_ids(tokenizer, sample.prompt)
    pre = encode_ids(tokenizer, sample.prompt[: len(sample.prompt) - len(q)])
    n = 0
    for a, b in zip(ids, pre):
        if a != b:
            break
        n += 1
    if n < 1 or n >= len(ids):
        raise ValueError(f"sample: could not split the prompt before its question (shared prefix {n} of {len(ids)} tokens)")
    return ids, n


# ----------------------------------------------------------------------------------------------
# prefill once, decode many times
# ----------------------------------------------------------------------------------------------

def _cache_kwarg(model) -> str:
    """The name of the forward's cache argument (``cache`` in newer transformers, ``past_key_values`` before)."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _model_sizes(model) -> tuple[int, int]:
    """(attention layers, query heads per KV head)."""
    from ..integrations.hf import attention_modules

    mods = attention_modules(model)
    cfg = next(iter(mods.values())).config
    hq = cfg.num_attention_heads
    hkv = getattr(cfg, "num_key_value_heads", None) or hq
    return len(mods), hq // hkv


def prefill(model, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """prefill: dense (unpatched) forward of ``ids [1, P]``; the per-layer ``(keys, values)`` of the cache.

    Raises:
        ValueError: the model is patched by sparsattn (the prefill must be the model's own dense one).
    """
    from transformers import DynamicCache

    from ..integrations.hf import is_patched

    if is_patched(model):
        raise ValueError("model: expected an unpatched model for the dense prefill (call sparsattn.unpatch first)")
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
        raise ValueError(f"ids: expected [1, P >= 1] token ids, got {tuple(ids.shape)}")
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=ids, use_cache=True, **{_cache_kwarg(model): cache})
    out = [(layer.keys, layer.values) for layer in cache.layers]
    if len(out) == 0 or any(kv[0] is None or kv[0].shape[2] != ids.shape[1] for kv in out):
        raise RuntimeError("prefill: the cache does not hold one (keys, values) pair of the prefix per layer")
    return out


@dataclass
class DecodeResult:
    """DecodeResult: ``tokens`` (generated, greedy), ``step_logits`` float32 ``[steps, V]`` (when kept:
    the teacher-forced steps, then the generated ones), ``recorder`` summary, ``calls`` by phase,
    ``needle``: ``NeedleRecorder.summary()`` (``decode_needle``) when a needle was given."""

    tokens: list[int]
    step_logits: Optional[torch.Tensor] = None
    recall: dict = field(default_factory=dict)
    calls: dict = field(default_factory=dict)
    seconds: float = 0.0
    needle: dict = field(default_factory=dict)


def decode_run(model, prefix_kv, tail: torch.Tensor, *, max_new_tokens: int, method=None,
               backend: Optional[str] = None, record_recall: bool = True, keep_logits: bool = False,
               needle: Optional[tuple] = None, needle_threshold: float = 0.1, needle_keep: float = 0.5) -> DecodeResult:
    """decode_run: feed ``tail [1, n]`` one token at a time through the decode path after the cached
    prefix, then generate ``max_new_tokens`` greedy tokens.

    Args:
        model: the (unpatched) causal LM.
        prefix_kv: ``prefill(model, prefix)`` (not modified; each run appends to its own cache).
        tail: the question tokens ``[1, n >= 1]`` on the model's device.
        max_new_tokens: greedy tokens generated after the tail (the first from the last tail step).
        method: a decode-phase ``Method`` instance (used inside ``sparsattn.patched(model,
            decode=method)``), or None = the model's own dense decode.
        backend: kernel backend for the patched layers (None = automatic; "reference" on the CPU).
        record_recall: record top-k recall / density while the tail is fed (method only).
        keep_logits: return the float32 logits of every step.
        needle: ``(cache positions, n_answer)`` (``decode_needle.needle_keys``): record the needle
            coverage of the method's selections at the answer steps (the last tail step and the
            first ``n_answer - 1`` generated ones; method only), with ``needle_threshold`` /
            ``needle_keep`` as in ``sparsattn.eval.needle``.
    """
    from ..integrations import hf
    from ..integrations.hf import SparseCache

    if tail.dim() != 2 or tail.shape[0] != 1 or tail.shape[1] < 1:
        raise ValueError(f"tail: expected [1, n >= 1] token ids, got {tuple(tail.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
    ck = _cache_kwarg(model)
    recorder = SelectRecorder(method) if method is not None else None
    nrec = None
    if needle is not None and method is not None:
        from .decode_needle import NeedleRecorder

        nrec = NeedleRecorder(method, needle[0], threshold=needle_threshold, keep=needle_keep)
        n_answer = int(needle[1])
    logits: list[torch.Tensor] = []
    t0 = time.perf_counter()
    with contextlib.ExitStack() as st:
        if method is not None:
            st.enter_context(hf.patched(model, decode=method, backend=backend))
            st.enter_context(recorder)
            if nrec is not None:
                st.enter_context(nrec)
        st.enter_context(torch.inference_mode())
        cache = SparseCache(config=model.config)
        for layer, (k, v) in enumerate(prefix_kv):
            cache.update(k, v, layer)  # DynamicCache concatenates: the prefix tensors are not written

        def step(tok):
            out = model(input_ids=tok, use_cache=True, **{ck: cache}).logits[:, -1]
            if keep_logits:
                logits.append(out.float()[0])
            return out

        if recorder is not None:
            recorder.active = record_recall
        for i in range(tail.shape[1]):
            if nrec is not None:
                nrec.active = i == tail.shape[1] - 1  # the last question token's output is the first answer token
            last = step(tail[:, i:i + 1])
        if recorder is not None:
            recorder.active = False
        nxt = last.argmax(-1, keepdim=True)
        gen = [nxt]
        for j in range(max_new_tokens - 1):
            if nrec is not None:
                nrec.active = j < n_answer - 1
            nxt = step(nxt).argmax(-1, keepdim=True)
            gen.append(nxt)
        if nrec is not None:
            nrec.active = False
        tokens = torch.cat(gen, 1)[0].tolist()  # the one host sync of the run
    res = DecodeResult(tokens=tokens, step_logits=torch.stack(logits) if keep_logits else None,
                       seconds=time.perf_counter() - t0)
    if nrec is not None:
        res.needle = nrec.summary()
    if recorder is not None:
        res.recall = recorder.summary()
        res.calls = dict(recorder.calls)
        for v in (res.recall.get("top10_recall"), res.recall.get("density")):
            if v is not None and not (0.0 <= v <= 1.0 + 1e-6):
                raise RuntimeError(f"decode_quality: recall/density out of [0, 1]: {v}")
    if res.step_logits is not None and not bool(torch.isfinite(res.step_logits).all()):
        raise RuntimeError("decode_quality: non-finite logits in a decode run")
    return res


@dataclass
class AllTokens(Method):
    """AllTokens: every valid cached token (dense decode expressed as a selection; not registered).

    The reference of the full-budget check that shares the sparse decode kernel with the methods:
    on a bf16 GPU, a method at full budget may differ from SDPA's dense decode by the kernel's
    rounding alone; ``match_kernel_dense`` compares it with this run instead.
    """

    name = "dense_kernel"
    paper = "dense decode attention over every cached token"
    phase = "decode"

    def select(self, q, k, ctx: Optional[SelectContext] = None):
        from ..methods._select import decode_inputs, full_pattern

        q, k, kl = decode_inputs(q, k, ctx)
        return full_pattern(k.shape[0], k.shape[1], kl, k.shape[2])
