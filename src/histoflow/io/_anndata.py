"""Convert a scanpy/squidpy Visium-style AnnData (``uns["spatial"]``, ``obsm["spatial"]``) to histoflow's layout."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from histoflow._constants import DEFAULT_SPOT_DIAMETER_UM, Key
from histoflow._logging import logger
from histoflow._validate import check_counts, check_obs_key, check_positive
from histoflow.io._build import SlideParts, as_uint8_rgb, build_spatialdata

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["from_anndata"]

_DEFAULT_TECHNOLOGY = "Visium"
#: Layer that receives the input ``X`` when the counts are taken from ``layers["counts"]``.
INPUT_X_LAYER = "X_input"


def _library_entries(adata: AnnData) -> Mapping[str, Any]:
    spatial = adata.uns.get("spatial")
    if not isinstance(spatial, Mapping) or not spatial:
        raise KeyError(
            "`adata.uns['spatial']` is missing or empty; `from_anndata` expects the scanpy Visium layout "
            "(`uns['spatial'][<library_id>]` with `images` and `scalefactors`), e.g. from `scanpy.read_visium`."
        )
    return spatial


def _libraries(adata: AnnData, library_key: str | None, spatial: Mapping[str, Any]) -> np.ndarray:
    """Library id of every spot (as strings)."""
    if library_key is None:
        if len(spatial) != 1:
            raise ValueError(
                f"`adata.uns['spatial']` holds {len(spatial)} libraries ({sorted(spatial)}) but `library_key` is "
                "None; pass `library_key=` with the `obs` column that says which library each spot belongs to."
            )
        return np.full(adata.n_obs, str(next(iter(spatial))), dtype=object)
    check_obs_key(adata, library_key, "library_key")
    values = adata.obs[library_key]
    if values.isna().any():
        raise ValueError(f"`adata.obs[{library_key!r}]` has {int(values.isna().sum())} missing value(s).")
    libs = values.astype(str).to_numpy(dtype=object)
    unknown = sorted(set(libs) - {str(k) for k in spatial})
    if unknown:
        raise KeyError(
            f"`adata.obs[{library_key!r}]` has libraries {unknown} without an entry in `adata.uns['spatial']` "
            f"(entries: {sorted(spatial)}); their image and scale factors are needed."
        )
    return libs


def _spot_diameter_default(technology: str) -> float | None:
    return DEFAULT_SPOT_DIAMETER_UM.get(technology.lower())


def from_anndata(
    adata: AnnData,
    *,
    library_key: str | None = None,
    image_key: str | None = "hires",
    pixel_size_um: float | None = None,
    spot_diameter_um: float | None = None,
    technology: str | None = None,
    cancer_type: str | None = None,
) -> SpatialData:
    """Convert a scanpy/squidpy Visium-style AnnData to histoflow's SpatialData layout.

    The input follows the layout of :func:`scanpy.read_visium`: spot centres in full-resolution pixels in
    ``obsm["spatial"]`` and, per library, ``uns["spatial"][<library_id>]`` with ``images`` (``hires``,
    ``lowres``) and ``scalefactors`` (``tissue_hires_scalef``, ``spot_diameter_fullres``, ...). ``adata`` is
    not modified.

    Parameters
    ----------
    adata
        AnnData with raw counts in ``X`` (or in ``layers["counts"]``, which is then used), ``obsm["spatial"]``
        and ``uns["spatial"]``.
    library_key
        ``obs`` column naming each spot's library (a key of ``uns["spatial"]``); needed when ``uns["spatial"]``
        has several libraries.
    image_key
        Which image of ``uns["spatial"][<library_id>]["images"]`` becomes the slide image, placed with the scale
        factor ``tissue_<image_key>_scalef``; None converts without image.
    pixel_size_um
        Micrometres per full-resolution pixel for every library. None derives it per library as
        ``spot_diameter_um / spot_diameter_fullres``.
    spot_diameter_um
        Spot diameter in micrometres; None uses the technology's (Visium 55 µm, Spatial Transcriptomics 100 µm).
    technology
        Technology written to ``obs["technology"]``; None means Visium, the technology of this layout.
    cancer_type
        Cancer type written to ``obs["cancer_type"]``; None keeps an existing ``obs["cancer_type"]`` column or
        writes ``"unknown"``.

    Returns
    -------
    SpatialData with one slide per library (see :func:`~histoflow.io.build_spatialdata`): images
    ``"<library_id>_downscaled_image"`` (placed in full-resolution pixels through the scale factor), circle
    ``shapes["<library_id>"]`` and ``tables["table"]`` with raw counts in ``X``, rows named
    ``"<library_id>_<barcode>"`` grouped by library, ``obsm["spatial"]``, the histoflow ``obs`` columns and
    everything else of ``adata``: its ``obs`` columns (``patient``, ``organ``, ``species`` kept when present,
    else the library id / ``"unknown"``), ``var``, ``layers``, ``obsm``, ``obsp`` (rows reordered to match) and
    ``uns`` (except ``spatial``). When the counts came from ``layers["counts"]``, the input ``X`` is kept in
    ``layers["X_input"]``.
    """
    from anndata import AnnData

    if not isinstance(adata, AnnData):
        raise TypeError(f"`adata` must be an AnnData, got {type(adata).__name__}.")
    if adata.n_obs == 0:
        raise ValueError("`adata` has no spots (n_obs == 0).")
    if Key.spatial not in adata.obsm:
        raise KeyError(
            f"`adata.obsm[{Key.spatial!r}]` is missing; it must hold the spot centres (x, y) in full-resolution pixels."
        )
    centres = np.asarray(adata.obsm[Key.spatial], dtype=np.float64)
    if centres.ndim != 2 or centres.shape[1] < 2 or not np.isfinite(centres[:, :2]).all():
        raise ValueError(
            f"`adata.obsm[{Key.spatial!r}]` must be finite (n_spots, 2) coordinates, got shape {centres.shape}."
        )
    centres = centres[:, :2]
    spatial = _library_entries(adata)
    libs = _libraries(adata, library_key, spatial)
    tech = technology if technology is not None else _DEFAULT_TECHNOLOGY
    if technology is None:
        logger.info("`technology` is None; assuming %s (the technology of the scanpy Visium layout)", tech)
    if pixel_size_um is not None:
        check_positive(float(pixel_size_um), "pixel_size_um")
    if spot_diameter_um is not None:
        check_positive(float(spot_diameter_um), "spot_diameter_um")
    diameter = float(spot_diameter_um) if spot_diameter_um is not None else _spot_diameter_default(tech)

    from_layer = Key.counts in adata.layers
    counts_all = adata.layers[Key.counts] if from_layer else adata.X
    if counts_all is None:
        raise ValueError("`adata.X` is empty and there is no `layers['counts']`; raw counts are needed.")
    check_counts(counts_all, f"adata.layers[{Key.counts!r}]" if from_layer else "adata.X")
    if from_layer:
        logger.info("Using `adata.layers[%r]` as raw counts; `adata.X` goes to `layers[%r]`", Key.counts, INPUT_X_LAYER)

    # everything is computed and checked per library before anything is built
    lib_order = list(dict.fromkeys(libs))
    slides, order = [], []
    meta_from_obs = {k for k in (Key.patient, Key.organ, Key.species, Key.cancer_type) if k in adata.obs.columns}
    for lib in lib_order:
        rows = np.flatnonzero(libs == lib)
        entry = spatial[lib] if lib in spatial else spatial[next(k for k in spatial if str(k) == lib)]
        scalefactors = entry.get("scalefactors", {}) or {}
        fullres = scalefactors.get("spot_diameter_fullres")
        if pixel_size_um is not None:
            px = float(pixel_size_um)
        else:
            if diameter is None:
                raise ValueError(
                    f"No spot diameter known for technology {tech!r}; pass `spot_diameter_um=` or `pixel_size_um=`."
                )
            if fullres is None or not np.isfinite(float(fullres)) or float(fullres) <= 0:
                raise KeyError(
                    f"Library {lib!r}: `uns['spatial'][{lib!r}]['scalefactors']['spot_diameter_fullres']` is missing "
                    "or not positive, so the pixel size cannot be derived; pass `pixel_size_um=`."
                )
            px = diameter / float(fullres)
        lib_diameter = diameter
        if lib_diameter is None:
            if fullres is None:
                raise ValueError(
                    f"No spot diameter known for technology {tech!r} and library {lib!r} has no "
                    "`spot_diameter_fullres`; pass `spot_diameter_um=`."
                )
            lib_diameter = float(fullres) * px
        image, scale = None, 1.0
        if image_key is not None:
            images = entry.get("images", {}) or {}
            if image_key not in images:
                raise KeyError(
                    f"`image_key={image_key!r}` is not an image of library {lib!r} (images: {sorted(images)}); "
                    "pass one of them, or `image_key=None` to convert without image."
                )
            sf_key = f"tissue_{image_key}_scalef"
            if sf_key not in scalefactors:
                raise KeyError(
                    f"Library {lib!r}: `scalefactors[{sf_key!r}]` is missing (scalefactors: {sorted(scalefactors)}); "
                    f"it places the {image_key!r} image on the full-resolution spot coordinates."
                )
            scale = float(scalefactors[sf_key])
            check_positive(scale, f"scalefactors[{sf_key!r}] of library {lib!r}")
            image = as_uint8_rgb(images[image_key], f"Image {image_key!r} of library {lib!r}")
        barcodes = adata.obs_names[rows]
        if not barcodes.is_unique:
            raise ValueError(f"Library {lib!r}: spot barcodes (`adata.obs_names`) are not unique within the library.")
        meta: dict[str, Any] = {Key.technology: tech}
        if Key.patient not in meta_from_obs:
            meta[Key.patient] = lib
        for key in (Key.organ, Key.species):
            if key not in meta_from_obs:
                meta[key] = "unknown"
        if cancer_type is not None:
            meta[Key.cancer_type] = cancer_type
        elif Key.cancer_type not in meta_from_obs:
            meta[Key.cancer_type] = "unknown"
        slides.append(
            SlideParts(
                library_id=lib,
                spot_ids=[str(b) for b in barcodes],
                centers_px=centres[rows],
                pixel_size_um=px,
                spot_diameter_um=lib_diameter,
                counts=counts_all[rows],
                var_names=list(adata.var_names),
                image=image,
                image_scale=scale,
                meta=meta,
                spot_obs=adata.obs.iloc[rows].reset_index(drop=True),
            )
        )
        order.append(rows)
    perm = np.concatenate(order)

    sdata = build_spatialdata(slides, join="inner")
    table = sdata.tables[Key.table]
    table.var = adata.var.loc[table.var_names].copy()
    written_by_build = {Key.region, Key.instance, Key.library, Key.pixel_size, Key.spot_diameter, *slides[0].meta}
    for col, values in adata.obs.items():
        if col not in written_by_build and isinstance(values.dtype, pd.CategoricalDtype):
            table.obs[col] = pd.Categorical(values.to_numpy()[perm], dtype=values.dtype)
    for key, layer in adata.layers.items():
        table.layers[key] = layer[perm]
    if from_layer and adata.X is not None:
        table.layers[INPUT_X_LAYER] = adata.X[perm]
    for key, value in adata.obsm.items():
        if key == Key.spatial:
            continue
        if isinstance(value, pd.DataFrame):
            table.obsm[key] = value.iloc[perm].set_axis(table.obs_names)
        else:
            table.obsm[key] = value[perm]
    for key, value in adata.obsp.items():
        table.obsp[key] = value[perm][:, perm] if sp.issparse(value) else np.asarray(value)[np.ix_(perm, perm)]
    for key, value in adata.uns.items():
        if key not in ("spatial", "spatialdata_attrs"):
            table.uns[key] = copy.deepcopy(value)
    logger.info(
        "Converted AnnData: %d librar%s, %d spots, %d genes, %d image(s)",
        len(slides),
        "y" if len(slides) == 1 else "ies",
        table.n_obs,
        table.n_vars,
        len(sdata.images),
    )
    return sdata
