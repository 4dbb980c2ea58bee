from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from histoflow._constants import Key
from histoflow.io._her2st import read_her2st
from histoflow.io._hest import HEST_UNS_KEY, read_hest

HEST_TO_HER2ST = {"SPA137": "C6", "SPA138": "C5", "SPA139": "C4", "SPA140": "C3", "SPA141": "C2"}
SPOTS = {"SPA137": 178, "SPA138": 181, "SPA139": 184, "SPA140": 180, "SPA141": 187}


def test_real_hest_layout(hest_layout_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="histoflow"):
        sdata = read_hest(hest_layout_dir)
    table = sdata.tables[Key.table]
    assert table.obs[Key.library].value_counts().to_dict() == SPOTS
    assert sorted(sdata.shapes) == sorted(SPOTS)
    obs = table.obs
    assert set(obs[Key.cancer_type]) == {"IDC"}
    assert set(obs[Key.patient]) == {"Patient C"}
    assert set(obs[Key.organ]) == {"Breast"} and set(obs[Key.species]) == {"Homo sapiens"}
    assert set(obs[Key.technology]) == {"Spatial Transcriptomics"}
    np.testing.assert_allclose(obs[Key.spot_diameter], 100.0)
    for sample in SPOTS:
        meta = json.loads((hest_layout_dir / "metadata" / f"{sample}.json").read_text())
        sizes = obs.loc[obs[Key.library] == sample, Key.pixel_size].unique()
        np.testing.assert_allclose(sizes, [meta["pixel_size_um_estimated"]])
    # the h5ad's own obs columns are kept
    assert {"in_tissue", "array_row", "array_col"} <= set(obs.columns)
    # no WSI on disk: the 1/16 downscaled images in uns["spatial"] are used, placed in full-resolution pixels
    assert sorted(sdata.images) == sorted(f"{s}_downscaled_image" for s in SPOTS)
    assert "patches will be cut from a downscaled image" in caplog.text
    from spatialdata.transformations import get_transformation

    scale = get_transformation(sdata.images["SPA141_downscaled_image"], to_coordinate_system="SPA141")
    np.testing.assert_allclose(np.diag(scale.to_affine_matrix(("x", "y"), ("x", "y")))[:2], [16.0, 16.0])
    assert table.uns[HEST_UNS_KEY]["patches"] == {"SPA141": str(hest_layout_dir / "patches" / "SPA141.h5")}


def test_spa141_is_her2st_c2(hest_layout_dir, her2st_dir):
    hest = read_hest(hest_layout_dir, "SPA141", load_images=False).tables[Key.table]
    her = read_her2st(her2st_dir, "C2", load_images=False).tables[Key.table]
    assert list(hest.obs[Key.instance]) == list(her.obs[Key.instance])
    np.testing.assert_allclose(hest.obsm[Key.spatial], her.obsm[Key.spatial])
    assert list(hest.var_names) == list(her.var_names)
    assert (hest.X != her.X).nnz == 0
    # the HEST patch file's barcodes are these spots
    import h5py

    with h5py.File(hest_layout_dir / "patches" / "SPA141.h5") as f:
        barcodes = [b.decode() for b in f["barcode"][:, 0]]
    assert barcodes == list(hest.obs[Key.instance])


def test_many_samples_pyramidal_tiff_png_and_fallback(tmp_path, write_hest_sample, image_level0, caplog):
    import dask.array as da

    rng = np.random.default_rng(0)
    s1 = write_hest_sample(tmp_path, "S1", rng=rng, image="tif")
    s2 = write_hest_sample(
        tmp_path, "S2", rng=rng, image="png", meta={"oncotree_code": None, "disease_state": "Healthy", "patient": None}
    )
    s3 = write_hest_sample(tmp_path, "S3", rng=rng, image=None)
    (tmp_path / "patches" / "S2.h5").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="histoflow"):
        sdata = read_hest(tmp_path, ["S1", "S2", "S3"])
    assert sorted(sdata.images) == ["S1_full_image", "S2_full_image", "S3_downscaled_image"]
    assert "Sample S3 has no WSI" in caplog.text and "Sample S1" not in caplog.text
    # the TIFF is read lazily, and its level 0 is exactly what was written
    element = sdata.images["S1_full_image"]
    assert isinstance(element.data, da.Array)
    np.testing.assert_array_equal(image_level0(sdata, "S1_full_image"), s1["image"])
    np.testing.assert_array_equal(image_level0(sdata, "S2_full_image"), s2["image"])
    np.testing.assert_array_equal(image_level0(sdata, "S3_downscaled_image"), s3["small"])
    table = sdata.tables[Key.table]
    for sample, written in (("S1", s1), ("S2", s2), ("S3", s3)):
        rows = (table.obs[Key.library] == sample).to_numpy()
        np.testing.assert_allclose(table.obsm[Key.spatial][rows], written["xy"])
        np.testing.assert_array_equal(table.X[rows].toarray(), written["counts"])
        assert list(table.obs.loc[rows, Key.instance]) == written["barcodes"]
    by_lib = table.obs.groupby(Key.library, observed=True).first()
    assert by_lib.loc["S2", Key.cancer_type] == "Healthy"  # no OncoTree code: the disease state
    assert by_lib.loc["S2", Key.patient] == "S2" and by_lib.loc["S1", Key.patient] == "P1"
    np.testing.assert_allclose(by_lib[Key.pixel_size], 0.5)
    np.testing.assert_allclose(by_lib[Key.spot_diameter], 55.0)
    assert table.uns[HEST_UNS_KEY]["patches"] == {"S2": str(tmp_path / "patches" / "S2.h5")}
    # load_images=False opens nothing; sample_ids=None reads every st/*.h5ad
    assert len(read_hest(tmp_path, load_images=False).images) == 0
    assert read_hest(tmp_path, load_images=False).tables[Key.table].obs[Key.library].nunique() == 3


def test_spot_diameter_fallbacks(tmp_path, write_hest_sample):
    rng = np.random.default_rng(1)
    # no spot_diameter in the metadata: spot_diameter_fullres (110 px) x pixel size (0.5 µm)
    write_hest_sample(tmp_path, "X1", rng=rng, image=None, meta={"spot_diameter": None, "st_technology": "Xenium"})
    table = read_hest(tmp_path, "X1", load_images=False).tables[Key.table]
    np.testing.assert_allclose(table.obs[Key.spot_diameter], 55.0)
    # nothing at all for an unknown technology: an error
    write_hest_sample(
        tmp_path, "X2", rng=rng, image=None, downscaled=False, meta={"spot_diameter": None, "st_technology": "Xenium"}
    )
    with pytest.raises(ValueError, match="no spot diameter"):
        read_hest(tmp_path, "X2")
    # no downscaled image and no WSI: a slide without image
    write_hest_sample(tmp_path, "X3", rng=rng, image=None, downscaled=False)
    sdata = read_hest(tmp_path, "X3")
    assert len(sdata.images) == 0 and sdata.tables[Key.table].n_obs == 12


def test_bad_input(tmp_path, write_hest_sample):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        read_hest(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="has no `st/` folder"):
        read_hest(tmp_path)
    rng = np.random.default_rng(2)
    write_hest_sample(tmp_path, "A", rng=rng, image=None)
    write_hest_sample(tmp_path, "B", rng=rng, image=None, meta={"pixel_size_um_estimated": None})
    write_hest_sample(tmp_path, "C", rng=rng, image=None)
    (tmp_path / "metadata" / "C.json").unlink()
    with pytest.raises(KeyError, match=r"\['SPA999'\].*available sample ids: \['A', 'B', 'C'\]"):
        read_hest(tmp_path, ["A", "SPA999"])
    with pytest.raises(ValueError, match="`sample_ids` is empty"):
        read_hest(tmp_path, [])
    with pytest.raises(ValueError, match="duplicates"):
        read_hest(tmp_path, ["A", "A"])
    with pytest.raises(ValueError, match="'B': its metadata has no pixel size"):
        read_hest(tmp_path, ["A", "B"])
    with pytest.raises(FileNotFoundError, match="'C' has no metadata file"):
        read_hest(tmp_path, ["A", "C"])
    with pytest.raises(ValueError, match=r"`join='left'` is not valid"):
        read_hest(tmp_path, "A", join="left")
    (tmp_path / "metadata" / "C.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        read_hest(tmp_path, "C")
    (tmp_path / "metadata" / "C.json").write_text(json.dumps({"pixel_size_um_estimated": -1}))
    with pytest.raises(ValueError, match="must be a positive number"):
        read_hest(tmp_path, "C")
    assert read_hest(tmp_path, "A").tables[Key.table].n_obs == 12
    # expression that is not raw counts
    import anndata as ad

    a = ad.read_h5ad(tmp_path / "st" / "A.h5ad")
    a.X = a.X.toarray() * 0.37 + 40
    a.write_h5ad(tmp_path / "st" / "A.h5ad")
    with pytest.raises(ValueError, match="X of st/A.h5ad` contains non-integer values"):
        read_hest(tmp_path, "A")
