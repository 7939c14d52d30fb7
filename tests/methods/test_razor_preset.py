"""RazorAttention's density preset: how many retrieval heads stay dense follows from razor's own
density (dense heads cost 1, the others sink + window), issue 21."""
import pytest
import torch

from sparsattn import patterns
from sparsattn.methods import get_method
from sparsattn.methods.base import PresetContext, SelectContext
from sparsattn.methods.razor import (AIM_MIN_WINDOW, RazorAttention, dense_head_count, razor_subset,
                                     sink_window_density)


@pytest.mark.parametrize("T,sink,window", [(300, 4, 32), (257, 0, 1), (130, 4, 200), (1000, 7, 63)])
def test_sink_window_density_is_the_patterns_density(T, sink, window):
    p = patterns.sink_local(T, sink, window, block_q=64)
    assert sink_window_density(T, sink, window) == pytest.approx(float(p.density), abs=1e-9)


def test_dense_head_count_values_and_maximality():
    # the issue-21 case: 64 heads, the shipped file's 6 retrieval heads; at 12% all 6 (the old
    # target x heads / 2 rule gave 3), at 10% 5, at 5% 2
    assert dense_head_count(4096, 0.12, 64, 6) == 6
    assert dense_head_count(8192, 0.12, 64, 6) == 6
    assert dense_head_count(4096, 0.10, 64, 6) == 5
    assert dense_head_count(4096, 0.05, 64, 6) == 2
    assert dense_head_count(256, 0.1, 64, 6) == 1  # the window alone is above the target: at least one
    for T, t in ((4096, 0.12), (8192, 0.2), (2048, 0.3), (16384, 0.07)):
        c = sink_window_density(T, 4, AIM_MIN_WINDOW)
        n = dense_head_count(T, t, 64, 64)
        assert (n + (64 - n) * c) / 64 <= t + 1e-12  # the others keep at least sink + min window
        assert (n + 1 + (63 - n) * c) / 64 > t  # and one more dense head would not fit
    assert dense_head_count(8192, 0.2, 64, 64) > dense_head_count(8192, 0.2, 64, 6) == 6  # capped by n_cal
    with pytest.raises(ValueError, match="target"):
        dense_head_count(4096, 0.0, 64, 6)
    with pytest.raises(ValueError, match="n_cal"):
        dense_head_count(4096, 0.1, 64, 0)


RET = ((0, 1), (1, 0), (1, 3))


def _calibration(path) -> str:
    """A razor calibration of a 2-layer, 4-head model whose 3 retrieval heads have the top scores."""
    from sparsattn.calibration import ModelShape

    m = RazorAttention()
    m._set(ModelShape(num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16),
           {str(l): {"retrieval_heads": [h for hl, h in RET if hl == l], "echo": [0.0] * 4,
                     "induction": [0.5 + 0.1 * h if (l, h) in RET else 0.01 * h for h in range(4)]}
            for l in range(2)})
    return m.save(path)


def test_density_knob_keeps_the_rule_s_heads_and_reaches_the_target(tmp_path):
    src = _calibration(str(tmp_path / "razor.json"))
    T, target = 1024, 0.35
    ctx = PresetContext(n_layers=2, n_heads=4, calibrations={"razor": src}, work_dir=str(tmp_path / "w"))
    fam = RazorAttention.density_knob(T, target, ctx)
    n = dense_head_count(T, target, 8, 3)
    assert n == 2  # floor(8 x (0.35 - c) / (1 - c)), c = 36 keys per row of 1024
    path = fam.config(AIM_MIN_WINDOW)["path"]
    assert path.startswith(str(tmp_path / "w")) and fam.label(50).startswith(f"{n} ret. heads")
    kept = get_method("razor", **fam.config(AIM_MIN_WINDOW)).retrieval_heads
    assert sum(len(h) for h in kept.values()) == n
    # the sub-set is the top n of the stored scores (razor_subset), and at the smallest window the
    # measured density is below the target: the knob can reach it with a window >= AIM_MIN_WINDOW
    assert razor_subset(src, n, str(tmp_path / "ref.json")) and \
        get_method("razor", path=str(tmp_path / "ref.json")).retrieval_heads == kept
    q = torch.randn(1, 4, T, 16)

    def density(window):
        m = get_method("razor", **dict(fam.config(window)))
        return sum(float(m.select(q, q, SelectContext(layer=l)).density) for l in range(2)) / 2

    d_min = density(AIM_MIN_WINDOW)
    assert d_min <= target < density(T // 2)
    assert d_min == pytest.approx((n + (8 - n) * sink_window_density(T, 4, AIM_MIN_WINDOW)) / 8, abs=0.01)
