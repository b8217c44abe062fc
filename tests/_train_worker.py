"""Subprocess entry point for tests/test_train_runtime.py: a tiny, fully seeded run of fastdiff's training runtime.

    python tests/_train_worker.py OUT_DIR --steps 40 [--hang-at K --marker FILE] [--record] [--adversary]

``--hang-at K`` stops inside the K-th loss call of this process (after touching ``--marker``) and waits to be
killed. ``--record`` (used under torchrun) writes the labels each rank trained on and its final weights, so the
parent can check that the shards were disjoint and the ranks agree. ``--adversary`` adds a second player (a linear
critic of the reconstructions, fastdiff.train.runtime.Adversary) whose final weights are recorded too.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from fastdiff.checkpoint import save_model
from fastdiff.train.runtime import Adversary, TrainConfig, distributed_context, train

N_ITEMS, DIM = 52, 6


def make_dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(123)
    # Labels are the item indices, so the parent can see which items each rank drew.
    return TensorDataset(torch.randn(N_ITEMS, DIM, generator=g), torch.arange(N_ITEMS))


def make_model() -> nn.Module:
    torch.manual_seed(7)
    # Dropout draws from torch's global RNG: an exact resume must restore that state too.
    return nn.Sequential(nn.Linear(DIM, 16), nn.SiLU(), nn.Dropout(0.2), nn.Linear(16, DIM))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--checkpoint-every", type=int, default=10)
    ap.add_argument("--hang-at", type=int, default=0)
    ap.add_argument("--marker", default="")
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--adversary", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)  # same thread count in every run: reductions then add up in the same order

    seen: list[int] = []
    calls = 0

    def draw(model, batch, generator):
        x, labels = batch
        sigma = 0.1 + torch.rand(x.shape[0], 1, generator=generator, device=x.device)
        noisy = x + sigma * torch.randn(x.shape, generator=generator, device=x.device)
        return x, labels, sigma, model(noisy)

    def critic_loss(net, model, batch, generator):
        with torch.no_grad():
            x, _, _, out = draw(model, batch, generator)
        gap = (net(x) - net(out)).square().mean()
        return -gap, {"gap": gap}

    torch.manual_seed(8)
    critic = nn.Linear(DIM, 4)
    adversary = Adversary(critic, critic_loss, lr=1e-2, start_step=2) if args.adversary else None

    def loss_fn(model, batch, generator):
        nonlocal calls
        calls += 1
        if calls == args.hang_at:
            Path(args.marker).touch()
            time.sleep(120)  # the parent SIGKILLs us here, mid-step
        x, labels, sigma, out = draw(model, batch, generator)
        seen.extend(labels.tolist())
        loss = ((out - x) ** 2).mean()
        if adversary is not None and adversary.active:
            loss = loss + 0.1 * (critic(out) - critic(x)).square().mean()
        return loss, {"sigma_mean": sigma.mean()}

    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=1e-2,
        ema_decay=0.9,
        checkpoint_every=args.checkpoint_every,
        log_every=1,
        out_dir=args.out_dir,
        progress=False,
        warmup_steps=5,
        weight_decay=0.01,
    )
    model = make_model()
    state = train(model, loss_fn, make_dataset(), config, adversary=adversary)
    if args.record:
        rank = distributed_context().rank
        (Path(args.out_dir) / f"seen-rank{rank}.json").write_text(json.dumps(seen))
        save_model(Path(args.out_dir) / f"final-rank{rank}.safetensors", state.model, {"rank": rank})
        if adversary is not None:
            save_model(Path(args.out_dir) / f"adversary-rank{rank}.safetensors", critic, {"rank": rank})


if __name__ == "__main__":
    main()
