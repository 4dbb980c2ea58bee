"""Resolve a SpatialData (or a scanpy-style AnnData) into slides.

Each slide gets its table rows, spot centres in image pixels, the image pyramid and the physical pixel size.
Joins use the table's instance key, never row order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from histoflow._constants import DEFAULT_SPOT_DIAMETER_UM, Key
from histoflow._utils import is_spatialdata, table_keys
from histoflow.io._build import as_uint8_rgb

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["Slide", "ImageLevel", "resolve_slides"]


@dataclass
class ImageLevel:
    """One pyramid level: ``data`` is a ``(c, y, x)`` array (numpy or dask).

    ``downsample`` is the number of level-0 pixels per pixel of this level.
    """

    data: Any
    downsample: float

    @property
    def shape_yx(self) -> tuple[int, int]:
        """Height and width in pixels."""
        return int(self.data.shape[-2]), int(self.data.shape[-1])


@dataclass
class Slide:
    """What histoflow needs of one slide to cut patches.

    Attributes
    ----------
    library_id
        Slide id (value of the library key).
    rows
        Integer positions of the slide's spots in the table.
    centers
        ``(n, 2)`` spot centres (x, y) in level-0 pixels of ``levels``.
    pixel_size_um
        Micrometres per level-0 image pixel.
    levels
        The image pyramid, finest first (empty for a slide without an image).
    image_key
        Name of the image element (None for AnnData input).
    """

    library_id: str
    rows: np.ndarray
    centers: np.ndarray
    pixel_size_um: float
    levels: list[ImageLevel] = field(default_factory=list)
    image_key: str | None = None


def _library_column(table: AnnData, library_key: str | None, region_key: str | None) -> pd.Series:
    if library_key is not None and library_key in table.obs:
        return table.obs[library_key].astype(str)
    if region_key is not None and region_key in table.obs:
        return table.obs[region_key].astype(str)
    if library_key is not None and library_key != Key.library:
        raise KeyError(
            f"`library_key={library_key!r}` is not a column of `adata.obs`; pass the column that names slides."
        )
    return pd.Series("slide", index=table.obs_names)


def _pixel_size(table: AnnData, rows: np.ndarray, pixel_size_key: str, radius_units: float | None, lib: str) -> float:
    """µm per unit of the spot coordinates (full-resolution pixels)."""
    if pixel_size_key in table.obs:
        vals = pd.to_numeric(table.obs[pixel_size_key].iloc[rows], errors="coerce").to_numpy(dtype=float)
        vals = vals[np.isfinite(vals)]
        if vals.size:
            if np.ptp(vals) > 1e-6 * abs(vals.mean()):
                raise ValueError(f"`adata.obs[{pixel_size_key!r}]` varies within slide {lib!r}; it must be constant.")
            if vals[0] <= 0:
                raise ValueError(f"`adata.obs[{pixel_size_key!r}]` must be positive, got {vals[0]} for slide {lib!r}.")
            return float(vals[0])
    diam_um = None
    if Key.spot_diameter in table.obs:
        d = pd.to_numeric(table.obs[Key.spot_diameter].iloc[rows], errors="coerce").to_numpy(dtype=float)
        diam_um = float(d[0]) if d.size and np.isfinite(d[0]) else None
    if diam_um is None and Key.technology in table.obs:
        tech = str(table.obs[Key.technology].iloc[rows[0]]).lower()
        diam_um = DEFAULT_SPOT_DIAMETER_UM.get(tech)
    if diam_um is not None and radius_units:
        return diam_um / (2.0 * radius_units)
    raise KeyError(
        f"No pixel size for slide {lib!r}: `adata.obs[{pixel_size_key!r}]` is missing and it cannot be inferred from "
        f"the spot radius and a known spot diameter. Set `adata.obs[{pixel_size_key!r}]` (micrometres per "
        "full-resolution "
        f"pixel) or pass `pixel_size_key=` naming the column that holds it."
    )


def _levels_of(image: Any) -> list[ImageLevel]:
    if hasattr(image, "children") and len(getattr(image, "children", {})) > 0:  # DataTree (multiscale)
        names = sorted(image.children, key=lambda s: int(str(s).replace("scale", "")) if str(s)[5:].isdigit() else 0)
        arrays = [next(iter(image[n].ds.data_vars.values())) for n in names]
        h0 = arrays[0].shape[-2]
        return [ImageLevel(a.data, h0 / a.shape[-2]) for a in arrays]
    return [ImageLevel(image.data, 1.0)]


def _check_inside(centers: np.ndarray, level0: ImageLevel, lib: str) -> None:
    h, w = level0.shape_yx
    out = (centers[:, 0] < 0) | (centers[:, 0] >= w) | (centers[:, 1] < 0) | (centers[:, 1] >= h)
    if out.any():
        raise ValueError(
            f"{int(out.sum())} of {len(centers)} spots of slide {lib!r} lie outside its image ({w} × {h} px), e.g. at "
            f"{centers[out][0].round(1).tolist()}. The spots and the image may use different coordinate systems or "
            "scales; check the transformations (or `obsm['spatial']` and the scale factors)."
        )


def _image_for(sdata: SpatialData, shapes_name: str, image_key: str | Mapping[str, str] | None, lib: str) -> str:
    from spatialdata.transformations import get_transformation

    shape_cs = set(get_transformation(sdata.shapes[shapes_name], get_all=True))
    if image_key is not None:
        key = image_key.get(lib) if isinstance(image_key, Mapping) else image_key
        if key is None:
            raise KeyError(f"`image_key` has no entry for slide {lib!r}; give one image element per slide.")
        if key not in sdata.images:
            raise KeyError(f"`image_key={key!r}` is not an image element of `sdata` (images: {sorted(sdata.images)}).")
        img_cs = set(get_transformation(sdata.images[key], get_all=True))
        if not shape_cs & img_cs:
            raise ValueError(
                f"Image {key!r} (coordinate systems {sorted(img_cs)}) and the spots of slide {lib!r} (shapes "
                f"{shapes_name!r}, coordinate systems {sorted(shape_cs)}) share no coordinate system; add a "
                "transformation that places both in one system, or pass the right `image_key=`."
            )
        return key
    candidates = []
    for name, img in sdata.images.items():
        transforms = get_transformation(img, get_all=True)
        common = shape_cs & set(transforms)
        if not common:
            continue
        cs = sorted(common)[0]
        # size of one level-0 pixel in the coordinate system: smaller = finer
        m = transforms[cs].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
        candidates.append((abs(np.linalg.det(m[:2, :2])) ** 0.5, name))
    if not candidates:
        raise ValueError(
            f"No image shares a coordinate system with the spots of slide {lib!r} (shapes {shapes_name!r} in "
            f"{sorted(shape_cs)}; images: {sorted(sdata.images) or 'none'}). Add the H&E image in that coordinate "
            "system or pass `image_key=`."
        )
    return min(candidates)[1]


def _shapes_to_image(shapes: Any, image: Any) -> np.ndarray:
    """3×3 affine from the shapes' intrinsic (x, y) to the image's level-0 pixels.

    It goes through a shared coordinate system (the first in sorted order), so several equal paths are fine,
    unlike spatialdata's graph search.
    """
    from spatialdata.transformations import get_transformation

    t_shapes = get_transformation(shapes, get_all=True)
    t_image = get_transformation(image, get_all=True)
    cs = sorted(set(t_shapes) & set(t_image))[0]
    a_shapes = t_shapes[cs].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    a_image = t_image[cs].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    return np.linalg.inv(a_image) @ a_shapes


def resolve_slides(
    sdata: SpatialData | AnnData,
    table: AnnData,
    *,
    library_key: str | None = Key.library,
    image_key: str | Mapping[str, str] | None = None,
    spatial_key: str = Key.spatial,
    pixel_size_key: str = Key.pixel_size,
    need_image: bool = True,
) -> list[Slide]:
    """Split the table into slides and locate each slide's spots on its image.

    For a SpatialData, spot positions come from the shapes element each row annotates (joined on the instance
    key) mapped into the image's pixels through the elements' transformations. For an AnnData, they come from
    ``obsm[spatial_key]`` (full-resolution pixels) and the images in ``uns["spatial"][library]`` (scanpy layout).
    """
    if table.n_obs == 0:
        raise ValueError("The table has no spots (0 rows).")
    if is_spatialdata(sdata):
        return _resolve_sdata(sdata, table, library_key, image_key, pixel_size_key, need_image)
    return _resolve_anndata(table, library_key, spatial_key, pixel_size_key, need_image, image_key)


def _resolve_sdata(
    sdata: SpatialData,
    table: AnnData,
    library_key: str | None,
    image_key: str | Mapping[str, str] | None,
    pixel_size_key: str,
    need_image: bool,
) -> list[Slide]:
    regions, region_key, instance_key = table_keys(table)
    if region_key is None or instance_key is None:
        raise ValueError("The table does not annotate any shapes (no `spatialdata_attrs`); parse it with TableModel.")
    libs = _library_column(table, library_key, region_key)
    region_of = table.obs[region_key].astype(str).to_numpy()
    slides = []
    for lib in pd.unique(libs):
        rows = np.flatnonzero(libs.to_numpy() == lib)
        slide_regions = pd.unique(region_of[rows])
        if len(slide_regions) != 1:
            raise ValueError(
                f"Slide {lib!r} spans several shapes elements {list(slide_regions)}; one per slide expected."
            )
        region = str(slide_regions[0])
        if region not in sdata.shapes:
            raise KeyError(f"The table annotates {region!r}, which is not a shapes element of `sdata`.")
        shapes = sdata.shapes[region]
        ids = table.obs[instance_key].iloc[rows]
        pos = pd.Index(shapes.index.astype(str)).get_indexer(ids.astype(str))
        if (pos < 0).any():
            raise ValueError(
                f"{int((pos < 0).sum())} spots of slide {lib!r} have no shape in {region!r} (joined on "
                f"`obs[{instance_key!r}]`), e.g. {ids[pos < 0].iloc[0]!r}."
            )
        geom = shapes.geometry.iloc[pos]
        xy = (
            np.column_stack([geom.centroid.x.to_numpy(), geom.centroid.y.to_numpy()]) if len(geom) else np.zeros((0, 2))
        )
        radius = float(shapes["radius"].iloc[pos].median()) if "radius" in shapes.columns else None
        px_units = _pixel_size(table, rows, pixel_size_key, radius, lib)
        if not need_image:
            slides.append(Slide(str(lib), rows, xy, px_units))
            continue
        key = _image_for(sdata, region, image_key, str(lib))
        image = sdata.images[key]
        affine = _shapes_to_image(shapes, image)
        centers = xy @ affine[:2, :2].T + affine[:2, 2]
        scale = abs(np.linalg.det(affine[:2, :2])) ** 0.5  # image pixels per shapes unit
        levels = _levels_of(image)
        _check_inside(centers, levels[0], str(lib))
        slides.append(Slide(str(lib), rows, centers, px_units / scale, levels, key))
    return slides


def _resolve_anndata(
    table: AnnData,
    library_key: str | None,
    spatial_key: str,
    pixel_size_key: str,
    need_image: bool,
    image_key: str | Mapping[str, str] | None,
) -> list[Slide]:
    if spatial_key not in table.obsm:
        raise KeyError(
            f"`spatial_key={spatial_key!r}` is not in `adata.obsm` (keys: {sorted(table.obsm)}); spot centres in "
            "full-resolution pixels are needed."
        )
    coords = np.asarray(table.obsm[spatial_key], dtype=np.float64)[:, :2]
    if not np.isfinite(coords).all():
        raise ValueError(f"`adata.obsm[{spatial_key!r}]` contains NaN or infinite coordinates.")
    libs = _library_column(table, library_key, None)
    spatial_uns = table.uns.get("spatial", {}) or {}
    slides = []
    for lib in pd.unique(libs):
        rows = np.flatnonzero(libs.to_numpy() == lib)
        entry = (
            spatial_uns.get(lib)
            if lib in spatial_uns
            else (next(iter(spatial_uns.values())) if len(spatial_uns) == 1 else None)
        )
        sf = (entry or {}).get("scalefactors", {})
        diam_px = sf.get("spot_diameter_fullres")
        px_units = _pixel_size(table, rows, pixel_size_key, diam_px / 2 if diam_px else None, str(lib))
        if not need_image:
            slides.append(Slide(str(lib), rows, coords[rows], px_units))
            continue
        images = (entry or {}).get("images", {})
        wanted = image_key.get(lib) if isinstance(image_key, Mapping) else image_key
        order = [wanted] if wanted else ["fullres", "hires", "downscaled_fullres", "lowres"]
        name = next((k for k in order if k in images), None)
        if name is None:
            raise KeyError(
                f"No image for slide {lib!r} in `adata.uns['spatial']` (found {sorted(images)}); convert the data with "
                "`histoflow.io.from_anndata` or pass a SpatialData with the H&E image."
            )
        scalef = (
            1.0 if name == "fullres" else float(sf.get(f"tissue_{name}_scalef", sf.get("tissue_hires_scalef", 1.0)))
        )
        img = as_uint8_rgb(images[name], f"Image {name!r} of slide {lib!r}")
        level = ImageLevel(np.moveaxis(img, -1, 0), 1.0)
        centers = coords[rows] * scalef
        _check_inside(centers, level, str(lib))
        slides.append(Slide(str(lib), rows, centers, px_units / scalef, [level], None))
    return slides
