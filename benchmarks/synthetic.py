"""Held-out accuracy and time of MoLF against its ablations and the baselines on ``datasets.synthetic``.

    python benchmarks/synthetic.py [--slides 9] [--grid 12] [--epochs 100] [--patch-px 224] [--seed 0]
        [--scvi-latent-dim 32] [--methods molf molf_scvi ridge ...]

Slides are split by ``pp.split_slides`` (stratified by cancer type; train / val / test), genes are the top HMHVG
chosen on the training slides, features come from ``pp.embed_patches`` with EfficientNet-Lite0. Every method is
trained on the train slides (early stopping on val) and scored on the test slides with ``tl.evaluate``
(PCC per slide, GSC, SSC), with its training and prediction time. Rows: MoLF (MoE, spatial window), MoLF without
spatial context, dense velocity (same depth, n_experts × width), MoLF with scvi-tools' SCVI as Stage I
(``latent="scvi"``: raw counts, slide as batch; its own latent size ``--scvi-latent-dim``; needs
``histoflow[scvi]``), MLP and ridge (HEST probe). ``--methods`` runs a subset (keys as in the list below).
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import histoflow as hf


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slides", type=int, default=9)
    p.add_argument("--grid", type=int, default=12)
    p.add_argument("--genes", type=int, default=50)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--patch-px", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scvi-latent-dim", type=int, default=32)
    p.add_argument("--methods", nargs="+", default=None, help="keys of the rows to run (default: all)")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    sd = hf.datasets.synthetic(n_slides=args.slides, grid=(args.grid, args.grid), seed=args.seed)
    table = sd.tables["table"]
    hf.pp.normalize(sd)
    hf.pp.split_slides(sd, seed=args.seed)
    train = (table.obs["split"] == "train").to_numpy()
    hf.pp.select_genes(sd, flavor="hmhvg", n_top=args.genes, mask_obs=train)
    t = time.perf_counter()
    hf.pp.embed_patches(sd, patch_px=args.patch_px, show_progress_bar=False)
    print(
        f"{table.n_obs} spots, {args.slides} slides, {int(table.var['histoflow_panel'].sum())} genes; "
        f"embedding {time.perf_counter() - t:.0f} s; split {dict(table.obs['split'].value_counts())}"
    )

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
    rows = []
    for label, key, cfg in runs:
        t = time.perf_counter()
        if cfg is None:
            hf.tl.fit_baseline(sd, kind=key, key_added=key, accelerator="cpu", devices=1, seed=args.seed)
        else:
            hf.tl.fit_molf(
                sd,
                max_epochs=args.epochs,
                batch_size=128,
                accelerator="cpu",
                devices=1,
                seed=args.seed,
                key_added=key,
                train_kwargs={"show_progress_bar": False},
                **cfg,
            )
        fit_s = time.perf_counter() - t
        res = hf.tl.evaluate(sd, pred_key=key, split="test", metrics=("pcc", "gsc", "ssc"), inplace=False)
        sel = res[(res["group"] == "all") & (res["gene_set"] == "all") & (res["aggregation"] == "per_slide")]
        val = {m: float(sel.loc[sel["metric"] == m, "value"].iloc[0]) for m in ("pcc", "gsc", "ssc")}
        rows.append((label, val, fit_s))
        print(f"  done {label}: {val} in {fit_s:.0f} s", flush=True)
    print()
    print("| method | PCC (test, per slide) | GSC | SSC | fit + predict s |")
    print("|---|---|---|---|---|")
    for label, val, s in rows:
        print(f"| {label} | {val['pcc']:.3f} | {val['gsc']:.3f} | {val['ssc']:.3f} | {s:.0f} |")


if __name__ == "__main__":
    main()
