"""histoflow on SpatialData made by spatialdata-io's Visium reader.

The fixture writes two tiny but real Space Ranger output folders (``filtered_feature_bc_matrix.h5`` in the 10x
HDF5 feature-barcode format, ``spatial/tissue_positions.csv`` (Space Ranger >= 2 layout, with a header and
off-tissue spots), ``spatial/scalefactors_json.json``, the hires/lowres PNGs and a full-resolution TIFF), reads
them with :func:`spatialdata_io.visium` and combines them as a user would::

    sdata = sd.concatenate([visium(dir_a, ...), visium(dir_b, ...)], concatenate_tables=True)

which gives one table ``"table"`` annotating both shapes elements (``obs["region"]`` names the sample, joined on
``obs["spot_id"]``). The H&E image paints every pixel with the colour of its nearest in-tissue spot, so the patch
under a spot has that spot's colour, and a wrong join between table rows and spots shows as a wrong colour. The
two samples are "scanned" at different pixel sizes, so physical patch sizes are exercised too.

What spatialdata-io does not write and histoflow needs from the user (checked below): a pixel size (or
``obs["technology"] = "Visium"`` to infer it from the 55 µm spot), ``library_key="region"`` for
:func:`histoflow.pp.split_slides`, and ``groupby=None`` (or a cancer-type column) for HVG panels.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import spatialdata_io

import histoflow as hf

pytestmark = pytest.mark.filterwarnings(
    "ignore:Observation names are not unique:UserWarning",  # inside sd.concatenate, before it makes them unique
    "ignore:Converting `region_key:UserWarning",
)

GENES = ["MT-CO1", "RPL13", "EPCAM", "KRT8", "ERBB2", "PTPRC", "CD3E", "COL1A1", "ACTB", "SCGB2A2"]
SPOT_DIAMETER_UM = 55.0  # Visium
PITCH_UM = 100.0  # Visium: centre-to-centre distance of neighbouring spots (hexagonal grid)
BACKGROUND = (238, 236, 240)
SAMPLES = {
    # name: (µm per full-resolution pixel, hires scale factor, lowres scale factor, top-left margin (x, y) px)
    "sampleA": (2.0, 0.5, 0.2, (37, 29)),
    "sampleB": (2.5, 0.4, 0.1, (23, 41)),
}
N_ROWS, N_COLS = 5, 6  # in-tissue spots per sample: 30


def _barcode(row: int, col: int) -> str:
    """A fixed 16-mer per grid position: as on real Visium slides, both samples share the barcode whitelist."""
    rng = np.random.default_rng(1000 * row + col)
    return "".join(rng.choice(list("ACGT"), 16)) + "-1"


def _write_h5(file: Path, barcodes: list[str], counts: np.ndarray) -> None:
    """10x HDF5 feature-barcode matrix (Cell Ranger >= 3 layout): genes × barcodes in CSC."""
    import h5py
    import scipy.sparse as sp

    m = sp.csc_matrix(counts.T.astype(np.int32))  # (genes, barcodes); column j = barcode j
    with h5py.File(file, "w") as f:
        f.attrs["library_ids"] = np.array([b"tiny_visium"])
        f.attrs["chemistry_description"] = b"Spatial 3' v1"
        f.attrs["software_version"] = b"spaceranger-2.1.0"
        g = f.create_group("matrix")
        g.create_dataset("barcodes", data=np.array(barcodes, dtype="S"))
        g.create_dataset("data", data=m.data.astype(np.int32))
        g.create_dataset("indices", data=m.indices.astype(np.int64))
        g.create_dataset("indptr", data=m.indptr.astype(np.int64))
        g.create_dataset("shape", data=np.array(m.shape, dtype=np.int32))
        feat = g.create_group("features")
        feat.create_dataset("id", data=np.array([f"ENSG{i:011d}" for i in range(len(GENES))], dtype="S"))
        feat.create_dataset("name", data=np.array(GENES, dtype="S"))
        feat.create_dataset("feature_type", data=np.array(["Gene Expression"] * len(GENES), dtype="S"))
        feat.create_dataset("genome", data=np.array(["GRCh38"] * len(GENES), dtype="S"))
        feat.create_dataset("_all_tag_keys", data=np.array([b"genome"]))


def _write_sample(root: Path, name: str, rng: np.random.Generator) -> dict[str, Any]:
    """One Space Ranger output folder; returns the truth (colour and counts per barcode, pixel size)."""
    import tifffile
    from PIL import Image

    px_um, hires_s, lowres_s, (mx, my) = SAMPLES[name]
    (root / "spatial").mkdir(parents=True)
    # grid positions: in-tissue block of N_ROWS × N_COLS with a frame of off-tissue positions around it
    grid = [(r, 2 * c + (r % 2)) for r in range(N_ROWS + 2) for c in range(N_COLS + 2)]
    inside = np.array([0 < r <= N_ROWS and 0 < c // 2 <= N_COLS for r, c in grid])
    rows = np.array([r for r, _ in grid])
    cols = np.array([c for _, c in grid])
    x = np.round(mx + cols * (PITCH_UM / 2) / px_um).astype(int)
    y = np.round(my + rows * (PITCH_UM * np.sqrt(3) / 2) / px_um).astype(int)
    w, h = int(x.max() + mx), int(y.max() + my)
    barcodes = [_barcode(r, c) for r, c in grid]

    # image: nearest in-tissue spot's colour within half a pitch, background elsewhere
    n_in = int(inside.sum())
    colours = rng.integers(20, 220, size=(n_in, 3), dtype=np.uint8)
    assert len(np.unique(colours, axis=0)) == n_in
    yy, xx = np.mgrid[0:h, 0:w]
    d2 = (xx[..., None] - x[inside]) ** 2 + (yy[..., None] - y[inside]) ** 2
    img = colours[d2.argmin(-1)]
    img[d2.min(-1) > (PITCH_UM / 2 / px_um) ** 2] = BACKGROUND
    tifffile.imwrite(root / "fullres.tif", img, photometric="rgb")
    for fname, s in (("tissue_hires_image.png", hires_s), ("tissue_lowres_image.png", lowres_s)):
        small = Image.fromarray(img).resize((round(w * s), round(h * s)), Image.LANCZOS)
        small.save(root / "spatial" / fname)

    spot_diam_px = SPOT_DIAMETER_UM / px_um
    (root / "spatial" / "scalefactors_json.json").write_text(
        json.dumps(
            {
                "tissue_hires_scalef": hires_s,
                "tissue_lowres_scalef": lowres_s,
                "spot_diameter_fullres": spot_diam_px,
                "fiducial_diameter_fullres": spot_diam_px * 65 / 55,
            }
        )
    )
    pd.DataFrame(
        {
            "barcode": barcodes,
            "in_tissue": inside.astype(int),
            "array_row": rows,
            "array_col": cols,
            "pxl_row_in_fullres": y,
            "pxl_col_in_fullres": x,
        }
    ).to_csv(root / "spatial" / "tissue_positions.csv", index=False)

    # counts of the in-tissue spots; the matrix lists barcodes sorted, as Space Ranger does (not in grid order)
    in_bc = [b for b, i in zip(barcodes, inside) if i]
    means = np.array([40.0, 25.0, 12.0, 9.0, 6.0, 1.0, 0.5, 3.0, 15.0, 2.0])
    gradient = 0.5 + np.linspace(0, 1, n_in)[:, None] * np.linspace(0, 2, len(GENES))[None, :]
    counts = rng.poisson(means * gradient)
    order = np.argsort(in_bc)
    _write_h5(root / "filtered_feature_bc_matrix.h5", [in_bc[i] for i in order], counts[order])
    return {
        "pixel_size_um": px_um,
        "colour": pd.DataFrame(colours, index=in_bc, columns=["r", "g", "b"]),
        "counts": pd.DataFrame(counts, index=in_bc, columns=GENES),
        "xy": pd.DataFrame({"x": x[inside], "y": y[inside]}, index=in_bc),
    }


@pytest.fixture(scope="session")
def visium_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, Any]]]:
    root = tmp_path_factory.mktemp("spaceranger")
    rng = np.random.default_rng(7)
    return {name: (root / name, _write_sample(root / name, name, rng)) for name in SAMPLES}


def _read(dirs: dict[str, tuple[Path, dict[str, Any]]], *, fullres: bool = True) -> Any:
    import spatialdata as sd

    parts = [
        spatialdata_io.visium(path, dataset_id=name, fullres_image_file="fullres.tif" if fullres else None)
        for name, (path, _) in dirs.items()
    ]
    return sd.concatenate(parts, concatenate_tables=True)


@pytest.fixture(scope="session")
def _visium_session(visium_dirs) -> Any:
    return _read(visium_dirs)


@pytest.fixture
def sdata(_visium_session) -> Any:
    """The concatenated reader output with a fresh copy of the table (images and shapes are shared, read-only)."""
    from spatialdata import SpatialData

    s = _visium_session
    return SpatialData(images=dict(s.images), shapes=dict(s.shapes), tables={"table": s.tables["table"].copy()})


def _truth(visium_dirs, table, what: str) -> np.ndarray:
    """Per table row, the value written for its (sample, barcode)."""
    out = []
    for region, bc in zip(table.obs["region"].astype(str), _barcodes(table)):
        out.append(visium_dirs[region][1][what].loc[bc].to_numpy())
    return np.array(out)


def _barcodes(table) -> list[str]:
    """The barcode of each row: ``concatenate`` made the shared barcodes unique by a suffix; undo it."""
    return [n[:18] for n in table.obs_names]


def _shuffled(sdata, seed: int = 3) -> Any:
    table = sdata.tables["table"]
    sdata.tables["table"] = table[np.random.default_rng(seed).permutation(table.n_obs)].copy()
    return sdata


# --- what the reader wrote ------------------------------------------------------------------------------------


def test_reader_output(sdata, visium_dirs):
    table = sdata.tables["table"]
    assert table.n_obs == 2 * N_ROWS * N_COLS
    assert sorted(table.obs["region"].unique()) == sorted(SAMPLES)
    assert table.uns["spatialdata_attrs"]["region_key"] == "region"
    assert table.uns["spatialdata_attrs"]["instance_key"] == "spot_id"
    assert table.obs_names.is_unique  # barcodes repeat across samples; concatenate suffixes them
    assert list(table.var_names) == GENES
    np.testing.assert_array_equal(table.X.toarray(), _truth(visium_dirs, table, "counts"))
    for name, (_, truth) in visium_dirs.items():
        assert {f"{name}_full_image", f"{name}_hires_image", f"{name}_lowres_image"} <= set(sdata.images)
        shapes = sdata.shapes[name]
        np.testing.assert_allclose(shapes["radius"], SPOT_DIAMETER_UM / truth["pixel_size_um"] / 2)
        # circles at (pxl_col_in_fullres, pxl_row_in_fullres) = (x, y), indexed by obs["spot_id"] (not by barcode)
        rows = table.obs["region"] == name
        geom = shapes.geometry.loc[table.obs.loc[rows, "spot_id"].to_numpy()]
        xy = truth["xy"].loc[np.array(_barcodes(table))[rows.to_numpy()]].to_numpy()
        np.testing.assert_array_equal(np.column_stack([geom.x, geom.y]), xy)
    # what histoflow's defaults look for and spatialdata-io does not write
    for col in ("library_id", "pixel_size_um", "technology", "cancer_type"):
        assert col not in table.obs


# --- patches ----------------------------------------------------------------------------------------------------


def _set_pixel_size(sdata, visium_dirs) -> None:
    table = sdata.tables["table"]
    sizes = {k: v[1]["pixel_size_um"] for k, v in visium_dirs.items()}
    table.obs["pixel_size_um"] = table.obs["region"].astype(str).map(sizes).astype(float)


@pytest.mark.parametrize("shuffle", [False, True])
def test_crop_patches_colour_under_each_spot(sdata, visium_dirs, shuffle):
    _set_pixel_size(sdata, visium_dirs)
    if shuffle:
        _shuffled(sdata)
    table = sdata.tables["table"]
    # 40 µm fits inside each spot's painted cell (half the 100 µm pitch away from the centre): one colour per patch
    patches = hf.pp.crop_patches(
        sdata, table_key="table", library_key="region", pixel_size_key="pixel_size_um", patch_size_um=40.0, patch_px=16
    )
    assert patches.shape == (table.n_obs, 16, 16, 3)
    want = _truth(visium_dirs, table, "colour")
    np.testing.assert_array_equal(patches[:, 8, 8], want)
    np.testing.assert_array_equal(patches, np.broadcast_to(want[:, None, None, :], patches.shape))
    # the default 112 µm patch reaches past the spot's painted disc (radius 50 µm); its centre is the spot's colour and
    # the share of the patch in that colour is the disc's share of the square in both samples (2 and 2.5 µm/px):
    # patches are cut at a physical size (a crop in pixels would give 0.16 and 0.10; a wrong scale, 0.40 or 0.98)
    big = hf.pp.crop_patches(sdata, library_key="region", patch_px=32)
    np.testing.assert_array_equal(big[:, 16, 16], want)
    own = (big == want[:, None, None, :]).all(axis=-1).mean(axis=(1, 2))
    np.testing.assert_allclose(own, np.pi * 50**2 / 112**2, atol=0.08)  # 0.626; bilinear edges lower it to ~0.55


def test_crop_patches_pixel_size_from_visium_spot(sdata, visium_dirs):
    table = sdata.tables["table"]
    with pytest.raises(KeyError, match=r"No pixel size for slide .*pixel_size_um"):
        hf.pp.crop_patches(sdata, library_key="region", patch_px=16)
    # 55 µm spot diameter over `spot_diameter_fullres` gives the pixel size
    table.obs["technology"] = "Visium"
    inferred = hf.pp.crop_patches(sdata, library_key="region", patch_size_um=150.0, patch_px=24)
    del table.obs["technology"]
    _set_pixel_size(sdata, visium_dirs)
    given = hf.pp.crop_patches(sdata, library_key="region", patch_size_um=150.0, patch_px=24)
    np.testing.assert_array_equal(inferred, given)
    # and a wrong pixel size gives other patches (150 µm reaches the neighbouring spots' colours)
    table.obs["pixel_size_um"] = table.obs["pixel_size_um"] * 1.5
    assert not np.array_equal(hf.pp.crop_patches(sdata, library_key="region", patch_size_um=150.0, patch_px=24), given)


# Regression: the reader puts the hires image in two coordinate systems (`<id>` and `<id>_downscaled_hires`) that the
# shapes share too, and spatialdata's `get_transformation_between_coordinate_systems(sdata, shapes, image)` raises
# "Multiple equal paths found" there; histoflow must compose the transformations through one shared system itself.
@pytest.mark.parametrize("fullres", [False, True], ids=["no-fullres-image", "image_key-hires"])
def test_crop_patches_hires_image(visium_dirs, fullres):
    """From the hires PNG (public Visium data often has no full-resolution image), through the reader's scale."""
    sdata = _read(visium_dirs, fullres=fullres)
    assert any(k.endswith("_full_image") for k in sdata.images) == fullres
    _shuffled(sdata)
    sdata.tables["table"].obs["technology"] = "Visium"
    image_key = {name: f"{name}_hires_image" for name in SAMPLES} if fullres else None
    patches = hf.pp.crop_patches(sdata, library_key="region", image_key=image_key, patch_size_um=40.0, patch_px=16)
    np.testing.assert_array_equal(patches[:, 8, 8], _truth(visium_dirs, sdata.tables["table"], "colour"))


# --- embedding --------------------------------------------------------------------------------------------------


def test_embed_patches_mean_colour(sdata, visium_dirs):
    import torch

    class MeanColour(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3))

    _set_pixel_size(sdata, visium_dirs)
    _shuffled(sdata, seed=11)
    table = sdata.tables["table"]
    hf.pp.embed_patches(
        sdata,
        MeanColour(),
        library_key="region",
        patch_size_um=40.0,
        patch_px=16,
        device="cpu",
        show_progress_bar=False,
        key_added="X_mean_colour",
    )
    feats = table.obsm["X_mean_colour"]
    assert feats.shape == (table.n_obs, 3)
    # a plain module gets ImageNet normalisation; undo it to read the colour back
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose((feats * std + mean) * 255, _truth(visium_dirs, table, "colour"), atol=1e-2)
    assert table.uns["X_mean_colour"]["n_features"] == 3


# --- expression -------------------------------------------------------------------------------------------------


def test_normalize(sdata, visium_dirs):
    hf.pp.normalize(sdata)
    table = sdata.tables["table"]
    counts = _truth(visium_dirs, table, "counts")
    np.testing.assert_allclose(table.layers["log1p"].toarray(), np.log1p(counts), rtol=1e-6)
    np.testing.assert_array_equal(table.layers["counts"].toarray(), counts)


def test_select_genes(sdata, visium_dirs):
    table = sdata.tables["table"]
    counts = _truth(visium_dirs, table, "counts").astype(float)
    # hmhvg: top 5 by mean ∩ top 5 by std, after dropping MT-/RPL genes
    hf.pp.select_genes(sdata, flavor="hmhvg", n_top=5, groupby=None)
    keep = np.array([not g.startswith(("MT-", "RPL")) for g in GENES])
    cand = np.array(GENES)[keep]
    top_mean = set(cand[np.argsort(-counts[:, keep].mean(0), kind="stable")[:5]])
    top_std = set(cand[np.argsort(-counts[:, keep].std(0), kind="stable")[:5]])
    expected = [g for g in GENES if g in top_mean & top_std]
    assert expected
    assert table.uns["histoflow_panel"]["genes"] == expected
    assert table.var["histoflow_panel"].sum() == len(expected)
    # hvg per cancer type: spatialdata-io writes no cancer type; the error says so, groupby=None works
    with pytest.raises(KeyError, match=r"`groupby='cancer_type'` is not a column .*groupby=None"):
        hf.pp.select_genes(sdata, flavor="hvg", n_top=5, key_added="hvg_panel")
    assert "hvg_panel" not in table.var
    hf.pp.select_genes(sdata, flavor="hvg", n_top=5, groupby=None, key_added="hvg_panel")
    assert table.var["hvg_panel"].sum() == 5
    assert not table.var.loc[["MT-CO1", "RPL13"], "hvg_panel"].any()


def test_split_slides(sdata):
    table = sdata.tables["table"]
    # the default library_key ("library_id") is not written by spatialdata-io: a clear error, then `region`
    with pytest.raises(KeyError, match=r"`library_key='library_id'` is not a column of `adata.obs`"):
        hf.pp.split_slides(sdata, stratify=None, val_frac=0.5, test_frac=0)
    assert "split" not in table.obs
    hf.pp.split_slides(sdata, library_key="region", stratify=None, val_frac=0.5, test_frac=0)
    per_slide = table.obs.groupby("region", observed=True)["split"].agg(lambda s: sorted(set(s)))
    assert sorted(per_slide.map(tuple)) == [("train",), ("val",)]
    assert table.uns["split"]["slides"]["test"] == []
