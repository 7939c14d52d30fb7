"""Retrieval-aware calibrations (issue 21) on a tiny random Llama with the bundled tokenizer and a
random-token haystack (no files read): prompts, MInference search rows, Razor from retrieval scores,
SeerAttention gate training on retrieval prompts, MoA on retrieval samples, the command line."""
import argparse

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparsattn.calibrate._retrieval import retrieval_prompts  # noqa: E402
from sparsattn.methods.minference import MInference, search_patterns  # noqa: E402
from sparsattn.methods.razor import RazorAttention  # noqa: E402


def _windows(seed=0, vocab=8192):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(300, vocab, (1, 4096), generator=g)


@pytest.fixture()
def no_files(monkeypatch):
    """token_windows over random ids: no source file is tokenized."""
    import sparsattn.train.seer_gate as sg

    monkeypatch.setattr(sg, "token_windows", lambda tok, n, seed=0, **kw: (w[:, :n] for w in _windows(seed)))


def test_retrieval_prompts_place_the_value(tok):
    ps = retrieval_prompts(tok, 300, 3, seed=1, haystack=_windows())
    for p, depth in zip(ps, (0.0, 0.5, 1.0)):
        ids = p["ids"][0]
        assert ids.shape == (300,) and p["depth"] == depth
        P = p["prompt_len"]
        value = tok.decode(ids[p["needle"]]).strip()
        assert len(value) == 7 and value.isdigit() and tok.decode(ids[P:]).strip() == value
        assert p["answer"] == list(range(P, 300))
    assert ps[0]["needle"][0] < ps[1]["needle"][0] < ps[2]["needle"][0]
    with pytest.raises(ValueError, match="length"):
        retrieval_prompts(tok, 100, 1, haystack=_windows())


def test_search_rows_from_sequence_is_the_mean_of_its_starts():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 256, 16, generator=g), torch.randn(1, 1, 256, 16, generator=g)
    cands = [{"type": "a_shape", "n_init": 8, "n_local": 32}, {"type": "block_sparse", "top_k": 2}]
    both = search_patterns({0: (q, k)}, cands, rows_from=(0, 240), block_size=32, last_q=16)
    one = [search_patterns({0: (q, k)}, cands, rows_from=r, block_size=32, last_q=16) for r in (0, 240)]
    for h in range(2):
        # the chosen candidate's score is the mean of its scores from each start
        c = both[0][h]
        per = [search_patterns({0: (q, k)}, [{x: c[x] for x in c if x not in ("score", "density")}], rows_from=r,
                               block_size=32, last_q=16)[0][h]["score"] for r in (0, 240)]
        assert c["score"] == pytest.approx(sum(per) / 2, rel=1e-9)
    assert {one[0][0][0]["score"], one[1][0][0]["score"]} != {both[0][0]["score"]}
    with pytest.raises(ValueError, match="rows_from"):
        search_patterns({0: (q, k)}, cands, rows_from=(), block_size=32)


def test_minference_on_retrieval_ids(tiny, tok, tmp_path):
    from sparsattn.calibrate.minference import fit_minference

    ids = torch.cat([p["ids"] for p in retrieval_prompts(tok, 256, 2, haystack=_windows())])
    cands = [{"type": "a_shape", "n_init": 16, "n_local": 32}, {"type": "vertical_slash", "v_size": 16, "s_size": 8}]
    m = fit_minference(tiny, tok, ids=ids, candidates=cands, budget=0.9, out=str(tmp_path / "m.json"), block_size=32,
                       last_q=16)
    assert MInference.load(tmp_path / "m.json").plan == m.plan and sorted(m.plan) == [0, 1]


def test_razor_from_retrieval_scores(tiny, tok, tmp_path, no_files):
    from sparsattn.calibrate.razor import fit_razor_retrieval

    r, scores, frac = fit_razor_retrieval(tiny, tok, lengths=(256,), depths=2, threshold=-1.0, max_heads=3,
                                          out=str(tmp_path / "r.json"), probe=(32, 3, 4))
    assert scores.shape == (2, 4) and 0 <= frac <= 1
    assert sum(len(h) for h in r.retrieval_heads.values()) == 3  # every head passes -1, capped at 3
    loaded = RazorAttention.load(tmp_path / "r.json")
    assert loaded.retrieval_heads == r.retrieval_heads and len(loaded.scores[1]["induction"]) == 4  # probe stored
    r0, _, _ = fit_razor_retrieval(tiny, tok, lengths=(256,), depths=2, threshold=1.0, max_heads=3, probe=None)
    assert sum(len(h) for h in r0.retrieval_heads.values()) == 0  # no head scores above 1


def test_seer_gate_trains_on_retrieval_prompts(tiny, tok, tmp_path, no_files):
    from sparsattn.calibrate.seer_attention import sequences, train
    from sparsattn.methods.seer_attention import SeerAttention

    seqs = sequences(tok, 256, retrieval_fraction=1.0, haystack=_windows(), source=_windows(1))
    assert next(seqs).shape == (1, 256)
    gate, losses = train(tiny, tok, str(tmp_path / "g"), steps=2, seq_len=256, minutes=None, log=None)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert SeerAttention.load(str(tmp_path / "g")).gate.model_info["steps_done"] == 2


def test_moa_on_retrieval_samples(tiny, tok, tmp_path, no_files):
    from sparsattn.calibrate.moa import fit_moa

    m = fit_moa(tiny, tok, lengths=(256,), budget=0.5, samples_per_length=1, sink=16, min_span=16, alpha_step=64,
                data="retrieval", out_path=str(tmp_path / "moa.json"), log=None)
    assert m.plan["info"]["density"][0] <= 0.5 + 1e-9 and m.plan["info"]["data"] == "retrieval"
    with pytest.raises(ValueError, match="data"):
        fit_moa(tiny, tok, lengths=(256,), data="nonsense", log=None)


def test_command_line_has_the_retrieval_options():
    from sparsattn.calibrate.cli import build_parser

    p = build_parser(argparse.ArgumentParser(prog="sparsattn calibrate"))
    a = p.parse_args(["razor", "--source", "echo"])
    assert a.source == "echo" and a.lengths == (1024, 2048, 4096)
    a = p.parse_args(["minference", "--budget", "0.12", "--data", "source"])
    assert a.budget == 0.12 and a.data == "source" and a.n_prompts == 2
    a = p.parse_args(["seer_attention", "--init", "g0"])
    assert a.init == "g0" and a.data == "retrieval"
    assert p.parse_args(["moa"]).budget == 0.5 and p.parse_args(["moa", "--data", "retrieval"]).data == "retrieval"


def test_check_razor_top_keeps_the_best_scored_heads(tmp_path):
    from sparsattn.methods.razor import razor_subset as razor_top
    from sparsattn.calibration import ModelShape, save_calibration

    shape = ModelShape(2, 4, 2, 16)
    data = {"0": {"retrieval_heads": [0, 1, 2], "retrieval": [0.9, 0.1, 0.5, 0.0]},
            "1": {"retrieval_heads": [3], "retrieval": [0.0, 0.2, 0.0, 0.95]}}
    src = save_calibration(tmp_path / "r.json", "razor", shape, data, {})
    out = razor_top(str(src), 2, str(tmp_path / "top2.json"))
    assert RazorAttention.load(out).retrieval_heads == {0: [0], 1: [3]}


def test_prose_windows_never_read_the_checks_files(tok):
    """Calibration prose comes from documentation files the held-out check's stream does not read."""
    from sparsattn.calibrate._retrieval import calibration_prose_files, eval_prose_files, prose_windows
    from sparsattn.eval.tasks._base import _Haystack

    h = _Haystack("prose", 2112)
    try:
        h.units(600)
    except ValueError:
        pytest.skip("this installation has too little documentation prose")
    read = set(h.files_read())
    assert read and read <= set(eval_prose_files(2112, 600))
    windows = prose_windows(tok, 128, seed=1, exclude_lines=600)
    w = [next(windows) for _ in range(3)]
    assert all(x.shape == (1, 128) and x.dtype == torch.long for x in w)
    cal = calibration_prose_files(2112, 600)
    assert cal and not (set(cal) & read)  # the windows are drawn from these files only
    with pytest.raises(ValueError, match="length"):
        next(prose_windows(tok, 0))
