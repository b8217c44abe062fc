"""Quality per NFE of every solver on the built-in digits model (runs on the CPU; no GPU needed).

For each solver and NFE budget, samples the built-in class-conditional digits UNet (no guidance) on the Karras
schedule (sigma 0.002..80, rho 7) from the same seeded noise (sample i always starts from the same noise) and
reports, from fastdiff's shipped digits classifier (fastdiff.evaluate):
  * the Frechet distance (FD) of the samples to all 1797 real digits in the classifier's features,
  * the class accuracy (does the classifier read the requested digit),
  * the RMSE to the teacher (Heun, 32 steps, 63 NFE) from the same noise.
An NFE budget maps to steps as each solver spends it: Heun spends 2N - 1 evaluations on N steps, so it gets
the largest N within the budget, and so do the other two-evaluation solvers. Every solver of fastdiff.SOLVERS
runs but lcm (consistency sampling needs a consistency-distilled model; the digits UNet is not one). The
stochastic solvers draw each sample's step noise from that sample's own generator (fastdiff.generate), so their
cells are reproducible too; their RMSE to the teacher measures how far they stray from the ODE's solution, not
an error. Writes digits_quality.csv and digits_quality.png to --out and prints a Markdown table.

    python benchmarks/digits_quality.py --out benchmarks/results/cpu

--solvers runs a subset; --merge redraws from several CSVs (later files win per solver), so that subsets run
in parallel processes make one table:

    python benchmarks/digits_quality.py --solvers euler,heun --out /tmp/a &
    python benchmarks/digits_quality.py --solvers lms,deis --out /tmp/b; wait
    python benchmarks/digits_quality.py --merge /tmp/a/digits_quality.csv /tmp/b/digits_quality.csv --out res
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch
from _training_runs import write_csv

from fastdiff import count_nfe, evaluate, generate, metrics, models, schedules, solvers
from fastdiff.checkpoint import atomic_write

SOLVERS = [name for name in solvers.SOLVERS if name != "lcm"]
ODE = [name for name in SOLVERS if solvers.SOLVERS[name].ode]
NFES = [4, 6, 8, 10, 20, 35]
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def steps_for(solver: str, nfe: int) -> int:
    """The most steps whose schedule costs at most ``nfe`` evaluations."""
    n = 1
    while count_nfe(solver, schedules.karras(n + 1, SIGMA_MIN, SIGMA_MAX))[0] <= nfe:
        n += 1
    return n


def run(n_samples: int, batch_size: int, names: list[str]) -> list[dict]:
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
    for name in names:
        for budget in NFES:
            steps = steps_for(name, budget)
            sigmas = schedules.karras(steps, SIGMA_MIN, SIGMA_MAX)
            t0 = time.perf_counter()
            gen = generate.generate(model, indices, sigmas, solver=solvers.get(name), **kw)
            rmse = metrics.teacher_error(gen.images, teacher.images)["rmse_mean"]
            row = {"solver": name, "nfe": gen.nfe, "steps": steps, **judge(gen.images, gen.labels),
                   "teacher_rmse": float(rmse)}  # fmt: skip
            rows.append(row)
            print(f"{name:19s} NFE {gen.nfe:3d}: FD {row['fd']:.3f} accuracy {row['accuracy']:.3f} "
                  f"RMSE to teacher {row['teacher_rmse']:.4f} ({time.perf_counter() - t0:.1f} s)")  # fmt: skip
    return rows


def plot(rows: list[dict], path: Path) -> None:
    """Two rows of panels, ODE solvers above and stochastic ones below: FD, class accuracy, RMSE to the teacher."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    present = [name for name in SOLVERS if any(r["solver"] == name for r in rows)]
    groups = [("ODE solvers", [n for n in present if n in ODE]), ("stochastic solvers", [n for n in present
              if n not in ODE])]  # fmt: skip
    groups = [(title, names) for title, names in groups if names]
    fig, grid = plt.subplots(len(groups), 3, figsize=(16, 4.8 * len(groups)), squeeze=False)
    teacher = rows[0]
    floor = next(r for r in rows if r["solver"] == "real held-out digits")["fd"]
    tab = plt.get_cmap("tab20").colors
    colours = tab[0::2] + tab[1::2]  # ten distinct hues first, then their light shades
    same = {"ddim": "euler", "ddpm": "euler_ancestral"}  # the same updates in this form: drawn once
    for axes, (group, names) in zip(grid, groups):
        for k, name in enumerate(n for n in names if n not in same):
            pts = [r for r in rows if r["solver"] == name]
            twin = next((a for a, b in same.items() if b == name and a in names), None)
            label = f"{name} = {twin}" if twin else name
            for ax, key in zip(axes, ("fd", "accuracy", "teacher_rmse")):
                ax.plot([r["nfe"] for r in pts], [r[key] for r in pts], marker="o", ms=3, color=colours[k % 20],
                        label=label)  # fmt: skip
        axes[0].axhline(teacher["fd"], color="k", ls="--", lw=1, label=f"teacher ({int(teacher['nfe'])} NFE)")
        axes[0].axhline(floor, color="grey", ls=":", lw=1, label="real held-out digits")
        axes[1].axhline(teacher["accuracy"], color="k", ls="--", lw=1)
        titles = (
            "Frechet distance to real digits (lower is better)",
            "class accuracy",
            "RMSE to the teacher, same noise",
        )
        for ax, title in zip(axes, titles):
            ax.set_xscale("log")
            ax.set_xticks(NFES, [str(v) for v in NFES])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("NFE")
            ax.set_title(f"{group}: {title}", fontsize=10)
            ax.grid(alpha=0.3)
        axes[0].set_yscale("log")
        axes[2].set_yscale("log")
        axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle("Built-in digits model, Karras schedule, no guidance (CPU)", fontsize=11)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def read_rows(paths: list[Path]) -> list[dict]:
    """Rows of earlier runs' CSVs; for a solver in several, the last file's rows. The teacher and floor rows come
    from the first file."""
    by_solver: dict[str, list[dict]] = {}
    for path in paths:
        with open(path) as f:
            rows = [{k: v if k == "solver" else float(v) for k, v in r.items()} for r in csv.DictReader(f)]
        fresh: dict[str, list[dict]] = {}
        for r in rows:
            fresh.setdefault(r["solver"], []).append(r)
        for name, got in fresh.items():
            if name in SOLVERS or name not in by_solver:
                by_solver[name] = got
    return [r for got in by_solver.values() for r in got]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000, help="samples per configuration")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu"))
    p.add_argument("--solvers", default=",".join(SOLVERS), help="comma-separated subset of the solvers")
    p.add_argument("--replot", action="store_true", help="redraw the plot and table from --out's CSV")
    p.add_argument("--merge", type=Path, nargs="+", help="redraw from these CSVs (later files win per solver)")
    args = p.parse_args()
    names = [n for n in args.solvers.split(",") if n]
    unknown = sorted(set(names) - set(SOLVERS))
    if unknown:
        p.error(f"--solvers: unknown {', '.join(unknown)}; choose from {', '.join(SOLVERS)}")
    csv_path = args.out / "digits_quality.csv"
    if args.replot or args.merge:
        rows = read_rows(args.merge or [csv_path])
    else:
        rows = run(args.n, args.batch_size, names)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.replot:
        write_csv(rows, csv_path)
    plot(rows, args.out / "digits_quality.png")
    print("\n| solver | " + " | ".join(f"NFE {v}" for v in NFES) + " |")
    print("|---|" + "---|" * len(NFES))
    for name in SOLVERS:
        cells = [f"{r['fd']:.2f} / {r['accuracy']:.3f}" for r in rows if r["solver"] == name]
        if cells:
            print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"wrote {csv_path} and {args.out / 'digits_quality.png'}")


if __name__ == "__main__":
    main()
