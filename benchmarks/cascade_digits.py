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
run's log. Models missing under --runs are trained first (the commands are printed). Writes cascade_digits.csv
and cascade_digits.png to --out and prints a Markdown table.

    python benchmarks/cascade_digits.py --runs runs/cascade --out benchmarks/results/cpu/cascade
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path

import torch

from fastdiff import evaluate, generate, models, solvers
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


def train_missing(runs: Path, names: list[str], steps: int, batch: int, seed: int) -> None:
    for name in names:
        if (runs / name / "model.safetensors").exists():
            continue
        cmd = [sys.executable, "-m", "fastdiff", "train", "cascade", *VARIANTS[name], "--steps", str(steps),
               "--batch-size", str(batch), "--seed", str(seed), "--checkpoint-every", "250",
               "--out-dir", str(runs / name), "--no-progress"]  # fmt: skip
        print("training:", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True)


def seconds_per_step(log_csv: Path) -> float:
    with open(log_csv) as f:
        rows = list(csv.DictReader(f))
    return float(rows[-1]["time_s"]) / int(rows[-1]["step"])


def evaluate_runs(runs: Path, names: list[str], n: int, batch: int) -> list[dict]:
    judge = evaluate.default_judge()
    indices = torch.arange(n)
    floor, count = judge.real_floor(n)
    rows = [{"variant": "real held-out digits", "solver": "", "nfe": 0, "fd": floor, "accuracy": float("nan"),
             "sample_s": float("nan"), "train_s_per_step": float("nan")}]  # fmt: skip
    print(f"FD of {count} real held-out digits: {floor:.3f}", flush=True)
    for name in names:
        den = models.get(runs / name / "model.safetensors")
        cascade = den.net.cascade
        shape, classes = cascade.image_shape, cascade.unet_config.num_classes
        train_s = seconds_per_step(runs / name / "log.csv")
        for solver in SOLVERS:
            for nfe in NFES:
                sigmas = trailing_sigmas(cascade.alphas_cumprod, nfe)
                t0 = time.perf_counter()
                with torch.no_grad():
                    gen = generate.generate(den, indices, sigmas, solver=solvers.get(solver), shape=shape,
                                            num_classes=classes, batch_size=batch)  # fmt: skip
                row = {"variant": name, "solver": solver, "nfe": gen.nfe, **judge(gen.images, gen.labels),
                       "sample_s": time.perf_counter() - t0, "train_s_per_step": train_s}  # fmt: skip
                rows.append(row)
                print(f"{name:17s} {solver:8s} NFE {nfe:2d}: FD {row['fd']:.3f}  accuracy {row['accuracy']:.3f}",
                      flush=True)  # fmt: skip
    return rows


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    floor = next(r["fd"] for r in rows if r["variant"] == "real held-out digits")
    for ax, solver in zip(axes, SOLVERS):
        for name in VARIANTS:
            pts = [(r["nfe"], r["fd"]) for r in rows if r["variant"] == name and r["solver"] == solver]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.axhline(floor, color="gray", ls="--", lw=1, label="real held-out digits")
        ax.set_xscale("log")
        ax.set_xticks(NFES, [str(v) for v in NFES])
        ax.set_xlabel("NFE")
        ax.set_title(f"{solver}: Fréchet distance to real digits (lower is better)", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("FD (digits classifier features)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, default=Path("runs/cascade"), help="one folder per variant")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu/cascade"))
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--n", type=int, default=500, help="samples per cell")
    p.add_argument("--batch-size", type=int, default=250, help="sampling batch")
    p.add_argument("--train-steps", type=int, default=1500, help="budget of a missing run (steps)")
    p.add_argument("--train-batch", type=int, default=64, help="budget of a missing run (batch)")
    p.add_argument("--seed", type=int, default=0, help="training seed of a missing run")
    args = p.parse_args()
    names = args.variants.split(",")
    for name in names:
        if name not in VARIANTS:
            p.error(f"unknown variant {name!r}; choose from {list(VARIANTS)}")
    torch.set_num_threads(1)
    train_missing(args.runs, names, args.train_steps, args.train_batch, args.seed)
    rows = evaluate_runs(args.runs, names, args.n, args.batch_size)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "cascade_digits.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[1]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out / "cascade_digits.png")
    base = next((r["train_s_per_step"] for r in rows if r["variant"] == "ddpm"), float("nan"))
    print("\n| variant | solver | NFE 10: FD / acc | NFE 20 | NFE 50 | train s/step (vs ddpm) |")
    print("|---|---|---|---|---|---|")
    for name in names:
        for solver in SOLVERS:
            cells = [r for r in rows if r["variant"] == name and r["solver"] == solver]
            fmt = " | ".join(f"{r['fd']:.3f} / {r['accuracy']:.3f}" for r in cells)
            ts = cells[0]["train_s_per_step"]
            print(f"| {name} | {solver} | {fmt} | {ts:.2f} ({ts / base:.2f}x) |")


if __name__ == "__main__":
    main()
