"""The lm-evaluation-harness adapter ``sparsattn`` (issue 16, item 5) on the bundled model with a local
task (a task YAML and a JSONL data set written here; nothing is downloaded).

The task is a 4-way passkey choice: the bundled model, trained on passkey retrieval, picks the right
key densely; an A-shape pattern whose window cannot reach the key does not. One run goes through
lm-eval's command line (``sparsattn-lm-eval``, the ``dense`` method through sparsattn's kernel),
one through the Python API (``get_model("sparsattn")`` + ``simple_evaluate``).
"""
from __future__ import annotations

import json
import random

import pytest

lm_eval = pytest.importorskip("lm_eval")  # the 'lmeval' extra (installed by the 'test' extra)

TASK = "sparsattn_tiny_passkey"
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def write_task(folder) -> None:
    """A multiple-choice passkey task: 4 documents of about 260 tokens, the key near the start."""
    rng = random.Random(0)
    rows = []
    for _ in range(4):
        keys = [str(rng.randint(10000, 99999)) for _ in range(4)]
        ctx = (FILLER * 2 + f"The pass key is {keys[0]}. Remember it. {keys[0]} is the pass key. " + FILLER * 8
               + "What is the pass key? The pass key is")
        order = list(range(4))
        rng.shuffle(order)
        rows.append({"context": ctx, "choices": [" " + keys[j] for j in order], "label": order.index(0)})
    (folder / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (folder / "tiny.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'data.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")


@pytest.fixture
def task_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the reference backend is asked for; no interpreter needed
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "task"
    d.mkdir()
    write_task(d)
    return d


def _logliks(res) -> list[list[float]]:
    return [[float(r[0][0]) for r in s["resps"]] for s in res["samples"][TASK]]


def test_registered_and_unknown_method_refused():
    from lm_eval.api.registry import get_model

    from sparsattn.integrations.lm_eval import SparsattnLM, split_model_args

    assert get_model("sparsattn") is SparsattnLM
    cfg, rest = split_model_args("a_shape", None, {"n_local": 64, "device": "cpu", "batch_size": 4})
    assert cfg == {"n_local": 64} and rest == {"device": "cpu", "batch_size": 4}
    with pytest.raises(ValueError, match="valid methods"):
        SparsattnLM.create_from_arg_string("method=no_such_method,device=cpu")


def test_cli_and_python_api_on_a_local_task(task_dir, tmp_path):
    import sparsattn
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    from sparsattn.integrations.lm_eval import cli_main
    from sparsattn.models import bundled_path

    base = f"pretrained={bundled_path()},dtype=float32,attn_backend=reference"
    out = tmp_path / "cli_out"
    cli_main(["--model", "sparsattn", "--model_args", base + ",method=dense", "--tasks", TASK,
              "--include_path", str(task_dir), "--output_path", str(out), "--log_samples", "--batch_size", "8",
              "--device", "cpu"])
    res_files = sorted(out.rglob("results_*.json"))
    assert res_files, list(out.rglob("*"))
    cli = json.loads(res_files[-1].read_text())
    assert cli["config"]["model"] == "sparsattn"
    dense_acc = cli["results"][TASK]["acc,none"]
    assert dense_acc >= 0.75  # the bundled model retrieves the key with dense attention

    lm = get_model("sparsattn").create_from_arg_string(base + ",device=cpu,batch_size=8,method=a_shape,n_init=16,n_local=32")
    assert sparsattn.integrations.hf.is_patched(lm.model)
    assert lm.sparsattn_method == "a_shape" and lm.sparsattn_config == {"n_init": 16, "n_local": 32}
    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    sparse = lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=tm, log_samples=True)
    # the 48-token A-shape window never reaches the key: the choice is no better than dense, the scores differ
    assert sparse["results"][TASK]["acc,none"] < dense_acc
    sparsattn.unpatch(lm.model)
    dense = lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=tm, log_samples=True)
    assert dense["results"][TASK]["acc,none"] == dense_acc  # transformers' own attention, same answers
    a, b = _logliks(sparse), _logliks(dense)
    assert max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)) > 1.0
