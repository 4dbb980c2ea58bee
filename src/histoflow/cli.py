"""The ``histoflow`` command line: ``histoflow demo`` runs the pipeline end to end."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "build_parser"]


def _demo(args: argparse.Namespace) -> int:
    import numpy as np

    import histoflow as hf
    from histoflow._constants import Key

    def step(msg: str) -> float:
        print(f"[histoflow demo] {msg}", flush=True)
        return time.perf_counter()

    t0 = step(f"histoflow {hf.__version__}: dataset {args.dataset!r}")
    if args.dataset == "synthetic":
        sdata = hf.datasets.synthetic(n_slides=args.n_slides, grid=(args.grid, args.grid), seed=args.seed)
    else:
        path = args.path or os.environ.get("HISTOFLOW_DATA")
        sections = args.sections.split(",") if args.sections else ["C2", "C3", "C4", "C5", "C6"]
        sdata = hf.datasets.her2st(sections=sections, path=path)
    table = sdata.tables[Key.table]
    libs = table.obs[Key.library].cat.categories.tolist()
    types = sorted(table.obs[Key.cancer_type].astype(str).unique())
    print(f"  {table.n_obs} spots × {table.n_vars} genes on {len(libs)} slides {libs}; cancer types {types}")
    print(f"  images: {sorted(sdata.images)}")

    step("pp.normalize: log1p of raw counts → layers['log1p'] (counts kept)")
    hf.pp.normalize(sdata)
    step("pp.split_slides: whole slides to train / val / test, stratified by cancer type")
    hf.pp.split_slides(sdata, level="slide", val_frac=args.val_frac, test_frac=args.test_frac, seed=args.seed)
    split = table.obs[Key.split].astype(str)
    for name in ("train", "val", "test"):
        ids = sorted(table.obs.loc[split == name, Key.library].astype(str).unique())
        print(f"  {name}: {ids}")
    step(f"pp.select_genes: top-{args.n_genes} HVGs per cancer type on the training slides (seurat_v3, raw counts)")
    train = (split == "train").to_numpy()
    hf.pp.select_genes(sdata, flavor="hvg", n_top=args.n_genes, mask_obs=train)
    panel = table.var_names[table.var[Key.panel].to_numpy()].tolist()
    print(f"  panel: {len(panel)} genes, e.g. {panel[:8]}")

    t = step(f"pp.embed_patches: encoder {args.encoder!r}, {args.patch_size_um:g} µm patches at {args.patch_px} px")
    hf.pp.embed_patches(
        sdata,
        args.encoder,
        patch_size_um=args.patch_size_um,
        patch_px=args.patch_px,
        batch_size=args.batch_size,
        show_progress_bar=not args.quiet,
    )
    key = f"X_{args.encoder}"
    feats = table.obsm[key]
    rate = table.n_obs / (time.perf_counter() - t)
    print(
        f"  obsm[{key!r}]: {feats.shape[0]} × {feats.shape[1]} features ({rate:.0f} patches/s); "
        f"mean {float(np.mean(feats)):.4f}"
    )

    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        summary = out / "summary.txt"
        tmp = summary.with_suffix(".tmp")
        tmp.write_text(
            f"dataset: {args.dataset}\nspots: {table.n_obs}\nslides: {libs}\npanel: {panel}\n"
            f"features: {key} {feats.shape}\n"
        )
        tmp.replace(summary)
        print(f"  wrote {summary}")
    step(f"done in {time.perf_counter() - t0:.1f} s (fitting, prediction and evaluation arrive with MoLF)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``histoflow`` command."""
    parser = argparse.ArgumentParser(
        prog="histoflow", description="Predict spatial gene expression from H&E histology."
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="run the pipeline on the synthetic dataset (offline) or on HER2ST")
    demo.add_argument("--dataset", choices=["synthetic", "her2st"], default="synthetic")
    demo.add_argument("--path", help="local HER2ST folder (default: $HISTOFLOW_DATA, else download)")
    demo.add_argument("--sections", help="comma-separated HER2ST sections (default C2,C3,C4,C5,C6)")
    demo.add_argument("--n-slides", type=int, default=6, help="synthetic slides (default 6)")
    demo.add_argument("--grid", type=int, default=16, help="synthetic spots per side of each slide (default 16)")
    demo.add_argument("--n-genes", type=int, default=50, help="HVGs per cancer type (default 50)")
    demo.add_argument("--encoder", default="efficientnet_lite0", help="patch encoder (default efficientnet_lite0)")
    demo.add_argument("--patch-size-um", type=float, default=112.0)
    demo.add_argument("--patch-px", type=int, default=224)
    demo.add_argument("--batch-size", type=int, default=64)
    demo.add_argument("--val-frac", type=float, default=0.2)
    demo.add_argument("--test-frac", type=float, default=0.2)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", help="folder for a summary of the run")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``histoflow`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from histoflow import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (KeyError, ValueError, FileNotFoundError, TypeError) as e:
        print(f"histoflow {args.command}: error: {e}", file=sys.stderr)
        return 1
