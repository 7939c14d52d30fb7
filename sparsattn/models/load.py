"""models.load: the one model loader of the library: ``(model, tokenizer, source)`` for the bundled
checkpoint, a local Hugging Face folder, or (only when downloads are allowed) a Hub model name.

Every driver that needs a whole model (``sparsattn eval``, ``sparsattn calibrate``, the demo, the
quality drivers, the analyses) loads it here, so the rules live in one place:

- nothing is downloaded unless the caller passes ``allow_download=True`` (``--allow-download`` on
  the command lines); a name that is not a local folder is refused with a ValueError otherwise;
- local folders must hold ``config.json`` and ``*.safetensors`` weights (pickled ``.bin``
  checkpoints are never loaded);
- float32 weights on the CPU by default (bf16 matmuls are slow on most CPUs), the saved dtype
  elsewhere; ``device_map`` (e.g. ``"auto"``, needs ``accelerate``) places the weights instead of
  ``device``;
- the tokenizer pads on the left (batched generation) and has a pad token (its EOS when it has none).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional, Union

import torch

__all__ = ["load_model", "resolve_model_source", "ModelPathError", "HUB_NAME"]

#: a Hugging Face Hub model id: ``name`` or ``owner/name`` (letters, digits, ``-``, ``_``, ``.``)
HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


class ModelPathError(FileNotFoundError, ValueError):
    """The model path does not exist or holds no loadable checkpoint (a FileNotFoundError and a ValueError)."""


def _check_folder(path: Path) -> None:
    if not path.is_dir():
        raise ModelPathError(f"model: {str(path)!r} is a file; expected a local Hugging Face model folder")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(path.glob("*.safetensors")):
        missing.append("*.safetensors weights")
    if missing:
        raise ModelPathError(f"model: folder {str(path)!r} holds no model weights (missing {', '.join(missing)}); "
                             "expected a checkpoint saved with save_pretrained (safetensors)")


def resolve_model_source(model: Union[str, Path, None] = None, *, allow_download: bool = False) -> tuple[str, bool]:
    """resolve_model_source: ``(source, is_local)`` for a model argument, checked before anything loads.

    Args:
        model: None (the bundled checkpoint), a local folder, or a Hub model name (``owner/name``).
        allow_download: whether a Hub name may be fetched (off by default: everything runs offline).
    Raises:
        ModelPathError (a ValueError): a local path that does not exist or holds no weights; a name
            that is neither a local folder nor a Hub name.
        ValueError: a Hub name given without ``allow_download``.
        sparsattn.models.BundledModelMissing: no model given and the bundled model is not trained yet.
    """
    if model is None:
        from . import bundled_path

        return str(bundled_path()), True
    if not isinstance(model, (str, Path)) or not str(model):
        raise ValueError(f"model: expected a local folder or a Hub model name, got {model!r}")
    path = Path(model).expanduser()
    if path.exists():
        _check_folder(path)
        return str(path), True
    s = str(model)
    looks_local = isinstance(model, Path) or s.startswith((".", "/", "~")) or "\\" in s or s.count("/") > 1
    if looks_local or not HUB_NAME.match(s):
        raise ModelPathError(f"model: path {s!r} does not exist; expected a local Hugging Face model folder "
                             "(config.json, *.safetensors, tokenizer files) or a Hub name such as 'owner/name'")
    if not allow_download:
        raise ValueError(f"model: {s!r} is not a local folder; it would be downloaded from the Hugging Face Hub, "
                         "which is off by default (everything runs offline). Pass allow_download=True "
                         "(--allow-download on the command line) to allow it, or give a local folder.")
    return s, False


def load_model(model: Union[str, Path, None] = None, *, device: Optional[str] = "cpu", dtype=None,
               device_map: Union[str, dict, None] = None, allow_download: bool = False,
               attn_implementation: str = "sdpa", padding_side: str = "left"):
    """load_model: ``(model, tokenizer, source)`` of a causal LM, in eval mode (see the module docstring).

    Args:
        model: None = the bundled checkpoint (``sparsattn.models.bundled_path()``); a local folder
            (config.json + safetensors weights + tokenizer files); or a Hub name, only with
            ``allow_download=True``.
        device: torch device string (ignored when ``device_map`` is given).
        dtype: weight dtype (a ``torch.dtype`` or its name such as ``"bfloat16"``); default float32 on
            the CPU and the saved dtype elsewhere.
        device_map: passed to ``from_pretrained`` (``"auto"``, ``"cpu"``, a dict of module -> device);
            placement is then left to transformers/accelerate.
        allow_download: allow fetching a Hub name (off by default).
        attn_implementation: transformers' attention backend to load with (``sdpa``; ``patch`` swaps
            it for sparsattn's and restores it).
        padding_side: the tokenizer's padding side (``"left"`` for batched generation).
    Returns:
        ``(model, tokenizer, source)``: source is a ``Path`` for a local folder, the Hub name otherwise.
    Raises:
        ModelPathError / ValueError: see ``resolve_model_source``; a bad dtype, device or padding side.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side: expected 'left' or 'right', got {padding_side!r}")
    if isinstance(dtype, str):
        if dtype != "auto" and not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype: expected a torch dtype name such as 'float32' or 'bfloat16', got {dtype!r}")
        dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    elif dtype is not None and not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype: expected a torch.dtype or its name, got {dtype!r}")
    if device_map is None:
        try:
            dev = torch.device(device or "cpu")
        except (RuntimeError, TypeError):
            raise ValueError(f"device: expected a torch device such as 'cpu' or 'cuda:0', got {device!r}") from None
    source, local = resolve_model_source(model, allow_download=allow_download)
    kw: dict[str, Any] = {"local_files_only": local, "attn_implementation": attn_implementation}
    if dtype is None:
        on_cpu = device_map is None and dev.type == "cpu" or device_map == "cpu"
        dtype = torch.float32 if on_cpu else "auto"
    kw["dtype"] = dtype
    if device_map is not None:
        kw["device_map"] = device_map
    net = AutoModelForCausalLM.from_pretrained(source, **kw)
    if device_map is None:
        net = net.to(dev)
    net = net.eval()
    tok = AutoTokenizer.from_pretrained(source, local_files_only=local)
    tok.padding_side = padding_side
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return net, tok, (Path(source) if local else source)
