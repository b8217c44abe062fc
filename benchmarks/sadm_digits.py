"""SADM on the digits: does structure-guided adversarial training help, from scratch and as a fine-tune?

Four runs per training seed, each the small EDM UNet (1.03M parameters) with the same budget (steps x batch):

* ``edm``: plain EDM training from scratch (``fastdiff train edm``);
* ``sadm``: SADM from scratch (``fastdiff train sadm --lam 0.1``; cosine affinity, L1 distance);
* ``edm_finetune``: the built-in digits model trained further with the plain EDM loss (``--init digits``, lr 2e-4,
  no warm-up), the control that separates SADM's effect from that of more training;
* ``sadm_finetune``: the built-in digits model fine-tuned with SADM, same settings;

and, to measure the standard stabilisers before making them defaults, ``sadm_r1`` (an R1-style gradient penalty,
gamma 1, on the real batch) and ``sadm_warmup`` (500 steps of the EDM loss alone before the game starts), and
``sadm_lam0.03``/``sadm_lam0.01`` and ``sadm_finetune_lam0.01`` (smaller weights of the structural term than
0.1; 0.01 became the default after this comparison).

The built-in model itself is the reference row. Each model is sampled class-conditionally without guidance
(sample i has class i mod 10 and always the same noise) on the Karras schedule (sigma 0.002..80) with
DPM-Solver++(2M) at NFE 10 and Heun at NFE 35 (18 steps, EDM's setting), and judged with fastdiff's digits
classifier: the Fréchet distance to the real digits and the class accuracy. The training time per step comes from
each run's log. Several --runs folders are several seeds (seed k for the k-th); missing runs are trained first.
Writes sadm_digits.csv (rows of runs not evaluated this time are kept) and sadm_digits.png (FD per variant, both
players' loss curves) to --out and prints a Markdown table.

    python benchmarks/sadm_digits.py --runs runs/sadm runs/sadm_seed1 --out benchmarks/results/cpu/sadm
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch
from _training_runs import (
    fd_accuracy_cell,
    mean,
    merge_csv,
    read_csv,
    sample_and_judge,
    seconds_per_step,
    train_missing,
    write_csv,
)

from fastdiff import evaluate, models, schedules

FINETUNE = ["--init", "digits", "--lr", "2e-4", "--warmup", "0"]
VARIANTS = {
    "edm": ["edm"],
    "sadm": ["sadm", "--lam", "0.1"],
    "edm_finetune": ["edm", *FINETUNE],
    "sadm_finetune": ["sadm", *FINETUNE, "--lam", "0.1"],
    # the stability tools, measured before they become defaults
    "sadm_r1": ["sadm", "--lam", "0.1", "--gradient-penalty", "1"],
    "sadm_warmup": ["sadm", "--lam", "0.1", "--adv-warmup", "500"],
    # smaller weights of the structural term
    "sadm_lam0.03": ["sadm", "--lam", "0.03"],
    "sadm_lam0.01": ["sadm", "--lam", "0.01"],
    "sadm_finetune_lam0.01": ["sadm", *FINETUNE, "--lam", "0.01"],
}
MAIN = ["edm", "sadm", "edm_finetune", "sadm_finetune"]
CELLS = [("dpmpp_2m", 10), ("heun", 18)]  # (solver, steps): NFE 10 and 35


def evaluate_model(model, n: int, batch: int, judge) -> list[dict]:
    rows = []
    for solver, steps in CELLS:
        sigmas = schedules.karras(steps, 0.002, 80.0)
        row = {"solver": solver, **sample_and_judge(model, sigmas, solver, (1, 16, 16), 10, n, batch, judge)}
        rows.append(row)
    return rows


def _smooth(values: list[float], k: int = 10) -> list[float]:
    return [mean(values[max(0, i - k + 1) : i + 1]) for i in range(len(values))]


def _curve(log_csv: Path, key: str) -> tuple[list[int], list[float]]:
    with open(log_csv) as f:
        rows = [r for r in csv.DictReader(f) if r.get(key) not in (None, "", "nan")]
    return [int(r["step"]) for r in rows], _smooth([float(r[key]) for r in rows])


def plot(rows: list[dict], runs: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    names = [n for n in ["builtin", *VARIANTS] if any(r["variant"] == n for r in rows)]
    for i, (solver, _) in enumerate(CELLS):
        fds = [[r["fd"] for r in rows if r["variant"] == name and r["solver"] == solver] for name in names]
        means = [mean(v) for v in fds]
        err = [[m - min(v) for m, v in zip(means, fds)], [max(v) - m for m, v in zip(means, fds)]]
        nfe = next(r["nfe"] for r in rows if r["solver"] == solver)
        x = [j + 0.38 * i for j in range(len(names))]
        axes[0].bar(x, means, width=0.36, yerr=err, capsize=3, label=f"{solver}, NFE {nfe}")
    axes[0].set_xticks([j + 0.19 for j in range(len(names))], names, fontsize=8, rotation=25, ha="right")
    axes[0].set_ylabel("FD to real digits (lower is better)")
    axes[0].set_title("Fréchet distance; bars: seed range", fontsize=10)
    axes[0].legend(fontsize=8)
    for name, style in (("edm", "-"), ("sadm", "-"), ("edm_finetune", "--"), ("sadm_finetune", "--")):
        key = "loss_denoise" if name.startswith("sadm") else "loss"
        axes[1].plot(*_curve(runs / name / "log.csv", key), style, lw=1, label=name)
    axes[1].set_yscale("log")
    axes[1].set_title("denoiser: EDM loss (seed 0, moving mean of 10 logs)", fontsize=10)
    for name in ("sadm", "sadm_finetune"):
        log = runs / name / "log.csv"
        axes[2].plot(*_curve(log, "adv_structure_gap"), lw=1, label=f"{name}: discriminator's step (maximises)")
        axes[2].plot(*_curve(log, "structure_gap"), lw=1, ls=":", label=f"{name}: denoiser's step (minimises)")
    axes[2].set_title("structural gap, each player's view (seed 0)", fontsize=10)
    for ax in axes[1:]:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    """Markdown: per variant, FD and accuracy per cell (mean over seeds with the range), training s/step."""
    nfes = [next(r["nfe"] for r in rows if r["solver"] == s) for s, _ in CELLS]
    head = " | ".join(f"{s} NFE {n}: FD / accuracy" for (s, _), n in zip(CELLS, nfes))
    lines = [f"| variant | {head} | train s/step |", "|---|" + "---|" * (len(CELLS) + 1)]
    base = mean([r["train_s_per_step"] for r in rows if r["variant"] == "edm"])
    for name in [n for n in ["builtin", *VARIANTS] if any(r["variant"] == n for r in rows)]:
        cells = []
        for solver, _ in CELLS:
            sel = [r for r in rows if r["variant"] == name and r["solver"] == solver]
            cells.append(fd_accuracy_cell(sel))
        ts = [r["train_s_per_step"] for r in rows if r["variant"] == name]
        timing = "-" if name == "builtin" else f"{mean(ts):.2f} ({mean(ts) / base:.2f}x)"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {timing} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, nargs="+", default=[Path("runs/sadm")],
                   help="one folder per training seed (seed k for the k-th), each holding the variants")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu/sadm"))
    p.add_argument("--variants", default=",".join(MAIN),
                   help="comma-separated subset of " + ",".join(VARIANTS) + "; the first --runs folder also gets "
                   "--extra")  # fmt: skip
    p.add_argument("--extra", default="sadm_r1,sadm_warmup,sadm_lam0.03,sadm_lam0.01",
                   help="variants trained for the first seed only")  # fmt: skip
    p.add_argument("--n", type=int, default=500, help="samples per cell")
    p.add_argument("--batch-size", type=int, default=250, help="sampling batch")
    p.add_argument("--train-steps", type=int, default=1500, help="budget of a missing run (steps)")
    p.add_argument("--train-batch", type=int, default=64, help="budget of a missing run (batch)")
    p.add_argument("--replot", action="store_true", help="redraw the plot and table from --out's CSV, no sampling")
    args = p.parse_args()
    if args.replot:
        rows = read_csv(args.out / "sadm_digits.csv", ("variant", "solver"))
        plot(rows, args.runs[0], args.out / "sadm_digits.png")
        print(table(rows))
        return
    torch.set_num_threads(1)
    judge = evaluate.default_judge()
    floor, count = judge.real_floor(args.n)
    rows = [{"variant": "builtin", "seed": 0, **r, "train_s_per_step": float("nan")}
            for r in evaluate_model(models.builtin_digits(), args.n, args.batch_size, judge)]  # fmt: skip
    for seed, runs in enumerate(args.runs):
        names = [n for n in args.variants.split(",") + (args.extra.split(",") if seed == 0 else []) if n]
        unknown = set(names) - set(VARIANTS)
        if unknown:
            p.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
        for name in names:
            job = VARIANTS[name]
            budget = ["--steps", str(args.train_steps), "--batch-size", str(args.train_batch), "--seed", str(seed)]
            train_missing(runs / name, [*job, *budget, "--checkpoint-every", "250"])
            train_s = seconds_per_step(runs / name / "log.csv")
            for r in evaluate_model(models.get(runs / name / "model.safetensors"), args.n, args.batch_size, judge):
                rows.append({"variant": name, "seed": seed, **r, "train_s_per_step": train_s})
                print(f"seed {seed} {name:14s} {r['solver']:8s} NFE {r['nfe']:2d}: FD {r['fd']:.3f}  accuracy "
                      f"{r['accuracy']:.3f}", flush=True)  # fmt: skip
    path = args.out / "sadm_digits.csv"
    order = ["builtin", *VARIANTS]
    rows = merge_csv(rows, path, lambda r: (order.index(r["variant"]), r["seed"], r["solver"]), ("variant", "solver"))
    write_csv(rows, path)
    plot(rows, args.runs[0], args.out / "sadm_digits.png")
    print(f"\nreal held-out digits ({count}): FD {floor:.3f}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
