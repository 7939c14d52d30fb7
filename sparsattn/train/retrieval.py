"""train.retrieval: synthetic long-context retrieval samples in the evaluation's exact prompt format.

``RetrievalTasks`` (RULER, Hsieh et al., arXiv 2404.06654): single needles (pass keys), multi-key
needles (distractor needles in noise/code, or a haystack made of needles), variable tracking chains,
and JSON-like key-value lists. Each sample is assembled at the token level from separately encoded
segments whose boundaries are pre-token boundaries, so the ids equal the tokenization of the whole
prompt string (tested), with no re-tokenization of long haystacks.
"""
from __future__ import annotations

import random
import string
from typing import Sequence

import numpy as np

from ..eval.tasks import (NEEDLE_TEMPLATE, NEEDLE_TEMPLATE_UUID, NOISE_SENTENCES, PREAMBLE, PREAMBLE_UUID,
                          QUESTION_TEMPLATE, QUESTION_TEMPLATE_UUID, VT_PREAMBLE, VT_QUESTION_TEMPLATE)
from .corpus import GROUP_IGNORE, Corpus
from .haystack import SampleBuilder, SynthSample
from .pieces import Pieces, _Seg

#: key-value list task (our own format; the evaluation suite has no kv task)
KV_PREAMBLE = "Extract the value corresponding to the specified key in the JSON object below."
KV_QUESTION_TEMPLATE = 'Key: "{key}"\nThe value associated with the specified key is:'

#: default mixture of synthetic tasks (probabilities)
DEFAULT_MIX = {"passkey": 0.30, "multikey": 0.35, "variable_tracking": 0.20, "kv": 0.15}


class RetrievalTasks(SampleBuilder):
    """RetrievalTasks: synthetic retrieval samples in the evaluation format (RULER, arXiv 2404.06654).

    Args:
        raw: a ``tokenizers.Tokenizer`` (see ``raw_tokenizer``), byte-level BPE.
        corpus: train-split token stream, for code haystacks and front filler.
        bos_id, eos_id: special token ids.
        mix: task -> probability (keys of ``DEFAULT_MIX``).
        with_text: also build each sample's prompt text (slower; for tests).
    """

    def __init__(self, raw, corpus: Corpus, *, bos_id: int, eos_id: int, mix: dict | None = None,
                 with_text: bool = False):
        self.raw, self.corpus, self.bos, self.eos = raw, corpus, int(bos_id), int(eos_id)
        self.with_text = with_text
        mix = dict(DEFAULT_MIX if mix is None else mix)
        bad = sorted(set(mix) - set(DEFAULT_MIX))
        if bad or not mix or any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
            raise ValueError(f"mix: expected non-negative weights over {sorted(DEFAULT_MIX)}, got {mix}")
        total = sum(mix.values())
        self.tasks = list(mix)
        self.probs = [mix[t] / total for t in self.tasks]
        self.p = Pieces(raw)
        self._noise_first = [self.p.lit(s) for s in NOISE_SENTENCES]
        self._noise_next = [self.p.lit(" " + s) for s in NOISE_SENTENCES]
        self._noise_cycle = sum(len(x) for x in self._noise_next)
        self._tile_units(4096)
        # newline structure of every token (all newline tokens of byte-level BPE are whitespace runs)
        vocab = raw.get_vocab_size()
        strs = [raw.decode([i]) for i in range(vocab)]
        self._has_nl = np.array(["\n" in t for t in strs], dtype=bool)
        self._ends_nl = np.array([t.endswith("\n") for t in strs], dtype=bool)
        self._starts_ws = np.array([bool(t) and t[0].isspace() for t in strs], dtype=bool)
        for i in (self.bos, self.eos):
            self._has_nl[i] = self._ends_nl[i] = self._starts_ws[i] = False
        # the piecewise assembly must reproduce whole-string encoding for every template in use
        probe = random.Random(0)
        keys = [self._key(probe, kd) for kd in ("words", "uuid", "number") for _ in range(2)]
        vals = [self._value(probe, "number"), self._value(probe, "uuid")] * 3
        for tpl in (NEEDLE_TEMPLATE, NEEDLE_TEMPLATE_UUID, "\n" + QUESTION_TEMPLATE, ".\n" + QUESTION_TEMPLATE,
                    '"{key}": "{value}"', '\n' + KV_QUESTION_TEMPLATE):
            self.p.check(tpl, key=keys, value=vals)

    # -------------------------------------------------------------- tasks
    def needle(self, rng: random.Random, nprng: np.random.Generator, length: int, *, haystack: str = "noise",
               n_needles: int = 1, n_questions: int = 1, key_kind: str = "words", value_kind: str = "number",
               depths: Sequence[float] | None = None, pad_front: bool = True) -> SynthSample:
        """needle: needles in a haystack (a pass key when n_needles == 1; RULER niah, arXiv 2404.06654).

        Layout (as ``sparsattn.eval.tasks``): ``PREAMBLE + "\\n" + context + "\\n" + QUESTION`` and
        `` value``; further questions about other needles follow after ``".\\n"``.

        Args:
            haystack: "noise" (the noise sentences joined by " "), "code" (train-corpus lines joined
                by "\\n", trained on as language modelling) or "needle" (the haystack is made of
                distractor needles, joined by "\\n"; questions ask about needles of it).
            n_needles: needles in a noise/code haystack (question 1 asks about needle 0).
            n_questions: questions in all (at most the number of needles).
            depths: per needle (per question for "needle"), the fraction of haystack units before
                it; uniform random when None. ``meta["gaps"]`` holds the unit index used.
            pad_front: fill to exactly ``length`` with corpus text + EOS before the BOS.
        """
        if haystack not in ("noise", "code", "needle"):
            raise ValueError(f"haystack: expected 'noise', 'code' or 'needle', got {haystack!r}")
        if value_kind == "number":
            pre, tpl, qtpl = PREAMBLE, NEEDLE_TEMPLATE, QUESTION_TEMPLATE
        elif value_kind == "uuid":
            pre, tpl, qtpl = PREAMBLE_UUID, NEEDLE_TEMPLATE_UUID, QUESTION_TEMPLATE_UUID
        else:
            raise ValueError(f"value_kind: expected 'number' or 'uuid', got {value_kind!r}")
        head = _Seg(self.p.lit(pre + "\n"), GROUP_IGNORE, pre + "\n")
        if haystack == "needle":
            return self._needle_haystack(rng, nprng, length, head, tpl, qtpl, n_questions, key_kind,
                                         value_kind, depths, pad_front)
        n_needles = max(1, int(n_needles))
        keys = self._distinct(rng, self._key, key_kind, n_needles)
        values = self._distinct(rng, self._value, value_kind, n_needles)
        if depths is None:
            depths = [rng.random() for _ in range(n_needles)]
        depths = [float(d) for d in depths]
        if len(depths) != n_needles or not all(0.0 <= d <= 1.0 for d in depths):
            raise ValueError(f"depths: expected {n_needles} floats in [0, 1], got {depths}")
        sep = " " if haystack == "noise" else "\n"
        enc_first = self.p.render(tpl, key=keys, value=values)
        enc_next = self.p.render(sep + tpl, key=keys, value=values)
        needles = [tpl.format(key=k, value=v) for k, v in zip(keys, values)]
        n_q = max(1, min(int(n_questions), n_needles))
        pick = [rng.random() for _ in range(n_q - 1)]
        while True:
            # question 1 asks about needle 0; the others about distinct random other needles
            asked = [0] + list(dict.fromkeys(1 + int(p * (n_needles - 1)) for p in pick if n_needles > 1))
            qa = self._qa(qtpl, [keys[i] for i in asked], [values[i] for i in asked], "\n", ".\n")
            fixed = 1 + len(head.ids) + sum(len(s.ids) for s in qa) + sum(len(x) for x in enc_next) + 2
            # short sequences: needles and questions take at most ~half of the length
            if n_needles == 1 or 2 * fixed <= length:
                break
            n_needles -= 1  # needle 0 always stays
            for lst in (keys, values, depths, needles, enc_first, enc_next):
                del lst[n_needles:]
        avail = length - fixed
        context, gaps, n_units = self._haystack_with(
            nprng, haystack, avail, depths, [(enc_first[i], enc_next[i], needles[i], ("needle", i)) for i in range(n_needles)])
        meta = {"haystack": haystack, "keys": keys, "values": values, "depths": depths, "gaps": gaps,
                "n_units": n_units, "asked": asked, "key_kind": key_kind, "value_kind": value_kind}
        s = self._finish(nprng, length, [head] + context + qa, "needle", meta, [values[i] for i in asked],
                         pad_front)
        s.meta["context_span"] = (s.prompt_start + 1 + len(head.ids), s.meta["spans"][("q", 0)][0])
        return s

    def _needle_haystack(self, rng, nprng, length, head, tpl, qtpl, n_questions, key_kind, value_kind,
                         depths, pad_front) -> SynthSample:
        """The haystack is distractor needles joined by "\\n" (RULER niah_multikey_2/3)."""
        budget = length - 2 - len(head.ids)
        n_q = max(1, int(n_questions))
        probe = self._qa(qtpl, [self._key(rng, key_kind)], [self._value(rng, value_kind)], "\n", ".\n")
        q_len = sum(len(s.ids) for s in probe) + 2
        avail = budget - q_len * n_q
        per = len(self.p.render("\n" + tpl, key=[self._key(rng, key_kind)], value=[self._value(rng, value_kind)])[0])
        est = max(2, int(avail / max(per - 2, 1)) + 4)
        keys = self._distinct(rng, self._key, key_kind, est)
        values = [self._value(rng, value_kind) for _ in range(est)]
        enc_first = self.p.render(tpl, key=keys[:1], value=values[:1])[0]
        enc_next = self.p.render("\n" + tpl, key=keys, value=values)
        total, n = len(enc_first), 1
        while n < est and total + len(enc_next[n]) <= avail:
            total += len(enc_next[n])
            n += 1
        if total > avail:
            raise ValueError(f"length: {length} tokens is too short for a needle-haystack sample")
        qd = [rng.random() for _ in range(n_q)] if depths is None else [float(d) for d in depths][:n_q]
        while True:
            picks = list(dict.fromkeys(min(n - 1, max(0, int(round(d * (n - 1))))) for d in qd))
            qa = self._qa(qtpl, [keys[i] for i in picks], [values[i] for i in picks], "\n", ".\n")
            if n == 1 or 2 + len(head.ids) + total + sum(len(x.ids) for x in qa) <= length:
                break
            n -= 1
            total -= len(enc_next[n])
        needles = [tpl.format(key=k, value=v) for k, v in zip(keys[:n], values[:n])]
        context = [_Seg(enc_first, GROUP_IGNORE, needles[0], ("needle", 0))]
        context += [_Seg(enc_next[i], GROUP_IGNORE, "\n" + needles[i], ("needle", i)) for i in range(1, n)]
        meta = {"haystack": "needle", "keys": keys[:n], "values": values[:n], "n_units": n, "asked": picks,
                "gaps": picks, "depths": [i / max(n - 1, 1) for i in picks], "key_kind": key_kind,
                "value_kind": value_kind}
        s = self._finish(nprng, length, [head] + context + qa, "needle", meta, [values[i] for i in picks],
                         pad_front)
        s.meta["context_span"] = (s.prompt_start + 1 + len(head.ids), s.meta["spans"][("q", 0)][0])
        return s

    def variable_tracking(self, rng: random.Random, nprng: np.random.Generator, length: int, *,
                          num_chains: int = 1, num_hops: int = 4, haystack: str = "noise",
                          pad_front: bool = True) -> SynthSample:
        """variable_tracking: chains ``VAR A = 12345``, ``VAR B = VAR A`` ... among haystack units
        (RULER vt, arXiv 2404.06654), layout as ``sparsattn.eval.tasks``; the answer is every
        variable of chain 0, in chain order, space-separated."""
        if haystack not in ("noise", "code"):
            raise ValueError(f"haystack: expected 'noise' or 'code', got {haystack!r}")
        if num_chains < 1 or num_hops < 0:
            raise ValueError(f"num_chains, num_hops: expected >= 1 and >= 0, got {num_chains}, {num_hops}")
        sep = " " if haystack == "noise" else "\n"
        names = self._distinct(rng, lambda r, _k: "".join(r.choices(string.ascii_uppercase, k=5)), "name",
                               num_chains * (num_hops + 1))
        values = self._distinct(rng, lambda r, _k: str(r.randint(10000, 99999)), "value", num_chains)
        stmts: list[tuple[str, str, str]] = []  # (template, a, b)
        fracs: list[float] = []
        for c in range(num_chains):
            vs = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
            stmts.append(("VAR {key} = {value}", vs[0], values[c]))
            stmts += [("VAR {key} = VAR {value}", vs[j + 1], vs[j]) for j in range(num_hops)]
            fracs += sorted(rng.random() for _ in range(num_hops + 1))
        enc_first = [self.p.render(t, key=[a], value=[b])[0] for t, a, b in stmts]
        enc_next = [self.p.render(sep + t, key=[a], value=[b])[0] for t, a, b in stmts]
        texts = [t.format(key=a, value=b) for t, a, b in stmts]
        head_text = VT_PREAMBLE + "\n\n"
        head = _Seg(self.p.lit(head_text), GROUP_IGNORE, head_text)
        answer = " ".join(names[:num_hops + 1])
        qa = self._qa(VT_QUESTION_TEMPLATE.replace("{value}", "{key}"), [values[0]], [answer], "\n", "\n",
                      num_v=[str(num_hops + 1)])
        avail = length - 3 - len(head.ids) - sum(len(s.ids) for s in qa) - sum(len(x) for x in enc_next)
        context, gaps, n_units = self._haystack_with(
            nprng, haystack, avail, fracs, [(enc_first[i], enc_next[i], texts[i], ("stmt", i)) for i in range(len(stmts))])
        meta = {"haystack": haystack, "names": names, "values": values, "fracs": fracs, "gaps": gaps,
                "num_chains": num_chains, "num_hops": num_hops, "n_units": n_units}
        return self._finish(nprng, length, [head] + context + qa, "variable_tracking", meta,
                            names[:num_hops + 1], pad_front)

    def kv(self, rng: random.Random, nprng: np.random.Generator, length: int, *, n_questions: int = 1,
           key_kind: str = "uuid", value_kind: str = "number", pad_front: bool = True) -> SynthSample:
        """kv: a JSON-like ``{"key": "value", ...}`` list, then ``Key: "k"`` asks for one value
        (key-value retrieval of "Lost in the Middle", Liu et al., arXiv 2307.03172)."""
        head_text = KV_PREAMBLE + "\n"
        head = _Seg(self.p.lit(head_text), GROUP_IGNORE, head_text)
        budget = length - 2 - len(head.ids)
        n_q = max(1, int(n_questions))
        probe_k, probe_v = self._key(rng, key_kind), self._value(rng, value_kind)
        probe = self._qa(KV_QUESTION_TEMPLATE, [probe_k], [probe_v], "\n", "\n", answer_quote=True)
        avail = budget - (sum(len(s.ids) for s in probe) + 2) * n_q - 2
        per = len(self.p.render(' "{key}": "{value}",', key=[probe_k], value=[probe_v])[0])
        est = max(2, int(avail / max(per - 2, 1)) + 4)
        keys = self._distinct(rng, self._key, key_kind, est)
        values = [self._value(rng, value_kind) for _ in range(est)]
        mid = self.p.render(' "{key}": "{value}",', key=keys, value=values)
        total, n = 0, 0
        while n < est and total + len(mid[n]) <= avail:
            total += len(mid[n])
            n += 1
        if n < 1:
            raise ValueError(f"length: {length} tokens is too short for a kv sample")
        draws = [rng.random() for _ in range(n_q)]
        while True:
            picks = list(dict.fromkeys(int(d * n) for d in draws))
            qa = self._qa(KV_QUESTION_TEMPLATE, [keys[i] for i in picks], [values[i] for i in picks], "\n", "\n",
                          answer_quote=True)
            if n == 1 or 4 + len(head.ids) + total + sum(len(x.ids) for x in qa) <= length:
                break
            n -= 1
            total -= len(mid[n])
        if n == 1:
            tpls = ['{{"{key}": "{value}"}}']
        else:
            tpls = ['{{"{key}": "{value}",'] + [' "{key}": "{value}",'] * (n - 2) + [' "{key}": "{value}"}}']
        ids = [self.p.render(tpls[0], key=keys[:1], value=values[:1])[0]] + mid[1:n - 1]
        if n > 1:
            ids.append(self.p.render(tpls[-1], key=keys[n - 1:n], value=values[n - 1:n])[0])
        context = [_Seg(x, GROUP_IGNORE, t.format(key=k, value=v), ("pair", i))
                   for i, (x, t, k, v) in enumerate(zip(ids, tpls, keys, values))]
        meta = {"keys": keys[:n], "values": values[:n], "asked": picks, "n_pairs": n}
        return self._finish(nprng, length, [head] + context + qa, "kv", meta, [values[i] for i in picks],
                            pad_front)

    # -------------------------------------------------------------- mixture
    def sample(self, rng: random.Random, nprng: np.random.Generator, length: int) -> SynthSample:
        """sample: one sample of exactly ``length`` tokens from the task mixture (random settings).

        Below 1024 tokens a setting that does not fit (e.g. a haystack of long UUID needles)
        falls back to a single pass key in noise.
        """
        try:
            return self._sample(rng, nprng, length)
        except ValueError:
            if length >= 1024:
                raise
            return self.needle(rng, nprng, length, haystack="noise", n_needles=1)

    def _sample(self, rng: random.Random, nprng: np.random.Generator, length: int) -> SynthSample:
        task = rng.choices(self.tasks, weights=self.probs)[0]
        key_kind = rng.choices(["words", "uuid", "number"], weights=[0.5, 0.25, 0.25])[0]
        short = length < 512
        if task == "passkey":
            hay = "noise" if rng.random() < 0.6 else "code"
            return self.needle(rng, nprng, length, haystack=hay, n_needles=1, key_kind=key_kind)
        if task == "multikey":
            hay = rng.choices(["needle", "noise", "code"], weights=[0.4, 0.35, 0.25])[0]
            value_kind = "number" if rng.random() < 0.8 else "uuid"
            return self.needle(rng, nprng, length, haystack=hay, n_needles=rng.randint(2, 3 if short else 8),
                               n_questions=rng.randint(1, 2 if short else 3), key_kind=key_kind,
                               value_kind=value_kind)
        if task == "variable_tracking":
            hay = "noise" if rng.random() < 0.8 else "code"
            return self.variable_tracking(rng, nprng, length, num_chains=1 if short else rng.randint(1, 2),
                                          num_hops=rng.randint(1, 2 if short else 4), haystack=hay)
        return self.kv(rng, nprng, length, n_questions=rng.randint(1, 2 if short else 3),
                       key_kind=rng.choice(["uuid", "words", "number"]),
                       value_kind="number" if rng.random() < 0.7 else "uuid")
