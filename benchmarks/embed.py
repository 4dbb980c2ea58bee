"""Throughput of ``pp.embed_patches`` against the encoder's forward pass alone on the same patches.

    python benchmarks/embed.py [--dataset her2st|synthetic] [--sections C2 C3] [--repeats 3]
                               [--encoder efficientnet_lite0]

Prints patches per second (median over repeats) of
- ``forward``: the encoder on pre-cut, pre-normalised tensors (nothing else);
- ``embed_patches``: the whole pipeline (resolve slides, read images, cut + resize, normalise, encode, write);
and the pipeline overhead = (t_embed − t_forward) / t_forward. Target: at most 20 %.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import histoflow as hf
from histoflow.pp._encoders import get_encoder
from histoflow.pp._patches import _Preprocess


def _shared() -> Path:
    env = os.environ.get("HISTOFLOW_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def load(dataset: str, sections: list[str]):
    if dataset == "her2st":
        return hf.io.read_her2st(_shared() / "her2st", sections=sections)
    return hf.datasets.synthetic(n_slides=2, seed=0)


def forward_only(enc, patches: np.ndarray, batch_size: int) -> float:
    prep = _Preprocess(enc, torch.device("cpu"), patches.shape[1])
    batches = [prep(patches[s : s + batch_size]) for s in range(0, len(patches), batch_size)]
    t = time.perf_counter()
    with torch.inference_mode():
        for x in batches:
            enc(x)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["her2st", "synthetic"], default="her2st")
    p.add_argument("--sections", nargs="+", default=["C2"])
    p.add_argument("--encoder", default="efficientnet_lite0")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    sdata = load(args.dataset, args.sections)
    table = sdata.tables["table"]
    n = table.n_obs
    enc = get_encoder(args.encoder)
    t = time.perf_counter()
    patches = hf.pp.crop_patches(sdata)
    t_crop = time.perf_counter() - t
    with torch.inference_mode():  # warm-up
        enc(_Preprocess(enc, torch.device("cpu"), patches.shape[1])(patches[:4]))

    fwd, emb = [], []
    for _ in range(args.repeats):
        fwd.append(forward_only(enc, patches, args.batch_size))
        t = time.perf_counter()
        hf.pp.embed_patches(sdata, enc, batch_size=args.batch_size, show_progress_bar=False)
        emb.append(time.perf_counter() - t)
    f, e = statistics.median(fwd), statistics.median(emb)
    print(
        f"dataset={args.dataset} sections={args.sections if args.dataset == 'her2st' else '-'} spots={n} "
        f"encoder={args.encoder} batch={args.batch_size} torch_threads={torch.get_num_threads()} "
        f"repeats={args.repeats}"
    )
    print(f"crop_patches alone (image read + cut + resize): {t_crop:.2f} s ({n / t_crop:.0f} patches/s)")
    print()
    print("| step | median s | patches/s |")
    print("|---|---|---|")
    print(f"| encoder forward alone | {f:.2f} | {n / f:.1f} |")
    print(f"| embed_patches (whole pipeline) | {e:.2f} | {n / e:.1f} |")
    print()
    print(f"pipeline overhead: {100 * (e - f) / f:.1f} % of encoder time (target ≤ 20 %)")


if __name__ == "__main__":
    main()
