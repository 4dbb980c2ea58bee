"""Training-step speed of MoLF's Stage I on the CPU: torch's dropout against histoflow's FastDropout.

    python benchmarks/train_speed.py [--threads 2] [--repeats 5] [--steps 100] [--ff-dims 512 128]

Stage I (:class:`~histoflow.models.GeneVAE`, 50 genes, batches of 64, the HER2ST benchmark's sizes: latent 128,
token width 64, decoder 256) takes AdamW steps on random log1p-like data. Each row times ``--steps`` steps, the median
of ``--repeats``; the baseline is the same model with torch's ``nn.Dropout`` put back in place of FastDropout, timed
in the same run, so the ratio is measured on the same machine at the same time. A last pair of rows times dropout
alone on one feed-forward activation of that model (64 × 26 tokens × the largest ``--ff-dims``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from histoflow.models import GeneVAE
from histoflow.models._dropout import FastDropout


def _torch_dropout(module: nn.Module) -> nn.Module:
    """Put torch's ``nn.Dropout`` back wherever FastDropout is (the baseline)."""
    for name, child in list(module.named_children()):
        if isinstance(child, FastDropout):
            setattr(module, name, nn.Dropout(child.p))
        else:
            _torch_dropout(child)
    return module


def _median_seconds(step, steps: int, repeats: int) -> float:
    for _ in range(5):  # warm-up
        step()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        times.append((time.perf_counter() - t) / steps)
    return statistics.median(times)


def _stage_one_step(ff_dim: int, fast: bool):
    torch.manual_seed(0)
    vae = GeneVAE(50, latent_dim=128, d_model=64, n_heads=4, ff_dim=ff_dim, max_tokens=32, decoder_hidden=(256,))
    if not fast:
        _torch_dropout(vae)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.01)
    x = torch.rand(64, 50) * 3
    mask = torch.ones(64, 50, dtype=torch.bool)

    def step():
        loss = vae.loss(x, mask, beta=1e-3)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--ff-dims", type=int, nargs="+", default=[512, 128], help="Stage I feed-forward widths")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads={args.threads}, median of {args.repeats} × {args.steps} steps, torch {torch.__version__}\n")
    print("| what | vae_ff_dim | dropout | ms per step | vs torch's dropout |")
    print("|---|---|---|---|---|")
    for ff in args.ff_dims:
        base = _median_seconds(_stage_one_step(ff, fast=False), args.steps, args.repeats)
        fast = _median_seconds(_stage_one_step(ff, fast=True), args.steps, args.repeats)
        print(f"| Stage I training step | {ff} | torch | {base * 1e3:.1f} | 1.00× |")
        print(f"| Stage I training step | {ff} | FastDropout | {fast * 1e3:.1f} | {base / fast:.2f}× |")
    x = torch.randn(64, 26, max(args.ff_dims), requires_grad=True)
    layers = {"torch": nn.Dropout(0.1).train(), "FastDropout": FastDropout(0.1).train()}
    base = None
    for name, layer in layers.items():
        sec = _median_seconds(lambda layer=layer: layer(x).sum().backward(), args.steps, args.repeats)
        base = base or sec
        cells = f"{max(args.ff_dims)} | {name} | {sec * 1e3:.2f} | {base / sec:.2f}×"
        print(f"| dropout alone, forward + backward | {cells} |")


if __name__ == "__main__":
    main()
