"""SeerAttention: gate shapes/semantics, selection rules, gate files, and distillation training."""
import math

import pytest
import torch

from sparsattn.kernels.attn_pool import attn_pool_reference
from sparsattn.methods import get_method
from sparsattn.methods.base import SelectContext
from sparsattn.methods.seer_attention import (SeerAttention, SeerGate, apply_rope, causal_block_mask,
                                              default_inv_freq, diagonal_block_mask)
from sparsattn.train.seer_gate import cosine_with_warmup, gate_loss, train_gate


def _qk(B=1, Hq=4, Hkv=2, T=333, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, Hq, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)


def test_unfitted_error_says_how_to_train():
    m = get_method("seer_attention")
    assert not m.is_fitted and m.needs
    q, k = _qk()
    with pytest.raises(ValueError, match="seer_gate"):
        m.select(q, k)


def test_hyper_parameters_validated():
    with pytest.raises(ValueError, match="threshold"):
        SeerAttention(threshold=-1.0)
    with pytest.raises(ValueError, match="nz_ratio"):
        SeerAttention(nz_ratio=0.0)
    with pytest.raises(ValueError, match="topk_rule"):
        SeerAttention(nz_ratio=0.3, topk_rule="global")
    with pytest.raises(ValueError, match="rope_input"):
        SeerGate(4, 2, 32, 1, rope_input="mid")


def test_gate_pooling_matches_manual_computation():
    q, k = _qk(T=150)
    gate = SeerGate(4, 2, 32, [3], rope_input="post", seed=1)
    s = gate.scores(3, q, k)
    assert s.shape == (1, 4, 3, 3)
    # manual: avg-pooled q; max/min/avg-pooled k; per-head linear; RoPE at block starts; softmax scale 1/sqrt(128)
    h, kvh, a, b = 3, 1, 2, 1
    qa = q[0, h, 128:150].mean(0)
    kb = k[0, kvh, 64:128]
    kcat = torch.cat([kb.amax(0), kb.amin(0), kb.mean(0)])
    qt = qa @ gate.wq["3"][h]
    kt = kcat @ gate.wk["3"][kvh]
    inv = default_inv_freq(128, 10000.0)
    qt = apply_rope(qt[None], torch.tensor([128]), inv)[0]
    kt = apply_rope(kt[None], torch.tensor([64]), inv)[0]
    torch.testing.assert_close(s[0, h, a, b], (qt @ kt) / math.sqrt(128), rtol=1e-4, atol=1e-4)
    assert torch.isinf(s[0, :, 0, 1:]).all() and torch.isinf(s[0, :, 1, 2]).all()


def test_rope_undo_equals_supplied_pre_rope():
    q0, k0 = _qk(T=200)
    inv = default_inv_freq(32, 500000.0)
    q = apply_rope(q0, torch.arange(200), inv)
    k = apply_rope(k0, torch.arange(200), inv)
    gate = SeerGate(4, 2, 32, [0], rope_theta=500000.0, seed=0)
    qi, ki = gate.gate_inputs(q, k)
    torch.testing.assert_close(qi, q0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ki, k0, atol=1e-4, rtol=1e-4)
    m = SeerAttention().set_gate(gate)
    assert m.needs_pre_rope
    p1 = m.block_probs(q, k, SelectContext(layer=0))
    p2 = m.block_probs(q, k, SelectContext(layer=0, extras={"q_pre_rope": q0, "k_pre_rope": k0}))
    torch.testing.assert_close(p1, p2, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("nz_ratio", [None, 0.3, 0.9])
def test_select_rules(nz_ratio):
    q, k = _qk(T=600)
    gate = SeerGate(4, 2, 32, [0], seed=3)
    allowed = causal_block_mask(600, 600, 64)
    p0 = SeerAttention().set_gate(gate).block_probs(q, k, SelectContext(layer=0))
    thr = float(p0[0][:, allowed].median())  # about half of the causal blocks pass
    m = SeerAttention(nz_ratio=nz_ratio, threshold=thr).set_gate(gate)
    p = m.select(q, k, SelectContext(layer=0))
    p.validate()
    bm = p.block_mask()[0]  # [H, nq, nk]
    nq = bm.shape[1]
    diag = diagonal_block_mask(600, 600, 64)
    assert not (bm & ~allowed).any()
    assert (bm | ~diag).all(), "diagonal blocks must be kept"
    assert torch.equal(bm[:, -2:], allowed[-2:].expand(4, -1, -1)), "last two block rows dense"
    probs = m.block_probs(q, k, SelectContext(layer=0))[0, :, :-2]
    body = bm[:, :-2]
    if nz_ratio is None:
        expect = probs > thr
    else:
        kk = int((1 - math.sqrt(1 - nz_ratio)) * 10)  # 10 key blocks: 1 (r=0.3) or 6 (r=0.9)
        expect = torch.zeros_like(body)
        for h in range(4):
            for r in range(nq - 2):
                vals = probs[h, r].masked_fill(~allowed[r], -1)
                expect[h, r, vals.topk(kk).indices] = True
    assert torch.equal(body, (expect | diag[:-2]) & allowed[:-2])
    assert p.density < 1.0
    assert 0 < nq


def test_gate_files_round_trip_and_mismatch(tmp_path):
    gate = SeerGate(4, 2, 32, [0, 2], seed=5, model_info={"name": "toy"})
    gate.save(tmp_path / "g")
    m = SeerAttention(gate_path=str(tmp_path / "g"))
    for key in ("0", "2"):
        torch.testing.assert_close(m.gate.wq[key], gate.wq[key])
        torch.testing.assert_close(m.gate.wk[key], gate.wk[key])
    assert m.gate.config() == gate.config()
    q, k = _qk()
    p1 = m.select(q, k, SelectContext(layer=2))
    p2 = SeerAttention().set_gate(gate).select(q, k, SelectContext(layer=2))
    assert torch.equal(p1.block_mask(), p2.block_mask())
    with pytest.raises(ValueError, match="num_q_heads"):
        SeerAttention().load_gate(tmp_path / "g", expect={"num_q_heads": 8})
    with pytest.raises(ValueError, match="num_q_heads"):
        m.select(torch.randn(1, 8, 333, 32), torch.randn(1, 2, 333, 32), SelectContext(layer=0))
    with pytest.raises(ValueError, match="head_dim"):
        m.select(torch.randn(1, 4, 333, 16), torch.randn(1, 2, 333, 16), SelectContext(layer=0))
    with pytest.raises(ValueError, match="layer"):
        m.select(q, k, SelectContext(layer=1))
    with pytest.raises(ValueError, match="gate_path"):
        SeerAttention(gate_path=str(tmp_path / "missing"))


def test_lr_schedule():
    f = [cosine_with_warmup(s, 100, 20) for s in range(100)]
    assert f[0] == pytest.approx(1 / 20) and f[19] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[19:], f[20:])) and f[-1] < 0.01


# -- training on planted block structure -----------------------------------------------------------

def planted(seed, B=2, Hq=2, Hkv=1, T=384, D=32, topics=4, strength=5.0):
    """Queries/keys of each 64-token block carry one of ``topics`` directions: attention mass goes to
    the key blocks sharing the query block's topic."""
    g = torch.Generator().manual_seed(seed)
    nb = T // 64
    U = torch.nn.functional.normalize(torch.randn(topics, D, generator=g), dim=-1) * strength
    tq = torch.randint(topics, (B, Hq, nb), generator=g)
    tk = torch.randint(topics, (B, Hkv, nb), generator=g)
    q = U[tq].repeat_interleave(64, 2) + torch.randn(B, Hq, T, D, generator=g)
    k = U[tk].repeat_interleave(64, 2) + torch.randn(B, Hkv, T, D, generator=g)
    return q, k, tq, tk


def top1_hit_rate(gate, seeds):
    hits, chance = [], []
    for s in seeds:
        q, k, tq, tk = planted(s)
        with torch.no_grad():
            p = torch.softmax(gate.scores(0, q, k), -1)
        nb = p.shape[-1]
        tkq = tk.repeat_interleave(q.shape[1] // k.shape[1], 1)
        allowed = causal_block_mask(q.shape[2], k.shape[2], 64)
        same = (tkq[:, :, None, :] == tq[..., None]) & allowed
        rows = slice(nb // 4, nb)
        hits.append((torch.gather(tkq, 2, p.argmax(-1)) == tq).float()[:, :, rows].mean())
        chance.append((same.sum(-1).float() / allowed.sum(-1))[:, :, rows].mean())
    return float(torch.stack(hits).mean()), float(torch.stack(chance).mean())


def test_training_lowers_loss_and_recovers_planted_blocks():
    torch.manual_seed(0)
    gate = SeerGate(2, 1, 32, [0], rope_input="post", seed=0)
    eval_sets = [planted(1000 + i)[:2] for i in range(3)]

    def eval_loss():
        with torch.no_grad():
            return sum(float(gate_loss(gate, 0, q, k)) for q, k in eval_sets)

    before = eval_loss()
    hit0, chance = top1_hit_rate(gate, range(2000, 2004))

    def batches():
        s = 0
        while True:
            q, k, _, _ = planted(s)
            s += 1
            yield {0: (q, k)}

    losses = train_gate(gate, batches(), steps=40, lr=1e-2, warmup=5)
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    after = eval_loss()
    hit1, _ = top1_hit_rate(gate, range(2000, 2004))
    assert after < 0.7 * before, (before, after)
    # chance ~0.21 here; the target's own argmax hits ~0.52 (the diagonal block often wins)
    assert hit1 > chance + 0.15 and hit1 > hit0 + 0.1, (hit0, hit1, chance)


def test_gate_loss_target_is_attn_pool():
    q, k = _qk(T=256, Hq=2, Hkv=1)
    gate = SeerGate(2, 1, 32, [0], rope_input="post", seed=0)
    t = attn_pool_reference(q, k)
    a = gate_loss(gate, 0, q, k)
    b = gate_loss(gate, 0, q, k, target=t)
    torch.testing.assert_close(a, b)
    # the loss vanishes when the gate's distribution equals the target
    logp = torch.log_softmax(gate.scores(0, q, k), -1)
    with pytest.raises(ValueError, match="target"):
        gate_loss(gate, 0, q, k, target=t[:, :, :2])
    assert float(gate_loss(gate, 0, q, k, target=logp.exp().detach()).detach()) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
def test_train_gates_end_to_end_on_a_tiny_hf_model(tmp_path):
    """train_gates on a saved tiny Llama + tokenizer: loads, captures, trains, saves a loadable gate."""
    import email
    from pathlib import Path

    import transformers as tf

    from sparsattn.data import read_source_text, source_files
    from sparsattn.train.seer_gate import main
    from sparsattn.train.tokenizer import save_tokenizer, train_tokenizer

    files = source_files("train", roots=[Path(email.__file__).resolve().parent])[:6]
    tok = train_tokenizer((read_source_text(f) for f in files), vocab_size=512)
    save_tokenizer(tok, tmp_path / "model")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "model")
    from sparsattn.train.seer_gate import train_gates

    out = train_gates(tmp_path / "model", tmp_path / "gate", steps=3, seq_len=256, device="cpu", files=files, log=None)
    m = SeerAttention(gate_path=str(out))
    assert m.gate.layers == [0, 1] and m.gate.num_kv_heads == 2 and m.gate.rope_input == "pre"
    assert m.gate.model_info["steps_done"] == 3
    q, k = torch.randn(1, 4, 256, 16), torch.randn(1, 2, 256, 16)
    m.select(q, k, SelectContext(layer=1)).validate()
    with pytest.raises(SystemExit):
        main(["--help"])


@pytest.mark.parametrize("nz_ratio", [0.15, 0.5])
def test_select_row_rule_keeps_the_same_share_of_every_row(nz_ratio):
    """topk_rule="row": row r keeps its ceil(r * causal blocks) best blocks (plus the diagonal); the
    constant rule keeps one k for every row."""
    q, k = _qk(T=600)
    gate = SeerGate(4, 2, 32, [0], seed=3)
    allowed = causal_block_mask(600, 600, 64)
    m = SeerAttention(nz_ratio=nz_ratio, topk_rule="row", last_block_dense=False).set_gate(gate)
    bm = m.select(q, k, SelectContext(layer=0)).block_mask()[0]
    probs = m.block_probs(q, k, SelectContext(layer=0))[0]
    diag = diagonal_block_mask(600, 600, 64)
    expect = torch.zeros_like(bm)
    for h in range(4):
        for r in range(bm.shape[1]):
            kr = max(1, math.ceil(nz_ratio * int(allowed[r].sum())))
            vals = probs[h, r].masked_fill(~allowed[r], -1)
            expect[h, r, vals.topk(kr).indices] = True
    assert torch.equal(bm, (expect | diag) & allowed)
    const = SeerAttention(nz_ratio=nz_ratio, last_block_dense=False).set_gate(gate)
    bc = const.select(q, k, SelectContext(layer=0)).block_mask()[0]
    assert int(bc[:, -1].sum()) <= int(bm[:, -1].sum())  # the last row keeps at least as much under "row"
