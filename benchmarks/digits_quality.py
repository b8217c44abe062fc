"""Quality per NFE of every solver on the built-in digits model (runs on the CPU; no GPU needed).

For each solver and NFE budget, samples the built-in class-conditional digits UNet (no guidance) on the Karras
schedule (sigma 0.002..80, rho 7) from the same seeded noise (sample i always starts from the same noise) and
reports, from fastdiff's shipped digits classifier (fastdiff.evaluate):
  * the Frechet distance (FD) of the samples to all 1797 real digits in the classifier's features,
  * the class accuracy (does the classifier read the requested digit),
  * the RMSE to the teacher (Heun, 32 steps, 63 NFE) from the same noise.
An NFE budget maps to steps as each solver spends it: Heun spends 2N - 1 evaluations on N steps, so it gets
the largest N within the budget; every other solver spends one per step. Writes digits_quality.csv and
digits_quality.png to --out and prints a Markdown table.

    python benchmarks/digits_quality.py --out benchmarks/results/cpu
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch

from fastdiff import count_nfe, evaluate, generate, metrics, models, schedules, solvers

SOLVERS = ["euler", "heun", "ddim", "dpmpp_2m", "dpmpp_3m", "ipndm", "unipc"]
NFES = [4, 6, 8, 10, 20, 35]
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def steps_for(solver: str, nfe: int) -> int:
    """The most steps whose schedule costs at most ``nfe`` evaluations."""
    n = 1
    while count_nfe(solver, schedules.karras(n + 1, SIGMA_MIN, SIGMA_MAX))[0] <= nfe:
        n += 1
    return n


def run(n_samples: int, batch_size: int) -> list[dict]:
    model = models.get("digits")
    judge = evaluate.default_judge()
    cfg = model.config
    kw = dict(shape=(cfg.in_channels, cfg.resolution, cfg.resolution), num_classes=cfg.num_classes,
              batch_size=batch_size)  # fmt: skip
    indices = torch.arange(n_samples)
    teacher = evaluate.teacher_sample(model, indices, SIGMA_MIN, SIGMA_MAX, **kw)
    spec = evaluate.TEACHER
    rows = [{"solver": f"teacher ({spec['solver']})", "nfe": teacher.nfe, "steps": spec["steps"],
             **judge(teacher.images, teacher.labels), "teacher_rmse": 0.0}]  # fmt: skip
    floor, count = judge.real_floor(n_samples)
    print(f"FD of {count} real held-out digits: {floor:.3f}")
    rows.append({"solver": "real held-out digits", "nfe": 0, "steps": 0, "fd": floor, "accuracy": float("nan"),
                 "teacher_rmse": float("nan")})  # fmt: skip
    for name in SOLVERS:
        for budget in NFES:
            steps = steps_for(name, budget)
            sigmas = schedules.karras(steps, SIGMA_MIN, SIGMA_MAX)
            t0 = time.perf_counter()
            gen = generate.generate(model, indices, sigmas, solver=solvers.get(name), **kw)
            rmse = metrics.teacher_error(gen.images, teacher.images)["rmse_mean"]
            row = {"solver": name, "nfe": gen.nfe, "steps": steps, **judge(gen.images, gen.labels),
                   "teacher_rmse": float(rmse)}  # fmt: skip
            rows.append(row)
            print(f"{name:9s} NFE {gen.nfe:3d}: FD {row['fd']:.3f} accuracy {row['accuracy']:.3f} "
                  f"RMSE to teacher {row['teacher_rmse']:.4f} ({time.perf_counter() - t0:.1f} s)")  # fmt: skip
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for name in SOLVERS:
        if name == "ddim":
            continue  # the same updates as euler in this form (drawn as "euler = ddim")
        pts = [r for r in rows if r["solver"] == name]
        label = "euler = ddim" if name == "euler" else name
        for ax, key in zip(axes, ("fd", "accuracy", "teacher_rmse")):
            ax.plot([r["nfe"] for r in pts], [r[key] for r in pts], marker="o", label=label)
    teacher = rows[0]
    floor = next(r for r in rows if r["solver"] == "real held-out digits")["fd"]
    axes[0].axhline(teacher["fd"], color="k", ls="--", lw=1, label=f"teacher ({int(teacher['nfe'])} NFE)")
    axes[0].axhline(floor, color="grey", ls=":", lw=1, label="real held-out digits")
    axes[1].axhline(teacher["accuracy"], color="k", ls="--", lw=1)
    for ax, title in zip(axes, ("Frechet distance to real digits (lower is better)", "class accuracy",
                                "RMSE to the teacher, same noise")):  # fmt: skip
        ax.set_xscale("log")
        ax.set_xticks(NFES, [str(v) for v in NFES])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("NFE")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle("Built-in digits model, Karras schedule, no guidance (CPU)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000, help="samples per configuration")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu"))
    p.add_argument("--replot", action="store_true", help="redraw the plot and table from --out's CSV")
    args = p.parse_args()
    csv_path = args.out / "digits_quality.csv"
    if args.replot:
        with open(csv_path) as f:
            rows = [{k: v if k == "solver" else float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    else:
        rows = run(args.n, args.batch_size)
        args.out.mkdir(parents=True, exist_ok=True)
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    plot(rows, args.out / "digits_quality.png")
    print("\n| solver | " + " | ".join(f"NFE {v}" for v in NFES) + " |")
    print("|---|" + "---|" * len(NFES))
    for name in SOLVERS:
        cells = [f"{r['fd']:.2f} / {r['accuracy']:.3f}" for r in rows if r["solver"] == name]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"wrote {csv_path} and {args.out / 'digits_quality.png'}")


if __name__ == "__main__":
    main()
