"""Training speed of MoLF on the CPU: Stage I with torch's dropout against histoflow's FastDropout, Stage II with the
window context's last layer through nn.MultiheadAttention against histoflow's centre-only attention, and (with
``--fits``) whole Lightning fits with per-step logging and torch's per-tensor AdamW against histoflow's defaults.

    python benchmarks/train_speed.py [--threads 2] [--repeats 5] [--steps 100] [--ff-dims 512 128]
                                     [--cond-dims 256 64] [--fits 3 [--fit-epochs 40]]

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

Whole fits (``--fits N``: N fits of each kind, in alternation; median seconds): ``MoLF.train`` on a table of HER2ST's
size (910 spots in five sections, three for training, one for validation; 3 × 1280 features; 50 genes), with the
narrower settings of the HER2ST benchmark (``cond_dim=64``, ``expert_width=128``, ``vae_decoder_hidden=256``,
``vae_ff_dim=128``, endpoint prediction, batches of 64), ``--fit-epochs`` epochs of each stage and no early stopping.
The baselines put back what histoflow did before: ``self.log`` of every training scalar at every step (instead of
:class:`~histoflow.models.EpochMeanLogging`) and torch's default AdamW on a CPU, the per-tensor loop (instead of
``foreach=True``). The table says whether every fit left the same history (every loss, every epoch) and weights.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from unittest import mock

import numpy as np
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


def _fit_table(seed: int = 0):
    """910 spots in five sections of a 14 × 13 grid (200 µm), 3 × 1280 features, 50 genes (HER2ST's sizes)."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    per, sections = 182, ["C2", "C3", "C4", "C5", "C6"]
    g = np.stack(np.meshgrid(np.arange(14), np.arange(13)), -1).reshape(-1, 2)
    n = per * len(sections)
    feats = rng.normal(size=(n, 3 * 1280)).astype(np.float32)
    load = rng.normal(size=(3 * 1280, 50)).astype(np.float32) / 60
    counts = rng.poisson(np.exp(np.clip(feats @ load, -3, 3))).astype(np.float32)
    obs = pd.DataFrame(
        {
            "library_id": np.repeat(sections, per),
            "split": np.repeat(["train", "train", "train", "val", "test"], per),
            "pixel_size_um": 1.0,
        },
        index=[f"s{i}" for i in range(n)],
    )
    a = ad.AnnData(sp.csr_matrix(counts), obs=obs)
    a.var_names = [f"G{i}" for i in range(50)]
    a.layers["log1p"] = a.X.copy()
    a.layers["log1p"].data = np.log1p(a.layers["log1p"].data)
    a.obsm["spatial"] = np.concatenate([g] * len(sections)) * 200.0
    a.obsm["X_feat"] = feats
    return a


def _per_step_log(self, values, batch_size, *, prefix="train_", prog_bar=False):
    """The baseline: one ``self.log`` per scalar and step (how histoflow's modules logged before)."""
    for key, value in values.items():
        self.log(prefix + key, value, on_step=False, on_epoch=True, batch_size=batch_size, sync_dist=True)


@contextlib.contextmanager
def _before(log: bool, loop: bool):
    """Put back per-step logging (``log``) and torch's per-tensor AdamW (``loop``) for the fits inside."""
    from histoflow.models import _molf, _train

    with contextlib.ExitStack() as stack:
        if log:
            stack.enter_context(mock.patch.object(_train.EpochMeanLogging, "log_epoch_means", _per_step_log))
        if loop:
            per_tensor = lambda params, **kw: torch.optim.AdamW(params, foreach=False, **kw)  # noqa: E731
            stack.enter_context(mock.patch.object(_molf, "adamw", per_tensor))
        yield


def _fit(table, epochs: int, log: bool, loop: bool):
    from histoflow.models import MoLF

    settings = {"cond_dim": 64, "expert_width": 128, "vae_decoder_hidden": (256,), "vae_ff_dim": 128}
    model = MoLF(table, embedding_key="X_feat", prediction="endpoint", seed=0, **settings)
    with _before(log, loop):
        t = time.perf_counter()
        model.train(
            epochs,
            vae_epochs=epochs,
            batch_size=64,
            accelerator="cpu",
            devices=1,
            early_stopping=False,
            show_progress_bar=False,
        )
        sec = time.perf_counter() - t
    hist = {k: v.drop(columns="time_s") for k, v in model.history.items()}
    weights = {k: v.clone() for k, v in model.flow.state_dict().items()}
    return sec, hist, weights


def _same(a, b) -> bool:
    hist = all(a[1][k].equals(b[1][k]) for k in a[1])
    return hist and all(torch.equal(a[2][k], b[2][k]) for k in a[2])


def _fits(fits: int, epochs: int) -> None:
    import logging
    import warnings

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    table = _fit_table()
    kinds = [
        ("per step", "per-tensor loop", True, True),
        ("once per epoch", "per-tensor loop", False, True),
        ("once per epoch", "multi-tensor (now)", False, False),
    ]
    runs: dict[int, list] = {i: [] for i in range(len(kinds))}
    for _ in range(fits):
        for i, (_, _, log, loop) in enumerate(kinds):
            runs[i].append(_fit(table, epochs, log, loop))
    first = runs[0][0]
    base = statistics.median(r[0] for r in runs[0])
    print(f"\nWhole fits: {epochs} epochs of each stage, median of {fits} fits of each kind, in alternation\n")
    print("| training scalars logged | AdamW | s per fit | vs per step + loop | same history and weights |")
    print("|---|---|---|---|---|")
    for i, (logging_kind, adam, _, _) in enumerate(kinds):
        sec = statistics.median(r[0] for r in runs[i])
        same = all(_same(first, r) for r in runs[i])
        print(f"| {logging_kind} | {adam} | {sec:.1f} | {base / sec:.2f}× | {'yes' if same else 'no'} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--ff-dims", type=int, nargs="+", default=[512, 128], help="Stage I feed-forward widths")
    p.add_argument("--cond-dims", type=int, nargs="+", default=[256, 64], help="Stage II condition widths")
    p.add_argument("--fits", type=int, default=0, help="whole fits of each kind (0: no fit rows)")
    p.add_argument("--fit-epochs", type=int, default=40, help="epochs of each stage in a whole fit")
    p.add_argument("--only-fits", action="store_true", help="skip the step rows")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads={args.threads}, median of {args.repeats} × {args.steps} steps, torch {torch.__version__}\n")
    if not args.only_fits:
        _steps(args)
    if args.fits:
        _fits(args.fits, args.fit_epochs)


def _steps(args: argparse.Namespace) -> None:
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
