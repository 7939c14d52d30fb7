"""MoA calibration: gradient profiling of a whole HF model and the per-head span plan search
(MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression, arXiv 2406.14909).

Model-level fitting of ``sparsattn.methods.moa.MoA`` (the method file holds the plan, the span rule,
``search_plan`` and selection; see its docstring for the two fitting steps). ``fit_moa`` builds
calibration samples answered by the model itself (``calibration_samples``), profiles the masking
effect with an explicit attention function swapped in through
``sparsattn.integrations.hf.attention_swapped`` (``profile_moa``), and searches the plan.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..calibration import ModelShape
from ..methods.moa import MoA

Tensor = torch.Tensor

__all__ = ["fit_moa", "profile_moa", "calibration_samples", "diagonal_sums", "masking_effect"]

# ------------------------------------------------------------------------------------------------

_PROFILE = "sparsattn_moa_profile"


def diagonal_sums(e: Tensor) -> Tensor:
    """``e [..., T, T]`` -> ``[..., T]``: ``out[..., d] = sum_i e[..., i, i - d]`` (d >= 0, lower part)."""
    T = e.shape[-1]
    r = torch.flip(e, dims=[-1])  # r[i, m] = e[i, T-1-m]
    r = torch.nn.functional.pad(r, (0, T))  # [..., T, 2T]
    flat = r.reshape(*r.shape[:-2], 2 * T * T)[..., : T * (2 * T - 1)]
    sheared = flat.reshape(*r.shape[:-2], T, 2 * T - 1)  # sheared[i, c] = r[i, c - i]
    return sheared[..., T - 1:].sum(-2)


def masking_effect(A: Tensor, G: Tensor, *, take_abs: bool = True) -> Tensor:
    """MoA's first-order loss increase of masking each attention entry (softmax renormalisation
    included): ``-A (G - sum_j' G A) / (1 - A)``, first row ``-G A``; ``|.|`` with ``take_abs``."""
    GA = G * A
    eps = torch.finfo(A.dtype).eps
    e = A * (G - GA.sum(-1, keepdim=True)) / (1 - A + eps)
    e[..., 0, :] = GA[..., 0, :]
    e = -e
    return e.abs() if take_abs else e


class _Profiler:
    def __init__(self, n_layers: int, sink: int, take_abs: bool):
        self.sink, self.take_abs = sink, take_abs
        self.acc: dict[int, Tensor] = {}
        # the probabilities wait here for their gradient: a hook closing over its own tensor would be a
        # reference cycle, freed only by the garbage collector (every sample's O(L H T^2) kept alive)
        self._probs: dict[int, Tensor] = {}
        self.rows: Optional[list] = None  # the answer-predicting rows and the needle of the current sample
        self.needle: Optional[list] = None
        self.reading: dict[int, Tensor] = {}  # per layer, per head: max over samples of the needle share

    def forward(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        layer = int(getattr(module, "layer_idx", 0))
        B, Hq, T, D = query.shape
        rep = Hq // key.shape[1]
        scaling = D ** -0.5 if scaling is None else scaling
        kf = key.float().repeat_interleave(rep, 1)
        vf = value.float().repeat_interleave(rep, 1)
        s = torch.matmul(query.float(), kf.transpose(-1, -2)) * scaling
        causal = torch.ones(T, key.shape[2], dtype=torch.bool, device=query.device).tril(key.shape[2] - T)
        A = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
        if not A.requires_grad:
            A.requires_grad_(True)
        sink, take_abs = self.sink, self.take_abs
        self._probs[layer] = A.detach()
        if self.needle is not None:  # share of the answer rows' attention on the value's tokens, per head
            with torch.no_grad():
                r = A.detach()[0][:, self.rows][..., self.needle].sum(-1).mean(-1).double().cpu()  # [Hq]
            self.reading[layer] = torch.maximum(self.reading[layer], r) if layer in self.reading else r

        def hook(G, layer=layer):
            with torch.no_grad():  # one head at a time: the temporaries stay O(T^2), not O(H T^2)
                Ad = self._probs.pop(layer)
                d = torch.zeros(Ad.shape[1], Ad.shape[-1], dtype=torch.float64)
                for h in range(Ad.shape[1]):
                    e = masking_effect(Ad[:, h], G[:, h].float(), take_abs=take_abs)
                    if sink:
                        e[..., :sink] = 0
                    d[h] = diagonal_sums(e).sum(0).double().cpu()  # [T]
                    del e
                self.acc[layer] = self.acc.get(layer, 0) + d
            return G

        A.register_hook(hook)
        out = torch.matmul(A, vf).to(query.dtype)
        return out.transpose(1, 2).contiguous(), None


def profile_moa(model, samples: Sequence[tuple], *, sink: int = 64, take_abs: bool = True,
                per_sample: str = "mean", reading: Optional[dict] = None) -> Tensor:
    """profile_moa: ``[L, Hq, N]`` diagonal profile of the masking effect, averaged over ``samples``.

    ``samples``: ``(input_ids [1, N], loss_mask [1, N] bool)`` pairs of one length ``N``; the loss is
    the mean next-token cross-entropy at the positions where ``loss_mask`` is true (the answer).
    ``per_sample``: ``"mean"`` (MoA: the plain mean of the samples' effects) or ``"share"`` (each
    sample's profile divided by its total (absolute) effect over every layer, head and distance first, so that
    every sample counts alike: the effect of a sample scales with ``1 - p`` of its answer tokens,
    which spans orders of magnitude between passkey prompts the model answers at p = 0.99 and 0.9999).
    A sample may carry a third element, the needle's token positions (``retrieval_samples(...,
    with_needle=True)``); then ``reading`` (a dict) receives, per layer, each head's largest share of
    the answer rows' dense attention on the needle over the samples (updated with the max of what
    it already holds).
    """
    if per_sample not in ("mean", "share"):
        raise ValueError(f"per_sample: expected 'mean' or 'share', got {per_sample!r}")
    from ..integrations.hf import attention_modules, attention_swapped  # lazy: transformers

    mods = attention_modules(model)
    L = max(mods) + 1
    prof = _Profiler(L, sink, take_abs)
    total: dict = {}
    n = None
    with attention_swapped(model, _PROFILE, prof.forward, modules=mods):
        for sample in samples:
            ids, mask = sample[0], sample[1]
            if len(sample) > 2:
                prof.needle = [int(i) for i in sample[2]]
                prof.rows = [int(i) - 1 for i in mask[0].nonzero().flatten().tolist()]
            else:
                prof.needle = prof.rows = None
            if n is not None and ids.shape[1] != n:
                raise ValueError(f"samples: expected one length per call, got {n} and {ids.shape[1]}")
            n = ids.shape[1]
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            tgt = ids[:, 1:]
            m = mask[:, 1:].to(logits.device)
            if not m.any():
                raise ValueError("samples: a loss_mask selects no answer token")
            loss = torch.nn.functional.cross_entropy(logits[m], tgt[m])
            loss.backward()
            prof._probs.clear()  # a layer the loss does not reach leaves its probabilities here
            if not prof.acc:
                raise RuntimeError("profile_moa: no attention call went through the profiling function")
            one, prof.acc = prof.acc, {}
            w = 1.0
            if per_sample == "share":
                tot = sum(float(d.abs().sum()) for d in one.values())
                w = 1.0 / tot if tot > 0 else 0.0
            for l, d in one.items():
                total[l] = total.get(l, 0) + d * w
    if reading is not None:
        for l, r in prof.reading.items():
            reading[l] = torch.maximum(reading[l], r) if l in reading else r
    Hq = next(iter(total.values())).shape[0]
    out = torch.zeros(L, Hq, n, dtype=torch.float64)
    for l, d in total.items():
        out[l] = d / len(samples)
    return out


def calibration_samples(model, tokenizer, length: int, n: int, *, answer_len: int = 64, query_len: int = 16,
                        seed: int = 0, files: Optional[list] = None) -> list[tuple[Tensor, Tensor]]:
    """Retrieval-style calibration samples of ``length`` tokens answered by the dense model itself:
    a context of training-split source text, then a ``query_len``-token snippet copied from the
    context's first half, then ``answer_len`` tokens greedily generated by ``model`` (the loss mask)."""
    from ..train.seer_gate import token_windows

    dev = next(model.parameters()).device
    ctx_len = length - query_len - answer_len
    if ctx_len < 2 * query_len:
        raise ValueError(f"length: expected > {3 * query_len + answer_len} tokens, got {length}")
    g = torch.Generator().manual_seed(seed)
    out = []
    win = token_windows(tokenizer, ctx_len, files=files, seed=seed)
    for _ in range(n):
        ctx = next(win)
        p = int(torch.randint(0, max(1, ctx_len // 2 - query_len), (1,), generator=g))
        prompt = torch.cat([ctx, ctx[:, p:p + query_len]], dim=1).to(dev)
        with torch.no_grad():
            ids = prompt
            for _ in range(answer_len):  # greedy, no cache: exact and model-agnostic
                nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, nxt], dim=1)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[:, prompt.shape[1]:] = True
        out.append((ids, mask))
    return out


def retrieval_samples(model, tokenizer, length: int, n: int, *, seed: int = 0, haystack=None,
                      with_needle: bool = False) -> list[tuple]:
    """Long-range dependent calibration samples of ``length`` tokens: passkey prompts over a
    training-split haystack (``calibrate._retrieval.retrieval_prompts``, depths ``linspace(0, 1, n)``)
    whose answer is the dense model's own argmax continuation (teacher-forced on the gold value,
    which the bundled model reproduces), the loss mask on the answer tokens; ``with_needle`` adds the
    value's token positions as a third element (for ``profile_moa``'s reading heads)."""
    from ._retrieval import retrieval_prompts

    dev = next(model.parameters()).device
    out = []
    for p in retrieval_prompts(tokenizer, length, n, seed=seed, haystack=haystack):
        ids = p["ids"].to(dev)
        P = p["prompt_len"]
        with torch.no_grad():
            pred = model(input_ids=ids, use_cache=False).logits[0, P - 1:-1].argmax(-1)
        ids = torch.cat([ids[:, :P], pred[None]], 1)  # the model's own answer
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[:, P:] = True
        out.append((ids, mask, list(p["needle"])) if with_needle else (ids, mask))
    return out


def fit_moa(model_or_path, tokenizer=None, *, lengths: Sequence[int] = (2048, 4096), budget: float = 0.5,
            samples_per_length: int = 4, answer_len: int = 64, sink: int = 64, min_span: int = 64,
            alpha_step: int = 1024, n_beta: int = 9, take_abs: bool = True, device: Optional[str] = None,
            out_path=None, seed: int = 0, files: Optional[list] = None, data: str = "copy", normalize: Optional[str] = None,
            extend_lengths: Sequence[int] = (), per_sample: str = "mean", bounds: Optional[dict] = None,
            extend_loss: str = "none", keep_readers: float = 0.0, log=print) -> MoA:
    """fit_moa: profile an HF causal LM at ``lengths``, search per-head spans under ``budget``.

    ``model_or_path``: a loaded model or a local path (then ``tokenizer`` may be None). Returns a
    fitted ``MoA``; with ``out_path`` the plan JSON is written too. The samples' answer tokens are
    generated by the model itself; profiling is quadratic in length (explicit attention matrices).
    ``files``: calibration text files (default ``sparsattn.data.source_files("train")``).
    ``data``: ``"copy"`` (``calibration_samples``: a copied snippet continued, ``answer_len`` tokens) or
    ``"retrieval"`` (``retrieval_samples``: passkey prompts, the answer a 7-digit value read from a
    needle anywhere in the context). ``normalize`` (None, ``"head"``, ``"layer"``) and
    ``extend_lengths`` go to ``MoA.fit`` (per-head normalised profiles; density bounds at unprofiled
    lengths), ``bounds`` (``{length: density}``, per-length density bounds) and ``extend_loss`` go to ``MoA.fit``;
    ``per_sample`` goes to ``profile_moa``. ``keep_readers`` (> 0, ``data="retrieval"`` only; a
    departure from MoA, whose loss-driven search may cut one of several redundant needle readers):
    every head whose answer rows put at least this share of their dense attention on a calibration
    needle keeps every key (``MoA.fit``'s ``full_heads``); the heads are recorded in the plan's info.
    """
    if data not in ("copy", "retrieval"):
        raise ValueError(f"data: expected 'copy' or 'retrieval', got {data!r}")
    if not 0 <= keep_readers < 1 or (keep_readers > 0 and data != "retrieval"):
        raise ValueError(f"keep_readers: expected a share in [0, 1), and data='retrieval' when > 0; got "
                         f"{keep_readers!r} with data={data!r}")
    from ..data import source_files

    if data == "copy":  # listing the source files takes seconds; retrieval prompts stream their own
        files = list(source_files("train") if files is None else files)

    if isinstance(model_or_path, (str, bytes)) or hasattr(model_or_path, "__fspath__"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = AutoModelForCausalLM.from_pretrained(str(model_or_path), dtype=torch.float32).to(device).eval()
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(model_or_path))
    else:
        model = model_or_path.eval()
        if device is not None:
            model = model.to(device)
    if tokenizer is None:
        raise ValueError("tokenizer: expected a tokenizer when a model object is given")
    lengths = sorted(int(x) for x in lengths)
    least = 4 * (answer_len + 16) if data == "copy" else 256  # a passkey prompt needs room for its haystack
    if not lengths or lengths[0] < least:
        raise ValueError(f"lengths: expected lengths >= {least} (data={data!r}), got {lengths}")
    for p in model.parameters():
        p.requires_grad_(False)
    from ..integrations.hf import attention_modules  # lazy: transformers

    mods = attention_modules(model)
    m0 = mods[min(mods)]
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hq = cfg.num_attention_heads
    hkv = getattr(cfg, "num_key_value_heads", None) or hq
    hd = getattr(m0, "head_dim", None) or cfg.hidden_size // hq
    shape = ModelShape(max(mods) + 1, int(hq), int(hkv), int(hd))
    profiles, reading = {}, {}
    for n in lengths:
        if data == "retrieval":
            samples = retrieval_samples(model, tokenizer, n, samples_per_length, seed=seed + n,
                                        with_needle=keep_readers > 0)
        else:
            samples = calibration_samples(model, tokenizer, n, samples_per_length, answer_len=answer_len,
                                          seed=seed + n, files=files)
        profiles[n] = profile_moa(model, samples, sink=sink, take_abs=take_abs, per_sample=per_sample,
                                  reading=reading)  # [L, H, n]
        if log:
            log(f"profiled length {n}: {samples_per_length} samples, total effect {float(profiles[n].sum()):.4g}")
    full = [l * shape.num_heads + h for l, r in sorted(reading.items()) for h in range(len(r))
            if float(r[h]) >= keep_readers] if keep_readers > 0 else []
    if log and keep_readers > 0:
        log(f"needle readers (share >= {keep_readers}): {[(i // shape.num_heads, i % shape.num_heads) for i in full]}")
    moa = MoA.fit({"shape": shape, "profiles": profiles}, budget=budget, path=out_path, sink=sink,
                  min_span=min_span, alpha_step=alpha_step, n_beta=n_beta, normalize=normalize,
                  extend_lengths=tuple(extend_lengths), bounds=bounds, extend_loss=extend_loss, full_heads=full,
                  info=dict({"samples_per_length": samples_per_length, "take_abs": take_abs, "answer_len": answer_len,
                             "data": data}, **({} if per_sample == "mean" else {"per_sample": per_sample}),
                            **({"keep_readers": keep_readers} if keep_readers > 0 else {})))
    info = moa.plan["info"]
    if log:
        log(f"MoA plan: density per length {['%.3f' % d for d in info['density']]} (budget {budget}), "
            f"predicted loss {info['loss']:.4g}")
    return moa


# ------------------------------------------------------------------------------------------------
# sparsattn calibrate moa

OUT = "moa.json"
PROVENANCE_KEY = "moa"
#: the options of the shipped default plan (2 lengths, 1 sample each, short answers: a 2-core CPU budget;
#: the plan at budget 0.5 keeps the passkey)
DEFAULTS = {"lengths": (1024, 2048), "budget": 0.5, "samples_per_length": 1, "answer_len": 16, "alpha_step": 256,
            "seed": 0, "data": "copy", "sink": 64, "min_span": 64, "normalize": "none", "extend_lengths": (),
            "per_sample": "mean", "signed": False, "bounds": (), "extend_loss": "none",
            "add": False, "keep_readers": 0.0}
#: the options of the shipped sparse plan, added to the shipped file (``sparsattn calibrate moa`` with
#: these options and ``--add``; issue 21, docs/results/moa_cpu_2026-12-05 and
#: docs/results/retrieval_prose_cpu_2026-12-05): passkey prompts, the signed effect, density bounds
#: 0.3 / 0.2 at the profiled 1K / 2K (sink + shortest span alone are 12% of a 1K context), 0.125 at 4K
#: (the six needle readers whole and 58 heads at sink + shortest span already cost 0.122 there), 0.12
#: at 8K, the 2K profile stretched to 4K / 8K, the heads reading the calibration needles kept whole
RETRIEVAL_PLAN = {"data": "retrieval", "budget": 0.12, "lengths": (1024, 2048), "samples_per_length": 4,
                  "sink": 32, "min_span": 32, "signed": True, "extend_lengths": (4096, 8192),
                  "extend_loss": "relative", "bounds": ((1024, 0.3), (2048, 0.2), (4096, 0.125)),
                  "keep_readers": 0.5}


def _bounds(text: str) -> tuple:
    """``"1024:0.3,2048:0.2"`` -> ``((1024, 0.3), (2048, 0.2))`` (ValueError naming ``bounds`` otherwise)."""
    out = []
    for part in (x.strip() for x in str(text).split(",")):
        if not part:
            continue
        n, sep, b = part.partition(":")
        try:
            out.append((int(n), float(b)))
        except ValueError:
            raise ValueError(f"bounds: expected LENGTH:DENSITY pairs such as 1024:0.3, got {part!r}") from None
        if not sep or out[-1][0] < 1 or not 0 < out[-1][1] <= 1:
            raise ValueError(f"bounds: expected LENGTH:DENSITY with density in (0, 1], got {part!r}")
    return tuple(out)


def add_arguments(p) -> None:
    """The method options of ``sparsattn calibrate moa``."""
    ints = lambda s: tuple(int(x) for x in s.split(",") if x.strip())  # noqa: E731
    p.add_argument("--lengths", type=ints, default=DEFAULTS["lengths"],
                   help="comma list of profiled lengths (1024,2048)")
    p.add_argument("--budget", type=float, default=DEFAULTS["budget"], help="mean density of the plan (0.5)")
    p.add_argument("--samples-per-length", type=int, default=DEFAULTS["samples_per_length"])
    p.add_argument("--answer-len", type=int, default=DEFAULTS["answer_len"],
                   help="greedy answer tokens per sample (--data copy)")
    p.add_argument("--alpha-step", type=int, default=DEFAULTS["alpha_step"])
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--data", choices=("retrieval", "copy"), default=DEFAULTS["data"],
                   help="copy: snippet continuation (default); retrieval: passkey prompts over training-split source")
    p.add_argument("--sink", type=int, default=DEFAULTS["sink"], help="sink tokens of every head (64)")
    p.add_argument("--min-span", type=int, default=DEFAULTS["min_span"], help="smallest span (64)")
    p.add_argument("--normalize", choices=("none", "head", "layer"), default=DEFAULTS["normalize"],
                   help="divide each head's (layer's) profile by its total before the search (none)")
    p.add_argument("--extend-lengths", type=ints, default=DEFAULTS["extend_lengths"],
                   help="comma list of unprofiled lengths where the budget must hold too (none)")
    p.add_argument("--per-sample", choices=("mean", "share"), default=DEFAULTS["per_sample"],
                   help="mean: average the samples' effects (MoA); share: each sample's effect divided by its total first")
    p.add_argument("--bounds", type=_bounds, default=DEFAULTS["bounds"],
                   help="per-length density bounds overriding --budget, e.g. 1024:0.3,2048:0.2 (none)")
    p.add_argument("--extend-loss", choices=("none", "relative"), default=DEFAULTS["extend_loss"],
                   help="loss at --extend-lengths: none (density bounds only) or relative (the longest profile "
                        "stretched: effects stay at the same relative distance)")
    p.add_argument("--signed", action="store_true",
                   help="profile the signed masking effect (a span's loss = |signed sum beyond it|) instead of MoA's |E|")
    p.add_argument("--keep-readers", type=float, default=DEFAULTS["keep_readers"],
                   help="with --data retrieval: heads whose answer rows put at least this share of their attention "
                        "on a calibration needle keep every key (a departure from MoA; 0 = off)")
    p.add_argument("--add", action="store_true",
                   help="add the plan to the plans already in --out (same model; a plan of the same budget is "
                        "replaced; the file's default plan stays first) instead of replacing the file")


def run(model_path: Optional[str], out: str, *, device: str = "cpu", lengths=(1024, 2048), budget: float = 0.5,
        samples_per_length: int = 1, answer_len: int = 16, alpha_step: int = 256, seed: int = 0,
        data: str = "copy", sink: int = 64, min_span: int = 64, normalize: str = "none", extend_lengths=(),
        per_sample: str = "mean", signed: bool = False, bounds=(), extend_loss: str = "none",
        add: bool = False, keep_readers: float = 0.0) -> tuple:
    """run: ``(fitted MoA, provenance record)`` of the model at ``model_path`` (None: bundled); with
    ``add`` the plan joins the plans of the existing file ``out`` (the record then lists every plan's
    command: from the plan's ``info.call``, or for a plan written before plans recorded it, from the
    previous record in ``provenance.json`` next to ``out``)."""
    import json
    import time
    from pathlib import Path

    from ._common import call_text, load_model

    if normalize not in ("none", "head", "layer"):
        raise ValueError(f"normalize: expected 'none', 'head' or 'layer', got {normalize!r}")
    prev = None
    if add:
        if not Path(out).is_file():
            raise ValueError(f"out: --add needs an existing plan file, {out} is not one")
        prev = MoA.load(out)  # checked before the (long) fit
    t0 = time.time()
    model, tok, _ = load_model(model_path, device=device)
    kw = dict(lengths=tuple(lengths), budget=budget, samples_per_length=samples_per_length, answer_len=answer_len,
              alpha_step=alpha_step, seed=seed, data=data, sink=sink, min_span=min_span)
    more = {k: v for k, v in (("normalize", normalize), ("extend_lengths", tuple(extend_lengths)),
                              ("per_sample", per_sample), ("extend_loss", extend_loss),
                              ("keep_readers", keep_readers)) if v not in ("none", (), "mean", 0.0)}
    bounds = _bounds(bounds) if isinstance(bounds, str) else tuple((int(n), float(b)) for n, b in dict(bounds).items()) \
        if isinstance(bounds, dict) else tuple(bounds)
    if bounds:
        more["bounds"] = ",".join(f"{n}:{b:g}" for n, b in bounds)
    call = call_text("moa", dict(kw, **more)) + (" --signed" if signed else "") + (" --add" if add else "")
    m = fit_moa(model, tok, out_path=None, device=device, normalize=None if normalize == "none" else normalize,
                extend_lengths=tuple(extend_lengths), per_sample=per_sample, take_abs=not signed,
                bounds=dict(bounds) or None, extend_loss=extend_loss, keep_readers=keep_readers, **kw)
    m.plan["info"]["call"] = call
    if prev is not None:
        m = prev.add_plan(m)
    m.path = m.plan_path = m.save(out)
    what = ("passkey prompts (calibrate._retrieval.retrieval_prompts: training-split source haystack, depths "
            f"linspace(0, 1, {samples_per_length}), seed {seed} + length), loss on the dense model's own 8-token "
            "answer") if data == "retrieval" else (
        f"calibration_samples: source_files('train') context + copied query + {answer_len} greedy answer tokens")
    info = m.plans[-1]["info"] if add else m.plan["info"]
    rec = {"call": call, "seconds": round(time.time() - t0, 1),
           "data": f"{samples_per_length} sample(s) per length {tuple(lengths)}: {what}",
           "density_per_length": [round(float(d), 4) for d in info["density"]]}
    if add:
        old = {}
        pv = Path(out).parent / "provenance.json"
        if pv.is_file():
            old = json.loads(pv.read_text()).get(PROVENANCE_KEY, {})
        rec["plans"] = [{"budget": p["info"].get("budget"), "call": p["info"].get("call") or _earlier_call(p, i, old)}
                        for i, p in enumerate(m.plans)]
    return m, rec


def _earlier_call(plan: dict, index: int, old: dict) -> Optional[str]:
    """The command of a plan that does not record one, from the earlier provenance record ``old``: its
    ``plans`` entry of the same budget, or (a record of a one-plan file) its call for the first plan."""
    b = plan["info"].get("budget")
    if "plans" in old:
        for q in old["plans"]:
            if isinstance(b, (int, float)) and isinstance(q.get("budget"), (int, float)) and abs(q["budget"] - b) < 1e-9:
                return q.get("call")
        return None
    return old.get("call") if index == 0 else None


# ------------------------------------------------------------------------------------------------
# a plan aimed at a target density (the prefill quality driver's --refit)

def fit_at_density(model, tokenizer, density: float, out: str, *, lengths: Sequence[int] = (4096, 8192),
                   sink: int = 32, min_span: int = 32) -> str:
    """fit_at_density: a MoA plan fitted for mean density ``density`` on ``model`` (1 sample per length
    of ``lengths``, 16 answer tokens, ``data="copy"``: the protocol of the prefill driver's earlier
    ``fit_moa_plans``), written to ``out``; returns a note on the fit. ``sink`` and ``min_span`` are 32
    rather than ``fit_moa``'s 64 so that a 5% budget is feasible at the profiled lengths (64 + 64 keys are
    6.3% of a 4K context). The calibrate contract's optional hook, found by
    ``sparsattn.eval.prefill_settings.density_fitters``."""
    m = fit_moa(model, tokenizer, lengths=tuple(lengths), budget=float(density), samples_per_length=1, answer_len=16,
                sink=sink, min_span=min_span, alpha_step=256, seed=0, out_path=str(out), data="copy", log=None)
    info = m.plan.get("info", {})
    return (f"fit_moa(lengths={list(lengths)}, budget={density:g}, sink={sink}, min_span={min_span}, "
            f"1 sample/length, 16 answer tokens, data='copy'): feasible={info.get('feasible')}, "
            f"density {['%.3f' % x for x in info.get('density', [])]}")
