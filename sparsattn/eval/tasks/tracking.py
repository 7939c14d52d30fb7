"""Multi-hop tracing: ``variable_tracking`` (RULER's VT)."""
from __future__ import annotations

import string
from typing import Any

from ._base import (Sample, VT_PREAMBLE, VT_QUESTION_TEMPLATE, _Haystack, _assemble, _check_common,
                    _estimate_tpu, _fit_units, _gap_index, _rng)


# ----------------------------------------------------------------------------------------------
# Variable tracking
# ----------------------------------------------------------------------------------------------

def variable_tracking(tokenizer: Any, length: int, *, seed: int, num_chains: int = 1, num_hops: int = 4,
                      haystack: str = "noise") -> Sample:
    """variable_tracking: follow chains of variable assignments hidden in noise (RULER vt, arXiv 2404.06654).

    Each chain is ``VAR ABCDE = 12345``, ``VAR FGHIJ = VAR ABCDE``, ... (``num_hops`` hops); the
    statements of a chain keep their order and sit at random unit boundaries. The question asks
    for every variable bound to the first chain's value.

    Args:
        tokenizer, length, seed: as in ``passkey``.
        num_chains: chains inserted (the others, with other values, are distractors).
        num_hops: assignments after the first in each chain.
        haystack: ``"noise"`` or ``"code"``.
    Returns:
        ``Sample`` with ``answers`` = the ``num_hops + 1`` variable names of chain 0; ``meta`` has
        ``value`` and ``statement_chars`` (prompt offsets of chain 0's statements, in order).
    """
    _check_common(length, seed)
    for name, v, lo in (("num_chains", num_chains, 1), ("num_hops", num_hops, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
    hay = _Haystack(haystack, seed)
    rng = _rng("variable_tracking", seed)
    n_vars = num_chains * (num_hops + 1)
    tpu = _estimate_tpu(tokenizer, hay.sample_units(), hay.sep)
    head = VT_PREAMBLE + "\n\n"
    for _attempt in range(16):
        names: list[str] = []
        while len(names) < n_vars:
            nm = "".join(rng.choices(string.ascii_uppercase, k=5))
            if nm not in names:
                names.append(nm)
        values: list[str] = []
        while len(values) < num_chains:
            v = str(rng.randint(10000, 99999))
            if v not in values:
                values.append(v)
        chains: list[list[str]] = []
        for c in range(num_chains):
            vs = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
            chains.append([f"VAR {vs[0]} = {values[c]}"] +
                          [f"VAR {vs[j + 1]} = VAR {vs[j]}" for j in range(num_hops)])
        fracs = [sorted(rng.random() for _ in chain) for chain in chains]
        value = values[0]
        question = VT_QUESTION_TEMPLATE.format(value=value, num_v=num_hops + 1)

        def build(n: int, chains=chains, fracs=fracs, question=question) -> tuple[str, Any]:
            us = hay.units(n)
            inserts: dict[int, list[tuple[float, str, Any]]] = {}
            for c, (chain, fr) in enumerate(zip(chains, fracs)):
                for j, (stmt, f_) in enumerate(zip(chain, fr)):
                    inserts.setdefault(_gap_index(f_, n), []).append((f_, stmt, (c, j)))
            ordered = {g: [(s_, t) for _, s_, t in sorted(items, key=lambda x: x[0])]
                       for g, items in inserts.items()}
            context, offsets = _assemble(us, ordered, hay.sep)
            prompt = head + context + "\n" + question
            return prompt, [len(head) + offsets[(0, j)] for j in range(num_hops + 1)]

        fit = _fit_units(build, tokenizer, length, n_min=0, tokens_per_unit=tpu, task="variable_tracking")
        # each name is bound once and (except a chain's last) read once; a code haystack that
        # happens to contain a name would make the answer ambiguous: draw new names then
        last_of_chain = set(names[num_hops::num_hops + 1])
        if all(fit.prompt.count(nm) == (1 if nm in last_of_chain else 2) for nm in names):
            break
    else:  # pragma: no cover - needs 16 unlucky draws
        raise RuntimeError("variable_tracking: variable names keep occurring in the haystack")
    answers = names[:num_hops + 1]
    meta = {"task": "variable_tracking", "length": length, "n_tokens": fit.n_tokens, "seed": seed,
            "haystack": haystack, "value": value, "num_chains": num_chains, "num_hops": num_hops,
            "n_units": fit.n, "statement_chars": fit.extra}
    return Sample(prompt=fit.prompt, answers=list(answers), meta=meta)
