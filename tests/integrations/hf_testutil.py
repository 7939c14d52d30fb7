"""Helpers of the HF integration tests: tiny randomly initialised decoders of several families
(offline, CPU, fast), eager references with explicit 4-D masks, padded inputs."""
from __future__ import annotations

import inspect

import pytest
import torch

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, head_dim=16)
FAMILIES = ["llama", "qwen2", "mistral", "gemma2", "gemma3"]


def make_model(family: str, *, attn_implementation: str = "eager", seed: int = 0, **over):
    """A tiny causal LM of ``family`` (GQA 4/2 heads, 4 layers, vocab 128); sliding windows of 24
    tokens on some layers for the families that have them (shorter than the test sequences)."""
    import transformers as tf

    kw = dict(COMMON)
    if family == "llama":
        cfg_cls, model_cls = tf.LlamaConfig, tf.LlamaForCausalLM
    elif family == "qwen2":
        cfg_cls, model_cls = tf.Qwen2Config, tf.Qwen2ForCausalLM
        kw.update(use_sliding_window=True, sliding_window=24, max_window_layers=2)
    elif family == "mistral":
        cfg_cls, model_cls = tf.MistralConfig, tf.MistralForCausalLM
        kw.update(sliding_window=24)
    elif family == "gemma2":
        cfg_cls, model_cls = tf.Gemma2Config, tf.Gemma2ForCausalLM
        kw.update(sliding_window=24, attn_logit_softcapping=None, final_logit_softcapping=None)
    elif family == "gemma3":
        if not hasattr(tf, "Gemma3TextConfig"):
            pytest.skip("transformers has no Gemma3 text model")
        cfg_cls, model_cls = tf.Gemma3TextConfig, tf.Gemma3ForCausalLM
        kw.update(sliding_window=24)
    else:  # pragma: no cover
        raise ValueError(family)
    kw.update(over)
    torch.manual_seed(seed)
    cfg = cfg_cls(**kw)
    cfg._attn_implementation = attn_implementation
    model = model_cls(cfg).eval()
    return model


def cache_kwarg(model) -> str:
    """The name transformers uses for the cache argument (``cache`` in 5.24, ``past_key_values`` before)."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def additive(mask: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """bool keep-mask -> additive float mask (0 / dtype min), as transformers' eager path expects."""
    return torch.where(mask, torch.zeros((), dtype=dtype), torch.full((), torch.finfo(dtype).min, dtype=dtype))


def causal_keep(T: int, padding_mask=None, window=None, Tq=None) -> torch.Tensor:
    """bool [B|1, 1, Tq, T]: causal (bottom-right) & window & key padding."""
    Tq = T if Tq is None else Tq
    i = torch.arange(Tq)[:, None] + (T - Tq)
    j = torch.arange(T)[None, :]
    keep = j <= i
    if window is not None:
        keep = keep & (i - j < window)
    keep = keep[None, None]
    if padding_mask is not None:
        keep = keep & padding_mask.bool()[:, None, None, :]
    return keep


def eager_logits(model, input_ids, layer_masks: dict, position_ids=None):
    """Logits of an *eager* model where decoder layer l sees the bool keep-mask ``layer_masks[l]``
    ``[B|1, H|1, T, T]`` (swapped in by forward pre-hooks on the decoder layers)."""
    assert model.config._attn_implementation == "eager"
    layers = model.model.layers
    handles = []
    for l, m in layer_masks.items():
        add = additive(m)

        def hook(mod, args, kwargs, add=add):
            kwargs["attention_mask"] = add
            return args, kwargs

        handles.append(layers[l].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            return model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


def left_padded(B: int, T: int, pads, seed: int = 1):
    """input_ids [B, T] (vocab 128), 2-D mask with ``pads[b]`` leading zeros, and position ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.long)
    for b, p in enumerate(pads):
        am[b, :p] = 0
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    return ids, am, pos


def layer_windows(model) -> dict:
    """{layer: sliding window or None} as the model's own masks apply them."""
    out = {}
    for l, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        out[l] = getattr(attn, "sliding_window", getattr(attn.config, "sliding_window", None))
    return out


def decode_step_logits(model, ids, am, pos, next_tok, cache):
    """Prefill ``ids`` (left padded: ``am``, ``pos``) into ``cache``, then feed ``next_tok [B, 1]``
    as one decode step; returns that step's logits ``[B, V]``."""
    ck = cache_kwarg(model)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=True, **{ck: cache})
        am2 = torch.cat([am, torch.ones(am.shape[0], 1, dtype=am.dtype)], 1)
        out = model(input_ids=next_tok, attention_mask=am2, position_ids=pos[:, -1:] + 1, use_cache=True,
                    **{ck: cache})
    return out.logits[:, -1]


def greedy_steps(model, ids, am, pos, cache, steps, extra_last=None):
    """Prefill, then ``steps`` greedy decode steps through ``cache``; returns (tokens [B, T + steps],
    logits of every decode step [steps, B, V], and the logits [B, n, V] of one last forward of the
    tokens ``extra_last [B, n]`` (several queries on the cache) or None)."""
    ck = cache_kwarg(model)
    logits = []
    last = None
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=True, **{ck: cache})
        toks, m, p = ids, am, pos
        for _ in range(steps):
            nxt = out.logits[:, -1:].argmax(-1)
            toks = torch.cat([toks, nxt], 1)
            m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
            p = torch.cat([p, p[:, -1:] + 1], 1)
            out = model(input_ids=nxt, attention_mask=m, position_ids=p[:, -1:], use_cache=True, **{ck: cache})
            logits.append(out.logits[:, -1])
        if extra_last is not None:
            m = torch.cat([m, torch.ones_like(extra_last)], 1)
            p2 = p[:, -1:] + 1 + torch.arange(extra_last.shape[1], device=p.device)
            last = model(input_ids=extra_last, attention_mask=m, position_ids=p2, use_cache=True, **{ck: cache}).logits
    return toks, torch.stack(logits), last
