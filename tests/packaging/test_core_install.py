"""Lean install (issue 16, item 1): ``import sparsattn``, the reference backend, the methods registry,
patterns and the kernel-level modules work with only the core dependencies (torch, triton, numpy,
safetensors) installed.

The optional packages are made unimportable in a fresh interpreter by a ``sys.meta_path`` finder that
raises ImportError for them, so this runs in the full test environment and still fails when a module
reachable from ``import sparsattn`` imports an extra at module level. ``.ci/run`` also installs the
core alone into a second virtual environment and runs the same check there.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

#: the packages of the extras (hf, eval, train, ann, lmeval, docs): never imported by the core
EXTRAS = ("transformers", "tokenizers", "matplotlib", "rich", "tqdm", "hnswlib", "faiss", "lm_eval",
          "datasets", "mkdocs", "pandas", "scipy")

CHECK = textwrap.dedent("""
    import sys

    BLOCKED = set(sys.argv[1].split(","))

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked (not part of the core install)")
            return None

    sys.meta_path.insert(0, Block())
    import torch
    import sparsattn
    from sparsattn import patterns

    torch.manual_seed(0)
    q = torch.randn(1, 4, 100, 16)
    k = torch.randn(1, 2, 100, 16)
    v = torch.randn(1, 2, 100, 16)
    dense = sparsattn.attention(q, k, v, causal=True, backend="reference")
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           is_causal=True)
    assert (dense - ref).abs().max() < 1e-5, float((dense - ref).abs().max())
    names = sparsattn.list_methods()
    assert "dense" in names and "a_shape" in names, names
    for n in names:
        sparsattn.get_method(n)
    p = sparsattn.get_method("a_shape", **sparsattn.methods.method_class("a_shape").small_config()).select(q, k)
    out = sparsattn.attention(q, k, v, p, backend="reference")
    assert out.shape == q.shape and torch.isfinite(out).all()
    p2 = patterns.sliding_window(100, 32, block_q=16)
    assert 0 < p2.density < 1
    import sparsattn.kernels, sparsattn.nn, sparsattn.kv, sparsattn.patterns, sparsattn.distributed  # noqa: E401
    from sparsattn.cli import main  # `sparsattn list`: methods and which backends run here
    assert main(["list"]) == 0
    loaded = sorted({m.split(".")[0] for m in sys.modules} & BLOCKED)
    assert not loaded, loaded
    print("core-ok", len(names))
""")


def run_check(python: str = sys.executable, blocked=EXTRAS) -> subprocess.CompletedProcess:
    """Run the core check in a fresh interpreter ``python`` with ``blocked`` packages unimportable."""
    return subprocess.run([python, "-c", CHECK, ",".join(blocked)], capture_output=True, text=True, timeout=300)


def test_core_runs_without_the_extras():
    r = run_check()
    assert r.returncode == 0 and "core-ok" in r.stdout, r.stdout + r.stderr


def test_the_check_fails_when_an_extra_is_imported_at_module_level():
    """The finder really blocks: importing the HF integration (which needs transformers) fails."""
    r = subprocess.run([sys.executable, "-c", CHECK.split("import torch")[0] + "import sparsattn.integrations.hf",
                        ",".join(EXTRAS)], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "transformers is blocked" in r.stderr, r.stdout + r.stderr


def main() -> int:
    """``python -m tests.packaging.test_core_install``: in an environment with only the core installed
    (``.ci/run``'s second virtual environment), check that no extra is installed, then run the check."""
    import importlib.util

    present = [m for m in EXTRAS if importlib.util.find_spec(m) is not None]
    if present:
        print(f"core install check: extras installed in this environment: {present}", file=sys.stderr)
        return 1
    r = run_check()
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    return r.returncode


if __name__ == "__main__":
    raise SystemExit(main())
