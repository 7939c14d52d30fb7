"""Approximations on the bundled model: fidelity of HyperAttention / Scatterbrain (and its parts) / SEA
on captured q/k/v, and HyperAttention swapped into the last layers (passkey, perplexity, prefill time).

    python scripts/approx_quality.py --out docs/results/approx_cpu_2026-12-05 --length 4096 --device cpu

The logic is in ``sparsattn.eval.approx_quality``.
"""
import sys

from sparsattn.eval.approx_quality import main

if __name__ == "__main__":
    sys.exit(main())
