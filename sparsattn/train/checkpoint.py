"""The bundled model's architecture from a ``TrainConfig``, parameter count and HF-format
safetensors checkpoints (shards under the size limit)."""
from __future__ import annotations

from pathlib import Path

from .lm_config import MAX_SHARD_BYTES, SHARD_SIZE, TrainConfig

# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------

def model_config(cfg: TrainConfig, *, vocab_size: int | None = None, bos_id: int = 1, eos_id: int = 2,
                 pad_id: int = 0):
    """model_config: the ``LlamaConfig`` of a run (RoPE via ``rope_parameters``, transformers 5.x)."""
    from transformers import LlamaConfig

    kw = dict(vocab_size=vocab_size or cfg.vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
              num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
              head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position, rms_norm_eps=1e-5,
              initializer_range=0.02, tie_word_embeddings=True, bos_token_id=bos_id, eos_token_id=eos_id,
              pad_token_id=pad_id, attention_bias=False, mlp_bias=False, use_cache=True)
    try:
        conf = LlamaConfig(**kw, rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)})
    except TypeError:  # transformers without rope_parameters
        conf = LlamaConfig(**kw, rope_theta=float(cfg.rope_theta))
    conf._attn_implementation = "sdpa"
    return conf


def count_parameters(model) -> int:
    """count_parameters: unique parameters (tied embeddings counted once)."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def save_checkpoint(model, tokenizer, out: Path, *, dtype: str = "bfloat16") -> list[Path]:
    """save_checkpoint: HF folder (config, safetensors shards <= 14 MB, generation config, tokenizer).

    The weights are copied to a fresh CPU model in ``dtype`` (the live model is untouched).
    Raises:
        RuntimeError: a shard came out larger than 15 MiB.
    """
    import torch
    from transformers import LlamaForCausalLM

    from .tokenizer import save_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("model*.safetensors*"):
        f.unlink()
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    state = {k[len("_orig_mod."):] if k.startswith("_orig_mod.") else k: v for k, v in state.items()}
    conf = model.config
    with torch.device("cpu"):
        cpu = LlamaForCausalLM(conf)
    cpu.load_state_dict(state, strict=True)
    tdtype = getattr(torch, dtype)
    cpu = cpu.to(tdtype)
    cpu.config.dtype = dtype  # config.json records the saved dtype (from_pretrained loads it by default)
    if hasattr(cpu, "generation_config") and cpu.generation_config is not None:
        cpu.generation_config.bos_token_id = conf.bos_token_id
        cpu.generation_config.eos_token_id = conf.eos_token_id
        cpu.generation_config.pad_token_id = conf.pad_token_id
    cpu.save_pretrained(str(out), max_shard_size=SHARD_SIZE)
    save_tokenizer(tokenizer, out)
    shards = sorted(out.glob("*.safetensors"))
    if not shards:
        raise RuntimeError(f"save_checkpoint: no safetensors written in {out}")
    big = [f"{p.name} ({p.stat().st_size} bytes)" for p in shards if p.stat().st_size > MAX_SHARD_BYTES]
    if big:
        raise RuntimeError(f"save_checkpoint: shards over 15 MiB: {big}")
    return shards
