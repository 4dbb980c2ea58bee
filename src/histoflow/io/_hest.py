"""Reader for the HEST-1k on-disk layout (Jaume et al., 2024): ``st/``, ``metadata/``, ``wsis/``, ``patches/``."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from histoflow._constants import DEFAULT_SPOT_DIAMETER_UM, Key
from histoflow._logging import logger
from histoflow._validate import check_choice, check_counts
from histoflow.io._build import SlideParts, as_uint8_rgb, build_spatialdata

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["read_hest", "HEST_UNS_KEY"]

#: ``uns`` entry of the table where :func:`read_hest` records where it read from (``path``) and the HEST patch
#: files found (``patches``: sample id → path of ``patches/<id>.h5``).
HEST_UNS_KEY = "histoflow_hest"

_TIFF_SUFFIXES = (".tif", ".tiff", ".btf")
_IMAGE_SUFFIXES = (*_TIFF_SUFFIXES, ".jpg", ".jpeg", ".png")
# downscaled images in ``uns["spatial"][<key>]["images"]``, best first
_DOWNSCALED_KEYS = ("downscaled_fullres", "hires", "lowres")


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value)


def _check_root(path: str | Path) -> Path:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"`path={str(path)!r}` is not a folder. Pass the HEST-1k folder that holds `st/`, `metadata/` and `wsis/`."
        )
    if not (root / "st").is_dir():
        raise FileNotFoundError(
            f"`path={str(path)!r}` has no `st/` folder; a HEST-1k folder holds `st/<id>.h5ad`, `metadata/<id>.json` "
            "and `wsis/<id>.tif`."
        )
    return root


def _read_metadata(root: Path, sample_id: str) -> dict[str, Any]:
    file = root / "metadata" / f"{sample_id}.json"
    if not file.is_file():
        raise FileNotFoundError(
            f"Sample {sample_id!r} has no metadata file {file}; HEST-1k keeps one JSON row per sample in `metadata/` "
            "(it gives the pixel size). Add it, or leave the sample out of `sample_ids`."
        )
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"Metadata file {file} is not valid JSON: {err}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"Metadata file {file} must hold one JSON object, got {type(meta).__name__}.")
    return meta


def _pixel_size(meta: Mapping[str, Any], sample_id: str) -> float:
    for key in ("pixel_size_um_estimated", "pixel_size_um_embedded", "pixel_size_um"):
        value = meta.get(key)
        if not _missing(value):
            value = float(value)
            if not np.isfinite(value) or value <= 0:
                raise ValueError(f"Sample {sample_id!r}: metadata `{key}` must be a positive number, got {value!r}.")
            return value
    raise ValueError(
        f"Sample {sample_id!r}: its metadata has no pixel size (`pixel_size_um_estimated` or "
        "`pixel_size_um_embedded`), which is needed to cut patches in micrometres. Add one to "
        f"`metadata/{sample_id}.json`."
    )


def _spatial_entry(adata: AnnData) -> tuple[str, Mapping[str, Any]] | tuple[None, None]:
    spatial = adata.uns.get("spatial")
    if isinstance(spatial, Mapping) and spatial:
        key = next(iter(spatial))
        entry = spatial[key]
        if isinstance(entry, Mapping):
            return str(key), entry
    return None, None


def _spot_diameter(meta: Mapping[str, Any], adata: AnnData, pixel_size: float, sample_id: str) -> float:
    value = meta.get("spot_diameter")
    if not _missing(value) and float(value) > 0:
        return float(value)
    _, entry = _spatial_entry(adata)
    fullres = (entry or {}).get("scalefactors", {}).get("spot_diameter_fullres")
    if not _missing(fullres) and float(fullres) > 0:
        return float(fullres) * pixel_size
    tech = str(meta.get("st_technology") or "").lower()
    if tech in DEFAULT_SPOT_DIAMETER_UM:
        return DEFAULT_SPOT_DIAMETER_UM[tech]
    raise ValueError(
        f"Sample {sample_id!r}: no spot diameter (metadata `spot_diameter`, scalefactor `spot_diameter_fullres`) "
        f"and no default for technology {meta.get('st_technology')!r}. Add `spot_diameter` (µm) to its metadata."
    )


def _open_tiff_level0(file: Path) -> Any:
    """Level 0 of a (pyramidal) TIFF as a lazy dask array, read tile by tile through ``tifffile``'s zarr store."""
    import dask.array as da
    import tifffile
    import zarr

    store = tifffile.imread(file, aszarr=True, series=0, level=0)
    arr = zarr.open(store, mode="r")
    if isinstance(arr, zarr.Group):  # pragma: no cover - level=0 gives an array; kept for older tifffile
        arr = arr["0"]
    img = da.from_zarr(arr)
    if img.ndim == 3 and img.shape[0] in (3, 4) and img.shape[-1] not in (3, 4):
        img = img.transpose(1, 2, 0)
    if img.ndim != 3 or img.shape[-1] not in (3, 4):
        raise ValueError(f"WSI {file} must be an RGB image, got level-0 shape {img.shape}.")
    if img.dtype != np.uint8:
        raise ValueError(f"WSI {file} must hold 8-bit RGB, got dtype {img.dtype}.")
    return img[..., :3]


def _find_wsi(root: Path, sample_id: str) -> Path | None:
    folder = root / "wsis"
    for suffix in _IMAGE_SUFFIXES:
        for name in (sample_id + suffix, sample_id + suffix.upper()):
            if (folder / name).is_file():
                return folder / name
    return None


def _read_image(root: Path, sample_id: str, adata: AnnData) -> tuple[Any, float]:
    """(image, image pixels per full-resolution pixel) of one sample, or (None, 1.0)."""
    wsi = _find_wsi(root, sample_id)
    if wsi is not None:
        if wsi.suffix.lower() in _TIFF_SUFFIXES:
            return _open_tiff_level0(wsi), 1.0
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = None
        with Image.open(wsi) as im:
            return as_uint8_rgb(np.asarray(im.convert("RGB") if im.mode != "RGB" else im), f"WSI {wsi}"), 1.0
    key, entry = _spatial_entry(adata)
    images = (entry or {}).get("images", {}) or {}
    scalefactors = (entry or {}).get("scalefactors", {}) or {}
    for name in (*_DOWNSCALED_KEYS, *images):
        scalef = scalefactors.get(f"tissue_{name}_scalef")
        if name in images and not _missing(scalef):
            logger.warning(
                "Sample %s has no WSI in %s; using the downscaled image uns['spatial'][%r]['images'][%r] "
                "(scale %.4g): patches will be cut from a downscaled image",
                sample_id,
                root / "wsis",
                key,
                name,
                float(scalef),
            )
            return as_uint8_rgb(images[name], f"Image {name!r} of sample {sample_id!r}"), float(scalef)
    logger.warning("Sample %s has no WSI in %s and no downscaled image; reading it without image", sample_id, root)
    return None, 1.0


def _centres(adata: AnnData, sample_id: str) -> np.ndarray:
    if Key.spatial in adata.obsm:
        xy = np.asarray(adata.obsm[Key.spatial], dtype=np.float64)
    elif {"pxl_col_in_fullres", "pxl_row_in_fullres"} <= set(adata.obs.columns):
        xy = adata.obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)
    else:
        raise KeyError(
            f"Sample {sample_id!r}: `st/{sample_id}.h5ad` has neither `obsm['spatial']` nor "
            "`obs[['pxl_col_in_fullres', 'pxl_row_in_fullres']]` with the spot centres."
        )
    if xy.ndim != 2 or xy.shape[1] < 2 or not np.isfinite(xy[:, :2]).all():
        raise ValueError(f"Sample {sample_id!r}: spot centres must be finite (n_spots, 2), got shape {xy.shape}.")
    return xy[:, :2]


def _sample_parts(root: Path, sample_id: str, load_images: bool) -> SlideParts:
    import anndata as ad

    meta = _read_metadata(root, sample_id)
    pixel_size = _pixel_size(meta, sample_id)
    adata = ad.read_h5ad(root / "st" / f"{sample_id}.h5ad")
    if adata.n_obs == 0:
        raise ValueError(f"Sample {sample_id!r}: `st/{sample_id}.h5ad` has no spots.")
    if not adata.obs_names.is_unique:
        raise ValueError(f"Sample {sample_id!r}: spot barcodes (obs_names) are not unique.")
    check_counts(adata.X, f"X of st/{sample_id}.h5ad")
    if not adata.var_names.is_unique:
        logger.info("Sample %s: making %d duplicated gene names unique", sample_id, adata.var_names.duplicated().sum())
        adata.var_names_make_unique()
    image, scale = _read_image(root, sample_id, adata) if load_images else (None, 1.0)
    onco = meta.get("oncotree_code")
    cancer_type = onco if not _missing(onco) else (meta.get("disease_state") or "unknown")
    slide_meta = {
        Key.patient: str(meta["patient"]) if not _missing(meta.get("patient")) else sample_id,
        Key.cancer_type: str(cancer_type),
        Key.organ: str(meta.get("organ") or "unknown"),
        Key.species: str(meta.get("species") or "unknown"),
        Key.technology: str(meta.get("st_technology") or "unknown"),
    }
    return SlideParts(
        library_id=sample_id,
        spot_ids=[str(s) for s in adata.obs_names],
        centers_px=_centres(adata, sample_id),
        pixel_size_um=pixel_size,
        spot_diameter_um=_spot_diameter(meta, adata, pixel_size, sample_id),
        counts=adata.X,
        var_names=list(adata.var_names),
        image=image,
        image_scale=scale,
        meta=slide_meta,
        spot_obs=pd.DataFrame(adata.obs).reset_index(drop=True),
    )


def read_hest(
    path: str | Path,
    sample_ids: str | Sequence[str] | None = None,
    *,
    load_images: bool = True,
    join: Literal["inner", "outer"] = "inner",
) -> SpatialData:
    """Read samples stored in the HEST-1k layout into one SpatialData with one slide per sample.

    Layout (as downloaded from HEST-1k): ``st/<id>.h5ad`` (raw counts; ``obsm["spatial"]`` = spot centres in
    full-resolution pixels), ``metadata/<id>.json`` (the HEST-1k metadata row), ``wsis/<id>.tif`` (pyramidal TIFF,
    read lazily tile by tile; a plain ``.jpg``/``.png``/``.tif`` image works too) and optionally
    ``patches/<id>.h5`` (HEST patches). Without a WSI, the downscaled image stored in the h5ad
    (``uns["spatial"][<key>]["images"]``) is used with its scale factor, and a warning says so.

    Parameters
    ----------
    path
        HEST-1k folder holding ``st/`` and ``metadata/``.
    sample_ids
        HEST sample ids such as ``"SPA141"`` or ``["TENX95", "NCBI783"]``; None reads every ``st/*.h5ad``.
    load_images
        Whether to open the images (TIFFs are opened lazily; nothing is read until used).
    join
        How to combine gene sets that differ between samples: ``"inner"`` keeps the shared genes, ``"outer"``
        all (see :func:`~histoflow.io.build_spatialdata`).

    Returns
    -------
    SpatialData with one slide per sample, library id = sample id (see :func:`~histoflow.io.build_spatialdata`):
    ``images["<id>_full_image"]`` (or ``"<id>_downscaled_image"``), circle ``shapes["<id>"]`` and
    ``tables["table"]`` with raw counts in ``X``, ``obsm["spatial"]`` (full-resolution pixels), the h5ad's
    ``obs`` columns and ``library_id``, ``patient``, ``cancer_type`` (OncoTree code; the disease state, e.g.
    ``"Healthy"``, where there is none), ``organ``, ``species``, ``technology``, ``pixel_size_um``
    (``pixel_size_um_estimated``) and ``spot_diameter_um``. ``uns["histoflow_hest"]`` holds ``path`` and
    ``patches`` (sample id → path of ``patches/<id>.h5``, for samples that have one).
    """
    check_choice(join, ["inner", "outer"], "join")
    root = _check_root(path)
    available = sorted(f.name[: -len(".h5ad")] for f in (root / "st").glob("*.h5ad"))
    if not available:
        raise FileNotFoundError(f"`path={str(path)!r}`: `{root / 'st'}` holds no `<id>.h5ad` file.")
    if sample_ids is None:
        ids = available
    else:
        ids = [sample_ids] if isinstance(sample_ids, str) else [str(s) for s in sample_ids]
        if not ids:
            raise ValueError("`sample_ids` is empty; pass HEST ids such as ['SPA141'] or None for all.")
        if len(set(ids)) != len(ids):
            raise ValueError(f"`sample_ids` has duplicates: {ids}.")
        unknown = [s for s in ids if s not in available]
        if unknown:
            shown = available[:50] + (["..."] if len(available) > 50 else [])
            raise KeyError(
                f"`sample_ids` contains {unknown}, which have no `st/<id>.h5ad` in {root}; "
                f"available sample ids: {shown}."
            )
    # check every metadata file before reading any expression or image
    for sample_id in ids:
        _pixel_size(_read_metadata(root, sample_id), sample_id)
    slides = [_sample_parts(root, sample_id, load_images) for sample_id in ids]
    sdata = build_spatialdata(slides, join=join)
    patches = {s: str(root / "patches" / f"{s}.h5") for s in ids if (root / "patches" / f"{s}.h5").is_file()}
    table = sdata.tables[Key.table]
    table.uns[HEST_UNS_KEY] = {"path": str(root), "patches": patches}
    logger.info(
        "Read HEST: %d sample(s), %d spots, %d genes, %d image(s), %d patch file(s)",
        len(slides),
        table.n_obs,
        table.n_vars,
        len(sdata.images),
        len(patches),
    )
    return sdata
