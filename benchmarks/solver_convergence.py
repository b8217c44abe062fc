"""Quality per NFE of every solver on the exact Gaussian mixture (CPU; no GPU needed).

For each solver and step count, samples the built-in class-conditional mixture on the EDM schedule (Karras,
sigma 0.002..80, rho 7, ending in 0) from the same seeded noise and reports
  * the mean L2 error against the high-accuracy reference solve of the same ODE (RK45, rtol 1e-10), and
  * the sliced W2 distance to exact draws from the data distribution.
Writes solver_convergence.csv and solver_convergence.png to --out and prints a Markdown table.

    python benchmarks/solver_convergence.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

import fastdiff
from fastdiff import metrics, models, schedules, solvers
from fastdiff.ode import reference_sample

SOLVERS = {
    "euler": solvers.Euler(),
    "heun": solvers.Heun(),
    "dpmpp_2m": solvers.DPMSolverPP2M(),
    "dpmpp_3m": solvers.DPMSolverPP3M(),
    "dpmpp_3m (corrected)": solvers.DPMSolverPP3M(corrected=True),
    "ipndm": solvers.IPNDM(),
    "unipc bh1": solvers.UniPC(order=3, variant="bh1"),
    "unipc bh2": solvers.UniPC(order=3, variant="bh2"),
}
NFES = [4, 5, 6, 8, 10, 16, 32, 64]
HEUN_STEPS = [2, 3, 4, 5, 8, 16, 32]  # Heun spends 2N - 1 evaluations: NFE 3, 5, 7, 9, 15, 31, 63


def run(n: int, seed: int) -> tuple[list[dict], dict[str, float]]:
    model = models.builtin_gmm()
    noise = torch.randn(n, model.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    cond = {"class_labels": torch.arange(n) % model.num_classes}
    data = model.sample(n, torch.Generator().manual_seed(seed + 1), class_labels=cond["class_labels"])
    data2 = model.sample(n, torch.Generator().manual_seed(seed + 2), class_labels=cond["class_labels"])
    sw = lambda a: metrics.sliced_wasserstein(a, data, generator=torch.Generator().manual_seed(0))  # noqa: E731
    floors = {"two draws of the data": sw(data2)}
    refs: dict[int, torch.Tensor] = {}
    rows = []
    for name, solver in SOLVERS.items():
        for steps in HEUN_STEPS if name == "heun" else NFES:
            s = schedules.karras(steps, 0.002, 80.0)
            if steps not in refs:
                refs[steps] = reference_sample(model, noise * s[0], s, cond=cond)
            out, stats = fastdiff.sample(model, noise * s[0], s, solver=solver, cond=cond, return_stats=True)
            rows.append(
                {
                    "solver": name,
                    "steps": steps,
                    "nfe": stats.nfe,
                    "error": (out - refs[steps]).norm(dim=1).mean().item(),
                    "sliced_w2": sw(out),
                }
            )
    floors["exact ODE solve, same noise"] = sw(refs[max(NFES)])
    return rows, floors


def plot(rows: list[dict], floors: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for name in SOLVERS:
        pts = [r for r in rows if r["solver"] == name]
        style = "--" if "corrected" in name else "-"
        for ax, key in zip(axes, ("error", "sliced_w2")):
            ax.loglog([r["nfe"] for r in pts], [r[key] for r in pts], style, marker="o", ms=3, label=name)
    axes[0].set(xlabel="NFE", ylabel="mean L2 error vs exact ODE solve", title="Error against the exact solve")
    axes[1].set(xlabel="NFE", ylabel="sliced W2 to data", title="Distance to the true distribution")
    lines = [axes[1].axhline(v, color="k", lw=0.8, ls=ls, label=k) for (k, v), ls in zip(floors.items(), (":", "-."))]
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8, loc="upper right", handles=lines)
    ticks = NFES
    for ax in axes:
        ax.set_xticks(ticks, [str(t) for t in ticks], minor=False)
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
    fig.suptitle("fastdiff solvers on the exact Gaussian mixture (Karras schedule, sigma 0.002..80)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--n", type=int, default=1000, help="samples")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows, floors = run(args.n, args.seed)
    with open(args.out / "solver_convergence.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, floors, args.out / "solver_convergence.png")
    names = list(SOLVERS)
    print("| NFE | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for nfe in sorted({r["nfe"] for r in rows}):
        cells = [next((f"{r['error']:.3g}" for r in rows if r["solver"] == s and r["nfe"] == nfe), "–") for s in names]
        print(f"| {nfe} | " + " | ".join(cells) + " |")
    for k, v in floors.items():
        print(f"sliced W2 to data, {k}: {v:.4f}")


if __name__ == "__main__":
    main()
