"""Time per batch of a cached sampling loop on a diffusers UNet built from config (random weights: speed only).

A ``UNet2DConditionModel`` with Stable Diffusion 1.5's configuration (``--size sd``: 4 x 64 x 64 latents, 77 x 768
text embeddings) or a small one (``--size tiny``, for a CPU rehearsal), in a VP denoiser, sampled with
DPM-Solver++(2M) over --steps Karras steps with CFG (cond and uncond batched). For no cache, DeepCache every 2nd
and 3rd evaluation and a calibrated first-block plan, each eager and replayed as one captured CUDA graph (on a
GPU), the median wall time of --reps batches. Writes cache_speed.csv to --out and prints a Markdown table.

    python benchmarks/cache_speed.py --out bench-results             # on a GPU: SD-sized, fp16
    python benchmarks/cache_speed.py --size tiny --steps 4 --reps 2  # the CPU rehearsal
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _training_runs import write_csv

import fastdiff
from fastdiff import schedules
from fastdiff.denoisers import VPDenoiser

CACHES = [None, "deepcache:2", "deepcache:3", "first_block:0.05"]
SIZES = {
    "sd": dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
               attention_head_dim=8, layers_per_block=2),
    "tiny": dict(sample_size=16, block_out_channels=(32, 64), cross_attention_dim=32, attention_head_dim=8,
                 layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8),
}  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(size: str, steps: int, batch: int, reps: int, device: torch.device) -> list[dict]:
    import diffusers

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    config = SIZES[size]
    unet = diffusers.UNet2DConditionModel(**config).to(device, dtype).eval()
    model = VPDenoiser(unet, diffusers.DDPMScheduler().alphas_cumprod).to(device)
    sigmas = schedules.karras(steps, model.sigma_min, model.sigma_max)
    res, width = config["sample_size"], config["cross_attention_dim"]
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 4, res, res, device=device, generator=g) * float(sigmas[0])
    text = torch.randn(batch, 77, width, device=device, dtype=dtype, generator=g)
    cond, uncond = {"encoder_hidden_states": text}, {"encoder_hidden_states": torch.zeros_like(text)}
    graphs = [False, True] if device.type == "cuda" else [False]
    rows = []
    for spec in CACHES:
        for graph in graphs:
            sampler = fastdiff.Sampler(model, sigmas=sigmas, guidance=fastdiff.Guidance(7.5), cuda_graph=graph,
                                       cache=spec)  # fmt: skip
            sampler.sample(x, cond, uncond)  # calibration, capture, warm-up
            times = []
            for _ in range(reps):
                _sync(device)
                t0 = time.perf_counter()
                sampler.sample(x, cond, uncond)
                _sync(device)
                times.append(time.perf_counter() - t0)
            stats = sampler.stats()
            full = stats.full_evaluations if stats.full_evaluations is not None else stats.forward_calls
            rows.append({"size": size, "cache": spec or "none", "cuda_graph": graph, "steps": steps, "batch": batch,
                         "full": full, "cached": stats.cached_evaluations or 0,
                         "ms": statistics.median(times) * 1e3,
                         "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"})  # fmt: skip
            r = rows[-1]
            print(f"{r['cache']:18s} graph {str(graph):5s}: {r['full']} full + {r['cached']} cached, {r['ms']:.1f} ms")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--size", choices=list(SIZES), default="sd")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=2, help="images per batch (CFG doubles the network's batch)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    rows = run(args.size, args.steps, args.batch, args.reps, torch.device(args.device))

    write_csv(rows, args.out / "cache_speed.csv")
    base = {r["cuda_graph"]: r["ms"] for r in rows if r["cache"] == "none"}
    print("| cache | CUDA graph | full + cached | ms per batch | speed-up |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['cache']} | {r['cuda_graph']} | {r['full']} + {r['cached']} | {r['ms']:.1f} | "
              f"{base[r['cuda_graph']] / r['ms']:.2f}x |")  # fmt: skip
    print(f"wrote {args.out / 'cache_speed.csv'}")


if __name__ == "__main__":
    main()
