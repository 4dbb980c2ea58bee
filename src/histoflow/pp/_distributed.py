"""Embedding patches on several devices (or CPU processes) through Lightning's ``Trainer.predict``.

Each process embeds whole slides (dealt to processes by size, so each image is read by one process only); the
processes write their features to a temporary folder and the calling process gathers them. This module imports
torch and Lightning; :mod:`histoflow.pp` imports it only when ``devices`` is given.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from histoflow.io._resolve import Slide
from histoflow.pp._patches import _Preprocess, encode, iter_patches

__all__ = ["embed_distributed"]


def _deal(slides: Sequence[Slide], world: int, rank: int) -> list[Slide]:
    """Largest slides first, each to the process with the fewest spots so far; the slides of ``rank``."""
    load = [0] * world
    mine = []
    for s in sorted(slides, key=lambda s: -len(s.rows)):
        r = int(np.argmin(load))
        load[r] += len(s.rows)
        if r == rank:
            mine.append(s)
    return mine


class _Stream(torch.utils.data.IterableDataset):
    """Batches of (table rows, uint8 patches, index of the patch size) of this process's slides, for every size."""

    def __init__(self, slides: Sequence[Slide], sizes: Sequence[float], kwargs: dict[str, Any]):
        self.slides, self.sizes, self.kwargs = list(slides), list(sizes), kwargs

    def __iter__(self):
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        world = torch.distributed.get_world_size() if dist else 1
        rank = torch.distributed.get_rank() if dist else 0
        mine = _deal(self.slides, world, rank)
        for block, size in enumerate(self.sizes):
            for rows, patches in iter_patches(mine, patch_size_um=size, **self.kwargs):
                yield torch.from_numpy(np.asarray(rows, dtype=np.int64)), torch.from_numpy(patches), block


class _Module(L.LightningModule):
    def __init__(self, enc: Any, patch_px: int, dihedral: bool = False):
        super().__init__()
        self.enc, self.patch_px, self.dihedral = enc, patch_px, dihedral
        self.model = enc.model  # registered, so Lightning moves it to the device

    def predict_step(self, batch: Any, batch_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, patches, block = batch
        x = _Preprocess(self.enc, self.device, self.patch_px)(patches)
        return rows.cpu(), torch.full_like(rows.cpu(), int(block)), encode(self.enc, x, self.dihedral).float().cpu()


class _Writer(BasePredictionWriter):
    def __init__(self, folder: Path):
        super().__init__(write_interval="epoch")
        self.folder = Path(folder)

    def write_on_epoch_end(self, trainer: Any, pl_module: Any, predictions: Any, batch_indices: Any) -> None:
        batches = [b for b in predictions if len(b[0])]
        rows = torch.cat([r for r, _, _ in batches]).numpy() if batches else np.zeros(0, dtype=np.int64)
        blocks = torch.cat([k for _, k, _ in batches]).numpy() if batches else np.zeros(0, dtype=np.int64)
        feats = torch.cat([f for _, _, f in batches]).numpy() if batches else np.zeros((0, 0), dtype=np.float32)
        tmp = self.folder / f"rank{trainer.global_rank}.tmp.npz"
        np.savez(tmp, rows=rows, blocks=blocks, feats=feats)
        tmp.replace(self.folder / f"rank{trainer.global_rank}.npz")


def embed_distributed(
    slides: Sequence[Slide],
    enc: Any,
    *,
    n_obs: int,
    patch_sizes_um: Sequence[float],
    patch_px: int,
    batch_size: int,
    max_read_pixels: int,
    accelerator: str,
    devices: Any,
    strategy: str | None,
    num_nodes: int = 1,
    dihedral: bool = False,
    show_progress_bar: bool = True,
) -> np.ndarray:
    """Features ``(n_obs, d × len(patch_sizes_um))`` of the spots of ``slides``, by one ``Trainer.predict``.

    The encoder's features of the patch of each size, concatenated in the order given; the processes are launched once
    for all sizes.
    """
    sizes = list(patch_sizes_um)
    kwargs = {
        "patch_px": patch_px,
        "batch_size": batch_size,
        "max_read_pixels": max_read_pixels,
    }
    with tempfile.TemporaryDirectory(prefix="histoflow-embed-") as tmp:
        folder = Path(tmp)
        trainer = L.Trainer(
            accelerator=accelerator,
            devices=devices,
            strategy=strategy or "auto",
            num_nodes=num_nodes,
            callbacks=[_Writer(folder)],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=show_progress_bar,
            enable_model_summary=False,
            inference_mode=True,
        )
        loader = torch.utils.data.DataLoader(_Stream(slides, sizes, kwargs), batch_size=None)
        trainer.predict(_Module(enc, patch_px, dihedral), dataloaders=loader, return_predictions=False)
        feats: np.ndarray | None = None
        seen = np.zeros((n_obs, len(sizes)), dtype=bool)
        for f in sorted(folder.glob("rank*.npz")):
            with np.load(f) as z:
                rows, blocks, part = z["rows"], z["blocks"], z["feats"]
            if rows.size == 0:
                continue
            d = part.shape[1]
            if feats is None:
                feats = np.zeros((n_obs, d * len(sizes)), dtype=np.float32)
            for block in range(len(sizes)):
                sel = blocks == block
                feats[rows[sel], block * d : (block + 1) * d] = part[sel]
                seen[rows[sel], block] = True
    expected = np.concatenate([s.rows for s in slides])
    if feats is None or not seen[expected].all():
        raise RuntimeError("Distributed embedding lost spots: some processes returned no features.")
    return feats
