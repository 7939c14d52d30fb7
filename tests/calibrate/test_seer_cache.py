"""SeerAttention cached gate training (arXiv 2410.13276) on a tiny random Llama with the bundled
tokenizer and random-token haystacks (no files read): build_cache / load_cache round trip, the
needle metadata, the cache metrics, batched cached steps, the command's cached path."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparsattn.calibrate.seer_attention import (answer_row_weights, build_cache, cache_metrics,  # noqa: E402
                                                cached_batches, load_cache, train_cached)
from sparsattn.train.seer_gate import cached_loss, capture_for_gate, gate_features, gate_for_model  # noqa: E402


def _windows(seed=0, vocab=8192, T=512):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(300, vocab, (1, T), generator=g)


def test_cache_round_trip_metrics_and_batches(tiny, tok, tmp_path):
    paths = build_cache(tiny, tok, tmp_path / "c", lengths=(256,), n_retrieval=3, n_source=1, haystack=_windows(),
                        source=_windows(1), log=None)
    assert [p.name for p in paths] == [f"retrieval_256_000{i}.safetensors" for i in range(3)] + \
        ["source_256_0003.safetensors"]
    recs = load_cache(tmp_path / "c")
    assert len(recs) == 4 and sorted(recs[0]["layers"]) == [0, 1]
    r = recs[0]
    P = r["meta"]["prompt_len"]
    assert r["meta"]["rows"] == list(range(P - 1, 255)) and r["read"][0].shape == (4,)
    assert len(r["meta"]["needle"]) >= 1 and r["meta"]["needle"][-1] < P
    # the cached features are gate_features of a fresh capture of the same ids (the cache is exact)
    for rec in recs[3:]:
        assert rec["meta"]["kind"] == "source" and not rec["read"]
    gate = gate_for_model(tiny, seed=0)
    w = next(_windows(1))[:, :256]
    f = gate_features(gate, *capture_for_gate(tiny, w, [1])[1])
    torch.testing.assert_close(f["t"], recs[3]["layers"][1]["t"])
    torch.testing.assert_close(f["k"], recs[3]["layers"][1]["k"])
    # metrics: a gate whose logits are the target's log ranks every block as the target does
    m = cache_metrics(gate, recs, k=1, threshold=0.0)
    assert set(m["block_recall"]) == {0, 1} and all(0 <= v <= 1 for v in m["block_recall"].values())
    assert sum(v[1] for v in m["oracle_needle"].values()) == 3 * 2 * 4  # threshold 0: every head reads
    by_target = {id(x["q"]): x["t"] for rec in recs for x in rec["layers"].values()}
    gate.scores_pooled = lambda l, q, k, Tq, Tk, **kw: by_target[id(q)].clamp_min(1e-30).log()
    m2 = cache_metrics(gate, recs, k=1, threshold=0.0)
    assert all(v == 1.0 for v in m2["block_recall"].values())
    assert m2["needle"] == m2["oracle_needle"] == m["oracle_needle"]
    del gate.scores_pooled
    # a batch of B stacked records: the loss is the mean of their losses
    answer_row_weights(recs, 5.0)
    assert float(recs[0]["layers"][0]["w"].max()) == 5.0 and float(recs[3]["layers"][0]["w"].max()) == 1.0
    b = next(cached_batches(recs[:2], batch_size=2, seed=3))
    assert b[0]["q"].shape[0] == 2 and b[0]["w"].shape == (2, 4)
    one = [cached_loss(gate, 0, {**x["layers"][0]}) for x in recs[:2]]
    both = cached_loss(gate, 0, {n: torch.cat([x["layers"][0][n] for x in recs[:2]]) if n in "qkt" else
                                 (torch.stack([x["layers"][0]["w"] for x in recs[:2]]) if n == "w" else
                                  recs[0]["layers"][0][n]) for n in ("q", "k", "t", "w", "Tq", "Tk")})
    torch.testing.assert_close(both, (one[0] + one[1]) / 2)
    with pytest.raises(ValueError, match="batch_size"):
        next(cached_batches(recs, batch_size=0))
    with pytest.raises(ValueError, match="cache"):
        load_cache(tmp_path / "nothing")


def test_train_cached_saves_a_gate_with_its_recipe(tiny, tok, tmp_path):
    from sparsattn.methods.seer_attention import SeerAttention

    gate, losses, n = train_cached(tiny, tok, str(tmp_path / "g"), cache=str(tmp_path / "c"), cache_lengths=(256,),
                                   n_retrieval=(2,), n_source=(1,), steps=4, minutes=None, batch_size=2,
                                   haystack=_windows(), source=_windows(1), log=None)
    assert n == 3 and len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    info = SeerAttention.load(str(tmp_path / "g")).gate.model_info
    assert info["steps_done"] == 4 and info["answer_weight"] == 30.0
    assert info["target_power"] == 8.0 and info["batch_size"] == 2 and "seq_len" in info
    with pytest.raises(ValueError, match="n_retrieval"):
        train_cached(tiny, tok, str(tmp_path / "g2"), cache_lengths=(256, 512), n_retrieval=(1,), n_source=(1,),
                     steps=1, log=None)


def test_prose_prompts_are_cached_as_retrieval_records(tiny, tok, tmp_path):
    paths = build_cache(tiny, tok, tmp_path / "c", lengths=(256,), n_retrieval=1, n_source=0, n_prose=2,
                        haystack=_windows(), prose=_windows(5), log=None)
    assert [p.name for p in paths] == ["retrieval_256_0000.safetensors", "prose_256_0001.safetensors",
                                       "prose_256_0002.safetensors"]
    recs = load_cache(tmp_path / "c")
    assert [r["meta"]["haystack"] for r in recs] == ["prose", "prose", "code"]  # sorted file names
    assert all(r["meta"]["kind"] == "retrieval" and r["read"] for r in recs)
    # the prose prompts come from the prose stream, not the code one
    code = next(_windows())[0, :32].tolist()
    assert recs[0]["meta"]["needle"] != [] and code != next(_windows(5))[0, :32].tolist()
    with pytest.raises(ValueError, match="n_prose"):
        train_cached(tiny, tok, str(tmp_path / "g"), cache_lengths=(256,), n_retrieval=(1,), n_source=(0,),
                     n_prose=(1, 1), steps=1, log=None)


def _fake_record(T, nb=2):
    f = {"q": torch.zeros(1, 2, nb, 4), "k": torch.zeros(1, 1, nb, 12), "t": torch.zeros(1, 2, nb, nb), "Tq": T, "Tk": T}
    return {"layers": {0: f}, "read": {}, "meta": {"kind": "source", "T": T}}


def test_cached_batches_length_mix():
    # 9 short records and 1 long one: "count" draws the long length ~1/10 of the steps, "equal" ~1/2
    recs = [_fake_record(128) for _ in range(9)] + [_fake_record(256, 4)]

    def long_share(mix):
        it = cached_batches(recs, seed=0, batch_size=2, length_mix=mix)
        return sum(next(it)[0]["Tq"] == 256 for _ in range(2000)) / 2000

    assert 0.06 < long_share("count") < 0.14
    assert 0.45 < long_share("equal") < 0.55
    with pytest.raises(ValueError, match="length_mix"):
        next(cached_batches(recs, length_mix="uniform"))


def test_block_start_prompt_puts_the_value_after_a_block_boundary(tok):
    from sparsattn.calibrate.seer_attention import block_start_prompt

    window = torch.randint(300, 8000, (1, 600), generator=torch.Generator().manual_seed(0))
    for off, depth in ((0, 0.5), (7, 0.0), (15, 1.0), (63, 0.3)):
        p = block_start_prompt(tok, 512, 3, depth, window, off, 64)
        assert p["needle"][0] % 64 == off and p["ids"].shape[1] <= 512
        ids = p["ids"][0].tolist()
        assert ids[p["needle"][0]:p["needle"][-1] + 1] == ids[p["answer"][0]:][-len(p["needle"]):]
    with pytest.raises(ValueError, match="offset"):
        block_start_prompt(tok, 512, 3, 0.5, window, 64, 64)
