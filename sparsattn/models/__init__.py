"""Models shipped with the library: the bundled long-context Llama-architecture checkpoint.

The checkpoint lives in ``sparsattn/models/bundled/`` (config.json, safetensors shards of at most
15 MiB, tokenizer files, README.md model card, metrics.json). It is produced by
``python -m sparsattn.train.lm --out sparsattn/models/bundled --device cuda --minutes 9``.
"""
from __future__ import annotations

from pathlib import Path

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
TRAIN_COMMAND = "python -m sparsattn.train.lm --out sparsattn/models/bundled --device cuda --minutes 9"


class BundledModelMissing(FileNotFoundError, ValueError):
    """The bundled checkpoint folder has no weights yet (both a FileNotFoundError and a ValueError)."""


def bundled_path() -> Path:
    """bundled_path: folder of the bundled checkpoint, loadable with ``from_pretrained(path)``.

    Raises:
        BundledModelMissing (a ValueError and FileNotFoundError): the folder lacks config.json,
            safetensors weights or tokenizer.json; the message says how to train it.
    """
    d = BUNDLED_DIR
    missing = [name for name, ok in (
        ("config.json", (d / "config.json").is_file()),
        ("*.safetensors", d.is_dir() and any(d.glob("*.safetensors"))),
        ("tokenizer.json", (d / "tokenizer.json").is_file()),
    ) if not ok]
    if missing:
        raise BundledModelMissing(
            f"bundled model: {d} has no trained checkpoint (missing {', '.join(missing)}). "
            f"Train it on a GPU (about 9 minutes on one H200) with:\n    {TRAIN_COMMAND}\n"
            "or pass the path of another local Llama-architecture checkpoint.")
    return d


def load_bundled(device: str = "cpu", dtype=None, attn_implementation: str = "sdpa"):
    """load_bundled: ``(model, tokenizer)`` of the bundled checkpoint, offline, in eval mode.

    Args:
        device: torch device string.
        dtype: torch dtype of the weights (default: the saved dtype, bfloat16).
        attn_implementation: transformers attention backend name.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = bundled_path()
    kw = {"local_files_only": True, "attn_implementation": attn_implementation}
    if dtype is not None:
        kw["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(str(path), **kw).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model, tokenizer


__all__ = ["BUNDLED_DIR", "BundledModelMissing", "bundled_path", "load_bundled", "TRAIN_COMMAND"]
