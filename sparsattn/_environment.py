"""_environment: the one record of the machine and software a result was measured with.

Every result file of the library (benchmarks, evaluation drivers, analyses) stores ``environment()``
beside it, in one format. Low in the import graph (torch and the standard library only; transformers
and triton are read if installed), so that every layer may call it.
"""
from __future__ import annotations

import datetime as _dt
import platform
from typing import Optional, Union

import torch

__all__ = ["environment"]


def environment(device: Union[str, torch.device, None] = None, args: Optional[dict] = None) -> dict:
    """environment: versions, hardware and date of a run (a JSON-serialisable dict).

    Args:
        device: the torch device the run used (None: ``cuda`` when available, else ``cpu``).
        args: the run's arguments, stored under ``"args"`` when given.
    Returns:
        ``date`` (``"YYYY-MM-DD HH:MM UTC"``), ``date_utc`` (ISO 8601, seconds), ``python``, ``platform``,
        ``processor``, ``torch``, ``transformers``, ``triton`` (None when not installed), ``torch_device``
        (e.g. ``"cuda:0"``), ``device`` (the GPU's name on CUDA, else ``"cpu"``), ``cpu_threads``
        (torch's intra-op threads); on CUDA also ``gpu``, ``cuda``, ``cudnn``.
    Raises:
        ValueError: ``device`` is not a torch device, or ``args`` not a dict.
    """
    try:
        dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected a torch device such as 'cpu' or 'cuda:0', got {device!r}") from None
    if args is not None and not isinstance(args, dict):
        raise ValueError(f"args: expected a dict of the run's arguments, got {type(args).__name__}")
    now = _dt.datetime.now(_dt.timezone.utc)
    env = {"date": now.strftime("%Y-%m-%d %H:%M UTC"), "date_utc": now.isoformat(timespec="seconds"),
           "python": platform.python_version(), "platform": platform.platform(),
           "processor": platform.processor() or platform.machine() or None,
           "torch": torch.__version__, "transformers": _version("transformers"), "triton": _version("triton"),
           "torch_device": str(dev), "device": "cpu", "cpu_threads": torch.get_num_threads()}
    if dev.type == "cuda" and torch.cuda.is_available():
        env["device"] = env["gpu"] = torch.cuda.get_device_name(dev)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    elif dev.type != "cpu":
        env["device"] = str(dev)
    if args is not None:
        env["args"] = args
    return env


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - not installed or broken: recorded as None
        return None
