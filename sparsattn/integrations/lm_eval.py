"""lm_eval: an lm-evaluation-harness model adapter ``sparsattn``: a Hugging Face causal LM patched
with a sparse-attention method, evaluated on any lm-eval task.

lm-evaluation-harness (Gao et al., "The Language Model Evaluation Harness", EleutherAI,
doi 10.5281/zenodo.5371628) runs its tasks on a model class looked up by name in its registry.
``SparsattnLM`` is its ``HFLM`` (transformers backend) with the model patched by
``sparsattn.patch`` right after loading, so every request (log-likelihoods, rolling perplexity,
generation) runs through sparsattn's attention.

Registration: importing this module registers the model as ``sparsattn``. lm-eval 0.4 looks models
up only in its own registry (it has no plugin discovery), so use one of

- ``sparsattn-lm-eval run --model sparsattn --model_args pretrained=PATH,method=a_shape,n_local=1024
  --tasks ...``: lm-eval's own command line (same arguments) with this module imported first
  (also ``python -m sparsattn.integrations.lm_eval ...``);
- Python: ``import sparsattn.integrations.lm_eval`` then ``lm_eval.simple_evaluate(model="sparsattn",
  model_args="pretrained=PATH,method=a_shape", tasks=[...])``.

``--model_args`` keys: those of ``HFLM`` (``pretrained``, ``device``, ``dtype``, ``batch_size``, ...),
plus ``method`` (a registered prefill or decode method name, default ``dense``), ``decode`` (a
decode-phase method name, optional), ``attn_backend`` (``triton`` | ``flex`` | ``reference``; default
automatic; ``backend`` is HFLM's own causal/seq2seq switch) and any hyper-parameter of the named
methods (e.g. ``n_init=64,n_local=1024`` for ``a_shape``): a key that is a field of ``method`` or
``decode`` goes to them (``sparsattn.patch``'s rule), every other key to ``HFLM``.

Needs the ``lmeval`` extra (``pip install 'sparsattn[lmeval]'``: lm-eval and accelerate).
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Optional

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

__all__ = ["SparsattnLM", "cli_main", "split_model_args"]


def split_model_args(method: str, decode: Optional[str], kwargs: dict) -> tuple[dict, dict]:
    """split_model_args: ``(method_config, hflm_kwargs)``: the keys of ``kwargs`` that are hyper-parameters
    of the registered methods ``method`` / ``decode`` (dataclass fields), and the rest.

    Raises:
        ValueError: an unknown method name (the message lists the registered ones).
    """
    from ..methods import method_class

    fields: set = set()
    for name in (method, decode):
        if name is None:
            continue
        if not isinstance(name, str):
            raise ValueError(f"method: expected a registered method name, got {name!r}")
        cls = method_class(name)
        fields |= {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}
    cfg = {k: v for k, v in kwargs.items() if k in fields}
    rest = {k: v for k, v in kwargs.items() if k not in fields}
    return cfg, rest


@register_model("sparsattn")
class SparsattnLM(HFLM):
    """SparsattnLM: lm-eval's ``HFLM`` with the loaded model patched by ``sparsattn.patch``
    (see the module docstring for the ``--model_args`` keys).

    Args:
        pretrained: a local model folder (or a Hub name, which HFLM downloads unless offline) or a
            loaded ``PreTrainedModel``.
        method: registered method name for prefill (or a decode-phase method), default ``dense``.
        decode: registered decode-phase method name (optional).
        attn_backend: sparsattn kernel backend (None = automatic).
        **kwargs: method hyper-parameters (fields of ``method`` / ``decode``) and ``HFLM`` arguments.
    """

    def __init__(self, pretrained=None, method: str = "dense", decode: Optional[str] = None,
                 attn_backend: Optional[str] = None, **kwargs):
        from .hf import patch

        if pretrained is None:
            from ..models import bundled_path

            pretrained = str(bundled_path())
        cfg, rest = split_model_args(method, decode, kwargs)
        if attn_backend is not None and attn_backend not in ("triton", "flex", "reference"):
            raise ValueError(f"attn_backend: expected 'triton', 'flex', 'reference' or None, got {attn_backend!r}")
        super().__init__(pretrained=pretrained, **rest)
        self.sparsattn_method = method
        self.sparsattn_decode = decode
        self.sparsattn_config = dict(cfg)
        patch(self.model, method, decode=decode, backend=attn_backend, **cfg)


def cli_main(argv=None) -> None:
    """cli_main: ``sparsattn-lm-eval``: lm-eval's command line with the ``sparsattn`` model registered
    (arguments exactly as ``lm_eval``'s)."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    cli_evaluate()


if __name__ == "__main__":
    cli_main()
