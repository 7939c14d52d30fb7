"""SeerAttention calibration of a model: train the AttnGates on the model's own attention
(SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs, arXiv 2410.13276).

Model-level fitting of ``sparsattn.methods.seer_attention.SeerAttention``: the self-distillation
of ``sparsattn.train.seer_gate`` (``gate_loss``: KL to the block max-pooled attention of the frozen
model, first quarter of query blocks dropped; ``train_gate``'s AdamW + warm-up + cosine loop) on a
stream of ``seq_len``-token sequences, saved as a gate directory that ``SeerAttention.load`` reads.

Data (``--data``): ``retrieval`` (default) mixes passkey prompts over a training-split haystack
(``calibrate._retrieval.retrieval_prompts``, needle at a uniform random depth; a fraction
``retrieval_fraction`` of the steps) with plain training-split source windows, so the gate sees
question rows whose attention peaks on a distant needle block: on source windows alone the
distilled target almost never holds such a block and the gate learns locality and sinks.
``source`` streams source windows only (the repository's recipe on its own corpus). ``--init``
starts from a saved gate directory (fine-tuning) instead of a fresh gate.

**Cached training** (default with ``--data retrieval``): the gate's inputs (block-pooled pre-RoPE
q/k) and its target (``attn_pool`` of the frozen model's q/k) do not depend on the gate, so
``build_cache`` captures them once per sequence (``--cache-lengths``, ``--n-retrieval`` passkey
prompts and ``--n-source`` source windows per length; ``--cache DIR`` keeps them for reuse) and the
optimiser then takes thousands of cheap steps on them (``train.seer_gate.cached_loss``: the same
loss, tested equal in value and gradient). Two changes to the repository's loss, both recorded:
``--answer-weight`` multiplies the KL of the query blocks holding the answer-deciding rows of the
retrieval prompts (one block in ~30 otherwise), and ``--target-power`` sharpens each target row
(``t^p / sum t^p``: the same ranking; the block-max-pooled row of the answer block is flat at the top,
the needle block at ~0.15 against ~0.10 for local blocks, so the plain KL barely rewards ranking it
first). ``--k-overlap N`` trains a gate whose key-block features also pool the last ``N`` tokens of
the previous block (``SeerGate``'s ``k_overlap``, a departure from the paper; default: 0 for a fresh
gate, the ``--init`` gate's own value when fine-tuning); the cache records the overlap its pooled keys
were built with and a cache built with another one is refused. ``--stream`` keeps the older per-step capture (a frozen-model forward per step).
``sparsattn calibrate seer_attention`` runs it.
"""
from __future__ import annotations

import argparse
import random
import time
from typing import Optional

import torch

from ..methods.seer_attention import SeerAttention
from ._seer_recall import diagnostics, gate_block_recall  # noqa: F401  (gate block recall vs the oracle)

OUT = "seer_gate"
PROVENANCE_KEY = "seer_gate"
DEFAULTS = {"steps": 300, "seq_len": 2048, "minutes": 20.0, "seed": 0, "lr": 1e-3, "rope_input": "pre",
            "data": "retrieval", "retrieval_fraction": 0.75, "init": None, "stream": False, "cache": None,
            "cache_lengths": (2048, 4096), "n_retrieval": (78, 24), "n_source": (4, 0), "n_prose": (0, 0),
            "n_split": (0, 0), "answer_weight": 30.0, "target_power": 8.0, "batch_size": 8, "length_mix": "count",
            "k_overlap": None}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The method options of ``sparsattn calibrate seer_attention``."""
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="optimiser steps (300)")
    p.add_argument("--seq-len", type=int, default=DEFAULTS["seq_len"], help="training sequence length (2048)")
    p.add_argument("--minutes", type=float, default=DEFAULTS["minutes"], help="wall-time cap (20)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--rope-input", choices=("pre", "post"), default=DEFAULTS["rope_input"])
    p.add_argument("--data", choices=("retrieval", "source"), default=DEFAULTS["data"],
                   help="retrieval: passkey prompts mixed with source windows (default); source: windows only")
    p.add_argument("--retrieval-fraction", type=float, default=DEFAULTS["retrieval_fraction"],
                   help="share of retrieval prompts with --data retrieval (0.75)")
    p.add_argument("--init", default=DEFAULTS["init"], help="gate directory to start from (default: a fresh gate)")
    ints = lambda x: tuple(int(v) for v in x.split(","))  # noqa: E731
    p.add_argument("--stream", action="store_true", help="capture the model at every step (no cache)")
    p.add_argument("--cache", default=DEFAULTS["cache"],
                   help="folder of cached features, reused and completed (default: a temporary folder)")
    p.add_argument("--cache-lengths", type=ints, default=DEFAULTS["cache_lengths"], help="cached lengths (2048,4096)")
    p.add_argument("--n-retrieval", type=ints, default=DEFAULTS["n_retrieval"],
                   help="passkey prompts cached per length (78,24)")
    p.add_argument("--n-source", type=ints, default=DEFAULTS["n_source"], help="source windows per length (4,0)")
    p.add_argument("--n-prose", type=ints, default=DEFAULTS["n_prose"],
                   help="passkey prompts per length over prose haystacks from documentation files the held-out "
                        "check never reads (_retrieval.prose_windows) (0,0)")
    p.add_argument("--n-split", type=ints, default=DEFAULTS["n_split"],
                   help="passkey prompts per length over prose haystacks (another calibration stream) whose value "
                        "starts in the first 16 tokens of a key block, so that the needle sentence is cut by the "
                        "block boundary (0,0)")
    p.add_argument("--answer-weight", type=float, default=DEFAULTS["answer_weight"],
                   help="loss weight of the query blocks holding answer rows (30; 1 = the repository's loss)")
    p.add_argument("--target-power", type=float, default=DEFAULTS["target_power"],
                   help="sharpen the target rows to t^p (8; 1 = the repository's loss)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"],
                   help="cached sequences of one length per step (8)")
    p.add_argument("--length-mix", choices=("count", "equal"), default=DEFAULTS["length_mix"],
                   help="how a step's cached length is drawn: count (in proportion to the records of each "
                        "length, the default) or equal (every cached length equally often)")
    p.add_argument("--k-overlap", type=int, default=DEFAULTS["k_overlap"],
                   help="tokens of the previous key block pooled with each key block (a departure from the paper, "
                        "0 = the paper's pooling; default: the --init gate's value, else 0)")


def sequences(tokenizer, seq_len: int, *, data: str = "retrieval", retrieval_fraction: float = 0.75, seed: int = 0,
              haystack=None, source=None):
    """Endless ``[1, seq_len]`` training sequences: with ``data="retrieval"`` a passkey prompt (random
    depth; ``haystack`` as ``retrieval_prompts``) with probability ``retrieval_fraction``, else a
    source window (``source``: an iterator of windows; default ``token_windows`` of the training split)."""
    from ..train.seer_gate import token_windows
    from ._retrieval import retrieval_prompts

    if data not in ("retrieval", "source"):
        raise ValueError(f"data: expected 'retrieval' or 'source', got {data!r}")
    if not isinstance(retrieval_fraction, (int, float)) or not 0 <= retrieval_fraction <= 1:
        raise ValueError(f"retrieval_fraction: expected a number in [0, 1], got {retrieval_fraction!r}")
    rng = random.Random(seed)
    win = token_windows(tokenizer, seq_len, seed=seed) if source is None else source
    if haystack is None:  # one stream for every prompt (a fresh token_windows re-tokenizes files)
        haystack = token_windows(tokenizer, seq_len, seed=10_000 + seed)
    i = 0
    while True:
        if data == "retrieval" and rng.random() < retrieval_fraction:
            p = retrieval_prompts(tokenizer, seq_len, 1, seed=1000 * seed + i, depths=[rng.random()],
                                  haystack=haystack)[0]
            yield p["ids"]
            i += 1
        else:
            yield next(win)


def train(model, tokenizer, out: str, *, steps: int = 300, seq_len: int = 2048, minutes: Optional[float] = 20.0,
          seed: int = 0, lr: float = 1e-3, rope_input: str = "pre", data: str = "retrieval",
          retrieval_fraction: float = 0.75, init: Optional[str] = None, haystack=None, source=None, log=print,
          k_overlap: Optional[int] = None):
    """train: distil a gate for ``model`` (fresh, or loaded from ``init``) on ``sequences(...)`` and save
    it to ``out`` -> ``(SeerGate, losses)``; ``k_overlap``: see ``new_gate``."""
    from ..train.seer_gate import capture_for_gate, train_gate

    for p in model.parameters():
        p.requires_grad_(False)
    dev = next(model.parameters()).device
    gate = new_gate(model, init, rope_input=rope_input, seed=seed, k_overlap=k_overlap).to(dev).float()
    stream = sequences(tokenizer, seq_len, data=data, retrieval_fraction=retrieval_fraction, seed=seed,
                       haystack=haystack, source=source)

    def batches():
        for ids in stream:
            yield capture_for_gate(model, ids.to(dev), gate.layers)

    t0 = time.time()
    losses = train_gate(gate, batches(), steps=steps, lr=lr, warmup=min(20, steps), minutes=minutes, log=log)
    gate.model_info.update({"steps_done": len(losses), "first_loss": losses[0] if losses else None,
                            "final_loss": losses[-1] if losses else None, "seconds": round(time.time() - t0, 1),
                            "seq_len": seq_len, "steps": steps, "lr": lr, "init": init,
                            "data": data if data == "source" else f"retrieval {retrieval_fraction} + source"})
    gate.save(out, dtype=torch.bfloat16)
    return gate, losses


def new_gate(model, init: Optional[str] = None, *, rope_input: str = "pre", seed: int = 0,
             k_overlap: Optional[int] = None):
    """new_gate: the gate a calibration starts from: loaded from ``init`` or fresh for ``model``, with
    key-block overlap ``k_overlap`` (None: the ``init`` gate's own, or 0; the weight shapes do not
    depend on it, so an ``init`` gate of another overlap is fine-tuned to the new one)."""
    from ..methods.seer_attention import SeerGate, check_k_overlap
    from ..train.seer_gate import gate_for_model

    gate = SeerGate.load(init) if init else gate_for_model(model, rope_input=rope_input, seed=seed)
    if k_overlap is not None:
        gate.k_overlap = check_k_overlap(k_overlap, gate.block_size)
    return gate


def check_cache_overlap(records: list, k_overlap: int, where) -> None:
    """Refuse cached records whose pooled keys were built with another key-block overlap (the metadata
    field ``k_overlap``; files without it were built with 0): ValueError naming the cache and the field."""
    for r in records:
        got = int(r["meta"].get("k_overlap", 0))
        if got != k_overlap:
            raise ValueError(f"cache: {where} holds features pooled with k_overlap={got} ({r['path']}, metadata "
                             f"field k_overlap), the gate uses k_overlap={k_overlap}; use another --cache folder")


def train_cached(model, tokenizer, out: str, *, cache=None, cache_lengths=(2048, 4096), n_retrieval=(78, 24),
                 n_source=(4, 0), n_prose=None, steps: int = 3000, minutes: Optional[float] = 20.0, seed: int = 0,
                 lr: float = 1e-3,
                 rope_input: str = "pre", init: Optional[str] = None, answer_weight: float = 30.0,
                 target_power: float = 8.0, batch_size: int = 8, info: Optional[dict] = None, haystack=None,
                 source=None, log=print, length_mix: str = "count", n_split=None, k_overlap: Optional[int] = None):
    """train_cached: capture the gate's features once (``build_cache`` into ``cache``; None: a temporary
    folder, removed afterwards) and distil a gate (fresh, or from ``init``) on them for ``steps`` steps
    of ``batch_size`` sequences (``answer_weight``, ``target_power``: see the module docstring;
    ``length_mix``: ``cached_batches``' draw of a step's length; ``k_overlap``: see ``new_gate``; the
    cache is built with the gate's overlap and refused if it holds another; the steps run on the
    model's device); the
    recipe (and ``info``, e.g. the command line) goes to the gate's ``model_info`` ->
    ``(SeerGate, losses, n_records)``."""
    import shutil
    import tempfile

    from ..train.seer_gate import train_gate

    lengths = [int(x) for x in cache_lengths]
    nr, ns = [int(x) for x in n_retrieval], [int(x) for x in n_source]
    npr = [0] * len(lengths) if n_prose is None else [int(x) for x in n_prose]
    nsp = [0] * len(lengths) if n_split is None else [int(x) for x in n_split]
    if not lengths or any(len(c) != len(lengths) for c in (nr, ns, npr, nsp)):
        raise ValueError(f"n_retrieval/n_source/n_prose/n_split: expected one count per cache length {lengths}, "
                         f"got {nr}, {ns}, {npr} and {nsp}")
    if rope_input != "pre":
        raise ValueError(f"rope_input: the cache holds pre-RoPE features; use --stream for {rope_input!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    gate = new_gate(model, init, rope_input=rope_input, seed=seed, k_overlap=k_overlap).float()
    tmp = None if cache is not None else tempfile.mkdtemp(prefix="seer_cache_")
    folder = cache if cache is not None else tmp
    try:
        paths = []
        for T, a, b, c, d in zip(lengths, nr, ns, npr, nsp):
            paths += build_cache(model, tokenizer, folder, lengths=(T,), n_retrieval=a, n_source=b, seed=seed,
                                 haystack=haystack, source=source, n_prose=c, n_split=d, log=log,
                                 k_overlap=gate.k_overlap)
        records = load_cache(paths)
        check_cache_overlap(records, gate.k_overlap, folder)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if init:  # the starting gate's own record, kept apart from this run's
        gate.model_info = {"model_type": gate.model_info.get("model_type"),
                           "num_hidden_layers": gate.model_info.get("num_hidden_layers"),
                           "init_model_info": dict(gate.model_info)}
    answer_row_weights(records, answer_weight, gate.block_size)
    dev = next(model.parameters()).device  # train where the model runs (the cached features are small)
    if dev.type != "cpu":
        gate = gate.to(dev)
        for r in records:
            for f in r["layers"].values():
                for n in ("q", "k", "t", "w"):
                    f[n] = f[n].to(dev)
    t0 = time.time()
    losses = train_gate(gate, cached_batches(records, seed=seed, batch_size=batch_size, length_mix=length_mix), steps=steps, lr=lr,
                        warmup=min(50, steps), minutes=minutes, target_power=target_power, log=log, log_every=250)
    gate.model_info.update({"steps_done": len(losses), "first_loss": losses[0] if losses else None,
                            "final_loss": losses[-1] if losses else None, "seconds": round(time.time() - t0, 1),
                            "seq_len": lengths, "steps": steps, "lr": lr, "init": init,
                            "data": f"cached: {dict(zip(lengths, nr))} passkey prompts + {dict(zip(lengths, ns))} "
                                    "source windows per length"
                                    + (f" + {dict(zip(lengths, npr))} prose-haystack passkey prompts" if any(npr) else "")
                                    + (f" + {dict(zip(lengths, nsp))} prose-haystack passkey prompts with the value "
                                       "in the first 16 tokens of a key block" if any(nsp) else ""),
                            "answer_weight": answer_weight, "target_power": target_power,
                            "batch_size": batch_size, **({"length_mix": length_mix} if length_mix != "count" else {}),
                            **({"k_overlap": gate.k_overlap} if gate.k_overlap else {}),
                            **(info or {})})
    gate.save(out, dtype=torch.bfloat16)
    return gate, losses, len(records)


def run(model_path: Optional[str], out: str, *, device: str = "cpu", steps: int = 300, seq_len: int = 2048,
        minutes: Optional[float] = 20.0, seed: int = 0, lr: float = 1e-3, rope_input: str = "pre",
        data: str = "retrieval", retrieval_fraction: float = 0.75, init: Optional[str] = None, stream: bool = False,
        cache=None, cache_lengths=(2048, 4096), n_retrieval=(78, 24), n_source=(4, 0), n_prose=(0, 0),
        answer_weight: float = 30.0,
        target_power: float = 8.0, batch_size: int = 8, length_mix: str = "count", n_split=(0, 0),
        k_overlap: Optional[int] = None) -> tuple:
    """run: ``(SeerAttention with the trained gate, provenance record)`` of the model at ``model_path``
    (None: bundled). ``data="retrieval"`` without ``stream``: cached training (``train_cached``)."""
    from ._common import call_text, load_model

    t0 = time.time()
    model, tok, _ = load_model(model_path, device=device)
    opts = dict(steps=steps, minutes=minutes, seed=seed, lr=lr, rope_input=rope_input, data=data, device=device)
    if data == "retrieval" and not stream:
        opts.update(cache_lengths=cache_lengths, n_retrieval=n_retrieval, n_source=n_source,
                    **({"n_prose": n_prose} if any(int(x) for x in n_prose) else {}),
                    **({"n_split": n_split} if any(int(x) for x in n_split) else {}), answer_weight=answer_weight,
                    target_power=target_power, batch_size=batch_size,
                    **({"length_mix": length_mix} if length_mix != "count" else {}),
                    **({"k_overlap": k_overlap} if k_overlap is not None else {}))
        if cache is not None:
            opts["cache"] = cache
        if init:
            opts["init"] = init
        info = {"model_path": model_path or "bundled", "call": call_text("seer_attention", opts)}
        gate, losses, n_rec = train_cached(model, tok, out, cache=cache, cache_lengths=cache_lengths,
                                           n_retrieval=n_retrieval, n_source=n_source, n_prose=n_prose, steps=steps,
                                           minutes=minutes,
                                           seed=seed, lr=lr, rope_input=rope_input, init=init,
                                           answer_weight=answer_weight, target_power=target_power,
                                           batch_size=batch_size, info=info, length_mix=length_mix, n_split=n_split,
                                           k_overlap=k_overlap)
        what = (f"{n_rec} cached sequences (build_cache): per length {list(cache_lengths)}, {list(n_retrieval)} "
                f"passkey prompts (calibrate._retrieval.retrieval_prompts: training-split source haystack, needle at a random "
                f"depth, seeds 1000 x {seed} + 7919 x length + i) and {list(n_source)} source windows of "
                "source_files('train')" + (
                    f" and {list(n_prose)} passkey prompts over prose haystacks (_retrieval.prose_windows: "
                    "documentation files outside the held-out check's first 4000 lines, seed 2112)"
                    if any(int(x) for x in n_prose) else "") + (
                    f" and {list(n_split)} prose-haystack passkey prompts (_retrieval.prose_windows, seed + 1) with the "
                    "value in the first 16 tokens of a key block" if any(int(x) for x in n_split) else ""))
    else:
        gate, losses = train(model, tok, out, steps=steps, seq_len=seq_len, minutes=minutes, seed=seed, lr=lr,
                             rope_input=rope_input, data=data, retrieval_fraction=retrieval_fraction, init=init,
                             k_overlap=k_overlap)
        what = f"{seq_len}-token sequences: " + (
            "sparsattn.data.source_files('train'), token_windows" if data == "source" else
            f"{retrieval_fraction:.2f} passkey prompts (calibrate._retrieval.retrieval_prompts: training-split source "
            f"haystack, needle at a random depth, seeds 1000 x {seed} + i) + source windows of source_files('train')")
        opts.update(seq_len=seq_len, retrieval_fraction=retrieval_fraction,
                    **({"k_overlap": k_overlap} if k_overlap is not None else {}))
    m = SeerAttention.load(str(out))
    if init:
        opts["init"] = init
    call = call_text("seer_attention", opts) + (" --stream" if stream and data == "retrieval" else "")
    rec = {"call": call, "seconds": round(time.time() - t0, 1),
           "data": what, "steps_done": len(losses),
           "first_loss": round(losses[0], 5) if losses else None,
           "final_loss": round(losses[-1], 5) if losses else None,
           "mean_loss_last_20": round(sum(losses[-20:]) / len(losses[-20:]), 5) if losses else None}
    return m, rec


# ------------------------------------------------------------------------------------------------
# Cached training: the gate's inputs and target are fixed functions of the frozen model
# ------------------------------------------------------------------------------------------------


def build_cache(model, tokenizer, cache_dir, *, lengths=(2048,), n_retrieval: int = 64, n_source: int = 16,
                seed: int = 0, haystack=None, source=None, n_prose: int = 0, prose=None, n_split: int = 0,
                log=print, k_overlap: int = 0) -> list:
    """build_cache: capture the gate's training features once (``train.seer_gate.gate_features``: pooled
    pre-RoPE q/k and the ``attn_pool`` target of every layer) for ``n_retrieval`` passkey prompts
    (``_retrieval.retrieval_prompts`` over the training-split haystack, random depth, seeds
    ``1000 x seed + i``) and ``n_source`` source windows per length; one safetensors file per sequence
    in ``cache_dir`` (files already there are kept: the cache resumes). Retrieval files also hold
    ``read.L`` (per head, the answer rows' dense attention on the value's tokens) and, in the metadata,
    the prompt length, the value's positions and the answer-deciding rows. ``n_prose`` more passkey
    prompts per length use a prose haystack (``prose``: an iterator of token windows; default
    ``_retrieval.prose_windows``, documentation text from files the held-out check never reads),
    cached as ``prose_<T>_<i>`` files. ``n_split`` more (``split_<T>_<i>``, prose haystack of another
    calibration stream, ``prose_windows`` seed + 1) put the value in the first ``SPLIT_OFFSETS`` tokens
    of a key block (``block_start_prompt``): the needle sentence is then cut by the block boundary, the
    case where the gate lost the needle on the held-out prose check (docs/results/
    retrieval_prose_cpu_2026-12-05/ninth_session). ``k_overlap``: the key-block overlap of the pooled
    keys (``SeerGate``), recorded in every file's metadata; a file already there with another overlap
    raises ValueError naming the cache folder and the field. Returns the file paths."""
    import json
    from pathlib import Path

    from ..train.seer_gate import gate_for_model, token_windows
    from ._retrieval import prose_windows, retrieval_prompts

    from safetensors import safe_open

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    gate = gate_for_model(model, rope_input="pre", k_overlap=k_overlap)
    rng = random.Random(f"seer-cache-{seed}")
    paths = []
    for T in lengths:
        hay = haystack if haystack is not None else token_windows(tokenizer, T, seed=10_000 + seed)
        win = source if source is not None else token_windows(tokenizer, T, seed=seed)
        pro = spl = None
        for i in range(n_retrieval + n_source + n_prose + n_split):
            kind = ("retrieval" if i < n_retrieval else "source" if i < n_retrieval + n_source else
                    "prose" if i < n_retrieval + n_source + n_prose else "split")
            path = cache_dir / f"{kind}_{T}_{i:04d}.safetensors"
            paths.append(path)
            depth = rng.random()
            if kind == "prose" and pro is None:
                pro = prose if prose is not None else prose_windows(tokenizer, T, seed=seed)
            if kind in ("retrieval", "prose"):
                p = retrieval_prompts(tokenizer, T, 1, seed=1000 * seed + 7919 * T + i, depths=[depth],
                                      haystack=hay if kind == "retrieval" else pro)[0]
                ids = p["ids"]
            elif kind == "split":
                spl = spl if spl is not None else (prose if prose is not None else prose_windows(tokenizer, T, seed=seed + 1))
                off = random.Random(f"seer-split-{seed}-{T}-{i}").randrange(SPLIT_OFFSETS)
                p = block_start_prompt(tokenizer, T, 1000 * seed + 7919 * T + i, depth, next(spl), off, gate.block_size)
                ids = p["ids"]
            else:
                ids = next(win)[:, :T]
            if path.is_file():
                with safe_open(str(path), framework="pt") as fh:
                    got = int(json.loads((fh.metadata() or {}).get("meta", "{}")).get("k_overlap", 0))
                if got != k_overlap:
                    raise ValueError(f"cache: {str(cache_dir)!r} was built with k_overlap={got} ({path.name}, "
                                     f"metadata field k_overlap), this gate pools with k_overlap={k_overlap}; "
                                     "use another --cache folder")
                continue
            t0 = time.time()
            meta = {"kind": "source" if kind == "source" else "retrieval", "T": T,
                    "haystack": "prose" if kind in ("prose", "split") else "code"}
            if kind != "source":
                P = p["prompt_len"]
                meta.update(prompt_len=P, needle=p["needle"], rows=list(range(P - 1, T - 1)), depth=depth)
            cache_record(model, gate, ids, meta, path)
            if log:
                log(f"cached {path.name} ({time.time() - t0:.1f} s)")
    return paths


def cache_record(model, gate, ids, meta: dict, path) -> None:
    """cache_record: capture ``ids`` (``[1, T]``) once and write one ``build_cache`` file at ``path``: the
    features of ``gate`` (``gate_features``: pooled pre-RoPE q/k with the gate's ``k_overlap``, the
    ``attn_pool`` target) of every layer, and for retrieval records (``meta["kind"] == "retrieval"``, with
    ``needle`` and ``rows``) the answer rows' dense attention on the value (``read.L``); ``meta`` (plus
    ``k_overlap`` when nonzero) goes to the file's metadata."""
    import json

    from safetensors.torch import save_file

    from ..eval.needle import needle_mass
    from ..train.seer_gate import capture_for_gate, gate_features

    meta = dict(meta)
    if gate.k_overlap:
        meta["k_overlap"] = gate.k_overlap
    dev = next(model.parameters()).device
    tensors = {}
    with torch.no_grad():
        cap = capture_for_gate(model, ids.to(dev), gate.layers)
        for l, tup in cap.items():
            f = gate_features(gate, *tup)
            tensors.update({f"q.{l}": f["q"], f"k.{l}": f["k"], f"t.{l}": f["t"]})
            if meta.get("kind") == "retrieval":
                tensors[f"read.{l}"] = needle_mass(tup[0], tup[1], meta["rows"], meta["needle"]).float()
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(path), metadata={"meta": json.dumps(meta)})


#: ``--n-split`` prompts put the value in the first this many tokens of a key block (the needle
#: template before the value is about this long)
SPLIT_OFFSETS = 16


def block_start_prompt(tokenizer, T: int, seed: int, depth: float, window, offset: int, block_size: int = 64) -> dict:
    """block_start_prompt: a ``_retrieval.retrieval_prompts`` passkey prompt over the haystack ``window``
    (``[1, >= T]`` token ids) whose value's first token sits ``offset`` tokens after a key-block
    boundary, the needle as near ``depth`` as that allows (the needle sentence before the value is then
    cut by the boundary). Raises ValueError for an ``offset`` outside ``[0, block_size)``."""
    import itertools

    from ._retrieval import retrieval_prompts

    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < block_size:
        raise ValueError(f"offset: expected an int in [0, {block_size}), got {offset!r}")
    make = lambda d: retrieval_prompts(tokenizer, T, 1, seed=seed, depths=[d],  # noqa: E731
                                       haystack=itertools.repeat(window))[0]
    v0 = make(0.0)["needle"][0]
    hay_len = make(1.0)["needle"][0] - v0
    if hay_len < block_size:
        raise ValueError(f"T: expected a haystack of at least {block_size} tokens, got {hay_len}")
    cut = round(depth * hay_len)
    cut += (offset - (v0 + cut)) % block_size
    if cut > hay_len:
        cut -= block_size
    p = make(cut / hay_len)
    if p["needle"][0] % block_size != offset:
        raise ValueError(f"offset: could not place the value {offset} tokens into a block (got "
                         f"{p['needle'][0] % block_size})")
    return p


def load_cache(paths) -> list:
    """load_cache: the records of ``build_cache`` files (a directory or a list of files) ->
    ``[{"layers": {layer: {"q", "k", "t", "Tq", "Tk"}}, "read": {layer: [Hq]}, "meta": dict, "path"}]``."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    if isinstance(paths, (str, Path)):
        d = Path(paths)
        if not d.is_dir():
            raise ValueError(f"cache: expected a directory of build_cache files, got {str(d)!r}")
        paths = sorted(d.glob("*.safetensors"))
    out = []
    for path in paths:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["meta"])
            t = {k: f.get_tensor(k) for k in f.keys()}
        T = int(meta["T"])
        layers = sorted({int(k.split(".")[1]) for k in t if k.startswith("q.")})
        out.append({"layers": {l: {"q": t[f"q.{l}"], "k": t[f"k.{l}"], "t": t[f"t.{l}"], "Tq": T, "Tk": T}
                               for l in layers},
                    "read": {l: t[f"read.{l}"] for l in layers if f"read.{l}" in t}, "meta": meta,
                    "path": str(path)})
    if not out:
        raise ValueError("cache: no build_cache files found")
    return out


def _topk_keep(scores: "torch.Tensor", allowed: "torch.Tensor", diag: "torch.Tensor", k: int) -> "torch.Tensor":
    """bool ``[..., nq, nk]``: the top ``k`` allowed blocks of every row, plus the diagonal (``select``'s rule)."""
    s = scores.masked_fill(~allowed, float("-inf"))
    keep = torch.zeros(s.shape, dtype=torch.bool).scatter_(-1, s.topk(min(k, s.shape[-1]), -1).indices, True)
    return (keep | diag) & allowed


def cache_metrics(gate, records: list, *, k: Optional[int] = None, k_frac: float = 1 / 16,
                  threshold: float = 0.1) -> dict:
    """cache_metrics: the gate against its distillation target on cached records (``load_cache``).

    ``block_recall[layer]``: share of the target's top-``k`` key blocks per query block row (diagonal
    excluded from both, rows with more than ``k`` candidates) that the gate's top-``k`` holds (the rule
    of ``calibrate._seer_recall.gate_block_recall``); ``k`` default ``max(1, round(k_frac x key blocks))``.
    ``needle[layer]`` = ``[kept, reading]``: over retrieval records, the heads whose answer rows put
    >= ``threshold`` of their attention on the value (``read``), and how many of them have the value's
    block inside the gate's selection (top-``k`` + diagonal, ``SeerAttention.select``'s top-k rule) in
    every query block holding an answer row; ``oracle_needle`` the same for the target's top-``k`` (+ the
    diagonal: the same rule, so the same number of blocks as the gate)."""
    from ..methods.seer_attention import causal_block_mask, diagonal_block_mask

    rec: dict = {}
    nd: dict = {}
    ond: dict = {}
    with torch.no_grad():
        for r in records:
            meta = r["meta"]
            for l, f in r["layers"].items():
                Tq, Tk, bs = f["Tq"], f["Tk"], gate.block_size
                g = gate.scores_pooled(l, f["q"], f["k"], Tq, Tk)[0]
                t = f["t"][0]
                nq, nk = t.shape[-2:]
                kk = k if k is not None else max(1, round(k_frac * nk))
                allowed = causal_block_mask(Tq, Tk, bs)
                diag = diagonal_block_mask(Tq, Tk, bs)
                cand = allowed & ~diag
                rows = cand.sum(-1) > kk
                gi = _topk_keep(g, cand, torch.zeros_like(diag), kk)[:, rows]
                oi = _topk_keep(t, cand, torch.zeros_like(diag), kk)[:, rows]
                a = rec.setdefault(l, [0.0, 0.0])
                a[0] += float((gi & oi).sum())
                a[1] += float(oi.sum())
                if meta.get("kind") == "retrieval" and l in r["read"]:
                    heads = (r["read"][l] >= threshold).nonzero().flatten().tolist()
                    qb = sorted({x // bs for x in meta["rows"]})
                    nb = sorted({x // bs for x in meta["needle"]})
                    gk = _topk_keep(g, allowed, diag, kk)
                    ok = _topk_keep(t, allowed, diag, kk)
                    for store, keep in ((nd, gk), (ond, ok)):
                        c = store.setdefault(l, [0, 0])
                        for h in heads:
                            c[0] += int(all(any(bool(keep[h, i, j]) for j in nb) for i in qb))
                            c[1] += 1
    return {"block_recall": {l: round(a[0] / max(1.0, a[1]), 4) for l, a in sorted(rec.items())},
            "needle": {l: v for l, v in sorted(nd.items())}, "oracle_needle": {l: v for l, v in sorted(ond.items())}}


def answer_row_weights(records: list, weight: float, block_size: int = 64) -> None:
    """answer_row_weights: give every retrieval record a per-query-block loss weight ``"w"`` (1, and
    ``weight`` on the query blocks holding an answer-deciding row) in each layer's features (in place)."""
    for r in records:
        meta = r["meta"]
        for f in r["layers"].values():
            nq = f["t"].shape[2]
            w = torch.ones(nq)
            if meta.get("kind") == "retrieval" and weight != 1.0:
                for i in {x // block_size for x in meta["rows"]}:
                    w[i] = weight
            f["w"] = w


def cached_batches(records: list, *, seed: int = 0, batch_size: int = 1, length_mix: str = "count"):
    """Endless ``{layer: features}`` batches of ``batch_size`` cached records of one length (drawn
    uniformly; features stacked on the batch axis, the row weights ``"w"`` as ``[B, nq]``). A step's
    length is drawn in proportion to its records (``length_mix="count"``) or uniformly over the cached
    lengths (``"equal"``: the few long prompts are seen as often as the many short ones)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    if length_mix not in ("count", "equal"):
        raise ValueError(f"length_mix: expected 'count' or 'equal', got {length_mix!r}")
    rng = random.Random(seed)
    by_len: dict = {}
    for r in records:
        by_len.setdefault(next(iter(r["layers"].values()))["Tq"], []).append(r)
    lens = sorted(by_len)
    weights = [len(by_len[T]) if length_mix == "count" else 1 for T in lens]
    while True:
        group = by_len[rng.choices(lens, weights=weights)[0]]
        pick = [rng.choice(group) for _ in range(batch_size)]
        if batch_size == 1:
            yield pick[0]["layers"]
            continue
        out = {}
        for l, f in pick[0]["layers"].items():
            fs = [r["layers"][l] for r in pick]
            b = {n: torch.cat([x[n] for x in fs]) for n in ("q", "k", "t")}
            b.update(Tq=f["Tq"], Tk=f["Tk"])
            if all("w" in x for x in fs):
                b["w"] = torch.stack([x["w"] for x in fs])
            out[l] = b
        yield out
