"""KV-policy memory benchmark: the counts follow from each policy's rule on a small cache."""
import csv

import torch

from sparsattn.bench.kv_memory import run_kv_memory


def test_kv_memory_counts_and_files(tmp_path):
    T, H, D = 512, 4, 16
    rows = run_kv_memory((T,), batch=1, kv_heads=H, q_heads=8, head_dim=D, dtype=torch.float32, out_dir=tmp_path)
    by = {r["policy"]: r for r in rows}
    assert set(by) == {"streaming_llm", "razor", "moa", "zipvl"}
    kv = 2 * H * T * D * 4  # float32 K and V
    # StreamingLLM: 4 sinks + a window of T / 16 per head, storage and slots alike
    s = by["streaming_llm"]
    assert s["kv_bytes_before"] == kv and s["slots_after"] == H * (4 + T // 16)
    assert s["kv_bytes_after"] == 2 * H * (4 + T // 16) * D * 4
    # Razor at T < S0 = 4000 keeps every token; nothing to merge
    assert by["razor"]["slots_after"] == H * T
    # MoA: head h keeps min(T, 64 + 1024 + beta_h * T) -> every head whole at T = 512
    assert by["moa"]["slots_after"] == H * T
    # ZipVL evicts nothing and stores 8/4-bit codes: less than half of float32... plus scales
    z = by["zipvl"]
    assert z["slots_after"] == H * T and z["bytes_kept"] < 0.5 * z["bytes_full"]
    with open(tmp_path / "kv_memory.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    assert (tmp_path / "kv_memory_env.json").is_file()
    assert (tmp_path / "kv_memory.png").stat().st_size > 10_000


def test_kv_memory_per_head_policies_free_storage():
    """Per-head policies free storage too: the contiguous layout stores KV heads in groups of similar
    length (KVCache head groups), so what is held is the slots in use plus per-slot metadata."""
    T, D = 8192, 8  # Razor's window max(4000, T / 5) = 4000 < T for the non-retrieval heads
    rows = run_kv_memory((T,), batch=1, kv_heads=2, q_heads=4, head_dim=D, dtype=torch.float32)
    r = {x["policy"]: x for x in rows}["razor"]
    # head 0 (retrieval) keeps T, head 1 keeps 4 sinks + 4000 + 1 compensation slot
    slots = T + 4 + 4000 + 1
    assert r["slots_after"] == slots and r["kv_bytes_after"] == slots * 2 * D * 4
    assert r["used_fraction"] < 0.75
    # storage held = K/V of the slots in use + int64 position + float32 log-weight per slot (+ small)
    meta = r["bytes_kept"] - r["kv_bytes_after"]
    assert slots * 12 <= meta <= slots * 12 + 256
    m = {x["policy"]: x for x in rows}["moa"]
    assert m["used_fraction"] < 0.3 and m["kept_fraction"] <= m["used_fraction"] * (1 + 8 / (2 * D * 4)) + 0.01


def test_policy_registry_names_and_errors():
    """The KV policies the memory benchmark loops over: registered by name, clear errors otherwise."""
    import pytest

    from sparsattn.kv import KVPolicy, StreamingLLMPolicy, list_policies, policy_class, register_policy

    assert list_policies()[:4] == ["streaming_llm", "razor", "moa", "zipvl"]
    assert policy_class("streaming_llm") is StreamingLLMPolicy and StreamingLLMPolicy.name == "streaming_llm"
    with pytest.raises(ValueError, match="policy"):
        policy_class("no_such_policy")
    with pytest.raises(ValueError, match="name"):
        register_policy("streaming_llm")(type("Other", (KVPolicy,), {}))
    with pytest.raises(ValueError, match="cls"):
        register_policy("zz_not_a_policy")(object)
    assert "zz_not_a_policy" not in list_policies()
    pol, text = policy_class("moa").example(1000, 3)
    assert text and pol.beta.shape == (1, 3) and float(pol.beta[0, -1]) == 0.25
