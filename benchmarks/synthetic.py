"""Held-out accuracy and time of MoLF against its ablations and the baselines on ``datasets.synthetic``.

    python benchmarks/synthetic.py [--slides 9] [--grid 12] [--epochs 100] [--patch-px 224] [--seeds 0 1 2]
        [--scvi-latent-dim 32] [--methods molf molf_scvi ridge ...] [--threads 1] [--set KEY=VALUE ...]
        [--accelerator gpu]

Slides are split by ``pp.split_slides`` (stratified by cancer type; train / val / test), genes are the top HMHVG
chosen on the training slides, features come from ``pp.embed_patches`` with EfficientNet-Lite0. Every method is
trained on the train slides (early stopping on val) and scored on the test slides with ``tl.evaluate``
(PCC per slide, GSC, SSC), with its training and prediction times; each seed draws new data (slides, split,
panel, features) and seeds the models, and the table gives mean ± std over seeds. Rows: MoLF (MoE, spatial
window), MoLF without spatial context, dense velocity (same depth, n_experts × width), MoLF with scvi-tools'
SCVI as Stage I (``latent="scvi"``: raw counts, slide as batch; its own latent size ``--scvi-latent-dim``; needs
``histoflow[scvi]``), MLP and ridge (HEST probe). ``--methods`` runs a subset (keys as in the list below).
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import numpy as np

import histoflow as hf
from histoflow._utils import accelerator_device
from histoflow.cli import _parse_settings


def run_seed(args: argparse.Namespace, seed: int, runs: list) -> dict[str, dict[str, float]]:
    """One draw of the data (slides, split, panel, features) and every method on it; metrics and times per method."""
    sd = hf.datasets.synthetic(n_slides=args.slides, grid=(args.grid, args.grid), seed=seed)
    table = sd.tables["table"]
    hf.pp.normalize(sd)
    hf.pp.split_slides(sd, seed=seed)
    train = (table.obs["split"] == "train").to_numpy()
    hf.pp.select_genes(sd, flavor="hmhvg", n_top=args.genes, mask_obs=train)
    t = time.perf_counter()
    device = accelerator_device(args.accelerator)
    hf.pp.embed_patches(sd, patch_px=args.patch_px, device=device, show_progress_bar=False)
    print(
        f"seed {seed}: {table.n_obs} spots, {args.slides} slides, {int(table.var['histoflow_panel'].sum())} genes; "
        f"embedding {time.perf_counter() - t:.0f} s; split {dict(table.obs['split'].value_counts())}",
        flush=True,
    )
    out = {}
    for label, key, cfg in runs:
        t = time.perf_counter()
        pred_s = float("nan")
        if cfg is None:  # fit_baseline predicts every spot too (a single forward pass, included in the fit time)
            hf.tl.fit_baseline(sd, kind=key, key_added=key, accelerator=args.accelerator, devices=1, seed=seed)
            fit_s = time.perf_counter() - t
        else:
            model = hf.models.MoLF(table, seed=seed, **{**cfg, **args.molf_config})
            model.train(
                args.epochs,
                batch_size=128,
                accelerator=args.accelerator,
                devices=1,
                show_progress_bar=False,
                **args.molf_train,
            )
            fit_s = time.perf_counter() - t
            t = time.perf_counter()
            hf.tl.predict(model, sd, key_added=key, device=device)
            pred_s = time.perf_counter() - t
        res = hf.tl.evaluate(sd, pred_key=key, split="test", metrics=("pcc", "gsc", "ssc"), inplace=False)
        sel = res[(res["group"] == "all") & (res["gene_set"] == "all") & (res["aggregation"] == "per_slide")]
        val = {m: float(sel.loc[sel["metric"] == m, "value"].iloc[0]) for m in ("pcc", "gsc", "ssc")}
        out[label] = {**val, "fit_s": fit_s, "predict_s": pred_s}
        print(
            f"  {label}: PCC {val['pcc']:.3f} GSC {val['gsc']:.3f} SSC {val['ssc']:.3f}; fit {fit_s:.0f} s", flush=True
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slides", type=int, default=9)
    p.add_argument("--grid", type=int, default=12)
    p.add_argument("--genes", type=int, default=50)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--patch-px", type=int, default=224)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one data draw and model seed each")
    p.add_argument("--scvi-latent-dim", type=int, default=32)
    p.add_argument("--methods", nargs="+", default=None, help="keys of the rows to run (default: all)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator of the fits (cpu, gpu)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="MoLF setting for every MoLF row (as `histoflow fit --set`), e.g. --set router=condition; repeatable",
    )
    args = p.parse_args()
    args.molf_config, args.molf_train = _parse_settings(p, args.set, "molf")
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)

    runs = [
        ("MoLF (MoE, window context)", "molf", {}),
        ("MoLF, no spatial context", "molf_bag", {"spatial_context": None}),
        ("MoLF, dense velocity", "molf_dense", {"velocity": "dense"}),
        ("MoLF, scvi latent (molf-scvi)", "molf_scvi", {"latent": "scvi", "latent_dim": args.scvi_latent_dim}),
        ("MLP", "mlp", None),
        ("ridge (HEST probe)", "ridge", None),
    ]
    if args.methods is not None:
        unknown = sorted(set(args.methods) - {key for _, key, _ in runs})
        if unknown:
            p.error(f"unknown --methods {unknown}; choose from {[key for _, key, _ in runs]}")
        runs = [r for r in runs if r[1] in args.methods]
    per_seed = [run_seed(args, seed, runs) for seed in args.seeds]

    def fmt(label: str, key: str, digits: int = 3) -> str:
        vals = np.array([res[label][key] for res in per_seed])
        if np.isnan(vals).all():
            return "–"
        m = f"{np.nanmean(vals):.{digits}f}"
        return m if len(vals) == 1 else f"{m} ± {np.nanstd(vals):.{digits}f}"

    print(f"\nmean ± std over seeds {args.seeds}; predict: every spot, 1 draw (baselines: included in fit)\n")
    print("| method | PCC (test, per slide) | GSC | SSC | fit s | predict s |")
    print("|---|---|---|---|---|---|")
    for label, _, _ in runs:
        print(
            f"| {label} | {fmt(label, 'pcc')} | {fmt(label, 'gsc')} | {fmt(label, 'ssc')} | "
            f"{fmt(label, 'fit_s', 0)} | {fmt(label, 'predict_s', 2)} |"
        )


if __name__ == "__main__":
    main()
