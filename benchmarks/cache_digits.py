"""Feature caching against fewer steps at equal wall time, on the built-in digits model (runs on the CPU).

The built-in class-conditional digits UNet, no guidance, DPM-Solver++(2M) on the Karras schedule (sigma 0.002..80),
the same seeded noise for every row (sample i always starts from the same noise), timed on this machine's CPU with
--threads torch threads. For each budget of N steps:

* N steps without a cache;
* N steps with each cache form: DeepCache every 2nd and 3rd evaluation (fixed interval), the same with TaylorSeer
  extrapolation, first-block caching from a calibrated plan and decided at every evaluation (dynamic);

and, for the comparison that matters, the uncached loop at fewer steps (4 ... 20) and LD3's learned schedules at 4,
5, 6, 8 and 10 steps (benchmarks/results/cpu/ld3/schedules, learned by benchmarks/ld3_grid.py). Quality from
fastdiff's shipped digits classifier: the Frechet distance to the real digits, the class accuracy, and the RMSE to
the teacher (Heun, 32 steps) from the same noise. The wall time is the median of --reps runs of the whole batch,
taken round-robin over the rows; a calibrated first-block plan is made once, on a row's first run (its 4-sample
calibration is then not in the median).
Writes cache_digits.csv and cache_digits.png (quality against wall time) to --out and prints a Markdown table.

    python benchmarks/cache_digits.py --out benchmarks/results/cpu
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _training_runs import write_csv

from fastdiff import cache as fastcache
from fastdiff import evaluate, generate, metrics, models, schedules
from fastdiff.checkpoint import atomic_write

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
SOLVER = "dpmpp_2m"
BUDGETS = [10, 20]
CACHES = [
    "deepcache:2",
    "deepcache:3",
    "deepcache:2:taylor",
    "first_block:0.2",
    "first_block:0.2:dynamic",
    "first_block:0.2:taylor",
]
FEWER = [4, 5, 6, 8, 10, 12, 16, 20]
LD3_STEPS = [4, 5, 6, 8, 10]
LD3_DIR = Path(__file__).parent / "results" / "cpu" / "ld3" / "schedules"


def run(n_samples: int, batch_size: int, reps: int) -> list[dict]:
    model = models.get("digits")
    judge = evaluate.default_judge()
    cfg = model.config
    kw = dict(shape=(cfg.in_channels, cfg.resolution, cfg.resolution), num_classes=cfg.num_classes,
              batch_size=batch_size)  # fmt: skip
    indices = torch.arange(n_samples)
    teacher = evaluate.teacher_sample(model, indices, SIGMA_MIN, SIGMA_MAX, **kw)  # also warms the model up
    forms = [("no cache", steps, None, schedules.karras(steps, SIGMA_MIN, SIGMA_MAX), None, None) for steps in FEWER]
    for steps in LD3_STEPS:
        learned = schedules.load_schedule(LD3_DIR / f"digits_{SOLVER}_nfe{steps}.json", solver=SOLVER)
        forms.append(("LD3", steps, None, learned.sigmas, None, learned.eval_sigmas))
    for budget in BUDGETS:
        # one cache object per row, kept over its runs: a calibrated plan is made on the first run only
        forms += [(spec, budget, budget, schedules.karras(budget, SIGMA_MIN, SIGMA_MAX), fastcache.parse(spec), None)
                  for spec in CACHES]  # fmt: skip

    def sample(form):
        _, _, _, sigmas, cache, eval_sigmas = form
        t0 = time.perf_counter()
        gen = generate.generate(model, indices, sigmas, solver=SOLVER, cache=cache, eval_sigmas=eval_sigmas, **kw)
        return gen, time.perf_counter() - t0

    rows, times = [], []
    for form in forms:  # the quality, and a first time
        name, steps, budget = form[:3]
        gen, seconds = sample(form)
        times.append([seconds])
        rmse = metrics.teacher_error(gen.images, teacher.images)["rmse_mean"]
        full = gen.full_evaluations if gen.full_evaluations is not None else gen.nfe
        rows.append({"form": name, "budget": budget or "", "steps": steps, "full": full,
                     "cached": gen.cached_evaluations or 0, **judge(gen.images, gen.labels),
                     "teacher_rmse": float(rmse)})  # fmt: skip
    for _ in range(reps - 1):  # more times, round-robin, so that a slow spell of the machine spreads over the forms
        for k, form in enumerate(forms):
            times[k].append(sample(form)[1])
    for row, t in zip(rows, times):
        row["wall_s"] = statistics.median(t)
        print(f"{row['form']:26s} {row['steps']:2d} steps ({row['full']:2d} full + {row['cached']:2d} cached): "
              f"{row['wall_s']:.2f} s  FD {row['fd']:.3f}  accuracy {row['accuracy']:.3f}  "
              f"RMSE to teacher {row['teacher_rmse']:.4f}")  # fmt: skip
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    lines = [("no cache", "k", "-"), ("LD3", "tab:green", "--")]
    markers = dict(zip(CACHES, "osD^v<"))
    for ax, key, title in zip(axes, ("fd", "accuracy", "teacher_rmse"),
                              ("Frechet distance to real digits (lower is better)", "class accuracy",
                               "RMSE to the teacher, same noise")):  # fmt: skip
        for form, colour, style in lines:
            pts = sorted((r for r in rows if r["form"] == form), key=lambda r: r["wall_s"])
            ax.plot([r["wall_s"] for r in pts], [r[key] for r in pts], style, color=colour, marker=".",
                    label=f"{form}, {'/'.join(str(r['steps']) for r in pts)} steps")  # fmt: skip
        for budget, colour in zip(BUDGETS, ("tab:blue", "tab:red")):
            for spec in CACHES:
                r = next(r for r in rows if r["form"] == spec and r["budget"] == budget)
                ax.plot(r["wall_s"], r[key], markers[spec], color=colour, ms=6, mfc="none",
                        label=f"{budget} steps, {spec}")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("wall time of the batch (s)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if key != "accuracy":
            ax.set_yscale("log")
    axes[0].legend(fontsize=6.5, ncol=2)
    fig.suptitle(f"Feature caching against fewer steps: digits UNet, {SOLVER}, Karras, no guidance (CPU)",
                 fontsize=11)  # fmt: skip
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def table(rows: list[dict]) -> str:
    lines = ["| form | steps | full + cached | wall (s) | FD | accuracy | RMSE to teacher |", "|---" * 7 + "|"]
    for r in rows:
        lines.append(f"| {r['form']} | {r['steps']} | {r['full']} + {r['cached']} | {r['wall_s']:.2f} | "
                     f"{r['fd']:.3f} | {r['accuracy']:.3f} | {r['teacher_rmse']:.4f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu"))
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--reps", type=int, default=5, help="timed runs per row, round-robin (the median is reported)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = run(args.samples, args.batch_size, args.reps)
    write_csv(rows, args.out / "cache_digits.csv")
    plot(rows, args.out / "cache_digits.png")
    print(table(rows))
    print(f"wrote {args.out / 'cache_digits.csv'} and {args.out / 'cache_digits.png'}")


if __name__ == "__main__":
    main()
