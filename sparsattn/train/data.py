"""Training data for the bundled model: a packed code corpus plus synthetic retrieval tasks.

One module per concept, every name re-exported here: ``corpus`` (``Corpus``, tokenizer helpers,
loss groups), ``pieces`` (token-level prompt assembly), ``haystack`` (``SynthSample``, haystacks and
sample assembly), ``retrieval`` (``RetrievalTasks``), ``batches`` (``BatchMaker``, ``BatchStream``).

* ``Corpus``: the train-split Python files of this installation (``sparsattn.data.source_files``),
  tokenized in parallel (``encode_batch_fast``) into one token stream ``<s> doc </s> <s> doc ...``;
  a training sequence is a random window of it (documents packed, EOS-separated).
* ``RetrievalTasks``: synthetic long-context retrieval samples in the exact prompt format of
  ``sparsattn.eval.tasks`` (RULER, Hsieh et al., arXiv 2404.06654): single needles (pass keys),
  multi-key needles (distractor needles in noise/code, or a haystack made of needles), variable
  tracking chains, and JSON-like key-value lists. Each sample is assembled at the token level from
  separately encoded segments whose boundaries are pre-token boundaries, so the ids equal the
  tokenization of the whole prompt string (tested), with no re-tokenization of long haystacks.
  After the first answer (the evaluation format) further questions about other needles may
  follow, which adds answer tokens per sample at no extra context cost.
* ``BatchMaker``: deterministic batches ``tokens[B, L+1]`` (int32) and ``groups[B, L+1]`` (uint8,
  the loss group of each token as a *target*): 0 ignored, 1 language modelling (corpus text, code
  haystack lines), 2 retrieval answer. Batch ``i`` depends only on ``(seed, L, i)``.
* ``BatchStream``: an ``IterableDataset`` over ``BatchMaker`` for a ``DataLoader`` with worker
  processes (worker w makes batches w, w + W, ...: the loader's round robin keeps the order).

Noise haystack tokens, needles and questions carry no loss: they are either trivially repetitive
or random identifiers; only the answers (group 2, averaged separately and up-weighted by the
trainer) and real code (group 1) are trained on.
"""
from __future__ import annotations

from .batches import BatchMaker, BatchStream
from .corpus import GROUP_ANSWER, GROUP_IGNORE, GROUP_LM, Corpus, _seed_of, encode_many, iter_texts, raw_tokenizer
from .haystack import SampleBuilder, SynthSample
from .pieces import Pieces, _Seg
from .retrieval import DEFAULT_MIX, KV_PREAMBLE, KV_QUESTION_TEMPLATE, RetrievalTasks

__all__ = ["GROUP_IGNORE", "GROUP_LM", "GROUP_ANSWER", "DEFAULT_MIX", "KV_PREAMBLE", "KV_QUESTION_TEMPLATE",
           "encode_many", "raw_tokenizer", "iter_texts", "Corpus", "SynthSample", "SampleBuilder", "Pieces",
           "RetrievalTasks", "BatchMaker", "BatchStream", "_seed_of", "_Seg"]
