"""The ``fastdiff`` command line (also ``python -m fastdiff``)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import fastdiff
from fastdiff import bench, metrics, models, schedules, solvers
from fastdiff.guidance import Guidance
from fastdiff.ode import reference_sample


def _pair(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers 'lo,hi', got {text!r}") from None
    return lo, hi


def _option(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    for conv in (int, float):
        try:
            return key, conv(raw)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(raw.lower(), raw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastdiff", description="Fast, trustworthy sampling for diffusion models.")
    p.add_argument("--version", action="version", version=f"fastdiff {fastdiff.__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser(
        "sample",
        help="sample a built-in model and report NFE, time and error against the exact solve",
        description=(
            "Sample a built-in model from seeded noise. Prints the NFE spent (conditional and unconditional), the "
            "wall time, the error against a high-accuracy reference solve of the same ODE from the same noise, and "
            "the sliced Wasserstein distance to the true data distribution."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    s.add_argument("--model", default="gmm", choices=sorted(models.MODELS), help="built-in model")
    s.add_argument("--solver", default="dpmpp_2m", choices=sorted(solvers.SOLVERS), help="ODE solver")
    s.add_argument(
        "--option",
        "-O",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="solver option, repeatable, e.g. -O order=3 -O variant=bh1 for unipc, -O max_order=3 for ipndm",
    )
    s.add_argument("--steps", type=int, default=6, help="solver steps N (the schedule has N+1 sigmas)")
    s.add_argument(
        "--schedule",
        default="karras",
        help="karras, logsnr_uniform, time_uniform, or a .json schedule file written by fastdiff.schedules.save",
    )
    s.add_argument("--sigma-min", type=float, default=0.002, help="smallest nonzero sigma")
    s.add_argument("--sigma-max", type=float, default=80.0, help="largest sigma")
    s.add_argument("--rho", type=float, default=7.0, help="rho of the karras schedule")
    s.add_argument("--guidance", type=float, default=None, metavar="W", help="classifier-free guidance scale w")
    s.add_argument(
        "--interval",
        type=_pair,
        default=None,
        metavar="LO,HI",
        help="guide only steps whose start sigma lies in (LO, HI]; default: every step",
    )
    s.add_argument("--unconditional", action="store_true", help="sample the whole mixture, not class-conditionally")
    s.add_argument("--n", type=int, default=2000, help="number of samples")
    s.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    s.add_argument("--dtype", default="float64", choices=["float32", "float64"], help="sampling dtype")
    s.add_argument("--out", type=Path, default=None, help="write a scatter plot PNG here")
    s.add_argument("--progress", action="store_true", help="show a progress bar")
    s.set_defaults(func=cmd_sample)

    b = sub.add_parser("bench", help="microbenchmarks (see BENCHMARKS.md)")
    bsub = b.add_subparsers(dest="bench", required=True, metavar="BENCH")
    k = bsub.add_parser(
        "kernels",
        help="the fused guided step against eager torch, torch.compile and the copy bandwidth",
        description=bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    k.add_argument("--sizes", default=None, help="elements per tensor, e.g. 16K,1M,50M (default: those on a GPU, "
                   "16K,1M on the CPU)")  # fmt: skip
    k.add_argument("--dtypes", default="fp32,fp32+bf16", help=f"comma-separated, from {list(bench.DTYPES)}")
    k.add_argument("--workloads", default=",".join(bench.WORKLOADS), help="comma-separated workloads")
    k.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    k.add_argument("--reps", type=int, default=20, help="timed repetitions on the CPU")
    k.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    k.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for kernels.csv and kernels.png")
    k.add_argument("--progress", action="store_true", help="print each measurement as it starts")
    k.set_defaults(func=cmd_bench_kernels)
    return p


def cmd_bench_kernels(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sizes = args.sizes or ("16K,1M,50M" if device.type == "cuda" else "16K,1M")
    dtypes = args.dtypes.split(",")
    workloads = args.workloads.split(",")
    for name, known in [(d, bench.DTYPES) for d in dtypes] + [(w, bench.WORKLOADS) for w in workloads]:
        if name not in known:
            raise ValueError(f"unknown {name!r}; choose from {list(known)}")
    rows = bench.bench_kernels(
        [bench.parse_size(v) for v in sizes.split(",")], dtypes, workloads, device, reps=args.reps,
        compile=not args.no_compile, progress=(lambda m: print(m, file=sys.stderr)) if args.progress else None,
    )  # fmt: skip
    bench.write_results(rows, args.out)
    print(bench.markdown_table(rows))
    print(f"wrote {args.out / 'kernels.csv'} and {args.out / 'kernels.png'}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.n < 2:
        raise ValueError("--steps must be >= 1 and --n >= 2")
    model = models.get(args.model)
    if args.guidance is not None and args.unconditional:
        raise ValueError("--guidance needs class-conditional sampling; drop --unconditional")
    kwargs = {"rho": args.rho} if args.schedule == "karras" else {}
    sigmas = schedules.get(args.schedule, args.steps, args.sigma_min, args.sigma_max, **kwargs)
    solver = solvers.get(args.solver, **dict(args.option))
    guidance = Guidance(args.guidance, args.interval) if args.guidance is not None else None

    gen = torch.Generator().manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    noise = torch.randn(args.n, model.dim, generator=gen, dtype=torch.float64)
    labels = None if args.unconditional else torch.arange(args.n) % model.num_classes
    cond = None if labels is None else {"class_labels": labels}
    x = (noise * sigmas[0]).to(dtype)

    t0 = time.perf_counter()
    out, stats = fastdiff.sample(
        model, x, sigmas, solver=solver, guidance=guidance, cond=cond, return_stats=True, progress=args.progress
    )
    wall = time.perf_counter() - t0
    ref = reference_sample(model, noise * sigmas[0], sigmas, guidance=guidance, cond=cond)
    err = (out.double() - ref).norm(dim=1)
    data = model.sample(args.n, torch.Generator().manual_seed(args.seed + 1), class_labels=labels)
    data2 = model.sample(args.n, torch.Generator().manual_seed(args.seed + 2), class_labels=labels)
    # The same projections for all three distances, so that they compare.
    sw_to_data = lambda pts: metrics.sliced_wasserstein(pts, data, generator=torch.Generator().manual_seed(12345))  # noqa: E731
    sw, sw_ref, sw_floor = sw_to_data(out), sw_to_data(ref), sw_to_data(data2)

    print(f"model {args.model}  solver {solver!r}  schedule {args.schedule} ({args.steps} steps)  guidance {guidance}")
    print(f"NFE            {stats.nfe} per sample ({stats.nfe_cond} conditional + {stats.nfe_uncond} unconditional)")
    print(f"wall time      {wall * 1e3:.1f} ms for {args.n} samples ({args.dtype}, {x.device})")
    print(f"error vs exact solve   mean {err.mean():.3e}  max {err.max():.3e}  (L2 per sample; RK45, rtol 1e-10)")
    print(f"sliced W2 to data      {sw:.4f}  (exact ODE solve: {sw_ref:.4f}; two draws of the data: {sw_floor:.4f})")
    if args.out is not None:
        _plot(args, out.double(), ref, data, labels)
        print(f"wrote {args.out}")
    return 0


def _plot(args, out: torch.Tensor, ref: torch.Tensor, data: torch.Tensor, labels) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    color = None if labels is None else labels.numpy()
    fig, axes = plt.subplots(1, 2, figsize=(10, 5), sharex=True, sharey=True)
    for ax, pts, title in [
        (axes[0], out, f"fastdiff {args.solver}, {args.steps} steps"),
        (axes[1], ref, "exact ODE solve (RK45)"),
    ]:
        ax.scatter(data[:, 0], data[:, 1], s=2, c="lightgrey", label="data")
        ax.scatter(pts[:, 0], pts[:, 1], s=2, c=color, cmap="tab10", vmin=0, vmax=9)
        ax.set_title(title)
        ax.set_aspect("equal")
    lim = 1.2 * float(data.abs().max())
    axes[0].set_xlim(-lim, lim)
    axes[0].set_ylim(-lim, lim)
    fig.suptitle(f"{args.model}: guidance {args.guidance or 'off'}, interval {args.interval or 'all steps'}")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"fastdiff {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
