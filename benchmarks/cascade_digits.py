"""Cas-DM on the digits: does the cascade with a metric loss help, at the same training budget?

Four variants of fastdiff UNets (``small``, 1.03M parameters per network), each trained by ``fastdiff train cascade``
with the same budget (steps x batch) and seed, on the discrete linear-beta VP schedule (T = 1000):

* ``ddpm``: a plain eps-DDPM (theta alone);
* ``dual``: one network with eps, x0 and r heads, the metric on its x0 head (Benny & Wolf's dual output);
* ``cascade_nometric``: Cas-DM without the metric (lam = 0);
* ``cascade_metric``: Cas-DM with the metric (LPIPS where it imports; here pseudo-Huber, lam = 1).

Each model is sampled class-conditionally (no guidance; sample i has class i mod 10 and always the same noise)
with DDIM and DPM-Solver++(2M) at NFE 10, 20 and 50 on uniformly spaced integer timesteps ("trailing":
t = round(T - k T / N) - 1, then sigma = 0), and judged with fastdiff's digits classifier (fastdiff.evaluate):
the Fréchet distance to the real digits and the class accuracy. The training time per step comes from each
run's log. Models missing under --runs are trained first (the commands are printed); several --runs folders are
several training seeds (seed k for the k-th folder), and the table gives their mean and range. Writes
cascade_digits.csv and cascade_digits.png to --out and prints a Markdown table.

    python benchmarks/cascade_digits.py --runs runs/cascade runs/cascade_seed1 --out benchmarks/results/cpu/cascade
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _training_runs import (
    fd_accuracy_cell,
    mean,
    read_csv,
    sample_and_judge,
    seconds_per_step,
    train_missing,
    write_csv,
)

from fastdiff import evaluate, models, solvers
from fastdiff.denoisers import discrete_sigmas

VARIANTS = {
    "ddpm": ["--variant", "ddpm"],
    "dual": ["--variant", "dual", "--metric", "auto"],
    "cascade_nometric": ["--variant", "cascade", "--metric", "none"],
    "cascade_metric": ["--variant", "cascade", "--metric", "auto"],
}
SOLVERS = ["ddim", "dpmpp_2m"]
NFES = [10, 20, 50]


def trailing_sigmas(alphas_cumprod: torch.Tensor, steps: int) -> torch.Tensor:
    """``[steps + 1]``: uniformly spaced integer timesteps from ``T - 1`` down (diffusers' "trailing"), then 0."""
    t_max = len(alphas_cumprod)
    return discrete_sigmas(alphas_cumprod, torch.tensor([round(t_max - k * t_max / steps) - 1 for k in range(steps)]))


def evaluate_runs(runs: Path, seed: int, names: list[str], n: int, batch: int, judge) -> list[dict]:
    rows = []
    for name in names:
        den = models.get(runs / name / "model.safetensors")
        cascade = den.net.cascade
        shape, classes = cascade.image_shape, cascade.unet_config.num_classes
        train_s = seconds_per_step(runs / name / "log.csv")
        for solver in SOLVERS:
            for nfe in NFES:
                sigmas = trailing_sigmas(cascade.alphas_cumprod, nfe)
                row = {"variant": name, "seed": seed, "solver": solver}
                row.update(sample_and_judge(den, sigmas, solvers.get(solver), shape, classes, n, batch, judge))
                row["train_s_per_step"] = train_s
                rows.append(row)
                print(f"seed {seed} {name:17s} {solver:8s} NFE {nfe:2d}: FD {row['fd']:.3f}  accuracy "
                      f"{row['accuracy']:.3f}", flush=True)  # fmt: skip
    return rows


def plot(rows: list[dict], floor: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, solver in zip(axes, SOLVERS):
        for name in VARIANTS:
            cells = [[r["fd"] for r in rows if r["variant"] == name and r["solver"] == solver and r["nfe"] == nfe]
                     for nfe in NFES]  # fmt: skip
            if cells[0]:
                means = [mean(c) for c in cells]
                err = [[m - min(c) for m, c in zip(means, cells)], [max(c) - m for m, c in zip(means, cells)]]
                ax.errorbar(NFES, means, yerr=err, marker="o", capsize=3, label=name)
        ax.axhline(floor, color="gray", ls="--", lw=1, label="real held-out digits")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(NFES, [str(v) for v in NFES])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("NFE")
        ax.set_title(f"{solver}: Fréchet distance to real digits (lower is better)", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("FD (digits classifier features); bars: seed range")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def table(rows: list[dict], names: list[str]) -> str:
    """Markdown: per variant and solver, FD and accuracy at each NFE (mean over seeds, with the range when there
    are several), and the training time per step against the DDPM's."""

    base = mean([r["train_s_per_step"] for r in rows if r["variant"] == "ddpm"] or [float("nan")])
    lines = ["| variant | solver | " + " | ".join(f"NFE {n}: FD / accuracy" for n in NFES) + " | train s/step |",
             "|---|---|" + "---|" * (len(NFES) + 1)]  # fmt: skip
    for name in names:
        for solver in SOLVERS:
            cells = []
            for nfe in NFES:
                sel = [r for r in rows if r["variant"] == name and r["solver"] == solver and r["nfe"] == nfe]
                cells.append(fd_accuracy_cell(sel))
            ts = mean([r["train_s_per_step"] for r in rows if r["variant"] == name])
            lines.append(f"| {name} | {solver} | " + " | ".join(cells) + f" | {ts:.2f} ({ts / base:.2f}x) |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, nargs="+", default=[Path("runs/cascade")],
                   help="one folder per training seed (seed k for the k-th), each holding the variants")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu/cascade"))
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--n", type=int, default=500, help="samples per cell")
    p.add_argument("--batch-size", type=int, default=250, help="sampling batch")
    p.add_argument("--train-steps", type=int, default=1500, help="budget of a missing run (steps)")
    p.add_argument("--train-batch", type=int, default=64, help="budget of a missing run (batch)")
    p.add_argument("--replot", action="store_true", help="redraw the plot and table from --out's CSV, no sampling")
    args = p.parse_args()
    names = args.variants.split(",")
    for name in names:
        if name not in VARIANTS:
            p.error(f"unknown variant {name!r}; choose from {list(VARIANTS)}")
    torch.set_num_threads(1)
    judge = evaluate.default_judge()
    floor, count = judge.real_floor(args.n)
    if args.replot:
        rows = read_csv(args.out / "cascade_digits.csv", ("variant", "solver"))
        plot(rows, floor, args.out / "cascade_digits.png")
        print(table(rows, names))
        return
    print(f"FD of {count} real held-out digits: {floor:.3f}", flush=True)
    rows = []
    for seed, runs in enumerate(args.runs):
        for name in names:
            budget = ["--steps", str(args.train_steps), "--batch-size", str(args.train_batch), "--seed", str(seed)]
            train_missing(runs / name, ["cascade", *VARIANTS[name], *budget, "--checkpoint-every", "250"])
        rows += evaluate_runs(runs, seed, names, args.n, args.batch_size, judge)
    write_csv(rows, args.out / "cascade_digits.csv")
    plot(rows, floor, args.out / "cascade_digits.png")
    print(f"\nreal held-out digits ({count}): FD {floor:.3f}\n")
    print(table(rows, names))


if __name__ == "__main__":
    main()
