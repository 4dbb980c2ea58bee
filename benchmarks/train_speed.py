"""Training-step speed of MoLF on the CPU: Stage I with torch's dropout against histoflow's FastDropout, and Stage II
with the window context's last layer through nn.MultiheadAttention against histoflow's centre-only attention.

    python benchmarks/train_speed.py [--threads 2] [--repeats 5] [--steps 100] [--ff-dims 512 128]
                                     [--cond-dims 256 64]

Stage I (:class:`~histoflow.models.GeneVAE`, 50 genes, batches of 64, the HER2ST benchmark's sizes: latent 128,
token width 64, decoder 256) takes AdamW steps on random log1p-like data. Each row times ``--steps`` steps, the median
of ``--repeats``; the baseline is the same model with torch's ``nn.Dropout`` put back in place of FastDropout, timed
in the same run, so the ratio is measured on the same machine at the same time. A last pair of rows times dropout
alone on one feed-forward activation of that model (64 × 26 tokens × the largest ``--ff-dims``).

Stage II rows time one AdamW step of the latent flow (window context of the spot and 8 neighbours over 1280-d patch
features, a cancer-type field, MoE velocity with 6 experts, top-2, endpoint prediction, the decoder's gene loss
through a frozen 128 → 256 → 50 decoder; batches of 64) at each condition width of ``--cond-dims`` (expert width
128 with ``cond_dim=64``, the paper's 256 otherwise). The baseline runs the window Transformer's last layer through
``nn.MultiheadAttention`` with the centre token as the query (how histoflow computed it before
:func:`~histoflow.models._velocity.centre_attention`); the same model takes the two kinds of steps in alternation,
``--steps`` at a time, so both medians see the same machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from histoflow.models import GeneVAE, _velocity
from histoflow.models._dropout import FastDropout
from histoflow.models._flow import LatentFlow
from histoflow.models._velocity import ConditionEncoder, VelocityField


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


def _mha_centre(mha: nn.MultiheadAttention, h: torch.Tensor, pad, *, training: bool) -> torch.Tensor:
    """The baseline: the centre token's attention through ``nn.MultiheadAttention`` (keys and values per token)."""
    return mha(h[:, :1], h, h, key_padding_mask=pad, need_weights=False)[0][:, 0]


def _alternating(step, steps: int, repeats: int) -> tuple[float, float]:
    """Median seconds per step with the baseline attention and with histoflow's, timed in alternation (drift-free)."""
    centre = _velocity.centre_attention
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        for r in range(repeats + 1):  # the first round warms up
            for baseline in (True, False):
                _velocity.centre_attention = _mha_centre if baseline else centre
                t = time.perf_counter()
                for _ in range(steps):
                    step()
                if r:
                    times[baseline].append((time.perf_counter() - t) / steps)
    finally:
        _velocity.centre_attention = centre
    return statistics.median(times[True]), statistics.median(times[False])


def _stage_two_step(cond_dim: int):
    torch.manual_seed(0)
    cond = ConditionEncoder(1280, cond_dim, spatial_context="window", metadata_sizes=(2,))
    width = 128 if cond_dim <= 64 else 256
    vel = VelocityField(128, cond_dim, n_experts=6, top_k=2, expert_width=width)
    flow = LatentFlow(cond, vel, prediction="endpoint").train()
    decoder = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 50)).requires_grad_(False)
    opt = torch.optim.AdamW(flow.parameters(), lr=1e-3, weight_decay=0.01)
    b = 64
    valid = torch.ones(b, 9, dtype=torch.bool)
    valid[::5, 6:] = False  # some spots at a section's edge
    batch = {
        "feats": torch.randn(b, 9, 1280),
        "offsets": torch.randn(b, 9, 2) * 100,
        "valid": valid,
        "meta": torch.randint(0, 2, (b, 1)),
        "z1": torch.randn(b, 128),
        "x": torch.rand(b, 50) * 3,
    }

    def step():
        loss = flow.loss(batch, decoder)["loss"]
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
    p.add_argument("--cond-dims", type=int, nargs="+", default=[256, 64], help="Stage II condition widths")
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
    print("\n| what | cond_dim | window attention | ms per step | vs nn.MultiheadAttention |")
    print("|---|---|---|---|---|")
    for cd in args.cond_dims:
        base, new = _alternating(_stage_two_step(cd), args.steps, args.repeats)
        print(f"| Stage II training step | {cd} | nn.MultiheadAttention | {base * 1e3:.1f} | 1.00× |")
        print(f"| Stage II training step | {cd} | centre only | {new * 1e3:.1f} | {base / new:.2f}× |")


if __name__ == "__main__":
    main()
