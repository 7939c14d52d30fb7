"""Layer harness: train any registered layer (``sparsattn.nn``) on MQAR, ListOps or Pathfinder.

How to call it (every helper's layer works without harness code naming it):

```python
from sparsattn.train.layerbench import train_layer, run_grid, plot_grid

row = train_layer("landmark", "mqar", seq_len=128, width=64, steps=2000, device="cpu", vocab=512)
row = train_layer(["baseconv", "dense"], "mqar", seq_len=256, width=128, device="cuda")   # hybrid
row = train_layer("biformer", "pathfinder", seq_len=1024, width=64)      # 2-D layer sees [B, 32, 32, dim]
run_grid("reduced", "layers_grid/results.csv", layers=["dense", "routing"])  # resumable, one CSV + plots
```

or ``sparsattn train-layer --layer routing --task mqar --seq-len 128 --width 64 --steps 2000``,
``sparsattn train-layer --grid full --device cuda --max-minutes 9`` (resumes from the CSV).

What the harness expects of a layer (``sparsattn/nn/base.py``): ``get_layer(name, dim, heads,
**config)``; ``causal`` is passed when the layer takes it (``False`` for ListOps / Pathfinder where
``causal_modes`` allows); ``layer_index`` / ``n_layers`` when the layer takes them (model-building
helpers such as ``masformer``); ``presets[task]`` (``"mqar"``, ``"listops"``, ``"pathfinder"``) is
the layer's configuration for that task unless ``layer_config`` overrides it; ``extra_loss()`` is
added to the loss; ``cost(T)`` gives the density / FLOPs columns (dense by default). On the CPU the
attention backend is ``"reference"`` (``sparsattn.nn.base.attention_backend``), on CUDA the
library's table (Triton).

Modules: ``model`` (LayerModel: embedding, pre-norm blocks, head; 2-D adapter), ``tasks``
(TaskData, make_task), ``loop`` (train_layer, evaluate, TASK_DEFAULTS, COLUMNS), ``grid``
(GRIDS, plan, run_grid, plot_grid), ``cli`` (the ``train-layer`` sub-command).
"""
from .grid import GRIDS, plan, plot_grid, run_grid
from .loop import COLUMNS, TASK_DEFAULTS, evaluate, train_layer
from .model import LayerModel
from .tasks import TaskData, make_task

__all__ = ["train_layer", "evaluate", "run_grid", "plan", "plot_grid", "make_task", "TaskData", "LayerModel",
           "GRIDS", "COLUMNS", "TASK_DEFAULTS"]
