"""Command line: ``sparsattn demo | list | bench | eval | calibrate | train-lm``."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _cmd_list(args) -> int:
    from . import list_methods
    from .methods import method_class

    print("registered methods:")
    for name in list_methods():
        cls = method_class(name)
        print(f"  {name:22s} {cls.phase:8s} {cls.paper}")
    import torch

    from .kernels.backends import describe

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rows = describe(dev)
    print(f"kernel backends on this machine ({dev}, float32, 4096 tokens; * = the automatic choice):")
    for r in rows:
        mark = "*" if r["default"] else " "
        print(f"  {r['family']:13s} {mark}{r['backend']:10s} {'yes' if r['can_run'] else 'no ':3s}  {r['reason']}")
    return 0


#: lengths the kernel demo's patterns accept: the 2-D neighbourhood grid is 16 tokens wide, the
#: vertical line at key 200 and the 7-wide window need T >= 256; above 8192 the dense reference
#: (a [T, T] score matrix per head) no longer fits a small machine
KERNEL_DEMO_LENGTHS = (256, 8192, 16)


def check_kernel_demo_length(T) -> int:
    """The kernel demo's sequence length, or ValueError saying which lengths work."""
    lo, hi, mult = KERNEL_DEMO_LENGTHS
    if isinstance(T, bool) or not isinstance(T, int) or not lo <= T <= hi or T % mult:
        raise ValueError(f"--length: expected a multiple of {mult} in [{lo}, {hi}] for the kernel demo, got {T!r}")
    return T


def _length_arg(s: str) -> int:
    """argparse type of ``--length``: an argparse error (one line) naming the lengths that work."""
    try:
        return check_kernel_demo_length(int(s))
    except ValueError:
        lo, hi, mult = KERNEL_DEMO_LENGTHS
        raise argparse.ArgumentTypeError(f"expected a multiple of {mult} in [{lo}, {hi}], got {s!r}") from None


def kernel_demo(out_dir: Path, *, T: int = 512, heads: int = 2, head_dim: int = 64, seed: int = 0) -> list[dict]:
    """kernel_demo: several patterns through the block-sparse kernel and through dense masked
    attention; prints density and error, writes ``patterns.png``. Runs the Triton kernel on the
    GPU, or through the Triton interpreter on the CPU. ``T``: a multiple of 16 in [256, 8192]."""
    import torch

    check_kernel_demo_length(T)

    from . import attention, patterns as P
    from .bench.common import print_table
    from .kernels.block_sparse.reference import dense_reference

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    q = torch.randn(1, heads, T, head_dim, device=dev)
    k = torch.randn(1, heads, T, head_dim, device=dev)
    v = torch.randn(1, heads, T, head_dim, device=dev)
    bs = 64
    n = -(-T // bs)  # the last block may be partial
    g = torch.Generator().manual_seed(seed)
    rand = (torch.rand(1, heads, n, n, generator=g) < 0.25).to(dev)
    pats = {
        "causal": P.causal(T, block_q=bs, device=dev),
        "sliding window 128": P.sliding_window(T, 128, block_q=bs, device=dev),
        "A-shape (sink 16 + local 96)": P.sink_local(T, 16, 96, block_q=bs, device=dev),
        "dilated (every 2nd block)": P.dilated(T, 2, block_q=bs, device=dev),
        "S2 strided shards": P.strided_shards(T, heads, vert_stride=4, local_blocks=2, block_size=bs, device=dev),
        "vertical + slash": P.vertical_slash(T, torch.tensor([[[0, 1, 2, 200]] * heads], device=dev),
                                             torch.tensor([[[0, 1, 64]] * heads], device=dev), block_size=bs),
        f"neighborhood 2D 16x{T // 16}, 5x7": P.neighborhood_2d(16, T // 16, (5, 7), block_size=bs, device=dev),
        "random blocks 25% (causal)": P.from_block_mask(rand | torch.eye(n, dtype=torch.bool, device=dev), block_size=bs,
                                                        q_len=T, causal=True),
    }
    rows = []
    backend = "triton"
    for name, p in pats.items():
        out = attention(q, k, v, p, backend=backend)
        mask = p.to_dense_mask()
        if mask.shape[1] != heads:
            mask = mask.expand(-1, heads, -1, -1)
        ref, _ = dense_reference(q, k, v, mask=mask)
        err = float((out.double() - ref).norm() / ref.norm())
        rows.append({"pattern": name, "density": round(p.density, 4), "blocks": p.num_computed_blocks,
                     "rel_error_vs_dense_masked": f"{err:.2e}", "nan": bool(torch.isnan(out).any())})
        print(f"  {name}: density {p.density:.3f}, error {err:.2e}", flush=True)
    print_table(rows, ["pattern", "density", "blocks", "rel_error_vs_dense_masked", "nan"],
                title=f"block-sparse kernel ({backend} on {dev}) vs dense masked attention, T={T}")
    out_dir.mkdir(parents=True, exist_ok=True)
    _plot_grid(pats, out_dir / "patterns.png")
    print(f"wrote {out_dir / 'patterns.png'}")
    return rows


def _plot_grid(pats: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(pats)
    ncol = 4
    nrow = -(-len(names) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.3 * ncol, 3.4 * nrow), squeeze=False)
    for i, name in enumerate(names):
        ax = axes[i // ncol][i % ncol]
        m = pats[name].to_dense_mask()[0, 0].float().cpu()
        ax.imshow(m, cmap="Blues", interpolation="nearest", vmin=0, vmax=1)
        ax.set_title(f"{name}\ndensity {pats[name].density:.2f}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    for i in range(len(names), nrow * ncol):
        axes[i // ncol][i % ncol].axis("off")
    fig.suptitle("sparsattn patterns (head 0; rows = queries, columns = keys)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cmd_demo(args) -> int:
    out = Path(args.out)
    model_ready = False
    if not args.kernels_only:
        try:
            from .models import bundled_path

            bundled_path()
            model_ready = True
        except Exception as e:  # no bundled model yet: the kernel demo is the main job
            print(f"(bundled model unavailable: {e}; running the kernel demo)")
    if model_ready:
        from .demo import model_demo

        return model_demo(out, quick=not args.full)
    kernel_demo(out, T=args.length)
    return 0


def _cmd_bench(args) -> int:
    if args.which == "prefill":
        from .bench import prefill

        return prefill.main(args=args)
    if args.which == "decode":
        try:
            from .bench import decode
        except ImportError as e:
            print(f"sparsattn bench decode: not available ({e})", file=sys.stderr)
            return 2
        return decode.main(args.rest)
    if args.which == "kv-memory":
        from .bench import kv_memory

        return kv_memory.main(args.rest)
    return 2


def _cmd_train_lm(args) -> int:
    from .train import lm

    return lm.main(args.rest)


def _cmd_eval(args) -> int:
    from . import evaluate

    return evaluate.main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsattn", description="Sparse attention: methods -> patterns -> kernels")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="the main job: dense vs sparse methods (bundled model), or the kernel demo")
    d.add_argument("--out", default="sparsattn_demo", help="output folder for the table and PNGs")
    d.add_argument("--length", type=_length_arg, default=512,
                   help="sequence length of the kernel demo: a multiple of 16 in [256, 8192] (default 512)")
    d.add_argument("--kernels-only", action="store_true", help="run only the kernel demo")
    d.add_argument("--full", action="store_true",
                   help="passkey at 4K and 8K with 2 samples each (default: 4K, 1 sample; about 3-4 minutes on 2 CPU cores)")
    d.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)  # the default; kept for old scripts
    d.set_defaults(fn=_cmd_demo)
    sub.add_parser("list", help="registered methods and backends").set_defaults(fn=_cmd_list)
    b = sub.add_parser("bench", help="speed/memory benchmarks (GPU)")
    bsub = b.add_subparsers(dest="which", required=True)
    from .bench import prefill

    prefill.build_parser(bsub.add_parser("prefill", help="block-sparse prefill vs SDPA and FlexAttention"))
    dec = bsub.add_parser("decode", help="sparse decode vs dense decode", add_help=False)
    dec.add_argument("rest", nargs=argparse.REMAINDER)
    kvm = bsub.add_parser("kv-memory", help="bytes each KV policy keeps (device independent)", add_help=False)
    kvm.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(fn=_cmd_bench)
    t = sub.add_parser("train-lm", help="train the bundled long-context model", add_help=False)
    t.add_argument("rest", nargs=argparse.REMAINDER)
    t.set_defaults(fn=_cmd_train_lm)
    e = sub.add_parser("eval", help="method x task x length grid on a model", add_help=False)
    e.add_argument("rest", nargs=argparse.REMAINDER)
    e.set_defaults(fn=_cmd_eval)
    an = sub.add_parser("analyze", help="analysis tools: retrieval-heads | sinks | activations | core-neurons | patterns",
                        add_help=False)
    an.add_argument("rest", nargs=argparse.REMAINDER)
    an.set_defaults(fn=lambda a: __import__("sparsattn.analysis.cli", fromlist=["main"]).main(a.rest))
    from .calibrate import cli as calibrate_cli  # fit a calibrated method on a model (regenerates shipped files)

    calibrate_cli.build_parser(sub.add_parser("calibrate", help="fit a calibrated method on a local model: "
                                              "sparsattn calibrate <method> [--model PATH] [--out PATH]"))
    from .train.layerbench import cli as layerbench_cli  # train any registered layer on MQAR / ListOps / Pathfinder

    layerbench_cli.build_parser(sub.add_parser("train-layer", help="train a registered layer (or a grid): CSV + plots"))
    return p


#: sub-commands that hand their arguments to another parser (argparse's REMAINDER does not take
#: arguments that start with "-" right after the sub-command, so those arrive as "unknown")
_PASS_THROUGH = {("train-lm", None), ("eval", None), ("analyze", None), ("bench", "decode"), ("bench", "kv-memory")}


def main(argv=None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if (args.cmd, getattr(args, "which", None)) in _PASS_THROUGH:
        args.rest = list(unknown) + list(args.rest or [])
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.cmd == "demo":
        if Path(args.out).exists() and not Path(args.out).is_dir():
            parser.error(f"argument --out: expected a folder for the table and PNGs, {args.out!r} is a file")
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")  # run the real Triton kernel on the CPU
    try:
        return int(args.fn(args) or 0)
    except ValueError as e:  # bad input (the library's convention: a ValueError naming the argument)
        if os.environ.get("SPARSATTN_TRACEBACK"):
            raise
        name = " ".join(x for x in (args.cmd, getattr(args, "which", None)) if x)
        print(f"sparsattn {name}: error: {e}  (SPARSATTN_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
