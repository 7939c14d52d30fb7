"""Resumable layer-harness runs: the training state of one run in a folder (safetensors + JSON).

A run cut by its time limit (a device call's 10 minutes, say) saves what it needs to go on:
the model's and the optimiser's tensors (``state.safetensors``), the data order, the position in
it and the random-number states, and the loop's counters (``state.json``: steps done, training
seconds so far, the loss average, the evaluation curve, and the run's identity). The next call of
``train_layer(..., checkpoint=DIR)`` with the same identity loads it and continues; a different
identity (another layer, task, width, seed, learning rate ...) is refused with a ``ValueError``
naming the file and the field, so a folder never resumes the wrong run. Never pickle: every
tensor goes through safetensors, every other value through JSON.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
VERSION = 1


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The optimiser's tensors as ``{"opt.<param index>.<key>": tensor}`` and the rest as JSON-able data."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{idx}.{key}"] = v.detach().to("cpu").contiguous()
            else:
                scalars[f"{idx}.{key}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def save_run(path, *, identity: dict, model: torch.nn.Module, opt: torch.optim.Optimizer, loop: dict,
             perm: torch.Tensor, gen: torch.Generator) -> Path:
    """save_run: write the state of a run that is not finished to the folder ``path``.

    Args:
        path: the folder (created); its two files are replaced atomically (written, then renamed).
        identity: what makes the run this run (layer, task, sizes, seed, lr, steps ...), checked on load.
        model, opt: the model and its optimiser.
        loop: the loop's JSON-able counters (``done``, ``elapsed_s``, ``loss_ema``, ``curve``, ``pos`` ...).
        perm, gen: the data order and its generator (the next reshuffle continues from it).
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    opt_t, opt_rest = _flatten_optimizer(opt)
    tensors.update(opt_t)
    tensors["data.perm"] = perm.to("cpu").contiguous()
    tensors["rng.data"] = gen.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {"version": VERSION, "identity": identity, "loop": loop, "optimizer": opt_rest}
    tmp_t, tmp_j = path / (STATE_TENSORS + ".tmp"), path / (STATE_JSON + ".tmp")
    save_file(tensors, str(tmp_t))
    tmp_j.write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
    tmp_t.replace(path / STATE_TENSORS)
    tmp_j.replace(path / STATE_JSON)
    return path


def has_run(path) -> bool:
    """has_run: whether ``path`` holds a saved run (both files)."""
    path = Path(path)
    return (path / STATE_JSON).is_file() and (path / STATE_TENSORS).is_file()


def load_run(path, *, identity: dict, model: torch.nn.Module, opt: torch.optim.Optimizer,
             gen: torch.Generator) -> Optional[dict]:
    """load_run: restore a saved run into ``model`` / ``opt`` / ``gen`` and return its loop counters
    plus ``perm`` (the data order), or ``None`` when ``path`` holds no saved run.

    Raises:
        ValueError: the saved run is another run (the differing ``identity`` field is named), or the
            files are not this format (the file and field are named).
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not has_run(path):
        return None
    fj = path / STATE_JSON
    try:
        meta = json.loads(fj.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"checkpoint: {fj} is not JSON ({e})") from None
    if meta.get("version") != VERSION:
        raise ValueError(f"checkpoint: {fj} field 'version' is {meta.get('version')!r}, expected {VERSION}")
    saved = meta.get("identity") or {}
    want = json.loads(json.dumps(identity, sort_keys=True, default=str))
    for k in sorted(set(saved) | set(want)):
        if saved.get(k) != want.get(k):
            raise ValueError(f"checkpoint: {fj} field 'identity.{k}' is {saved.get(k)!r}, but this run has "
                             f"{want.get(k)!r}: the folder holds another run (use another folder or delete it)")
    t = load_file(str(path / STATE_TENSORS))
    dev = next(model.parameters()).device
    model.load_state_dict({k[len("model."):]: v for k, v in t.items() if k.startswith("model.")})
    state: dict = {}
    for k, v in t.items():
        if k.startswith("opt."):
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = v
    for k, v in (meta.get("optimizer", {}).get("scalars") or {}).items():
        idx, key = k.split(".", 1)
        state.setdefault(int(idx), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    for st in opt.state.values():  # load_state_dict casts to the params' device except 'step'
        for key, v in st.items():
            if torch.is_tensor(v) and key != "step":
                st[key] = v.to(dev)
    gen.set_state(t["rng.data"])
    torch.set_rng_state(t["rng.torch"])
    if "rng.cuda" in t and dev.type == "cuda":
        torch.cuda.set_rng_state(t["rng.cuda"])
    loop = dict(meta.get("loop") or {})
    loop["perm"] = t["data.perm"]
    return loop


def clear_run(path) -> None:
    """clear_run: remove a saved run's files from ``path`` (the run finished)."""
    path = Path(path)
    for name in (STATE_JSON, STATE_TENSORS):
        (path / name).unlink(missing_ok=True)
