"""analysis.cli: ``sparsattn analyze <what> --model PATH`` (default: the bundled model).

Each analysis writes ``<what>.json`` + ``<what>.csv`` + ``<what>.png`` into ``--out`` and prints a
short table; ``retrieval-heads --fit`` also writes the razor calibration and the masformer plan
fitted from the scores, and ``--compare`` measures them against razor's own calibration.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

WHATS = ("retrieval-heads", "sinks", "activations", "core-neurons", "patterns")


def _ints(s: str) -> list:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {s!r}") from None


def _floats(s: str) -> list:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The ``sparsattn analyze`` parser."""
    p = argparse.ArgumentParser(prog="sparsattn analyze", description="analysis tools (JSON + CSV + PNG per analysis)")
    p.add_argument("what", choices=WHATS)
    p.add_argument("--model", default=None, help="local Hugging Face model folder (default: the bundled model)")
    p.add_argument("--out", default="sparsattn_analysis", help="output folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=8, help="task samples per measurement (counts x/N)")
    p.add_argument("--length", type=int, default=1024, help="prompt length of the task measurements")
    p.add_argument("--lengths", type=_ints, default=[512, 1024, 2048], help="retrieval-heads: needle lengths")
    p.add_argument("--depths", type=int, default=5, help="retrieval-heads: needle depths per length")
    p.add_argument("--k", type=int, default=None, help="retrieval-heads: heads masked (default: heads over 0.1)")
    p.add_argument("--random-draws", type=int, default=3, help="retrieval-heads: random head sets masked")
    p.add_argument("--fit", action="store_true", help="retrieval-heads: write razor / masformer files fitted from the scores")
    p.add_argument("--compare", action="store_true", help="retrieval-heads: with --fit, passkey of razor (ours vs "
                                                          "its echo/induction calibration) and masformer at one KV budget")
    p.add_argument("--scores", default=None, help="retrieval-heads: reuse the scores of a previous retrieval_heads.json "
                                                  "(skips scoring and the masking test; use with --fit)")
    p.add_argument("--budgets", type=_ints, default=[2, 4], help="retrieval-heads --compare: retrieval-head counts "
                                                                 "compared besides razor's own count")
    p.add_argument("--tasks", default="passkey,multikey_needle,variable_tracking", help="sinks: tasks for ACT")
    p.add_argument("--alpha", type=float, default=0.1, help="sinks: sink threshold on mean column attention")
    p.add_argument("--beta", type=float, default=0.4, help="sinks: ACT scale of sink attention")
    p.add_argument("--p", type=_floats, default=[1.0, 5.0, 10.0], help="activations: PPL-p%% targets")
    p.add_argument("--topk", type=_floats, default=[0.5, 0.25, 0.1, 0.05], help="activations: top-k fractions")
    p.add_argument("--tokens", type=int, default=2048, help="activations / core-neurons: held-out tokens")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args) -> int:
    """run: one analysis from parsed arguments; returns the exit status."""
    import torch

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: expected a folder, {args.out!r} is a file")
    for name in ("samples", "length", "depths", "tokens", "random_draws"):
        v = getattr(args, name)
        if v < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected an int >= 1, got {v}")
    prog = not args.no_progress
    if args.what == "patterns":
        import os

        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")  # the real Triton kernel on the CPU
        from .patterns import analyze

        analyze(show_progress=prog, device=args.device).write(out)
        return 0
    with torch.no_grad():  # grad mode restored on return (the tests call this in-process)
        return _run_model_analysis(args, out, prog)


def _run_model_analysis(args, out, prog) -> int:
    """The analyses that run a model (all but ``patterns``), under ``torch.no_grad``."""
    from . import _common

    model, tok, path = _common.load(args.model, device=args.device)
    if args.what == "retrieval-heads" and args.scores:
        from . import fit_methods

        scores = fit_methods.read_scores(args.scores, fit_methods.model_shape(model))
        fit_methods.fit_and_compare(model, tok, scores, out, compare=args.compare, length=args.length, n=args.samples,
                                    seed=args.seed, device=args.device, head_budgets=args.budgets, show_progress=prog)
    elif args.what == "retrieval-heads":
        from . import retrieval_heads as rh

        rep = rh.analyze(model, tok, lengths=args.lengths, n_depths=args.depths, k=args.k, test_length=args.length,
                         n_test=args.samples, n_random=args.random_draws, seed=args.seed, device=args.device,
                         show_progress=prog)
        rep.write(out)
        from ..bench.common import print_table

        print_table(rep.summary["masking"], ["masked", "k", "correct", "n", "accuracy", "heads"],
                    title=f"passkey @ {args.length} with heads masked (exact, teacher-forced)")
        if args.fit:
            from . import fit_methods

            fit_methods.fit_and_compare(model, tok, rep.summary["scores"], out, compare=args.compare,
                                        length=args.length, n=args.samples, seed=args.seed, device=args.device,
                                        head_budgets=args.budgets, show_progress=prog)
    elif args.what == "sinks":
        from .sinks import analyze

        analyze(model, tok, tasks=[t for t in args.tasks.split(",") if t], length=args.length, n=args.samples,
                alpha=args.alpha, beta=args.beta, seed=args.seed, device=args.device, show_progress=prog).write(out)
    elif args.what == "activations":
        from .activations import analyze

        analyze(model, tok, n_tokens=args.tokens, p_targets=args.p, topk=args.topk, seed=args.seed,
                show_progress=prog).write(out)
    elif args.what == "core-neurons":
        from .core_neurons import analyze

        analyze(model, tok, length=args.length, n=args.samples, seed=args.seed, device=args.device,
                show_progress=prog).write(out)
    return 0


def main(argv=None) -> int:
    """main: ``sparsattn analyze`` entry point; bad input prints one line and returns 2."""
    import os

    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except ValueError as e:
        if os.environ.get("SPARSATTN_TRACEBACK"):
            raise
        print(f"sparsattn analyze {args.what}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
