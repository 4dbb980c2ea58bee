from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp


def _level0(sdata: Any, name: str) -> np.ndarray:
    """Level-0 pixels of an image element as (y, x, 3) uint8."""
    element = sdata.images[name]
    if hasattr(element, "children") and "scale0" in getattr(element, "children", {}):
        arr = element["scale0"]["image"]
    else:
        arr = element
    return np.asarray(arr.data).transpose(1, 2, 0)


@pytest.fixture(scope="session")
def image_level0() -> Callable[[Any, str], np.ndarray]:
    return _level0


def _write_pyramid(file: Path, img: np.ndarray, n_levels: int = 3, tile: int = 64) -> None:
    """A pyramidal tiled TIFF (level 0 with sub-IFDs holding 2x, 4x, ... downsampled levels), as WSIs are stored."""
    import tifffile

    with tifffile.TiffWriter(file, bigtiff=True) as tw:
        tw.write(img, subifds=n_levels - 1, tile=(tile, tile), photometric="rgb", compression="zlib")
        for level in range(1, n_levels):
            f = 2**level
            tw.write(img[::f, ::f], subfiletype=1, tile=(tile, tile), photometric="rgb", compression="zlib")


def _hest_sample(
    root: Path,
    sample_id: str,
    *,
    rng: np.random.Generator,
    n_spots: int = 12,
    n_genes: int = 6,
    image: str | None = "tif",
    image_shape: tuple[int, int] = (300, 260),
    meta: dict[str, Any] | None = None,
    downscaled: bool = True,
) -> dict[str, Any]:
    """Write one sample in the HEST-1k layout under ``root``; returns what was written."""
    import anndata as ad

    for sub in ("st", "metadata", "wsis", "patches"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    h, w = image_shape
    img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    xy = np.column_stack([rng.uniform(10, w - 10, n_spots), rng.uniform(10, h - 10, n_spots)])
    counts = rng.poisson(3.0, size=(n_spots, n_genes)).astype(np.float32)
    barcodes = [f"{sample_id}-bc{i:03d}" for i in range(n_spots)]
    adata = ad.AnnData(
        X=sp.csr_matrix(counts),
        obs=pd.DataFrame({"in_tissue": 1, "array_row": np.arange(n_spots)}, index=barcodes),
        var=pd.DataFrame(index=[f"G{j}" for j in range(n_genes)]),
    )
    adata.obsm["spatial"] = xy
    scalef = 0.25
    small = img[::4, ::4]
    if downscaled:
        adata.uns["spatial"] = {
            "ST": {
                "images": {"downscaled_fullres": small},
                "scalefactors": {"tissue_downscaled_fullres_scalef": scalef, "spot_diameter_fullres": 110.0},
                "metadata": {},
            }
        }
    adata.write_h5ad(root / "st" / f"{sample_id}.h5ad")
    row = {
        "id": sample_id,
        "organ": "Breast",
        "oncotree_code": "IDC",
        "species": "Homo sapiens",
        "patient": "P1",
        "st_technology": "Visium",
        "spot_diameter": 55.0,
        "pixel_size_um_estimated": 0.5,
        "pixel_size_um_embedded": None,
    }
    row.update(meta or {})
    (root / "metadata" / f"{sample_id}.json").write_text(json.dumps(row))
    if image == "tif":
        _write_pyramid(root / "wsis" / f"{sample_id}.tif", img)
    elif image is not None:
        from PIL import Image

        Image.fromarray(img).save(root / "wsis" / f"{sample_id}.{image}")
    return {"image": img, "xy": xy, "counts": counts, "barcodes": barcodes, "small": small, "scalef": scalef}


@pytest.fixture
def write_hest_sample() -> Callable[..., dict[str, Any]]:
    return _hest_sample


@pytest.fixture(scope="session")
def write_pyramid() -> Callable[..., None]:
    return _write_pyramid
