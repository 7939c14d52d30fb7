"""calibrate.check: the former home of issue 21's retrieval check, kept as an alias of
``python -m sparsattn.eval.retrieval_check`` (same flags and specs ``name[:variant][@label]``; no method
is named in code any more: every method is aimed by its own presets in the prefill quality driver).

The fifth session's tables (``docs/results/retrieval_cal_cpu_2026-12-05/``) used lines of the held-out
source files as the haystack: pass ``--haystack code`` to reproduce them; the default is now ``prose``
(documentation text the bundled model never saw, ``sparsattn.data.prose``).
"""
from __future__ import annotations

from ..eval.retrieval_check import main, plot, run  # noqa: F401  (the old module's names)
from ..methods.razor import razor_subset as razor_top  # noqa: F401
from ._seer_recall import gate_block_recall  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
