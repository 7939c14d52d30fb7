"""calibrate._common: what every model-level calibration shares: the shipped folder, loading a
local model, the provenance record written next to the shipped files."""
from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Optional

import torch

from ..calibration import read_json, write_json


def shipped_dir() -> Path:
    """shipped_dir: the folder of the bundled model's shipped calibrations
    (``sparsattn/models/bundled/calibration``)."""
    from ..models import BUNDLED_DIR

    return Path(BUNDLED_DIR) / "calibration"


def load_model(model_path=None, *, device: str = "cpu", dtype=torch.float32, device_map=None,
               allow_download: bool = False):
    """load_model: ``(model, tokenizer, source)`` of a causal LM (default: the bundled model) through the
    one loader ``sparsattn.models.load.load_model``, float32 by default (calibrations are fitted in fp32)."""
    from ..models.load import load_model as _load

    return _load(model_path, device=device, dtype=dtype, device_map=device_map, allow_download=allow_download)


def update_provenance(path, entry: str, record: dict) -> str:
    """update_provenance: set ``entry`` of the provenance JSON at ``path`` (created if absent; read
    through the checked loader) to ``record``, with the environment under ``_env``; returns the path."""
    data = read_json(path, kind="provenance JSON").plain() if Path(path).is_file() else {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    data[entry] = record
    data["_env"] = {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                    "machine": f"CPU ({platform.machine()}), {torch.get_num_threads()} threads"
                    if not torch.cuda.is_available() else torch.cuda.get_device_name(),
                    "date": time.strftime("%Y-%m-%d", time.gmtime())}
    return write_json(path, data, indent=1)


def call_text(name: str, opts: dict, extra: Optional[str] = None) -> str:
    """The reproducing command line of a calibration: ``sparsattn calibrate NAME --opt value ...``."""
    parts = [f"sparsattn calibrate {name}"]
    for k, v in opts.items():
        if isinstance(v, (list, tuple)):
            v = ",".join(map(str, v))
        parts.append(f"--{k.replace('_', '-')} {v}")
    return " ".join(parts) + (f" ({extra})" if extra else "")
