"""SeerAttention gate training on cached features (arXiv 2410.13276): the cached loss is the loss.

The gate's inputs (block-pooled pre-RoPE q/k) and its target (``attn_pool`` of the frozen model's
q/k) do not depend on the gate's weights, so ``gate_features`` captured once and ``cached_loss``
on them give the same value and gradient as ``gate_loss`` on the q/k, through a safetensors round
trip of the cache (``build_cache`` / ``load_cache``)."""
import pytest
import torch

from sparsattn.methods.seer_attention import SeerGate
from sparsattn.train.seer_gate import cached_loss, gate_features, gate_loss, kl_to_target, train_gate


def _qkpre(T=203, Hq=4, Hkv=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, Hq, T, D, generator=g), torch.randn(1, Hkv, T, D, generator=g)
    qp, kp = torch.randn(1, Hq, T, D, generator=g), torch.randn(1, Hkv, T, D, generator=g)
    return q, k, qp, kp


@pytest.mark.parametrize("rope_input,pre", [("pre", True), ("pre", False), ("post", False)])
def test_cached_loss_equals_gate_loss_value_and_gradient(rope_input, pre, tmp_path):
    from safetensors.torch import load_file, save_file

    q, k, qp, kp = _qkpre()
    args = (q, k, qp, kp) if pre else (q, k)
    gate = SeerGate(4, 2, 16, [1], hidden_size=8, rope_input=rope_input, seed=3)
    f = gate_features(gate, *args)
    save_file({n: f[n] for n in ("q", "k", "t")}, str(tmp_path / "f.safetensors"))
    f2 = dict(load_file(str(tmp_path / "f.safetensors")), Tq=f["Tq"], Tk=f["Tk"])
    w = torch.rand(f["t"].shape[2])
    for rw in (None, w):
        gate.zero_grad()
        a = gate_loss(gate, 1, *args, row_weight=rw)
        a.backward()
        ga = [p.grad.clone() for p in gate.parameters()]
        gate.zero_grad()
        b = cached_loss(gate, 1, f2, row_weight=rw)
        b.backward()
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        for x, y in zip(ga, [p.grad for p in gate.parameters()]):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    # the pre-RoPE tensors are what a "pre" gate pools: features differ when they are not given
    if rope_input == "pre":
        other = gate_features(gate, q, k) if pre else gate_features(gate, q, k, qp, kp)
        assert not torch.allclose(other["q"], f["q"])
    # a uniform row weight of 1 is the unweighted loss; a weight of 0 on every row is 0
    torch.testing.assert_close(cached_loss(gate, 1, f2, row_weight=torch.ones(4)), cached_loss(gate, 1, f2))
    assert float(cached_loss(gate, 1, f2, row_weight=torch.zeros(4)).detach()) == 0.0


def test_train_gate_steps_on_cached_features_like_on_raw_tensors():
    q, k, qp, kp = _qkpre(T=256, seed=1)
    g1 = SeerGate(4, 2, 16, [0], hidden_size=8, seed=0)
    g2 = SeerGate(4, 2, 16, [0], hidden_size=8, seed=0)
    f = gate_features(g1, q, k, qp, kp)
    l1 = train_gate(g1, iter([{0: (q, k, qp, kp)}] * 3), steps=3, lr=1e-2, warmup=1)
    l2 = train_gate(g2, iter([{0: f}] * 3), steps=3, lr=1e-2, warmup=1)
    assert l1 == pytest.approx(l2, rel=1e-6)
    torch.testing.assert_close(g1.wq["0"], g2.wq["0"])


def test_kl_to_target_refuses_a_misshapen_target():
    with pytest.raises(ValueError, match="target"):
        kl_to_target(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 3), 128, 128, 64)
