"""Cut patches centred on spots at a physical size, and embed them with an encoder into ``obsm``."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from histoflow._constants import Key
from histoflow._docs import doc_params
from histoflow._logging import logger
from histoflow._utils import copy_data, get_table, log_write, torch_device
from histoflow._validate import check_positive
from histoflow.io._resolve import ImageLevel, Slide, resolve_slides

if TYPE_CHECKING:
    import torch
    from anndata import AnnData
    from spatialdata import SpatialData

    from histoflow.pp._encoders import Encoder

__all__ = ["crop_patches", "embed_patches", "iter_patches"]

_DEFAULT_MAX_READ_PIXELS = 64 * 1024 * 1024  # pixels per region read (≈ 200 MB of RGB uint8)


def _choose_level(levels: Sequence[ImageLevel], pixel_size_um: float, target_um: float) -> int:
    """The coarsest level whose pixels are not coarser than the target pixel size (level 0 if all are)."""
    best = 0
    for i, level in enumerate(levels):
        if pixel_size_um * level.downsample <= target_um * (1 + 1e-3):
            best = i
    return best


def _read(data: Any, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    region = data[:3, y0:y1, x0:x1]
    if hasattr(region, "compute"):
        region = region.compute()
    return np.moveaxis(np.asarray(region), 0, -1)


def _resize(patch: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if patch.shape[0] == size and patch.shape[1] == size:
        return patch
    return np.asarray(Image.fromarray(np.ascontiguousarray(patch)).resize((size, size), Image.BILINEAR))


def _slide_patches(
    slide: Slide,
    patch_size_um: float,
    patch_px: int,
    max_read_pixels: int,
    pad_value: int,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(rows, patches)`` for one slide, band by band (bounded memory), in the order they are read."""
    if not slide.levels:
        raise ValueError(f"Slide {slide.library_id!r} has no image; patches cannot be cut.")
    li = _choose_level(slide.levels, slide.pixel_size_um, patch_size_um / patch_px)
    level = slide.levels[li]
    level_um = slide.pixel_size_um * level.downsample
    # HEST-1k convention: source side = round(target side in µm / µm per pixel), top-left = round(centre - side / 2)
    side = max(1, int(round(patch_size_um / level_um)))
    centers = slide.centers / level.downsample
    tl = np.round(centers - side / 2.0).astype(np.int64)
    h, w = level.shape_yx
    order = np.argsort(tl[:, 1], kind="stable")
    x_lo, x_hi = int(tl[:, 0].min()), int(tl[:, 0].max()) + side
    width = x_hi - x_lo
    rows_per_band = max(side, max_read_pixels // max(width, 1))
    start = 0
    while start < len(order):
        y_start = tl[order[start], 1]
        stop = start
        while stop < len(order) and tl[order[stop], 1] + side - y_start <= rows_per_band:
            stop += 1
        stop = max(stop, start + 1)
        idx = order[start:stop]
        by0, by1 = int(tl[idx, 1].min()), int(tl[idx, 1].max()) + side
        band = np.full((by1 - by0, width, 3), pad_value, dtype=np.uint8)
        ry0, ry1, rx0, rx1 = max(by0, 0), min(by1, h), max(x_lo, 0), min(x_hi, w)
        if ry1 > ry0 and rx1 > rx0:
            band[ry0 - by0 : ry1 - by0, rx0 - x_lo : rx1 - x_lo] = _read(level.data, ry0, ry1, rx0, rx1)
        patches = np.empty((len(idx), patch_px, patch_px, 3), dtype=np.uint8)
        for j, i in enumerate(idx):
            y, x = tl[i, 1] - by0, tl[i, 0] - x_lo
            patches[j] = _resize(band[y : y + side, x : x + side], patch_px)
        yield slide.rows[idx], patches
        start = stop


def iter_patches(
    slides: Sequence[Slide],
    *,
    patch_size_um: float = 112.0,
    patch_px: int = 224,
    batch_size: int = 64,
    max_read_pixels: int = _DEFAULT_MAX_READ_PIXELS,
    pad_value: int = 255,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(table rows, uint8 patches (b, patch_px, patch_px, 3))`` in batches of at most ``batch_size``."""
    for slide in slides:
        for rows, patches in _slide_patches(slide, patch_size_um, patch_px, max_read_pixels, pad_value):
            for s in range(0, len(rows), batch_size):
                yield rows[s : s + batch_size], patches[s : s + batch_size]


def _validate_patch_args(patch_size_um: float, patch_px: int, batch_size: int | None = None) -> None:
    check_positive(patch_size_um, "patch_size_um")
    if int(patch_px) != patch_px or patch_px < 8:
        raise ValueError(f"`patch_px` must be an integer of at least 8, got {patch_px!r}.")
    if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")


def _context_sizes(context_size_um: Any) -> tuple[float, ...]:
    """``embed_patches``' context sizes as a tuple of positive floats (empty for None)."""
    if context_size_um is None:
        return ()
    sizes = (context_size_um,) if np.ndim(context_size_um) == 0 else tuple(context_size_um)
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, int | float | np.integer | np.floating):
            raise TypeError(
                f"`context_size_um` must be a number or a sequence of numbers (micrometres), got {context_size_um!r}."
            )
        check_positive(size, "context_size_um")
    return tuple(float(size) for size in sizes)


@doc_params()
def crop_patches(
    sdata: SpatialData | AnnData,
    *,
    table_key: str = Key.table,
    library_key: str = Key.library,
    image_key: str | Mapping[str, str] | None = None,
    spatial_key: str = Key.spatial,
    pixel_size_key: str = Key.pixel_size,
    patch_size_um: float = 112.0,
    patch_px: int = 224,
    obs_names: Sequence[str] | None = None,
    pad_value: int = 255,
) -> np.ndarray:
    """Cut the H&E patch centred on each spot, at a physical size.

    The patch covers ``patch_size_um`` micrometres and is resized to ``patch_px`` pixels. The source region follows
    HEST-1k exactly: side ``round(patch_size_um / µm-per-pixel)`` on the chosen pyramid level, top-left corner
    ``round(centre - side / 2)``, bilinear resize; so with the defaults (112 µm, 224 px = 0.5 µm/px) the patches are
    pixel-identical to HEST-1k's ``patches/<id>.h5``. Each slide's image is read once (or in bands of rows for large
    images) and patches are sliced from it; parts outside the image are filled with ``pad_value``.

    Parameters
    ----------
    sdata
        SpatialData with H&E images and the table, or an AnnData with ``uns["spatial"]`` images (scanpy layout).
    {doc_table_key}
    {doc_library_key}
    {doc_patch_params}
    obs_names
        Only these spots (default all), in this order.
    pad_value
        Fill value for the part of a patch that lies outside the image.

    Returns
    -------
    ``uint8`` array of shape ``(n_spots, patch_px, patch_px, 3)`` in table row order (or ``obs_names`` order).
    """
    _validate_patch_args(patch_size_um, patch_px)
    table = get_table(sdata, table_key)
    slides = resolve_slides(
        sdata,
        table,
        library_key=library_key,
        image_key=image_key,
        spatial_key=spatial_key,
        pixel_size_key=pixel_size_key,
    )
    if obs_names is not None:
        pos = table.obs_names.get_indexer(list(obs_names))
        if (pos < 0).any():
            missing = [n for n, p in zip(obs_names, pos) if p < 0][:5]
            raise KeyError(f"`obs_names` contains names not in the table, e.g. {missing}.")
        wanted = {int(p): i for i, p in enumerate(pos)}
        slides = [_subset_slide(s, np.fromiter(wanted, dtype=np.int64)) for s in slides]
        slides = [s for s in slides if len(s.rows)]
        out = np.empty((len(pos), patch_px, patch_px, 3), dtype=np.uint8)
        for rows, patches in iter_patches(slides, patch_size_um=patch_size_um, patch_px=patch_px, pad_value=pad_value):
            out[[wanted[int(r)] for r in rows]] = patches
        return out
    out = np.empty((table.n_obs, patch_px, patch_px, 3), dtype=np.uint8)
    for rows, patches in iter_patches(slides, patch_size_um=patch_size_um, patch_px=patch_px, pad_value=pad_value):
        out[rows] = patches
    return out


def _subset_slide(slide: Slide, rows: np.ndarray) -> Slide:
    keep = np.isin(slide.rows, rows)
    return Slide(
        slide.library_id, slide.rows[keep], slide.centers[keep], slide.pixel_size_um, slide.levels, slide.image_key
    )


class _Preprocess:
    """uint8 NHWC patches → normalised float NCHW tensors at the encoder's input size (on the encoder's device)."""

    def __init__(self, enc: Encoder, device: torch.device, patch_px: int):
        import torch

        self.device = device
        self.mean = torch.tensor(enc.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(enc.std, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0
        self.size = enc.input_size
        self.patch_px = patch_px

    def __call__(self, patches: np.ndarray | torch.Tensor) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        x = torch.as_tensor(patches).to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        if self.size != self.patch_px:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean) / self.std


def encode(enc: Encoder, x: torch.Tensor, dihedral: bool = False) -> torch.Tensor:
    """Features of normalised patches ``x``; with ``dihedral``, their mean over the 8 rotations and flips.

    On CUDA, convolutions run in full float32 (no TF32) with deterministic cuDNN algorithms: a patch's features then do
    not depend on the batch it is in, and differ from the CPU's only by rounding.
    """
    import torch

    exact = {"benchmark": False, "deterministic": True, "allow_tf32": False}
    with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, **exact):
        return _encode(enc, x, dihedral)


def _encode(enc: Encoder, x: torch.Tensor, dihedral: bool) -> torch.Tensor:
    if not dihedral:
        return enc(x)
    import torch

    total = None
    for k in range(4):
        turned = torch.rot90(x, k, dims=(2, 3))
        for view in (turned, torch.flip(turned, dims=(3,))):
            out = enc(view).float()
            total = out if total is None else total + out
    return total / 8


@doc_params()
def embed_patches(
    sdata: SpatialData | AnnData,
    encoder: str | Any = "efficientnet_lite0",
    *,
    checkpoint: str | Path | None = None,
    table_key: str = Key.table,
    library_key: str = Key.library,
    image_key: str | Mapping[str, str] | None = None,
    spatial_key: str = Key.spatial,
    pixel_size_key: str = Key.pixel_size,
    patch_size_um: float = 112.0,
    patch_px: int = 224,
    batch_size: int = 64,
    device: str = "auto",
    accelerator: str = "auto",
    devices: int | str | Sequence[int] | None = None,
    strategy: str | None = None,
    num_nodes: int = 1,
    max_read_pixels: int = _DEFAULT_MAX_READ_PIXELS,
    dihedral: bool = False,
    context_size_um: float | Sequence[float] | None = None,
    show_progress_bar: bool = True,
    key_added: str | None = None,
    copy: bool = False,
) -> SpatialData | AnnData | None:
    """Embed the H&E patch under each spot with an image encoder.

    Patches are cut as in :func:`crop_patches` (HEST-1k convention: 112 µm at 224 px by default), normalised as the
    encoder expects and run through it in batches on ``device``. Each slide's image is read once (in bands of rows for
    very large whole-slide images, bounded by ``max_read_pixels``).

    Parameters
    ----------
    sdata
        SpatialData with H&E images and the table, or an AnnData with ``uns["spatial"]`` images (scanpy layout).
    encoder
        A named encoder (``"efficientnet_lite0"``, the offline default; ``"uni"``, ``"uni2-h"``, ``"virchow2"``,
        ``"h-optimus-0"``, ``"gigapath"``), any timm model name, a :class:`torch.nn.Module`, or an
        :class:`~histoflow.pp.Encoder`; see :func:`~histoflow.pp.get_encoder`.
    checkpoint
        Local weights file for a named or timm encoder (for machines without access to the model hub).
    {doc_table_key}
    {doc_library_key}
    {doc_patch_params}
    batch_size
        Patches per forward pass.
    device
        Single-process run: ``"auto"`` (CUDA, then MPS, then CPU), or a torch device string such as ``"cuda:1"``.
    accelerator
        With ``devices``: Lightning accelerator (``"auto"``, ``"gpu"``, ``"cpu"``, ...).
    devices
        Run on several devices (or CPU processes) through Lightning's ``Trainer.predict``; e.g. ``4`` GPUs, or
        ``2`` CPU processes with ``accelerator="cpu"``. Slides are dealt to processes, each image read by one.
        None (default) runs in this process on ``device``.
    strategy
        With ``devices``: Lightning strategy; default ``"ddp_notebook"`` in Jupyter, ``"ddp_spawn"`` elsewhere.
    num_nodes
        With ``devices``: number of machines.
    max_read_pixels
        Largest image region (pixels) read at once; bounds memory for whole-slide images.
    dihedral
        Average each patch's features over its 8 rotations by quarter turns and their mirror images. A section has
        no preferred orientation, so the averaged features do not depend on how the slide was placed on the
        scanner; this costs 8 encoder passes per patch. On HER2ST it raised the held-out PCC of every method run
        (ridge, MLP, MoLF and its dense ablation; see the benchmarks page of the documentation).
    context_size_um
        Multi-scale features: also cut a larger patch of this side (micrometres; one size or several) centred on
        each spot, resize it to ``patch_px`` and encode it the same way; its features are concatenated after the
        spot patch's, in the order given (so the feature dimension grows by the encoder's width per size). On legacy
        ST (100 µm spots on a 200 µm grid) the 112 µm spot patch never sees the tissue between spots; on HER2ST,
        ``context_size_um=[224, 448]`` raised the held-out PCC of MoLF from 0.239 to 0.288, and ridge and the MLP
        gained as much (see the benchmarks page).
        Each size costs one more read of each image and one more encoder pass per patch (times 8 with
        ``dihedral``).
    show_progress_bar
        Show a tqdm progress bar.
    key_added
        ``obsm`` key for the features; default ``"X_<encoder name>"``.
    {doc_copy}

    Returns
    -------
    Sets ``adata.obsm['X_<encoder>' | key_added]`` (float32, spots × features) and ``adata.uns[key]`` (encoder
    name, patch and context sizes, pixel size, timing) on the table; returns the copy if ``copy=True``, else None.
    """
    from histoflow.pp._encoders import get_encoder

    _validate_patch_args(patch_size_um, patch_px, batch_size)
    if not isinstance(dihedral, (bool, np.bool_)):
        raise TypeError(f"`dihedral` must be True or False, got {dihedral!r}.")
    contexts = _context_sizes(context_size_um)
    target = copy_data(sdata, table_key) if copy else sdata
    table = get_table(target, table_key)
    slides = resolve_slides(
        target,
        table,
        library_key=library_key,
        image_key=image_key,
        spatial_key=spatial_key,
        pixel_size_key=pixel_size_key,
    )
    n_rows = sum(len(s.rows) for s in slides)
    enc = get_encoder(encoder, checkpoint=checkpoint)
    key = key_added or Key.embedding(enc.name)

    t_encode = 0.0
    t0 = time.perf_counter()
    sizes = (float(patch_size_um), *contexts)  # the spot patch, then each context patch
    if devices is not None:  # one launch of the processes for every size
        from histoflow.models._train import default_strategy
        from histoflow.pp._distributed import embed_distributed

        feats = embed_distributed(
            slides,
            enc,
            n_obs=table.n_obs,
            patch_sizes_um=sizes,
            patch_px=patch_px,
            batch_size=batch_size,
            max_read_pixels=max_read_pixels,
            accelerator=accelerator,
            devices=devices,
            strategy=strategy or default_strategy(accelerator, devices, num_nodes),
            num_nodes=num_nodes,
            dihedral=dihedral,
            show_progress_bar=show_progress_bar,
        )
        t_encode = float("nan")
    else:
        blocks = []
        for size in sizes:
            block, seconds = _embed_here(
                slides,
                enc,
                table.n_obs,
                n_rows,
                device,
                size,
                patch_px,
                batch_size,
                max_read_pixels,
                show_progress_bar,
                dihedral=dihedral,
            )
            if block is None:  # pragma: no cover - resolve_slides rejects empty tables
                raise ValueError("No spots to embed.")
            t_encode += seconds
            blocks.append(block)
        feats = blocks[0] if len(blocks) == 1 else np.hstack(blocks)
    total = time.perf_counter() - t0
    if not np.isfinite(feats).all():
        raise FloatingPointError(f"Encoder {enc.name!r} produced NaN or infinite features; check its weights.")

    table.obsm[key] = feats
    log_write("obsm", key)
    table.uns[key] = {
        "encoder": enc.name,
        "checkpoint": str(checkpoint) if checkpoint is not None else "",
        "patch_size_um": float(patch_size_um),
        "patch_px": int(patch_px),
        "mean": list(map(float, enc.mean)),
        "std": list(map(float, enc.std)),
        "n_features": int(feats.shape[1]),
        "dihedral": bool(dihedral),
        "context_size_um": [float(c) for c in contexts],
        "seconds_total": float(total),
        "seconds_encoder": float(t_encode),
    }
    log_write("uns", key)
    logger.info("Embedded %d patches with %r in %.1f s (encoder %.1f s)", n_rows, enc.name, total, t_encode)
    return target if copy else None


def _embed_here(
    slides: Sequence[Slide],
    enc: Encoder,
    n_obs: int,
    n_rows: int,
    device: str,
    patch_size_um: float,
    patch_px: int,
    batch_size: int,
    max_read_pixels: int,
    show_progress_bar: bool,
    *,
    dihedral: bool = False,
) -> tuple[np.ndarray | None, float]:
    """Embed in this process; returns the features and the seconds spent in the encoder."""
    import torch
    from tqdm.auto import tqdm

    dev = torch_device(device)
    enc.model = enc.model.to(dev).eval()
    prep = _Preprocess(enc, dev, patch_px)
    feats: np.ndarray | None = None
    t_encode = 0.0
    with torch.inference_mode(), tqdm(total=n_rows, desc=f"embed {enc.name}", disable=not show_progress_bar) as bar:
        for rows, patches in iter_patches(
            slides,
            patch_size_um=patch_size_um,
            patch_px=patch_px,
            batch_size=batch_size,
            max_read_pixels=max_read_pixels,
        ):
            t1 = time.perf_counter()
            out = encode(enc, prep(patches), dihedral).float().cpu().numpy()
            t_encode += time.perf_counter() - t1
            if feats is None:
                feats = np.zeros((n_obs, out.shape[1]), dtype=np.float32)
            feats[rows] = out
            bar.update(len(rows))
    return feats, t_encode
