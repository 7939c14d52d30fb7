"""Training recipe of the bundled long-context model (``python -m sparsattn.train.lm``).

* ``tokenizer``: byte-level BPE with single-digit pre-tokens (HF ``tokenizers``), saved as a
  ``PreTrainedTokenizerFast``.
* ``data``: packed code corpus + synthetic retrieval tasks in the evaluation's exact format.
* ``lm``: the training script (``main``, ``build_parser``, ``train``, ``TrainConfig``).
* ``card``: the model card rendered from ``metrics.json`` (``render_card``, ``write_card``).
"""
from .card import render_card, write_card
from .lm import TrainConfig, build_parser, main, model_config, train
from .tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

__all__ = ["TrainConfig", "build_parser", "main", "model_config", "train", "render_card", "write_card",
           "train_tokenizer", "save_tokenizer", "load_tokenizer"]
