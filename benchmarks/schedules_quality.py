"""Every named schedule at 4-10 NFE, against Karras and LD3, on the digits model and the exact mixture (CPU).

For the best few-step ODE solvers on the digits model (``ipndm``, ``deis``, ``dpmpp_2m``, ``unipc``; each spends
one evaluation per step) and NFE 4, 6, 8 and 10, every schedule of :data:`fastdiff.schedules.SCHEDULES` is run with
its defaults over EDM's range (sigma 0.002..80), except ``flow_shift``: it is a rectified-flow schedule (levels
``t / (1 - t)`` of a flow time) and neither model here is a flow model. Karras (rho 7) is the baseline, and Karras
over SD's range (sigma 0.0292..14.61, ``karras, SD range``) a control. LD3 is the learned schedule of
``benchmarks/results/cpu/ld3/schedules/`` where one was learned for that solver and NFE (with its evaluation sigmas).
Schedules that take a model's discrete table (``simple``, ``sgm_uniform``, ``ddim_uniform``, ``normal``) use Stable
Diffusion's by default, as ``align_your_steps`` and ``gits`` use their published SD 1.5 tables: those start at
sigma 14.6 (``ddim_uniform``: lower) and stop at 0.029, not at 80 and 0.002. A schedule that is identical to another
one (``exponential`` and ``polyexponential`` with rho 1 are ``logsnr_uniform``) is run once.

* **digits** (the built-in class-conditional UNet, no guidance): the same seeded noise per cell (sample indices
  from 1,000,000 on, which the LD3 schedules never saw: they were learned on indices 0-99), via
  :func:`fastdiff.generate.generate`; the Frechet distance (FD) to the real digits and the class accuracy from
  :mod:`fastdiff.evaluate`, and the RMSE to the teacher (Heun, 32 Karras steps, 63 NFE) from the same noise.
* **gmm** (the built-in Gaussian mixture, float64): the same seeded noise, mean L2 error against the exact ODE
  solve from the same starting point (:func:`fastdiff.ode.reference_sample`, RK45 at rtol 1e-10), and sliced W2
  to exact draws from the data.

Writes ``schedules_quality.csv`` and ``schedules_quality.png`` to --out and prints Markdown tables.

    python benchmarks/schedules_quality.py --out benchmarks/results/cpu        (about 12 min on one thread)
    python benchmarks/schedules_quality.py --replot --out benchmarks/results/cpu
    python benchmarks/schedules_quality.py --quick --out /tmp/x                  (a smoke test, under a minute)
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import torch

import fastdiff
from fastdiff import evaluate, generate, ld3, metrics, models, schedules
from fastdiff.checkpoint import atomic_write
from fastdiff.ode import reference_sample

SOLVERS = ["ipndm", "deis", "dpmpp_2m", "unipc"]
NFES = [4, 6, 8, 10]
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
NAMED = [name for name in schedules.SCHEDULES if name != "flow_shift"]
# Schedules whose levels are Stable Diffusion's (its discrete table, or a table published for SD 1.5), 0.029..14.6.
SD_LEVELS = {"sgm_uniform", "simple", "ddim_uniform", "normal", "align_your_steps", "gits"}
_SD_TABLE = ((1 - schedules.sd_alphas_cumprod()) / schedules.sd_alphas_cumprod()).sqrt()
SD_RANGE = (_SD_TABLE[0].item(), _SD_TABLE[-1].item())  # about 0.0292 and 14.61
KARRAS_SD = "karras, SD range"
LD3_DIR = Path(__file__).resolve().parent / "results" / "cpu" / "ld3" / "schedules"
FIRST_INDEX = 1_000_000  # held-out noise: LD3 learned on indices 0..99, ld3_grid.py scored on these too
FIELDS = ["dataset", "solver", "nfe", "schedule", "same_as", "fd", "accuracy", "teacher_rmse", "error", "sliced_w2",
          "sigmas"]  # fmt: skip
METRICS = {  # (dataset, column): panel title
    ("digits", "teacher_rmse"): "digits: RMSE to the teacher (Heun 63 NFE), same noise",
    ("digits", "fd"): "digits: Frechet distance to real digits",
    ("gmm", "error"): "mixture: mean L2 error against the exact ODE solve",
    ("gmm", "sliced_w2"): "mixture: sliced W2 to the data",
}


def schedule_cells(dataset: str, solver: str, nfe: int) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """``(name, sigmas, eval_sigmas)`` of every schedule for this cell: the named ones, then LD3 if learned."""
    steps = ld3.steps_for_nfe(solver, nfe)
    cells = [(name, schedules.get(name, steps, SIGMA_MIN, SIGMA_MAX), None) for name in NAMED]
    # A control: Karras's spacing over SD's range, to tell the range of the SD-level schedules from their spacing.
    cells.append((KARRAS_SD, schedules.karras(steps, *SD_RANGE), None))
    path = LD3_DIR / f"{dataset}_{solver}_nfe{nfe}.json"
    if path.exists():
        learned = schedules.load_schedule(path, solver=solver, nfe=nfe)
        cells.append(("ld3", learned.sigmas, learned.eval_sigmas))
    return cells


def _rounded(values: torch.Tensor | None) -> tuple | None:
    """Values to 10 significant digits: two constructions of one schedule (polyexponential with rho 1 and
    exponential) differ in the last bits only."""
    return None if values is None else tuple(f"{v:.10g}" for v in values.tolist())


def _key(solver: str, sigmas: torch.Tensor, eval_sigmas: torch.Tensor | None) -> tuple:
    return solver, _rounded(sigmas), _rounded(eval_sigmas)


def _row(dataset: str, solver: str, nfe: int, name: str, same_as: str, sigmas: torch.Tensor, **values) -> dict:
    row = {k: "" for k in FIELDS}
    row.update(dataset=dataset, solver=solver, nfe=nfe, schedule=name, same_as=same_as, **values)
    row["sigmas"] = " ".join(f"{v:.6g}" for v in sigmas.tolist())
    return row


def run_digits(n: int, solver_names: list[str], nfes: list[int]) -> list[dict]:
    model = models.get("digits")
    judge = evaluate.default_judge()
    cfg = model.config
    kw = dict(shape=(cfg.in_channels, cfg.resolution, cfg.resolution), num_classes=cfg.num_classes, batch_size=500)
    indices = torch.arange(FIRST_INDEX, FIRST_INDEX + n)
    t0 = time.perf_counter()
    teacher = evaluate.teacher_sample(model, indices, SIGMA_MIN, SIGMA_MAX, **kw)
    t_sig = schedules.karras(evaluate.TEACHER["steps"], SIGMA_MIN, SIGMA_MAX)
    rows = [_row("digits", "reference", teacher.nfe, f"teacher ({evaluate.TEACHER_LABEL}, karras)", "", t_sig,
                 **judge(teacher.images, teacher.labels), teacher_rmse=0.0)]  # fmt: skip
    floor, count = judge.real_floor(n)
    rows.append(_row("digits", "reference", 0, f"{count} real held-out digits", "", torch.zeros(0), fd=floor))
    print(f"digits: teacher FD {rows[0]['fd']:.3f} ({time.perf_counter() - t0:.0f} s); FD of {count} real "
          f"held-out digits {floor:.3f}", flush=True)  # fmt: skip
    done: dict[tuple, tuple[str, dict]] = {}
    for solver in solver_names:
        for nfe in nfes:
            for name, sigmas, ev in schedule_cells("digits", solver, nfe):
                key = _key(solver, sigmas, ev)
                if key in done:  # the same schedule under another name: the same numbers
                    first, values = done[key]
                    rows.append(_row("digits", solver, nfe, name, first, sigmas, **values))
                    continue
                t0 = time.perf_counter()
                gen = generate.generate(model, indices, sigmas, solver=solver, eval_sigmas=ev, **kw)
                if gen.nfe != nfe:
                    raise RuntimeError(f"{solver} spent {gen.nfe} evaluations on {name}, expected {nfe}")
                rmse = float(metrics.teacher_error(gen.images, teacher.images)["rmse_mean"])
                values = {**judge(gen.images, gen.labels), "teacher_rmse": rmse}
                done[key] = (name, values)
                rows.append(_row("digits", solver, nfe, name, "", sigmas, **values))
                took = time.perf_counter() - t0
                print(f"digits {solver:8s} NFE {nfe:2d} {name:17s} FD {values['fd']:7.3f} accuracy "
                      f"{values['accuracy']:.3f} RMSE {rmse:.4f} ({took:.1f} s)", flush=True)  # fmt: skip
    return rows


def run_gmm(n: int, solver_names: list[str], nfes: list[int], seed: int = 0) -> list[dict]:
    model = models.builtin_gmm()
    indices = torch.arange(FIRST_INDEX, FIRST_INDEX + n)
    noise = generate.sample_noise(indices, (model.dim,), seed)
    labels = generate.sample_labels(indices, model.num_classes, None)
    cond = {"class_labels": labels}
    data = model.sample(n, torch.Generator().manual_seed(seed + 1), class_labels=labels)
    data2 = model.sample(n, torch.Generator().manual_seed(seed + 2), class_labels=labels)
    sw = lambda a: metrics.sliced_wasserstein(a, data, generator=torch.Generator().manual_seed(0))  # noqa: E731
    rows = [_row("gmm", "reference", 0, "two draws of the data", "", torch.zeros(0), sliced_w2=sw(data2))]
    # The exact solve from the same start depends on the schedule only through its first level (all end in 0).
    refs: dict[str, torch.Tensor] = {}
    done: dict[tuple, tuple[str, dict]] = {}
    for solver in solver_names:
        for nfe in nfes:
            for name, sigmas, ev in schedule_cells("gmm", solver, nfe):
                key = _key(solver, sigmas, ev)
                if key in done:
                    first, values = done[key]
                    rows.append(_row("gmm", solver, nfe, name, first, sigmas, **values))
                    continue
                x_T = noise * sigmas[0]
                start = float(sigmas[0])
                at = f"{start:.10g}"  # 80 and 79.99999999999997 (LD3's) start the same solve
                if at not in refs:
                    refs[at] = reference_sample(model, x_T, torch.tensor([start, 0.0], dtype=torch.float64),
                                                cond=cond)  # fmt: skip
                    rows.append(_row("gmm", "reference", 0, f"exact ODE solve from sigma {start:.9g}", "",
                                     torch.tensor([start, 0.0]), error=0.0, sliced_w2=sw(refs[at])))  # fmt: skip
                sampler = fastdiff.Sampler(model, solver=solver, sigmas=sigmas, eval_sigmas=ev)
                with torch.no_grad():
                    out = sampler.sample(x_T, cond)
                if sum(sampler.nfe) != nfe:
                    raise RuntimeError(f"{solver} spent {sum(sampler.nfe)} evaluations on {name}, expected {nfe}")
                values = {"error": (out - refs[at]).norm(dim=1).mean().item(), "sliced_w2": sw(out)}
                done[key] = (name, values)
                rows.append(_row("gmm", solver, nfe, name, "", sigmas, **values))
                print(f"gmm    {solver:8s} NFE {nfe:2d} {name:17s} error {values['error']:.4f} sliced W2 "
                      f"{values['sliced_w2']:.4f}", flush=True)  # fmt: skip
    return rows


def read_rows(path: Path) -> list[dict]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["nfe"] = int(r["nfe"])
        for k in ("fd", "accuracy", "teacher_rmse", "error", "sliced_w2"):
            r[k] = float(r[k]) if r[k] != "" else math.nan
    return rows


def _value(rows: list[dict], dataset: str, solver: str, nfe: int, name: str, metric: str) -> float:
    for r in rows:
        if (r["dataset"], r["solver"], r["nfe"], r["schedule"]) == (dataset, solver, nfe, name):
            v = r[metric]
            return float(v) if v != "" else math.nan
    return math.nan


def _shown(rows: list[dict]) -> list[tuple[str, str]]:
    """``(name, label)`` of the schedules drawn: Karras, LD3, then the named ones, each duplicate folded into the
    schedule it equals (it has the same numbers everywhere)."""
    names = [n for n in ["karras", KARRAS_SD, "ld3", *NAMED] if any(r["schedule"] == n for r in rows)]
    names = list(dict.fromkeys(names))
    aliases: dict[str, set[str]] = {}
    for r in rows:
        if r["same_as"]:
            aliases.setdefault(r["schedule"], set()).add(r["same_as"])
    folded = {n for n, of in aliases.items() if len(of) == 1 and all(
        r["same_as"] for r in rows if r["schedule"] == n and r["solver"] != "reference")}  # fmt: skip
    shown = []
    for n in names:
        if n in folded:
            continue
        twins = [a for a in names if a in folded and aliases[a] == {n}]
        shown.append((n, " = ".join([n, *twins]) + (" (SD levels)" if n in SD_LEVELS else "")))
    return shown


def plot(rows: list[dict], path: Path) -> None:
    """One heatmap per dataset and metric: schedules down, (solver, NFE) across. The colour is log2 of the value
    over Karras's in the same column (blue better, red worse); the number is the value itself, the best of each
    column boxed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    cols = sorted({(r["solver"], r["nfe"]) for r in rows if r["solver"] != "reference"},
                  key=lambda c: (SOLVERS.index(c[0]) if c[0] in SOLVERS else 99, c[1]))  # fmt: skip
    shown = _shown(rows)
    panels = [(k, t) for k, t in METRICS.items() if any(r["dataset"] == k[0] for r in rows)]
    size = (max(8.0, 0.78 * len(cols) + 3.5), (0.34 * len(shown) + 1.2) * len(panels))
    fig, axes = plt.subplots(len(panels), 1, figsize=size, squeeze=False)
    for ax, ((dataset, metric), title) in zip(axes[:, 0], panels):
        vals = np.array([[_value(rows, dataset, s, nfe, n, metric) for s, nfe in cols] for n, _ in shown])
        base = np.array([_value(rows, dataset, s, nfe, "karras", metric) for s, nfe in cols])
        with np.errstate(invalid="ignore", divide="ignore"):
            rel = np.log2(vals / base)
        im = ax.imshow(np.ma.masked_invalid(rel), cmap="RdBu_r", vmin=-3, vmax=3, aspect="auto")
        im.cmap.set_bad("0.85")
        for i in range(vals.shape[0]):
            for j in range(vals.shape[1]):
                if np.isfinite(vals[i, j]):
                    v = vals[i, j]
                    text = f"{v:.3g}" if v < 100 else f"{v:.0f}"
                    ax.text(j, i, text, ha="center", va="center", fontsize=6.5,
                            color="white" if abs(rel[i, j]) > 2 else "black")  # fmt: skip
        for j in range(vals.shape[1]):
            col = vals[:, j]
            if np.isfinite(col).any():
                i = int(np.nanargmin(col))
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=1.6, ec="k"))
        ax.set_yticks(range(len(shown)), [label for _, label in shown], fontsize=7.5)
        ax.set_xticks(range(len(cols)), [f"{s}\n{nfe}" for s, nfe in cols], fontsize=7)
        for j in range(1, len(cols)):
            if cols[j][0] != cols[j - 1][0]:
                ax.axvline(j - 0.5, color="k", lw=1.2)
        ax.set_title(f"{title} (lower is better)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01)
    fig.suptitle("Named schedules at 4-10 NFE on the CPU. Columns: solver, NFE; boxed: the column's best; colour: log2 "
                 "of the value over Karras's (blue better); grey: no LD3 schedule", fontsize=9)  # fmt: skip
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.25 / size[1]))
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def markdown(rows: list[dict]) -> str:
    """The best schedule per solver and NFE for each metric (with Karras's and LD3's values), then the full grid
    per metric."""
    cols = sorted({(r["solver"], r["nfe"]) for r in rows if r["solver"] != "reference"},
                  key=lambda c: (SOLVERS.index(c[0]) if c[0] in SOLVERS else 99, c[1]))  # fmt: skip
    shown = _shown(rows)
    lines = []
    panels = [(k, t) for k, t in METRICS.items() if any(r["dataset"] == k[0] for r in rows)]
    head = "| solver | NFE | " + " | ".join(f"{t.split(':')[0]} {k[1]}: best / karras / ld3" for k, t in panels)
    lines += ["Best schedule per cell (value), with Karras and LD3:", "", head + " |",
              "|---|---:|" + "---|" * len(panels)]  # fmt: skip
    for solver, nfe in cols:
        cells = []
        for (dataset, metric), _ in panels:
            vals = {n: _value(rows, dataset, solver, nfe, n, metric) for n, _ in shown}
            vals = {n: v for n, v in vals.items() if not math.isnan(v)}
            best = min(vals, key=vals.get)
            ld3_txt = f"{vals['ld3']:.3g}" if "ld3" in vals else "–"
            cells.append(f"{best} {vals[best]:.3g} / {vals['karras']:.3g} / {ld3_txt}")
        lines.append(f"| {solver} | {nfe} | " + " | ".join(cells) + " |")
    for (dataset, metric), title in panels:
        lines += ["", f"{title}:", "", "| schedule | " + " | ".join(f"{s} {nfe}" for s, nfe in cols) + " |",
                  "|---|" + "---:|" * len(cols)]  # fmt: skip
        table = {n: [_value(rows, dataset, s, nfe, n, metric) for s, nfe in cols] for n, _ in shown}
        best = [min((v[j] for v in table.values() if not math.isnan(v[j])), default=math.nan) for j in range(len(cols))]
        for n, label in shown:
            txt = ["–" if math.isnan(v) else (f"**{v:.3g}**" if v == best[j] else f"{v:.3g}")
                   for j, v in enumerate(table[n])]  # fmt: skip
            lines.append(f"| {label} | " + " | ".join(txt) + " |")
    refs = list({(r["dataset"], r["schedule"]): r for r in rows if r["solver"] == "reference"}.values())
    lines += ["", "References:"] + [
        f"- {r['dataset']}: {r['schedule']}: "
        + ", ".join(f"{k} {r[k]:.4g}" for k in ("fd", "accuracy", "sliced_w2") if not math.isnan(float(r[k] or "nan")))
        for r in refs
    ]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=500, help="digits samples per cell (default 500)")
    p.add_argument("--n-gmm", type=int, default=2000, help="mixture samples per cell (default 2000)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu"))
    p.add_argument("--solvers", default=",".join(SOLVERS), help="comma-separated subset of the solvers")
    p.add_argument("--datasets", default="digits,gmm", help="comma-separated subset of digits,gmm")
    p.add_argument("--quick", action="store_true", help="smoke test: 40 digits, 200 mixture samples, NFE 4 only")
    p.add_argument("--replot", action="store_true", help="redraw the plot and tables from --out's CSV")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args()
    names = [s for s in args.solvers.split(",") if s]
    unknown = sorted(set(names) - set(SOLVERS))
    if unknown:
        p.error(f"--solvers: unknown {', '.join(unknown)}; choose from {', '.join(SOLVERS)}")
    datasets = [d for d in args.datasets.split(",") if d]
    if set(datasets) - {"digits", "gmm"}:
        p.error(f"--datasets: choose from digits, gmm, got {args.datasets!r}")
    if args.n < 2 or args.n_gmm < 2:
        p.error("--n and --n-gmm must be at least 2 (FD and sliced W2 need two samples)")
    torch.set_num_threads(args.threads)
    csv_path, png_path = args.out / "schedules_quality.csv", args.out / "schedules_quality.png"
    if args.replot:
        rows = read_rows(csv_path)
    else:
        nfes = [4] if args.quick else NFES
        n, n_gmm = (40, 200) if args.quick else (args.n, args.n_gmm)
        t0 = time.perf_counter()
        rows = []
        if "digits" in datasets:
            rows += run_digits(n, names, nfes)
        if "gmm" in datasets:
            rows += run_gmm(n_gmm, names, nfes)
        print(f"total {time.perf_counter() - t0:.0f} s", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=FIELDS)
                w.writeheader()
                w.writerows(rows)

        atomic_write(csv_path, write)
        rows = read_rows(csv_path)
    plot(rows, png_path)
    print(markdown(rows))
    print(f"wrote {csv_path} and {png_path}")


if __name__ == "__main__":
    main()
