"""Assemble histoflow's SpatialData layout from per-slide parts (shared by every reader and dataset).

Layout, one entry per slide ``<library_id>`` (the same as spatialdata-io's Visium reader):

- coordinate system ``<library_id>``: full-resolution image pixels of that slide;
- ``images["<library_id>_full_image"]`` (or ``"<library_id>_downscaled_image"`` with a
  :class:`~spatialdata.transformations.Scale` into the full-resolution system when only a downscaled
  image exists): RGB, ``(c, y, x)`` uint8, multiscale when large;
- ``shapes["<library_id>"]``: circles at the spot centres (full-resolution pixels) with the spot radius,
  indexed by spot id;
- ``tables["table"]``: raw counts in ``X``; ``obs`` with ``region`` (= library id, the region key),
  ``spot_id`` (the instance key), ``library_id``, ``patient``, ``cancer_type``, ``organ``, ``species``,
  ``technology``, ``pixel_size_um``, ``spot_diameter_um``; ``obsm["spatial"]`` = spot centres in
  full-resolution pixels (x, y).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from histoflow._constants import Key

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = ["SlideParts", "build_spatialdata", "as_uint8_rgb", "SLIDE_META_COLUMNS"]

#: Per-slide metadata columns written into ``obs`` (constant within a slide).
SLIDE_META_COLUMNS = (Key.patient, Key.cancer_type, Key.organ, Key.species, Key.technology)

# images larger than this (pixels along the longest side) get a pyramid
_PYRAMID_MIN_SIDE = 4096


def as_uint8_rgb(img: Any, what: str) -> np.ndarray:
    """``(y, x, 3)`` uint8 RGB from uint8/uint16/float (scanpy stores [0, 1] floats) images; alpha dropped."""
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[-1] not in (3, 4):
        raise ValueError(f"{what} must be an RGB image (y, x, 3), got shape {img.shape}.")
    img = img[..., :3]
    if img.dtype == np.uint8:
        return img
    if img.dtype.kind == "f":
        scale = 255.0 if float(np.nanmax(img)) <= 1.0 else 1.0
        return np.clip(np.rint(img * scale), 0, 255).astype(np.uint8)
    if img.dtype == np.uint16:
        return (img // 257).astype(np.uint8)
    return np.clip(img, 0, 255).astype(np.uint8)


@dataclass
class SlideParts:
    """What one slide contributes to the SpatialData built by :func:`~histoflow.io.build_spatialdata`.

    Attributes
    ----------
    library_id
        Unique slide id; names the coordinate system, the shapes element and the image element.
    spot_ids
        Spot identifiers, unique within the slide (barcodes or ``"<x>x<y>"`` array positions).
    centers_px
        ``(n_spots, 2)`` spot centres (x, y) in full-resolution image pixels.
    pixel_size_um
        Micrometres per full-resolution pixel.
    spot_diameter_um
        Spot diameter in micrometres.
    counts
        ``(n_spots, n_genes)`` raw counts, or None for an image-only slide.
    var_names
        Gene names of ``counts``.
    image
        RGB image as ``(y, x, 3)`` or ``(3, y, x)`` uint8 array (numpy or dask), or None.
    image_scale
        Image pixels per full-resolution pixel (1 for a full-resolution image, e.g. 1/16 for a thumbnail).
    meta
        Per-slide metadata (patient, cancer_type, organ, species, technology, ...), written to every row.
    spot_obs
        Optional per-spot columns (same order as ``spot_ids``), e.g. ``array_row``, pathologist labels.
    """

    library_id: str
    spot_ids: Sequence[str]
    centers_px: np.ndarray
    pixel_size_um: float
    spot_diameter_um: float
    counts: Any = None
    var_names: Sequence[str] | None = None
    image: Any = None
    image_scale: float = 1.0
    meta: Mapping[str, Any] = field(default_factory=dict)
    spot_obs: pd.DataFrame | None = None


def _image_element(parts: SlideParts) -> tuple[str, Any]:
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity, Scale

    img = parts.image
    if img.ndim != 3:
        raise ValueError(f"The image of slide {parts.library_id!r} must be 3-D RGB, got shape {img.shape}.")
    if img.shape[-1] in (3, 4) and img.shape[0] not in (3, 4):
        img = img[..., :3].transpose(2, 0, 1)
    elif img.shape[0] == 4:
        img = img[:3]
    if parts.image_scale == 1.0:
        name = Key.full_image(parts.library_id)
        transform = Identity()
    else:
        name = Key.downscaled_image(parts.library_id)
        s = 1.0 / parts.image_scale
        transform = Scale([s, s], axes=("x", "y"))
    side = max(img.shape[1:])
    scale_factors = []
    while side > _PYRAMID_MIN_SIDE:
        scale_factors.append(2)
        side //= 2
    element = Image2DModel.parse(
        img,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=scale_factors or None,
        chunks=(3, 2048, 2048),
        transformations={parts.library_id: transform},
    )
    return name, element


def _shapes_element(parts: SlideParts) -> Any:
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    centers = np.asarray(parts.centers_px, dtype=np.float64)
    radius = parts.spot_diameter_um / parts.pixel_size_um / 2.0
    return ShapesModel.parse(
        centers,
        geometry=0,
        radius=np.full(len(centers), radius),
        index=pd.Index([str(s) for s in parts.spot_ids], name=Key.instance),
        transformations={parts.library_id: Identity()},
    )


def build_spatialdata(
    slides: Sequence[SlideParts],
    *,
    join: Literal["inner", "outer"] = "inner",
) -> SpatialData:
    """Build one SpatialData (images, circle shapes, one table) from the parts of several slides.

    Parameters
    ----------
    slides
        One :class:`SlideParts` per slide; library ids must be unique.
    join
        How to combine gene sets that differ between slides: ``"inner"`` keeps the shared genes,
        ``"outer"`` keeps all and records which genes each slide measured in
        ``uns["histoflow_gene_mask"]`` (slides × genes, boolean); unmeasured entries are 0 in ``X``.
    """
    import anndata as ad
    from spatialdata import SpatialData
    from spatialdata.models import TableModel

    if not slides:
        raise ValueError("No slides to build a SpatialData from.")
    libs = [s.library_id for s in slides]
    if len(set(libs)) != len(libs):
        raise ValueError(f"Library ids must be unique, got {libs}.")

    tables = []
    images: dict[str, Any] = {}
    shapes: dict[str, Any] = {}
    measured: dict[str, list[str]] = {}
    for parts in slides:
        n = len(parts.spot_ids)
        centers = np.asarray(parts.centers_px, dtype=np.float64)
        if centers.shape != (n, 2):
            raise ValueError(f"Slide {parts.library_id!r}: `centers_px` must be ({n}, 2), got {centers.shape}.")
        if parts.counts is not None:
            X = sp.csr_matrix(parts.counts, dtype=np.float32)
            var_names = [str(g) for g in parts.var_names]
        else:
            X = sp.csr_matrix((n, 0), dtype=np.float32)
            var_names = []
        obs = pd.DataFrame(index=pd.Index([f"{parts.library_id}_{s}" for s in parts.spot_ids]))
        if parts.spot_obs is not None:
            for col in parts.spot_obs.columns:
                obs[col] = np.asarray(parts.spot_obs[col])
        obs[Key.region] = parts.library_id
        obs[Key.instance] = [str(s) for s in parts.spot_ids]
        obs[Key.library] = parts.library_id
        for key, value in parts.meta.items():
            obs[key] = value
        obs[Key.pixel_size] = float(parts.pixel_size_um)
        obs[Key.spot_diameter] = float(parts.spot_diameter_um)
        a = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(var_names)))
        a.obsm[Key.spatial] = centers
        tables.append(a)
        measured[parts.library_id] = var_names
        shapes[parts.library_id] = _shapes_element(parts)
        if parts.image is not None:
            name, element = _image_element(parts)
            images[name] = element

    table = ad.concat(tables, join=join, merge="same", fill_value=0)
    table.X = sp.csr_matrix(table.X, dtype=np.float32)
    for col in [Key.region, Key.library, *[c for c in SLIDE_META_COLUMNS if c in table.obs]]:
        table.obs[col] = pd.Categorical(table.obs[col].astype(str))
    if join == "outer" and any(set(v) != set(table.var_names) for v in measured.values()):
        table.uns["histoflow_gene_mask"] = pd.DataFrame(
            {lib: table.var_names.isin(genes) for lib, genes in measured.items()}, index=table.var_names
        ).T
    table = TableModel.parse(table, region=libs, region_key=Key.region, instance_key=Key.instance)
    return SpatialData(images=images, shapes=shapes, tables={Key.table: table})
