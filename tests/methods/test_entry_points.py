"""Third-party methods through the ``sparsattn.methods`` entry-point group (issue 16, item 6).

A tiny distribution is "installed" into a temporary folder (a package plus its ``.dist-info`` with
``entry_points.txt``, found by ``importlib.metadata`` on ``sys.path``) and a fresh interpreter checks
that its methods are in the registry, that they run through ``sparsattn.attention``, that ``sparsattn
list`` shows them, and that a broken entry point is skipped with a warning naming it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

PLUGIN = textwrap.dedent('''
    """fakeplug: a third-party sparse-attention method."""
    from dataclasses import dataclass

    from sparsattn import patterns
    from sparsattn.methods import Method, register


    @register("plugin_window")
    @dataclass
    class PluginWindow(Method):
        """PluginWindow: a sliding window from a third-party package (test only)."""

        paper = "Longformer: The Long-Document Transformer (arXiv 2004.05150)"
        phase = "prefill"
        window: int = 32
        block_size: int = 16

        def select(self, q, k, ctx=None):
            return patterns.sliding_window(q.shape[2], self.window, block_q=self.block_size, device=q.device)


    @dataclass
    class ClassOnly(PluginWindow):
        """ClassOnly: registered by its entry point's name (no decorator)."""

        window: int = 16
''')

CHECK = textwrap.dedent('''
    import warnings
    import torch
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        import sparsattn
        names = sparsattn.list_methods()
    assert "plugin_window" in names and "plugin_class" in names and "a_shape" in names, names
    msgs = [str(x.message) for x in w]
    assert any("broken (fakeplug)" in m and "failed to load" in m for m in msgs), msgs
    from sparsattn.methods import PLUGIN_ERRORS, method_class
    assert list(PLUGIN_ERRORS) == ["broken (fakeplug)"], PLUGIN_ERRORS
    assert method_class("plugin_class").window == 16 and method_class("plugin_class").name == "plugin_class"
    q = torch.randn(1, 2, 64, 16)
    m = sparsattn.get_method("plugin_window", window=24)
    p = m.select(q, q)
    out = sparsattn.attention(q, q, q, p, backend="reference")
    mask = p.to_dense_mask()[0, 0]
    i = torch.arange(64)
    assert torch.equal(mask, (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < 24))
    s = (q @ q.transpose(-1, -2)) * 16 ** -0.5
    ref = s.masked_fill(~mask, float("-inf")).softmax(-1) @ q
    assert (out - ref).abs().max() < 1e-5
    from sparsattn.cli import main
    main(["list"])
    print("plugin-ok")
''')


def install_fake_distribution(site: Path) -> None:
    """Write package ``fakeplug`` and its metadata (three entry points: a module, a class, a broken one)."""
    (site / "fakeplug").mkdir(parents=True)
    (site / "fakeplug" / "__init__.py").write_text(PLUGIN)
    info = site / "fakeplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[sparsattn.methods]\nplugin_window = fakeplug\n"
                                          "plugin_class = fakeplug:ClassOnly\nbroken = fakeplug_missing\n")


def test_methods_from_an_installed_distribution(tmp_path):
    install_fake_distribution(tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, timeout=300,
                       cwd=str(Path(__file__).resolve().parents[2]))
    assert r.returncode == 0 and "plugin-ok" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert "plugin_window" in r.stdout and "plugin_class" in r.stdout  # `sparsattn list` shows them


def test_no_plugins_no_errors():
    import sparsattn
    from sparsattn.methods import ENTRY_POINT_GROUP, PLUGIN_ERRORS

    sparsattn.list_methods()
    assert ENTRY_POINT_GROUP == "sparsattn.methods" and PLUGIN_ERRORS == {}
