"""SeerAttention gate with key-block overlap (a departure from SeerAttention, arXiv 2410.13276) in the
cached calibration: the cache records the overlap of its pooled keys and refuses another one."""
import pytest
import torch

pytest.importorskip("transformers")

from sparsattn.calibrate.seer_attention import build_cache, check_cache_overlap, load_cache, train_cached  # noqa: E402
from sparsattn.methods.seer_attention import SeerGate  # noqa: E402
from sparsattn.train.seer_gate import capture_for_gate, gate_features, gate_for_model  # noqa: E402


def _windows(seed=0, vocab=8192, T=512):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(300, vocab, (1, T), generator=g)


def test_cache_records_overlap_and_refuses_another(tiny, tok, tmp_path):
    c = tmp_path / "c"
    build_cache(tiny, tok, c, lengths=(256,), n_retrieval=1, n_source=1, haystack=_windows(), source=_windows(1),
                log=None, k_overlap=16)
    recs = load_cache(c)
    assert all(r["meta"]["k_overlap"] == 16 for r in recs)
    # the cached keys are the overlap gate's pooling of a fresh capture
    gate = gate_for_model(tiny, seed=0, k_overlap=16)
    w = next(_windows(1))[:, :256]
    f = gate_features(gate, *capture_for_gate(tiny, w, [1])[1])
    src = [r for r in recs if r["meta"]["kind"] == "source"][0]
    torch.testing.assert_close(f["k"], src["layers"][1]["k"])
    assert not torch.allclose(gate_features(gate_for_model(tiny), *capture_for_gate(tiny, w, [1])[1])["k"], f["k"])
    # reusing the folder with another overlap: ValueError naming the folder and the field
    with pytest.raises(ValueError, match="k_overlap") as e:
        build_cache(tiny, tok, c, lengths=(256,), n_retrieval=1, n_source=1, haystack=_windows(),
                    source=_windows(1), log=None, k_overlap=0)
    assert str(c) in str(e.value)
    with pytest.raises(ValueError, match="k_overlap"):
        train_cached(tiny, tok, str(tmp_path / "g"), cache=str(c), cache_lengths=(256,), n_retrieval=(1,),
                     n_source=(1,), steps=1, minutes=None, haystack=_windows(), source=_windows(1), log=None)
    with pytest.raises(ValueError, match="k_overlap"):
        check_cache_overlap(recs, 8, c)


def test_train_cached_with_overlap_and_init_of_another_overlap(tiny, tok, tmp_path):
    kw = dict(cache_lengths=(256,), n_retrieval=(1,), n_source=(1,), minutes=None, batch_size=1,
              haystack=_windows(), source=_windows(1), log=None)
    g0, _, _ = train_cached(tiny, tok, str(tmp_path / "g0"), cache=str(tmp_path / "c0"), steps=2, **kw)
    assert g0.k_overlap == 0 and SeerGate.load(tmp_path / "g0").k_overlap == 0
    # fine-tune the overlap-0 gate to overlap 8 (same weight shapes), then keep the init's overlap by default
    g8, losses, _ = train_cached(tiny, tok, str(tmp_path / "g8"), cache=str(tmp_path / "c8"), steps=2,
                                 init=str(tmp_path / "g0"), k_overlap=8, **kw)
    back = SeerGate.load(tmp_path / "g8")
    assert back.k_overlap == 8 and back.model_info["k_overlap"] == 8 and all(map(torch.isfinite, map(torch.tensor, losses)))
    g8b, _, _ = train_cached(tiny, tok, str(tmp_path / "g8b"), cache=str(tmp_path / "c8"), steps=1,
                             init=str(tmp_path / "g8"), **kw)
    assert g8b.k_overlap == 8
    with pytest.raises(ValueError, match="k_overlap"):
        train_cached(tiny, tok, str(tmp_path / "gx"), cache=str(tmp_path / "cx"), steps=1, k_overlap=-2, **kw)


def test_cli_k_overlap_option():
    import argparse

    from sparsattn.calibrate.seer_attention import DEFAULTS, add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args([]).k_overlap is None and DEFAULTS["k_overlap"] is None
    assert p.parse_args(["--k-overlap", "16"]).k_overlap == 16


@pytest.mark.gpu
def test_train_cached_steps_on_the_model_device(tiny, tok, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = tiny.to("cuda")
    try:
        gate, losses, _ = train_cached(model, tok, str(tmp_path / "g"), cache=str(tmp_path / "c"), cache_lengths=(256,),
                                       n_retrieval=(1,), n_source=(1,), steps=2, minutes=None, batch_size=2,
                                       haystack=_windows(), source=_windows(1), log=None, k_overlap=8)
        assert gate.wq["0"].device.type == "cuda" and len(losses) == 2
        assert SeerGate.load(tmp_path / "g").k_overlap == 8
    finally:
        tiny.to("cpu")
