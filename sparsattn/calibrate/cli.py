"""calibrate.cli: ``sparsattn calibrate <method> [--model PATH] [--out PATH] [method options]``."""
from __future__ import annotations

import argparse


def build_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Fill ``p`` (the ``calibrate`` sub-command) with one sub-parser per calibrated method."""
    from . import calibrated_methods, calibrator

    sub = p.add_subparsers(dest="method", required=True)
    for name in calibrated_methods():
        mod = calibrator(name)
        s = sub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0])
        s.add_argument("--model", default=None, help="local HF model directory (default: the bundled model)")
        s.add_argument("--out", default=None,
                       help=f"output {'directory' if name == 'seer_attention' else 'file'} (default: the shipped "
                            f"{mod.OUT}, and its provenance.json entry is updated)")
        s.add_argument("--provenance", default=None,
                       help="provenance JSON to update (default: the shipped one when --out is not given)")
        s.add_argument("--device", default="cpu")
        mod.add_arguments(s)
    p.set_defaults(fn=_cmd)
    return p


def _cmd(a) -> int:
    from . import calibrate, calibrator

    mod = calibrator(a.method)
    opts = {k: getattr(a, k) for k in mod.DEFAULTS if hasattr(a, k)}
    if getattr(a, "candidates", None) is not None:
        opts["candidates"] = a.candidates
    m, rec = calibrate(a.method, a.model, a.out, device=a.device, provenance=a.provenance, **opts)
    print(f"{a.method}: wrote {m.path} ({rec['seconds']} s)")
    return 0


def main(argv=None) -> int:
    """main: parse ``argv`` and run one calibration."""
    p = build_parser(argparse.ArgumentParser(prog="sparsattn calibrate",
                                             description="Fit a calibrated method on a local model."))
    a = p.parse_args(argv)
    return a.fn(a)
