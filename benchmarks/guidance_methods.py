"""Guidance methods against the guidance scale, over every noise level and limited to the middle ones (runs on the
CPU; no GPU needed).

For each method of fastdiff.Guidance (plain CFG, rescale, APG, CFG-Zero*, CFG++), each scale w (CFG++: its lambda,
0.2 ... 1), and guidance either at every step or only in the interval (0.3, 3.0] (Kynkaenniemi et al. 2024's idea:
guide the middle noise levels):

* **the exact mixture** (the built-in 2-D Gaussian mixture, 2000 class-conditional samples, DPM-Solver++(2M),
  32 Karras steps): the sliced Wasserstein-2 distance of each class's samples to exact draws of that class,
  averaged over the classes, so how far guidance pulls the samples from the true conditional distribution;
* **the digits** (the built-in class-conditional digits model, 500 samples from the same seeded noise,
  DPM-Solver++(2M), 10 Karras steps): the Frechet distance to the real digits and the class accuracy from
  fastdiff's shipped classifier.

The methods' options: rescale phi = 0.7 (its paper's value), APG eta = 0 and momentum -0.5, CFG-Zero* without
zero-init (the digits and the mixture are not flow models). Writes guidance_methods.csv and guidance_methods.png
to --out and prints a Markdown table.

    python benchmarks/guidance_methods.py --out benchmarks/results/cpu
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch

import fastdiff
from fastdiff import Guidance, evaluate, generate, metrics, models, schedules
from fastdiff.checkpoint import atomic_write

METHODS = {
    "cfg": {},
    "rescale": {"phi": 0.7},
    "apg": {"eta": 0.0, "momentum": -0.5},
    "cfg_zero_star": {},
    "cfg_pp": {},
}
INTERVAL = (0.3, 3.0)
SCALES = [1.5, 2.0, 3.0, 4.0, 6.0]
LAMBDAS = [0.2, 0.4, 0.6, 0.8, 1.0]  # CFG++'s lambda: D_u + lambda (D_c - D_u), re-noised along D_u


def _scales(method: str) -> list[float]:
    return LAMBDAS if method == "cfg_pp" else SCALES


SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def _guidance(method: str, w: float, interval) -> Guidance:
    return Guidance(w, interval, method=method, **METHODS[method])


def mixture_rows(n: int) -> list[dict]:
    model = models.get("gmm")
    sigmas = schedules.karras(32, SIGMA_MIN, SIGMA_MAX)
    noise = torch.randn(n, model.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.arange(n) % model.num_classes
    cond, uncond = {"class_labels": labels}, {"class_labels": torch.full_like(labels, -1)}
    exact = model.sample(n, torch.Generator().manual_seed(1), class_labels=labels)

    def distance(x: torch.Tensor) -> float:
        per_class = [metrics.sliced_wasserstein(x[labels == k], exact[labels == k],
                                                generator=torch.Generator().manual_seed(2))
                     for k in range(model.num_classes)]  # fmt: skip
        return sum(per_class) / len(per_class)

    rows = []
    plain = fastdiff.sample(model, noise * SIGMA_MAX, sigmas, cond=cond)
    rows.append({"model": "gmm", "method": "none", "interval": "-", "w": 1.0, "sw2": distance(plain)})
    for method in METHODS:
        for interval in (None, INTERVAL):
            for w in _scales(method):
                g = _guidance(method, w, interval)
                x = fastdiff.sample(model, noise * SIGMA_MAX, sigmas, guidance=g, cond=cond, uncond=uncond)
                rows.append({"model": "gmm", "method": method, "interval": _where(interval), "w": w,
                             "sw2": distance(x)})  # fmt: skip
                print(f"gmm    {method:14s} {_where(interval):10s} w {w:3.1f}: sliced W2 {rows[-1]['sw2']:.4f}")
    return rows


def digits_rows(n: int, batch_size: int) -> list[dict]:
    model = models.get("digits")
    judge = evaluate.default_judge()
    cfg = model.config
    kw = dict(shape=(cfg.in_channels, cfg.resolution, cfg.resolution), num_classes=cfg.num_classes,
              batch_size=batch_size)  # fmt: skip
    indices = torch.arange(n)
    sigmas = schedules.karras(10, SIGMA_MIN, SIGMA_MAX)
    rows = []
    gen = generate.generate(model, indices, sigmas, **kw)
    rows.append({"model": "digits", "method": "none", "interval": "-", "w": 1.0, "nfe": gen.nfe,
                 **judge(gen.images, gen.labels)})  # fmt: skip
    for method in METHODS:
        for interval in (None, INTERVAL):
            for w in _scales(method):
                t0 = time.perf_counter()
                gen = generate.generate(model, indices, sigmas, guidance=_guidance(method, w, interval), **kw)
                row = {"model": "digits", "method": method, "interval": _where(interval), "w": w, "nfe": gen.nfe,
                       **judge(gen.images, gen.labels)}  # fmt: skip
                rows.append(row)
                print(f"digits {method:14s} {_where(interval):10s} w {w:3.1f}: NFE {gen.nfe} FD {row['fd']:.3f} "
                      f"accuracy {row['accuracy']:.3f} ({time.perf_counter() - t0:.1f} s)")  # fmt: skip
    return rows


def _where(interval) -> str:
    return "all" if interval is None else f"({interval[0]:g}, {interval[1]:g}]"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    colours = dict(zip(METHODS, plt.get_cmap("tab10").colors))
    panels = [("gmm", "sw2", "mixture: sliced W2 to the exact class distributions (lower is better)"),
              ("digits", "fd", "digits: FD to real digits (lower is better)"),
              ("digits", "accuracy", "digits: class accuracy")]  # fmt: skip
    for ax, (model, key, title) in zip(axes, panels):
        base = next(r for r in rows if r["model"] == model and r["method"] == "none")
        ax.axhline(base[key], color="grey", ls=":", lw=1, label="no guidance")
        for method in METHODS:
            for interval, style in (("all", "-"), (_where(INTERVAL), "--")):
                pts = [r for r in rows if r["model"] == model and r["method"] == method and r["interval"] == interval]
                ax.plot([r["w"] for r in pts], [r[key] for r in pts], style, marker="o", ms=3,
                        color=colours[method], label=f"{method}, {interval}")  # fmt: skip
        ax.set_xlabel("guidance scale w (CFG++: its lambda)")
        ax.set_xscale("log")
        if key != "accuracy":
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle("Guidance methods, every step (solid) or the interval (0.3, 3.0] (dashed); DPM-Solver++(2M), CPU",
                 fontsize=11)  # fmt: skip
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def table(rows: list[dict]) -> str:
    lines = ["| method | guided | w | mixture sliced W2 | digits FD | digits accuracy | digits NFE |", "|---" * 7 + "|"]
    digits = {(r["method"], r["interval"], r["w"]): r for r in rows if r["model"] == "digits"}
    for r in (r for r in rows if r["model"] == "gmm"):
        d = digits[(r["method"], r["interval"], r["w"])]
        lines.append(f"| {r['method']} | {r['interval']} | {r['w']:g} | {r['sw2']:.4f} | {d['fd']:.3f} | "
                     f"{d['accuracy']:.3f} | {d['nfe']} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu"))
    ap.add_argument("--mixture-samples", type=int, default=2000)
    ap.add_argument("--digits-samples", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=500)
    args = ap.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    rows = mixture_rows(args.mixture_samples) + digits_rows(args.digits_samples, args.batch_size)
    args.out.mkdir(parents=True, exist_ok=True)
    fields = ["model", "method", "interval", "w", "sw2", "nfe", "fd", "accuracy"]

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(args.out / "guidance_methods.csv", write)
    plot(rows, args.out / "guidance_methods.png")
    print(table(rows))
    print(f"wrote {args.out / 'guidance_methods.csv'} and {args.out / 'guidance_methods.png'}")


if __name__ == "__main__":
    main()
