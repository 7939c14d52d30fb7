"""The layer harness (sparsattn.train.layerbench): one run, resumable grid, plots, CLI, errors."""
import pytest
import torch

from sparsattn.train.layerbench import COLUMNS, GRIDS, LayerModel, make_task, plan, run_grid, train_layer
from sparsattn.train.layerbench.grid import read_rows


def test_train_layer_row_and_hybrid():
    row = train_layer("dense", "mqar", seq_len=32, width=16, steps=6, vocab=64, n_test=20, n_train=64,
                      progress=False)
    assert set(COLUMNS) <= set(row)
    assert 0.0 <= row["accuracy"] <= 1.0 and row["density"] == 1.0 and row["flops"] > 0
    assert row["steps_done"] == 6 and row["layers"] == 2 and row["task"] == "mqar"
    row = train_layer(["s2", "dense"], "listops", seq_len=32, width=16, steps=3, n_test=8, n_train=16,
                      layer_config=None, progress=False)
    assert row["layer"] == "s2+dense" and row["layers"] == 2 and 0 < row["density"] <= 1


def test_layer_model_two_d_adapter_and_errors():
    model = LayerModel(["dense"], 16, 2, vocab=256, max_len=64, n_out=2, causal=False, grid=(8, 8))
    assert model.hidden(torch.randint(0, 256, (2, 64))).shape == (2, 64, 16)
    with pytest.raises(ValueError, match="mixers"):
        LayerModel([], 16, 2, vocab=4, max_len=8, n_out=2, causal=True)
    with pytest.raises(ValueError, match="ids"):
        model.hidden(torch.randint(0, 256, (1, 65)))


@pytest.mark.parametrize("kw,arg", [
    (dict(layer="nope", task="mqar"), "layer"),
    (dict(layer="dense", task="copy"), "task"),
    (dict(layer="dense", task="mqar", width=0), "width"),
    (dict(layer="dense", task="listops", vocab=8), "vocab"),
])
def test_train_layer_bad_arguments(kw, arg):
    with pytest.raises(ValueError, match=arg):
        train_layer(steps=1, n_train=8, n_test=4, progress=False, **kw)


def test_make_task_splits_are_seeded_and_distinct():
    from sparsattn.train.layerbench import tasks

    a = make_task("mqar", 64, n_train=8, n_test=8, seed=3, vocab=128)
    assert make_task("mqar", 64, n_train=8, n_test=8, seed=3, vocab=128) is a   # cached per process
    tasks._CACHE.clear()
    b = make_task("mqar", 64, n_train=8, n_test=8, seed=3, vocab=128)
    assert b is not a and torch.equal(a.x_train, b.x_train) and not torch.equal(a.x_train, a.x_test)
    lo = make_task("listops", 64, n_train=4, n_test=4, seed=0)
    assert lo.kind == "cls" and lo.x_train.shape == (4, 64) and lo.n_out == 10


def test_grid_is_resumable_and_plots(tmp_path, monkeypatch):
    monkeypatch.setitem(GRIDS, "reduced", [dict(task="mqar", seq_lens=[32], widths=[16], steps=3,
                                                kw=dict(vocab=32, n_train=32, n_test=8))])
    out = tmp_path / "grid.csv"
    runs = plan("reduced", layers=["dense", "s2"])
    assert [r["layer"] for r in runs] == ["dense", "s2"]
    first = run_grid("reduced", out, layers=["dense", "s2"], progress=False)
    assert len(first) == 2 and all(not r["error"] for r in first)
    assert run_grid("reduced", out, layers=["dense", "s2"], progress=False) == []   # resumed: nothing left
    assert len(read_rows(out)) == 2
    assert (tmp_path / "accuracy_vs_width.png").exists() and (tmp_path / "accuracy_vs_compute.png").exists()


def test_cli_single_run(tmp_path):
    from sparsattn.cli import main

    out = tmp_path / "r.csv"
    assert main(["train-layer", "--layer", "selective", "--task", "mqar", "--seq-len", "32", "--width", "16",
                 "--steps", "2", "--vocab", "32", "--out", str(out), "--no-progress"]) == 0
    rows = read_rows(out)
    assert len(rows) == 1 and rows[0]["layer"] == "selective" and rows[0]["error"] == ""


def test_lr_schedule_follows_the_budget_that_runs_out_first():
    from sparsattn.train.layerbench.loop import _lr_at

    # steps alone: 10% warmup of 1000 steps, peak at step 99, cosine to 10% at the end
    assert _lr_at(0, 1000, 100, 1.0) == pytest.approx(0.01)
    assert _lr_at(99, 1000, 100, 1.0) == pytest.approx(1.0)
    assert _lr_at(999, 1000, 100, 1.0) == pytest.approx(0.1, abs=1e-4)
    # a time budget half spent at step 10: the schedule is past its warmup, at its middle
    assert _lr_at(10, 1000, 100, 1.0, time_frac=0.5) == pytest.approx(_lr_at(500, 1000, 100, 1.0))
    assert _lr_at(10, 1000, 100, 1.0, time_frac=0.5) > 0.5
    # the time fraction never moves the schedule back
    assert _lr_at(800, 1000, 100, 1.0, time_frac=0.1) == pytest.approx(_lr_at(800, 1000, 100, 1.0))
    assert _lr_at(10, 1000, 100, 1.0, time_frac=1.0) == pytest.approx(0.1)


def _tiny(**kw):
    return dict(layer="dense", task="mqar", seq_len=32, width=16, steps=6, vocab=64, n_test=20, n_train=24,
                batch_size=8, eval_every=2, stop_at=1.01, progress=False, schedule_time_s=1e9, **kw)


def test_a_run_cut_by_its_time_limit_resumes_exactly(tmp_path):
    """One step per call (a time limit of a nanosecond), resumed from the folder each time, gives the
    same row as the uninterrupted run: the model, optimiser, data order and RNG all come back."""
    import json

    from sparsattn.train.layerbench.resume import has_run

    whole = train_layer(**_tiny())
    ck = tmp_path / "run"
    calls = 0
    while True:
        row = train_layer(**_tiny(time_limit_s=1e-9, checkpoint=str(ck)))
        calls += 1
        if row["steps_done"] == 6:
            break
        assert has_run(ck) and row["steps_done"] == calls
        assert calls < 10
    assert calls == 6
    assert not has_run(ck)  # a finished run removes its state
    for k in ("accuracy", "final_loss", "steps_done", "params"):
        assert row[k] == whole[k], k
    assert json.loads(row["curve"]) == json.loads(whole["curve"])
    assert [s for s, _ in json.loads(whole["curve"])] == [2, 4, 6]


def test_a_checkpoint_folder_refuses_another_run(tmp_path):
    ck = tmp_path / "run"
    train_layer(**_tiny(time_limit_s=1e-9, checkpoint=str(ck)))
    with pytest.raises(ValueError, match=r"identity\.width"):
        train_layer(**{**_tiny(time_limit_s=1e-9, checkpoint=str(ck)), "width": 32})
    with pytest.raises(ValueError, match="schedule_time_s"):
        train_layer(**{**_tiny(), "schedule_time_s": -1})


def test_stop_by_ends_training_at_a_wall_clock_deadline(tmp_path):
    """A deadline already passed stops after the first step (the sweep's deadline covers data building),
    and with a checkpoint folder the cut run is saved to go on."""
    import time

    from sparsattn.train.layerbench.resume import has_run

    row = train_layer(**_tiny(stop_by=time.time() - 1.0, checkpoint=str(tmp_path / "r")))
    assert row["steps_done"] == 1 and has_run(tmp_path / "r")


def test_length_presets_apply_at_their_length_only():
    from sparsattn.nn.base import Layer, preset_config

    class Toy(Layer):
        presets = {"t": {"a": 1, "b": 2}, "t:8": {"b": 3}}

    assert preset_config(Toy, "t", 8) == {"a": 1, "b": 3}
    assert preset_config(Toy, "t", 16) == preset_config(Toy, "t") == {"a": 1, "b": 2}
    assert preset_config(Toy, "other", 8) == {}
    preset_config(Toy, "t", 8)["a"] = 9                       # a copy: the class is untouched
    assert Toy.presets["t"] == {"a": 1, "b": 2}


def test_pathfinder_task_uses_the_generators_size_preset_and_the_layers_length_preset():
    from sparsattn.eval.pathfinder import SIZE_PRESETS, pathfinder_dataset

    data = make_task("pathfinder", 256, n_train=6, n_test=4, seed=5)
    x, y = pathfinder_dataset(6, seed=5, size=16, **SIZE_PRESETS[16])
    assert data.grid == (16, 16) and torch.equal(data.x_train, x.long().reshape(6, -1)) and torch.equal(data.y_train, y)
    row = train_layer("halo", data, seq_len=256, width=16, steps=1, n_test=4, progress=False)
    assert '"block": 4' in row["config"] and '"halo": 2' in row["config"]     # presets["pathfinder:256"]
    assert row["density"] < 0.3


def test_plot_grid_draws_the_evaluation_curves_and_names_a_bad_curve(tmp_path):
    from sparsattn.bench.common import write_csv
    from sparsattn.train.layerbench import plot_grid

    def row(layer, curve):
        r = {c: "" for c in COLUMNS}
        r.update(layer=layer, task="pathfinder", seq_len=256, width=64, accuracy=0.9, flops=1e6, curve=curve)
        return r

    out = tmp_path / "g.csv"
    write_csv([row("dense", "[[250, 0.5]]"), row("halo", "[[250, 0.6], [500, 0.8]]")], out, COLUMNS + ["error"])
    names = [p.name for p in plot_grid(out)]
    assert names == ["accuracy_vs_width.png", "accuracy_vs_compute.png", "accuracy_vs_step.png"]
    write_csv([row("dense", "[[250, 0.5]]")], out, COLUMNS + ["error"])      # one evaluation: no curve to draw
    assert "accuracy_vs_step.png" not in [p.name for p in plot_grid(out, tmp_path / "one")]
    write_csv([row("halo", "[[250, 0.6], [500")], out, COLUMNS + ["error"])
    with pytest.raises(ValueError, match="curve"):
        plot_grid(out)
