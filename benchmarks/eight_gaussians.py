"""MoLF Table 1: conditional eight Gaussians, MoE-Transformer velocity vs the dense Transformer ablation.

    python benchmarks/eight_gaussians.py --threads 1 [--seeds 0 1 2] [--steps 1500] [--quick] [--router-lr-scale 1]
        [--models moe moe-cond moe-cond-top2 moe-cond-top2-km dense moe-oracle]

Setting (MoLF section 4.1 and appendix A.3): ``c = (cos θ, sin θ)``, ``z ~ N(μ_k, 0.01 I)`` with the eight means
on a ring of radius 3 (``histoflow.datasets.eight_gaussians``). The condition enters the velocity field directly
(``cond_dim=2``, no embedding). Both models are ``histoflow.models._velocity.VelocityField`` trained through
``LatentFlow.loss`` (linear path, ``z0 ~ N(0, I)``, target ``z1 − z0``, no gene term, no condition dropout) and
sampled with ``LatentFlow.sample`` (Euler from N(0, I)):

- MoE: ``velocity="moe"``, 8 experts, top-1, each expert a 1-layer 1-head Transformer of width 32 over the
  tokens ``[z_t, time embedding, c]``; loss = flow MSE + ``λ_aux`` · load-balancing loss;
- dense: ``velocity="dense"``, one 1-layer Transformer with 8 heads and width 256 (same depth, 8× the width);
- MoE, router on c (``moe-cond``, not MoLF's published setting): the same MoE, but the router sees ``c`` alone
  (``router="condition"``) rather than ``LayerNorm([z_t, 64-d time embedding, c])``, whose 68 inputs are mostly
  the time embedding.
- MoE, router on c, top-2 (``moe-cond-top2``): the router on ``c`` with two experts per input (gates renormalised
  over the kept pair, MoLF's default for real data) and a stronger load-balancing weight ``λ_aux = 0.1``. With two
  experts the router gets a comparative signal (the gradient of a logit is the difference of the two experts'
  outputs), which top-1 lacks; with ``λ_aux = 0.01`` it leaves most experts unused.

Top-1 gating is Switch-Transformer style (``MixtureOfExperts``): the chosen expert's output is scaled by its full
softmax probability, so the router learns from the flow loss (a renormalised top-1 gate is identically 1 and would
leave the router to the load-balancing loss alone).

- MoE, router on c, top-2, k-means initialisation (``moe-cond-top2-km``): ``moe-cond-top2`` whose router starts as
  the Voronoi partition of 8 k-means centroids of 5,000 training conditions
  (:meth:`~histoflow.models.MixtureOfExperts.init_router`, sharpness 3), so every expert begins with its own arc of
  the circle instead of an arbitrary share of it (training moves the boundaries little: see routing purity).
- MoE, oracle routing (``moe-oracle``, a diagnostic, not a method): the same experts, each spot sent with weight 1
  to the expert of its true mode (``router="cancer_type"`` with the mode index as the metadata code). It measures
  what the experts can do when routing is solved, i.e. how much of the MoE's error is the router's.

Metrics on held-out conditions (one generated sample per test condition, compared with the true sample drawn
for the same conditions):

- ``W2 dim-1 / dim-2 / avg``: exact 1-D 2-Wasserstein between the generated and true marginals,
  ``sqrt(mean((sort(a) − sort(b))²))`` (the quantity of MoLF Table 1);
- ``cW2``: conditional W2 — the conditions are binned by angle into 16 arcs (two per mode), and in each arc the
  2-D W2 between generated and true samples is computed exactly (``ot.emd2`` when POT is installed, otherwise an
  optimal assignment with ``scipy.optimize.linear_sum_assignment``; equal sizes), then averaged over arcs. Unlike the
  marginal W2 it punishes sending a condition to the wrong (or an averaged) mode;
- ``in 3σ``: fraction of generated points within 3σ = 0.3 of their condition's true mode mean (an exact sample
  lands there with probability 1 − e^{-4.5} ≈ 0.989).

Diagnostics per model: parameters, training seconds, final flow MSE (floor 0.157 when ``c`` fixes the mode), the
experts used by the held-out points at t = 0 and routing purity (share of points whose expert's most frequent mode
is their own; 1 = experts split by mode, about 1/8 for routing unrelated to the mode).

A ``truth`` row (a second independent draw for the same conditions) gives the finite-sample floor of each metric.
Mean ± std over seeds; the seed sets the initialisation, training data and sampling noise; the test conditions are
the same for every seed. Nothing is tuned per seed.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from histoflow.datasets import eight_gaussians
from histoflow.models._flow import LatentFlow
from histoflow.models._velocity import VelocityField

try:  # exact OT via POT when available; the assignment below gives the same value on equal-size samples
    import ot
except ImportError:  # pragma: no cover - depends on the environment
    ot = None

RADIUS, SIGMA = 3.0, 0.1
TEST_SEED = 10_000  # held-out conditions: the same for every seed, disjoint from the training draws
# Lowest possible flow MSE (per dimension) when c fixes the mode: ∫_0^1 Var(z1 − z0 | z_t, t, c) dt for
# z0 ~ N(0, I), z1 ~ N(μ, σ² I), i.e. the mean over t of (1 + σ²) − (tσ² − (1 − t))² / ((1 − t)² + t²σ²).
FLOW_FLOOR = 0.157


class IdentityCondition(nn.Module):
    """The condition ``c = (cos θ, sin θ)`` as is, with the interface :class:`LatentFlow` expects."""

    def __init__(self, dim: int = 2):
        super().__init__()
        self.null = nn.Parameter(torch.zeros(dim), requires_grad=False)

    def forward(self, feats, offsets=None, valid=None, meta=None, drop=None):
        c = feats if drop is None else torch.where(drop[:, None], self.null.expand_as(feats), feats)
        return c, None


@dataclass
class Config:
    steps: int = 1500
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    lambda_aux: float = 0.01
    lambda_aux_top2: float = 0.1  # the top-2 variant: stronger balancing (0.01 leaves experts unused)
    gate_noise: float = 1e-2
    n_router_init: int = 5_000  # training conditions clustered for the k-means router initialisation
    router_sharpness: float = 3.0
    router_lr_scale: float = 1.0  # the router's learning rate relative to the rest (learned routers only)
    n_train: int = 50_000
    n_test: int = 4_000
    euler_steps: int = 20
    n_bins: int = 16


def make_velocity(kind: str, cfg: Config) -> VelocityField:
    common = {"latent_dim": 2, "cond_dim": 2, "n_experts": 8, "expert": "transformer", "expert_width": 32}
    common["expert_heads"] = 1
    if kind == "moe":
        return VelocityField(velocity="moe", top_k=1, gate_noise=cfg.gate_noise, **common)
    if kind == "moe-cond":
        return VelocityField(velocity="moe", top_k=1, gate_noise=cfg.gate_noise, router="condition", **common)
    if kind in ("moe-cond-top2", "moe-cond-top2-km"):
        return VelocityField(velocity="moe", top_k=2, gate_noise=cfg.gate_noise, router="condition", **common)
    if kind == "moe-oracle":  # hard routing by the true mode (the mode index as a metadata code)
        return VelocityField(velocity="moe", router="cancer_type", metadata_sizes=[8], **common)
    return VelocityField(velocity="dense", **common)


def train(kind: str, seed: int, cfg: Config) -> tuple[LatentFlow, float, float]:
    """Train one model; returns it, the training time in seconds and the mean flow loss of the last 10% of steps."""
    torch.manual_seed(seed)
    c, z, mode = eight_gaussians(cfg.n_train, seed=seed)
    c, z, mode = torch.from_numpy(c), torch.from_numpy(z), torch.from_numpy(mode)[:, None]
    model = LatentFlow(IdentityCondition(), make_velocity(kind, cfg))
    if kind == "moe-cond-top2-km":  # router starts as the Voronoi partition of k-means centroids of training c
        model.velocity.block.init_router(c[: cfg.n_router_init], sharpness=cfg.router_sharpness, seed=seed)
    gate = getattr(model.velocity.block, "gate", None)
    gate_params = [] if gate is None else list(gate.parameters())
    rest = [p for p in model.parameters() if p.requires_grad and all(p is not g for g in gate_params)]
    groups = [{"params": rest}] + ([{"params": gate_params, "lr": cfg.lr * cfg.router_lr_scale}] if gate_params else [])
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    gen = torch.Generator().manual_seed(seed)
    tail = []
    model.train()
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        idx = torch.randint(0, cfg.n_train, (cfg.batch_size,), generator=gen)
        batch = {"z1": z[idx], "feats": c[idx]} | ({"meta": mode[idx]} if kind == "moe-oracle" else {})
        aux = cfg.lambda_aux_top2 if kind.startswith("moe-cond-top2") else cfg.lambda_aux
        out = model.loss(batch, nn.Identity(), p_uncond=0.0, p_meta_drop=0.0, lambda_gene=0.0, lambda_aux=aux)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        sched.step()
        if step >= 0.9 * cfg.steps:
            tail.append(out["flow"].item())
    return model.eval(), time.perf_counter() - t0, float(np.mean(tail))


def w2_1d(a: np.ndarray, b: np.ndarray) -> float:
    """Exact 2-Wasserstein distance between two 1-D empirical distributions of equal size."""
    return float(np.sqrt(np.mean((np.sort(a) - np.sort(b)) ** 2)))


def w2_2d(a: np.ndarray, b: np.ndarray) -> float:
    """Exact 2-Wasserstein distance between two equal-size 2-D point clouds (uniform weights)."""
    cost = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    if ot is not None:
        return float(np.sqrt(ot.emd2(np.full(len(a), 1 / len(a)), np.full(len(b), 1 / len(b)), cost)))
    rows, cols = linear_sum_assignment(cost)
    return float(np.sqrt(cost[rows, cols].mean()))


def metrics(gen: np.ndarray, true: np.ndarray, cond: np.ndarray, n_bins: int) -> dict[str, float]:
    theta = np.mod(np.arctan2(cond[:, 1], cond[:, 0]), 2 * np.pi)
    mode = np.clip(np.floor(4 * theta / np.pi), 0, 7)
    mu = RADIUS * np.stack([np.cos(mode * np.pi / 4), np.sin(mode * np.pi / 4)], axis=1)
    bins = np.clip(np.floor(theta / (2 * np.pi) * n_bins).astype(int), 0, n_bins - 1)
    d1, d2 = w2_1d(gen[:, 0], true[:, 0]), w2_1d(gen[:, 1], true[:, 1])
    cw2 = np.mean([w2_2d(gen[bins == b], true[bins == b]) for b in range(n_bins) if np.any(bins == b)])
    in3 = np.mean(np.linalg.norm(gen - mu, axis=1) < 3 * SIGMA)
    return {"W2 dim-1": d1, "W2 dim-2": d2, "W2 avg": (d1 + d2) / 2, "cW2": float(cw2), "in 3σ": float(in3)}


@torch.no_grad()
def evaluate(model: LatentFlow, seed: int, cfg: Config, steps: int) -> tuple[dict[str, float], np.ndarray, float]:
    """Metrics of ``steps``-step Euler samples, the share of test points per expert at t = 0 and the routing
    purity (fraction of points whose expert's most frequent mode is their own mode; 1 = experts split by mode)."""
    cond, true, mode = eight_gaussians(cfg.n_test, seed=TEST_SEED)
    g = torch.Generator().manual_seed(seed + 1)
    z0 = torch.randn(cfg.n_test, 2, generator=g)
    meta = torch.from_numpy(mode)[:, None] if model.velocity.uses_metadata else None  # the oracle router only
    out = model.sample(torch.from_numpy(cond), z0, meta=meta, steps=steps)
    weights = out["routing"].numpy()
    load = (weights > 0).mean(0)
    expert = weights.argmax(1)
    purity = sum(np.bincount(mode[expert == e], minlength=8).max() for e in np.unique(expert)) / len(mode)
    return metrics(out["z1"].numpy(), true, cond, cfg.n_bins), load, float(purity)


def truth_row(cfg: Config) -> dict[str, float]:
    cond, true, _ = eight_gaussians(cfg.n_test, seed=TEST_SEED)
    rng = np.random.default_rng(TEST_SEED + 1)
    theta = np.mod(np.arctan2(cond[:, 1], cond[:, 0]), 2 * np.pi)
    k = np.clip(np.floor(4 * theta / np.pi), 0, 7)
    redraw = RADIUS * np.stack([np.cos(k * np.pi / 4), np.sin(k * np.pi / 4)], 1) + SIGMA * rng.standard_normal(
        (cfg.n_test, 2)
    )
    return metrics(redraw, true, cond, cfg.n_bins)


def fmt(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


NAMES = {
    "moe": "MoE (8 × w32 1-head, top-1)",
    "moe-cond": "MoE, router on c only",
    "moe-cond-top2": "MoE, router on c, top-2",
    "moe-cond-top2-km": "MoE, c, top-2, k-means init",
    "dense": "dense (w256 8-head)",
    "moe-oracle": "MoE, oracle routing by mode",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help=f"training steps (default {Config.steps}; 300 with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke run: 300 steps, 1000 test conditions")
    p.add_argument("--models", nargs="+", default=list(NAMES), choices=list(NAMES), help="default: all")
    p.add_argument("--lr", type=float, default=None, help=f"AdamW learning rate (default {Config.lr})")
    p.add_argument("--lambda-aux", type=float, default=None, help=f"MoE aux weight (default {Config.lambda_aux})")
    p.add_argument("--gate-noise", type=float, default=None, help=f"router noise std (default {Config.gate_noise})")
    p.add_argument(
        "--router-lr-scale",
        type=float,
        default=None,
        help=f"router learning rate relative to --lr (default {Config.router_lr_scale})",
    )
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    cfg = Config()
    if args.quick:
        cfg.steps, cfg.n_test = 300, 1_000
    for name in ("steps", "lr", "lambda_aux", "gate_noise", "router_lr_scale"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    print(
        f"eight Gaussians (R={RADIUS}, σ={SIGMA}); c = (cos θ, sin θ) used directly (cond_dim=2); "
        f"{cfg.n_train} training samples, {cfg.n_test} held-out conditions; seeds {args.seeds}; "
        f"torch threads {torch.get_num_threads()}"
    )
    print(
        f"AdamW lr={cfg.lr} (cosine to 0), weight_decay={cfg.weight_decay}, {cfg.steps} steps × batch "
        f"{cfg.batch_size}; "
        f"MoE λ_aux={cfg.lambda_aux}, gate noise {cfg.gate_noise}, router lr × {cfg.router_lr_scale}; "
        f"Euler {cfg.euler_steps} steps and 1 step from "
        f"N(0, I); cW2 over {cfg.n_bins} angle bins ({'POT emd2' if ot is not None else 'linear_sum_assignment'})"
    )
    results: dict[tuple[str, int], dict[str, list[float]]] = {}
    extra: dict[str, dict] = {}
    t_all = time.perf_counter()
    for kind in args.models:
        n_params = sum(p.numel() for p in make_velocity(kind, cfg).parameters())
        extra[kind] = {"time": [], "flow": [], "load": [], "purity": [], "params": n_params}
        for seed in args.seeds:
            model, secs, flow = train(kind, seed, cfg)
            extra[kind]["time"].append(secs)
            extra[kind]["flow"].append(flow)
            for steps in (cfg.euler_steps, 1):
                m, load, purity = evaluate(model, seed, cfg, steps)
                for key, val in m.items():
                    results.setdefault((kind, steps), {}).setdefault(key, []).append(val)
            extra[kind]["load"].append(load)
            extra[kind]["purity"].append(purity)
            w2 = results[(kind, cfg.euler_steps)]["W2 avg"][-1]
            print(
                f"  {kind:8s} seed {seed}: trained in {secs:6.1f} s, flow MSE {flow:.4f}, W2 avg {w2:.3f}", flush=True
            )

    keys = ["W2 dim-1", "W2 dim-2", "W2 avg", "cW2", "in 3σ"]
    head = f"{'model':30s} {'Euler':>5s} " + " ".join(f"{k:>14s}" for k in keys)
    print("\n" + head + "\n" + "-" * len(head))
    for steps in (cfg.euler_steps, 1):
        for kind in args.models:
            row = results[(kind, steps)]
            print(f"{NAMES[kind]:30s} {steps:5d} " + " ".join(f"{fmt(row[k]):>14s}" for k in keys))
    floor = truth_row(cfg)
    print(f"{'truth (independent redraw)':30s} {'-':>5s} " + " ".join(f"{floor[k]:>14.3f}" for k in keys))
    print(f"{'MoLF Table 1: MoLF (MoE)':30s} {'?':>5s} {0.315:>14.3f} {0.268:>14.3f} {0.292:>14.3f}")
    print(f"{'MoLF Table 1: w/o MoE':30s} {'?':>5s} {0.358:>14.3f} {0.272:>14.3f} {0.315:>14.3f}")

    print(
        f"\n{'model':30s} {'params':>8s} {'train s':>14s} {'flow MSE':>14s} {'purity':>14s}  "
        f"experts used at t=0 [mean load]  (flow MSE floor {FLOW_FLOOR:.3f})"
    )
    for kind in args.models:
        e = extra[kind]
        load = np.mean(e["load"], axis=0)
        used = np.mean([(ld > 0.01).sum() for ld in e["load"]])
        purity = fmt(e["purity"]) if kind != "dense" else "-"
        print(f"{NAMES[kind]:30s} {e['params']:8d} {fmt(e['time']):>14s} {fmt(e['flow']):>14s} {purity:>14s}  "
              f"{used:.1f} [{' '.join(f'{x:.2f}' for x in load)}]")  # fmt: skip
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
