"""Training recipe of the bundled long-context model (``python -m sparsattn.train.lm``).

* ``tokenizer``: byte-level BPE with single-digit pre-tokens (HF ``tokenizers``), saved as a
  ``PreTrainedTokenizerFast``.
* ``data``: packed code corpus + synthetic retrieval tasks in the evaluation's exact format.
* ``lm``: the training script (``main``, ``build_parser``, ``train``, ``TrainConfig``).
* ``card``: the model card rendered from ``metrics.json`` (``render_card``, ``write_card``).

Names are imported lazily so that ``python -m sparsattn.train.lm`` runs the module only once.
"""
import importlib

_EXPORTS = {
    "TrainConfig": "lm", "build_parser": "lm", "main": "lm", "model_config": "lm", "train": "lm",
    "render_card": "card", "write_card": "card",
    "train_tokenizer": "tokenizer", "save_tokenizer": "tokenizer", "load_tokenizer": "tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
