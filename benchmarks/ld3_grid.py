"""LD3 against hand-designed and optimised schedules, per model, solver and NFE.

For each model (the exact Gaussian mixture and the built-in digits UNet), each solver and each NFE, five
schedules are compared on held-out noise (teacher pairs the schedules never saw):

* ``karras``, ``time_uniform``, ``logsnr_uniform``: the hand-designed schedules;
* ``gits``: the GITS-style dynamic programme (:mod:`fastdiff.gits`; grid of 64 Karras points, 64 samples);
* ``ld3``: learned by :func:`fastdiff.train.ld3.train_ld3` on 50 training and 50 validation pairs (the paper's
  split), defaults of :class:`~fastdiff.train.ld3.LD3Config`, L2 metric (lpips cannot be imported here).

Metrics: the teacher error (per-sample RMSE to the teacher's sample from the same noise, averaged) and, for
digits, the Fréchet distance and class accuracy of the same held-out samples (:mod:`fastdiff.evaluate`), plus the
wall time of each LD3 run. The teacher is Heun with 32 steps on the Karras schedule (63 NFE).

    python benchmarks/ld3_grid.py --out benchmarks/results/cpu/ld3     (about 70 min on one CPU thread)
    python benchmarks/ld3_grid.py --replot --out benchmarks/results/cpu/ld3

Rows are appended to ``ld3_grid.csv`` as they finish, and a rerun skips the cells already there. Learned
schedules are saved as ``schedules/<model>_<solver>_nfe<N>.json`` (loadable by ``fastdiff sample --schedule``).
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import fastdiff  # noqa: E402
from fastdiff import evaluate, gits, ld3, metrics, models, schedules  # noqa: E402
from fastdiff.train.ld3 import LD3Config, train_ld3  # noqa: E402

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
HAND = ("karras", "time_uniform", "logsnr_uniform")
SCHEDULES = (*HAND, "gits", "ld3")
FIELDS = ["model", "solver", "nfe", "schedule", "rmse", "fd", "accuracy", "ld3_seconds", "sigmas"]
SPECS = {  # shape, classes, dtype, held-out pairs
    "gmm": ((2,), 4, torch.float64, 1000),
    "digits": ((1, 16, 16), 10, torch.float32, 500),
}


def pairs_for(model, name: str, out: Path, n: int, first_index: int) -> ld3.TeacherPairs:
    path = out / f"{name}_pairs_{first_index}_{n}.safetensors"
    if path.exists():
        return ld3.TeacherPairs.load(path)
    shape, classes, dtype, _ = SPECS[name]
    kw = dict(shape=shape, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, num_classes=classes, dtype=dtype)
    pairs = ld3.make_teacher_pairs(model, n, first_index=first_index, model_name=name, **kw)
    pairs.save(path)
    return pairs


def run(args) -> None:
    out = args.out
    (out / "schedules").mkdir(parents=True, exist_ok=True)
    csv_path = out / "ld3_grid.csv"
    done = set()
    if csv_path.exists():
        with open(csv_path) as f:
            done = {(r["model"], r["solver"], int(r["nfe"]), r["schedule"]) for r in csv.DictReader(f)}
    new_file = not csv_path.exists()
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new_file:
            writer.writeheader()
        for name in args.models:
            model = models.get(name)
            shape, classes, dtype, n_held = SPECS[name]
            train_pairs = pairs_for(model, name, out, 100, 0)
            held = pairs_for(model, name, out, n_held, 1_000_000)
            tr, va = train_pairs.split(50)
            grid_sig, cost = gits.cost_matrix(model, shape=shape, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, grid=64,
                                              n=64, num_classes=classes, dtype=dtype)  # fmt: skip
            judge = evaluate.default_judge() if name == "digits" else None
            cond = {"class_labels": held.labels}
            for solver in args.solvers:
                for nfe in args.nfes:
                    steps = ld3.steps_for_nfe(solver, nfe)
                    for sched in SCHEDULES:
                        if (name, solver, nfe, sched) in done:
                            continue
                        seconds, eval_sigmas = float("nan"), None
                        if sched in HAND:
                            sigmas = schedules.get(sched, steps, SIGMA_MIN, SIGMA_MAX)
                        elif sched == "gits":
                            sigmas = grid_sig[gits.best_path(cost, steps)]
                        else:
                            res = train_ld3(model, solver, tr, va, steps=steps, sigma_min=SIGMA_MIN,
                                            sigma_max=SIGMA_MAX, config=LD3Config(metric="l2"))  # fmt: skip
                            sigmas, eval_sigmas, seconds = res.sigmas, res.eval_sigmas, res.seconds
                            schedules.save(out / "schedules" / f"{name}_{solver}_nfe{nfe}.json", sigmas,
                                           eval_sigmas=eval_sigmas, solver=solver, nfe=nfe, model=name,
                                           metric=res.metric, seconds=round(seconds, 1), log=res.log)  # fmt: skip
                        with torch.no_grad():
                            x = fastdiff.Sampler(model, solver=solver, sigmas=sigmas, eval_sigmas=eval_sigmas).sample(
                                held.noise, cond
                            )
                        rmse = metrics.teacher_error(x, held.target)["rmse_mean"]
                        row = {"model": name, "solver": solver, "nfe": nfe, "schedule": sched, "rmse": rmse,
                               "fd": "", "accuracy": "", "ld3_seconds": seconds,
                               "sigmas": " ".join(f"{v:.5g}" for v in sigmas.tolist())}  # fmt: skip
                        if judge is not None:
                            images = x.clamp(-1, 1)
                            row["fd"], row["accuracy"] = (
                                judge.fd(images, held.labels),
                                judge.accuracy(images, held.labels),
                            )
                        writer.writerow(row)
                        f.flush()
                        fd_text = f" fd {row['fd']:.3f}" if judge is not None else ""
                        print(f"{name} {solver} NFE {nfe} {sched}: rmse {rmse:.4f}{fd_text}", flush=True)
    plot(csv_path, out / "ld3_grid.png")


def read_rows(csv_path: Path) -> list[dict]:
    with open(csv_path) as f:
        return list(csv.DictReader(f))


def plot(csv_path: Path, png: Path) -> None:
    rows = read_rows(csv_path)
    names = [m for m in SPECS if any(r["model"] == m for r in rows)]
    solvers_ = sorted({r["solver"] for r in rows}, key=lambda s: ["euler", "dpmpp_2m", "ipndm", "unipc"].index(s))
    fig, axes = plt.subplots(len(names), len(solvers_), figsize=(3.4 * len(solvers_), 3.0 * len(names)),
                             squeeze=False)  # fmt: skip
    for a, name in enumerate(names):
        for b, solver in enumerate(solvers_):
            ax = axes[a, b]
            for sched in SCHEDULES:
                pts = sorted((int(r["nfe"]), float(r["rmse"])) for r in rows
                             if r["model"] == name and r["solver"] == solver and r["schedule"] == sched)  # fmt: skip
                if pts:
                    ax.plot(*zip(*pts), marker="o", ms=3, lw=2.2 if sched == "ld3" else 1.2, label=sched)
            ax.set_yscale("log")
            ax.set_title(f"{name}: {solver}", fontsize=9)
            ax.set_xlabel("NFE")
            if b == 0:
                ax.set_ylabel("teacher RMSE (held-out)")
            ax.grid(alpha=0.3, which="both")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=130)
    print(f"wrote {png}")


def markdown(csv_path: Path) -> str:
    """Teacher RMSE per cell, best schedule in bold, with LD3's gain over the best other schedule."""
    rows = read_rows(csv_path)
    lines = []
    for name in [m for m in SPECS if any(r["model"] == m for r in rows)]:
        head = "| solver | NFE | " + " | ".join(SCHEDULES) + " | gain vs hand | gain vs GITS | LD3 time |"
        lines += [f"**{name}**: teacher RMSE on held-out noise; LD3's gain is 1 - LD3 / best hand-designed, and"
                  " 1 - LD3 / GITS", "", head, "|---|---:|" + "---:|" * (len(SCHEDULES) + 3)]  # fmt: skip
        cells: dict = {}
        for r in rows:
            if r["model"] == name:
                cells.setdefault((r["solver"], int(r["nfe"])), {})[r["schedule"]] = r
        for (solver, nfe), c in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            vals = {s: float(c[s]["rmse"]) for s in SCHEDULES if s in c}
            best = min(vals.values())
            txt = [
                f"**{vals[s]:.4f}**" if vals.get(s) == best else (f"{vals[s]:.4f}" if s in vals else "")
                for s in SCHEDULES
            ]
            gains = ["", ""]
            if "ld3" in vals:
                refs = (min(vals[s] for s in HAND if s in vals), vals.get("gits"))
                gains = [f"{1 - vals['ld3'] / ref:+.0%}" if ref else "" for ref in refs]
            secs = f"{float(c['ld3']['ld3_seconds']):.0f} s" if "ld3" in c else ""
            lines.append(f"| {solver} | {nfe} | " + " | ".join(txt) + f" | {gains[0]} | {gains[1]} | {secs} |")
        lines.append("")
        if name == "digits":
            head = "| solver | NFE | " + " | ".join(SCHEDULES) + " |"
            lines += ["**digits**, Fréchet distance / accuracy of the same 500 held-out samples", "", head,
                      "|---|---:|" + "---:|" * len(SCHEDULES)]  # fmt: skip
            for (solver, nfe), c in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1])):
                txt = [f"{float(c[s]['fd']):.3f} / {float(c[s]['accuracy']):.3f}" if s in c else "" for s in SCHEDULES]
                lines.append(f"| {solver} | {nfe} | " + " | ".join(txt) + " |")
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="gmm,digits")
    p.add_argument("--solvers", default="euler,dpmpp_2m,ipndm,unipc")
    p.add_argument("--nfes", default="4,5,6,8,10")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu/ld3"))
    p.add_argument("--replot", action="store_true", help="redraw the plot and table from the CSV")
    args = p.parse_args()
    args.models, args.solvers = args.models.split(","), args.solvers.split(",")
    args.nfes = [int(v) for v in args.nfes.split(",")]
    torch.set_num_threads(args.threads)
    if not args.replot:
        t0 = time.perf_counter()
        run(args)
        print(f"total {time.perf_counter() - t0:.0f} s")
    else:
        plot(args.out / "ld3_grid.csv", args.out / "ld3_grid.png")
    print(markdown(args.out / "ld3_grid.csv"))


if __name__ == "__main__":
    main()
