from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from histoflow._constants import Key
from histoflow.io._anndata import INPUT_X_LAYER, from_anndata


def _visium(rng: np.random.Generator, libs=("lib_a", "lib_b"), n_per_lib=(7, 5), n_genes=8):
    """An AnnData in exactly the layout of ``scanpy.read_visium`` (several libraries concatenated, as in squidpy)."""
    import anndata as ad

    n = sum(n_per_lib)
    lib_col = np.repeat(libs, n_per_lib)
    obs = pd.DataFrame(
        {
            "library_id": pd.Categorical(lib_col),
            "in_tissue": 1,
            "my_cluster": pd.Categorical(rng.integers(0, 3, n).astype(str), categories=["2", "1", "0"]),
        },
        index=[f"AAAC{j:02d}-1" for j in np.concatenate([np.arange(k) for k in n_per_lib])],  # repeat across libraries
    )
    obs.index = [f"{b}_{lib}" for b, lib in zip(obs.index, lib_col)]  # as scanpy's concat makes them unique
    counts = rng.poisson(2.0, size=(n, n_genes)).astype(np.float32)
    adata = ad.AnnData(
        X=sp.csr_matrix(counts),
        obs=obs,
        var=pd.DataFrame({"gene_ids": [f"ENSG{j}" for j in range(n_genes)]}, index=[f"G{j}" for j in range(n_genes)]),
    )
    adata.obsm["spatial"] = np.column_stack([rng.uniform(100, 1900, n), rng.uniform(100, 1500, n)])
    adata.obsm["X_pca"] = rng.normal(size=(n, 3))
    adata.obsm["props"] = pd.DataFrame(rng.uniform(size=(n, 2)), index=adata.obs_names, columns=["t1", "t2"])
    adata.layers["raw_copy"] = counts.copy()
    adata.obsp["spatial_connectivities"] = sp.random(n, n, density=0.3, format="csr", random_state=0)
    adata.uns["my_key"] = {"a": 1}
    adata.uns["spatial"] = {}
    for k, lib in enumerate(libs):
        hires_scalef = 0.2 + 0.05 * k
        hires = rng.uniform(0, 1, size=(int(1600 * hires_scalef), int(2000 * hires_scalef), 3)).astype(np.float32)
        adata.uns["spatial"][lib] = {
            "images": {"hires": hires, "lowres": hires[::4, ::4]},
            "scalefactors": {
                "tissue_hires_scalef": hires_scalef,
                "tissue_lowres_scalef": hires_scalef / 4,
                "spot_diameter_fullres": 100.0 + 20 * k,
                "fiducial_diameter_fullres": 150.0,
            },
            "metadata": {"chemistry_description": "Spatial 3' v1", "software_version": "spaceranger-1.0.0"},
        }
    return adata


def test_two_libraries(image_level0):
    from spatialdata.transformations import get_transformation

    rng = np.random.default_rng(0)
    adata = _visium(rng)
    before = adata.copy()
    sdata = from_anndata(adata, library_key="library_id", cancer_type="IDC")
    table = sdata.tables[Key.table]
    assert sorted(sdata.shapes) == ["lib_a", "lib_b"]
    assert sorted(sdata.images) == ["lib_a_downscaled_image", "lib_b_downscaled_image"]
    assert table.obs[Key.library].value_counts().to_dict() == {"lib_a": 7, "lib_b": 5}
    for k, lib in enumerate(("lib_a", "lib_b")):
        entry = adata.uns["spatial"][lib]
        scalef = entry["scalefactors"]["tissue_hires_scalef"]
        # the hires image, as uint8, placed in full-resolution pixels by 1 / tissue_hires_scalef
        expected = np.rint(entry["images"]["hires"] * 255).astype(np.uint8)
        np.testing.assert_array_equal(image_level0(sdata, f"{lib}_downscaled_image"), expected)
        t = get_transformation(sdata.images[f"{lib}_downscaled_image"], to_coordinate_system=lib)
        np.testing.assert_allclose(np.diag(t.to_affine_matrix(("x", "y"), ("x", "y")))[:2], [1 / scalef] * 2)
        rows = (table.obs[Key.library] == lib).to_numpy()
        # pixel size from the Visium spot diameter: 55 µm / spot_diameter_fullres
        np.testing.assert_allclose(table.obs.loc[rows, Key.pixel_size], 55.0 / (100.0 + 20 * k))
        np.testing.assert_allclose(table.obs.loc[rows, Key.spot_diameter], 55.0)
        radius = sdata.shapes[lib]["radius"].to_numpy()
        np.testing.assert_allclose(radius, (100.0 + 20 * k) / 2)
    # rows are "<library>_<barcode>"; everything follows the rows
    index = [adata.obs_names.get_loc(spot) for spot in table.obs[Key.instance]]
    assert list(table.obs_names) == [
        f"{lib}_{spot}" for lib, spot in zip(table.obs[Key.library], table.obs[Key.instance])
    ]
    np.testing.assert_array_equal(table.X.toarray(), adata.X[index].toarray())
    np.testing.assert_allclose(table.obsm[Key.spatial], adata.obsm["spatial"][index])
    np.testing.assert_allclose(table.obsm["X_pca"], adata.obsm["X_pca"][index])
    np.testing.assert_allclose(table.obsm["props"].to_numpy(), adata.obsm["props"].to_numpy()[index])
    assert list(table.obsm["props"].index) == list(table.obs_names)
    np.testing.assert_array_equal(table.layers["raw_copy"], adata.layers["raw_copy"][index])
    np.testing.assert_allclose(
        table.obsp["spatial_connectivities"].toarray(),
        adata.obsp["spatial_connectivities"].toarray()[np.ix_(index, index)],
    )
    assert list(table.obs["my_cluster"]) == list(adata.obs["my_cluster"].iloc[index])
    assert list(table.obs["my_cluster"].cat.categories) == ["2", "1", "0"]
    assert list(table.var["gene_ids"]) == list(adata.var["gene_ids"])
    assert table.uns["my_key"] == {"a": 1} and "spatial" not in table.uns
    assert set(table.obs[Key.cancer_type]) == {"IDC"} and set(table.obs[Key.technology]) == {"Visium"}
    assert set(table.obs[Key.patient]) == {"lib_a", "lib_b"}
    # the input is untouched
    assert adata.obs.equals(before.obs) and sorted(adata.uns) == sorted(before.uns)
    np.testing.assert_array_equal(adata.X.toarray(), before.X.toarray())


def test_single_library_options():
    rng = np.random.default_rng(1)
    adata = _visium(rng, libs=("only",), n_per_lib=(6,))
    adata.obs[Key.patient] = "P7"
    adata.layers[Key.counts] = adata.X.copy()
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()))
    sdata = from_anndata(
        adata, image_key="lowres", pixel_size_um=0.8, technology="Spatial Transcriptomics", spot_diameter_um=None
    )
    table = sdata.tables[Key.table]
    # counts from layers["counts"]; the log-normalised X is kept
    np.testing.assert_array_equal(table.X.toarray(), adata.layers[Key.counts].toarray())
    np.testing.assert_allclose(table.layers[INPUT_X_LAYER].toarray(), adata.X.toarray())
    np.testing.assert_allclose(table.obs[Key.pixel_size], 0.8)
    np.testing.assert_allclose(table.obs[Key.spot_diameter], 100.0)  # Spatial Transcriptomics default
    assert set(table.obs[Key.patient]) == {"P7"} and set(table.obs[Key.cancer_type]) == {"unknown"}
    assert sdata.images["only_downscaled_image"].shape == (3, 80, 100)
    assert len(from_anndata(adata, image_key=None).images) == 0


def test_real_hest_h5ad_in_scanpy_layout(hest_layout_dir):
    """HEST-1k's h5ad keep scanpy's layout; the pixel size derived from the spot diameter matches HEST's estimate."""
    import anndata as ad

    adata = ad.read_h5ad(hest_layout_dir / "st" / "SPA141.h5ad")
    sdata = from_anndata(adata, image_key="downscaled_fullres", technology="Spatial Transcriptomics", cancer_type="IDC")
    table = sdata.tables[Key.table]
    assert table.n_obs == 187
    np.testing.assert_allclose(table.obs[Key.pixel_size].iloc[0], 0.6961064252183218, rtol=1e-6)
    assert sdata.images["ST_downscaled_image"].shape == (3, 619, 580)


def test_bad_input():
    import anndata as ad

    rng = np.random.default_rng(2)
    adata = _visium(rng)
    with pytest.raises(TypeError, match="must be an AnnData"):
        from_anndata(adata.X)
    with pytest.raises(ValueError, match="holds 2 libraries .* pass `library_key=`"):
        from_anndata(adata)
    with pytest.raises(KeyError, match="`library_key='sample'` is not a column"):
        from_anndata(adata, library_key="sample")
    bad = adata.copy()
    del bad.uns["spatial"]["lib_b"]
    with pytest.raises(KeyError, match=r"libraries \['lib_b'\] without an entry"):
        from_anndata(bad, library_key="library_id")
    with pytest.raises(KeyError, match=r"`image_key='highres'` is not an image of library 'lib_a'"):
        from_anndata(adata, library_key="library_id", image_key="highres")
    bad = adata.copy()
    del bad.uns["spatial"]["lib_a"]["scalefactors"]["spot_diameter_fullres"]
    with pytest.raises(KeyError, match="pass `pixel_size_um=`"):
        from_anndata(bad, library_key="library_id")
    assert from_anndata(bad, library_key="library_id", pixel_size_um=0.5).tables[Key.table].n_obs == 12
    bad = adata.copy()
    del bad.uns["spatial"]
    with pytest.raises(KeyError, match="`adata.uns\\['spatial'\\]` is missing"):
        from_anndata(bad)
    bad = adata.copy()
    del bad.obsm["spatial"]
    with pytest.raises(KeyError, match="`adata.obsm\\['spatial'\\]` is missing"):
        from_anndata(bad, library_key="library_id")
    bad = adata.copy()
    bad.X = -bad.X
    with pytest.raises(ValueError, match="`adata.X` contains negative values"):
        from_anndata(bad, library_key="library_id")
    with pytest.raises(ValueError, match="`pixel_size_um` must be positive"):
        from_anndata(adata, library_key="library_id", pixel_size_um=0.0)
    with pytest.raises(ValueError, match="No spot diameter known for technology 'CosMx'"):
        from_anndata(adata, library_key="library_id", technology="CosMx")
    bad = adata.copy()
    bad.uns["spatial"]["lib_a"]["images"]["hires"] = np.zeros((10, 10), dtype=np.uint8)
    with pytest.raises(ValueError, match="must be an RGB"):
        from_anndata(bad, library_key="library_id")
    with pytest.raises(ValueError, match="no spots"):
        from_anndata(ad.AnnData(np.zeros((0, 3))))
