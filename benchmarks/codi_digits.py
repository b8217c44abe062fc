"""CoDi on the digits: 4x super-resolution (and class) in 1, 2 and 4 steps against the teacher at 10 and 50.

The built-in digits model is the teacher. Students (``fastdiff train codi --condition lowres4+class``; full CoDi
and PE-CoDi, read from --runs, trained there first when missing) take the 4x4 average-pooled image and the class,
and sample by multistep consistency sampling at 1, 2 and 4 steps (noise levels from the training grid). The
teacher samples with iPNDM on the Karras schedule (fastdiff's best at 10 NFE on this model, BENCHMARKS.md) at 10
and 50 steps, conditioned on the class by its own labels and on the low-res image by replacement
(:class:`fastdiff.train.codi.LowResReplacement`: the denoised estimate's 4x4 block means are set to the input's
at every evaluation).

Inputs are the 359 held-out digits (test split), each sample from the same noise for every method. Reported:
the Fréchet distance to the real digits and the class accuracy (fastdiff's digits classifier), the RMSE to the
ground-truth 16x16 image, the RMSE of the output's 4x4 block means to the input (how well the condition holds),
and the wall time per batch of 359 on one thread. LPIPS needs torchvision, which this machine lacks. Writes
codi_digits.csv and codi_digits.png (sample grids and FD against wall time) to --out and prints a Markdown table.

    python benchmarks/codi_digits.py --runs runs/codi --out benchmarks/results/cpu/codi
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _training_runs import train_missing, write_csv

import fastdiff
from fastdiff import evaluate, models, schedules
from fastdiff.data import DigitsDataset, image_grid
from fastdiff.train.codi import LowResCondition, LowResReplacement, load_student, student_solver

STUDENTS = {"full": ["--trainable", "all"], "pe": ["--trainable", "adapter"]}  # run folder: options
STUDENT_STEPS = [1, 2, 4]
TEACHER_STEPS = [10, 50]
FACTOR = 4


def student_sigmas(student, steps: int) -> torch.Tensor:
    """``steps`` noise levels from the student's training grid, evenly spaced in its index, from the top, then 0."""
    grid = student.codi_config.grid()
    n = len(grid) - 1
    return torch.stack([grid[round(n * (1 - i / steps))] for i in range(steps)] + [grid.new_zeros(())])


def timed(fn, *args, **kwargs) -> tuple[torch.Tensor, float]:
    """``fn``'s images, clamped to [-1, 1], and its wall time."""
    t0 = time.perf_counter()
    with torch.no_grad():
        out = fn(*args, **kwargs).clamp(-1, 1)
    return out, time.perf_counter() - t0


def measure(name: str, steps: int, out: torch.Tensor, wall: float, truth, lowres, labels, judge) -> dict:
    rmse = float((out - truth).square().mean().sqrt())
    rmse_lowres = float((F.avg_pool2d(out, FACTOR) - lowres).square().mean().sqrt())
    row = {"method": name, "steps": steps, "nfe": steps, **judge(out, labels), "rmse_truth": rmse,
           "rmse_lowres": rmse_lowres, "batch_s": wall}  # fmt: skip
    print(f"{name:10s} {steps:2d} steps: FD {row['fd']:.3f} accuracy {row['accuracy']:.3f} RMSE to truth "
          f"{row['rmse_truth']:.4f} to the input {row['rmse_lowres']:.4f}, {wall:.2f} s", flush=True)  # fmt: skip
    return row


def plot(rows: list[dict], grids: dict[str, torch.Tensor], truth, cond, floor: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("input (4x4, upsampled)", cond), *grids.items(), ("ground truth", truth)]
    fig = plt.figure(figsize=(15, 5.2))
    for i, (title, images) in enumerate(panels):
        ax = fig.add_subplot(2, len(panels), i + 1)
        ax.imshow(image_grid(images[:20], nrow=4), cmap="gray", vmin=0, vmax=255)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    ax = fig.add_subplot(2, 1, 2)
    for method in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == method]
        ax.plot([r["batch_s"] for r in sel], [r["fd"] for r in sel], "o-", label=method)
        for r in sel:
            ax.annotate(f"{r['steps']}", (r["batch_s"], r["fd"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(floor, color="gray", ls="--", lw=1, label="real held-out digits")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("wall time per batch of 359 (s, 1 thread; labels: steps)")
    ax.set_ylabel("FD to real digits")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, default=Path("runs/codi"), help="holds one folder per student")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu/codi"))
    p.add_argument("--train-steps", type=int, default=1500, help="budget of a missing student (steps)")
    p.add_argument("--train-batch", type=int, default=64, help="budget of a missing student (batch)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    args = p.parse_args()
    torch.set_num_threads(1)
    judge = evaluate.default_judge()
    held = DigitsDataset(16, split="test")
    truth, labels = held.images, held.labels
    lowres = F.avg_pool2d(truth, FACTOR)
    cond = LowResCondition(1, FACTOR).from_lowres(lowres)
    noise = torch.randn(truth.shape, generator=torch.Generator().manual_seed(args.seed))
    floor, count = judge.real_floor(len(truth))
    rows, grids = [], {}
    teacher = models.builtin_digits()
    replaced = LowResReplacement(teacher, lowres, FACTOR)
    for steps in TEACHER_STEPS:
        sig = schedules.karras(steps, 0.002, 80.0)
        out, wall = timed(fastdiff.sample, replaced, noise * 80.0, sig, solver="ipndm", cond={"class_labels": labels})
        rows.append(measure("teacher", steps, out, wall, truth, lowres, labels, judge))
        grids[f"teacher, iPNDM {steps} steps"] = out
    for name, job in STUDENTS.items():
        budget = ["--steps", str(args.train_steps), "--batch-size", str(args.train_batch)]
        train_missing(args.runs / name, ["codi", "--condition", "lowres4+class", *job, *budget])
        student = load_student(args.runs / name / "model.safetensors")
        for steps in STUDENT_STEPS:
            sig = student_sigmas(student, steps)
            gen = torch.Generator().manual_seed(args.seed + 1)
            out, wall = timed(fastdiff.sample, student, noise * float(sig[0]), sig, solver=student_solver(student),
                              cond={"cond": cond, "class_labels": labels}, generator=gen)  # fmt: skip
            rows.append(measure(f"codi_{name}", steps, out, wall, truth, lowres, labels, judge))
            grids[f"CoDi {name}, {steps} step{'s' if steps > 1 else ''}"] = out
    write_csv(rows, args.out / "codi_digits.csv")
    plot(rows, grids, truth, cond, floor, args.out / "codi_digits.png")
    print(f"\nreal held-out digits ({count}): FD {floor:.3f}\n")
    print("| method | steps | FD | accuracy | RMSE to truth | RMSE of 4x4 means to input | s per batch |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['steps']} | {r['fd']:.3f} | {r['accuracy']:.3f} | {r['rmse_truth']:.4f} | "
              f"{r['rmse_lowres']:.4f} | {r['batch_s']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
