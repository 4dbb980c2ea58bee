from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from histoflow._constants import Key
from histoflow.datasets import synthetic

PIXEL_SIZES = [1.0, 0.5, 2.0, 1.0, 1.0, 1.0]
SPACING = 100.0
SHARED = ["tumor", "stroma", "immune", "necrosis"]


@pytest.fixture(scope="module")
def sdata():
    return synthetic(6, grid=(8, 8), pixel_size_um=PIXEL_SIZES, seed=0)


@pytest.fixture(scope="module")
def table(sdata):
    return sdata.tables[Key.table]


def _image(sdata, lib: str) -> np.ndarray:
    return np.asarray(sdata.images[Key.full_image(lib)].values)


def _patch_features(sdata, table) -> np.ndarray:
    """Per spot: mean and std of R, G, B and the fraction of dark (nuclear) pixels in a 112 µm square patch."""
    libs = table.obs[Key.library].astype(str).to_numpy()
    feats = np.zeros((table.n_obs, 7))
    for lib in np.unique(libs):
        img = _image(sdata, lib).astype(np.float32)
        rows = np.flatnonzero(libs == lib)
        half = int(round(56.0 / table.obs[Key.pixel_size].iloc[rows[0]]))
        for i in rows:
            x, y = table.obsm[Key.spatial][i]
            patch = img[:, int(y) - half : int(y) + half, int(x) - half : int(x) + half].reshape(3, -1)
            feats[i] = np.r_[patch.mean(1), patch.std(1), (patch.mean(0) < 150).mean()]
    return feats


def _neighbour_corr(values: np.ndarray, xy_um: np.ndarray) -> float:
    """Correlation between a value and the mean of its hexagonal-grid neighbours (a Moran's-I-like statistic)."""
    d = np.linalg.norm(xy_um[:, None] - xy_um[None], axis=-1)
    adj = (d > 0) & (d < 1.1 * SPACING)
    return float(np.corrcoef(values, adj @ values / adj.sum(1))[0, 1])


def _slide_xy_um(table, lib: str) -> tuple[np.ndarray, np.ndarray]:
    mask = (table.obs[Key.library] == lib).to_numpy()
    return mask, table.obsm[Key.spatial][mask] * table.obs[Key.pixel_size].to_numpy()[mask, None]


def test_layout(sdata, table):
    libs = [f"S{i}" for i in range(6)]
    assert sorted(sdata.images) == sorted(Key.full_image(lib) for lib in libs)
    assert sorted(sdata.shapes) == sorted(libs)
    assert list(sdata.tables) == [Key.table]
    assert table.shape == (6 * 64, 100)
    for col in [Key.region, Key.instance, Key.library, Key.patient, Key.cancer_type, Key.organ, Key.species]:
        assert col in table.obs, col
    assert {"array_row", "array_col"} <= set(table.obs)
    assert set(table.obs[Key.technology]) == {"Visium"}
    assert table.obs[Key.spot_diameter].eq(55.0).all()
    per_slide = table.obs.groupby(Key.library, observed=True).first()
    assert per_slide[Key.cancer_type].tolist() == ["IDC", "PRAD", "COAD", "IDC", "PRAD", "COAD"]
    assert per_slide[Key.organ].tolist() == ["Breast", "Prostate", "Bowel"] * 2
    # two sections per patient, patients nested in cancer types
    assert per_slide[Key.patient].tolist() == ["P0", "P1", "P2", "P0", "P1", "P2"]
    np.testing.assert_allclose(per_slide[Key.pixel_size].to_numpy(), PIXEL_SIZES)
    assert table.obs_names.is_unique and table.var_names.is_unique
    for lib in libs:
        shapes = sdata.shapes[lib]
        rows = table.obs[table.obs[Key.library] == lib]
        assert len(shapes) == 64
        xy = np.c_[shapes.geometry.x, shapes.geometry.y]
        joined = xy[shapes.index.get_indexer(rows[Key.instance])]
        np.testing.assert_allclose(joined, table.obsm[Key.spatial][(table.obs[Key.library] == lib).to_numpy()])
        assert _image(sdata, lib).dtype == np.uint8 and _image(sdata, lib).shape[0] == 3


def test_hexagonal_grid_and_pixel_sizes(sdata, table):
    for lib, px in zip([f"S{i}" for i in range(6)], PIXEL_SIZES):
        mask, xy = _slide_xy_um(table, lib)
        d = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
        np.fill_diagonal(d, np.inf)
        np.testing.assert_allclose(d.min(1), SPACING, rtol=1e-6)  # every spot's nearest neighbour is one pitch away
        n_neigh = (d < 1.01 * SPACING).sum(1)
        assert n_neigh.max() == 6  # hexagonal packing
        # the same tissue extent in µm whatever the pixel size
        h, w = _image(sdata, lib).shape[1:]
        assert abs(w * px - _image(sdata, "S0").shape[2] * 1.0) <= 2 * px
        assert abs(h * px - _image(sdata, "S0").shape[1] * 1.0) <= 2 * px


def test_spot_patches_inside_image(sdata, table):
    for lib in [f"S{i}" for i in range(6)]:
        mask = (table.obs[Key.library] == lib).to_numpy()
        px = table.obs[Key.pixel_size].to_numpy()[mask][0]
        xy = table.obsm[Key.spatial][mask]
        h, w = _image(sdata, lib).shape[1:]
        r = 56.0 / px
        assert (xy - r >= 0).all()
        assert (xy[:, 0] + r <= w).all() and (xy[:, 1] + r <= h).all()


def test_counts_are_raw_integers(table):
    assert sp.issparse(table.X)
    X = table.X.toarray()
    assert X.min() >= 0
    np.testing.assert_array_equal(X, np.round(X))
    assert X.sum() > 0 and (X.sum(0) > 0).all()  # every gene is detected somewhere
    assert 0.01 < (X == 0).mean() < 0.8  # sparse-ish like real spots, not all zeros


def test_true_programs_stored(table):
    info = table.uns["synthetic"]
    tp = table.obsm["true_programs"]
    assert isinstance(tp, pd.DataFrame)
    assert tp.index.equals(table.obs_names)
    assert list(tp.columns) == list(info["programs"])
    assert list(info["shared_programs"]) == SHARED
    assert list(info["hidden_programs"]) == ["interferon"]
    specific = {ct: list(v) for ct, v in info["specific_programs"].items()}
    assert specific == {"IDC": ["IDC_specific"], "PRAD": ["PRAD_specific"], "COAD": ["COAD_specific"]}
    visible = tp.drop(columns=list(info["hidden_programs"]))
    np.testing.assert_allclose(visible.sum(1), 1.0, atol=1e-6)
    assert (visible.to_numpy() >= 0).all()
    hidden = tp["interferon"].to_numpy()
    assert ((hidden > 0) & (hidden < 1)).all()
    ct = table.obs[Key.cancer_type].astype(str).to_numpy()
    for t, programs in specific.items():
        for p in programs:
            assert (tp.loc[ct != t, p] == 0).all()  # a cancer type's own program never appears elsewhere
            assert tp.loc[ct == t, p].max() > 0.1
    for t in specific:
        L = info["loadings"][t]
        assert list(L.index) == list(table.var_names) and list(L.columns) == list(info["programs"])
    assert info["seed"] == 0
    assert list(info["genes"].index) == list(table.var_names)
    assert set(info["slides"].index) == {f"S{i}" for i in range(6)}


def test_gene_names_are_real_symbols_then_generic():
    small = synthetic(1, grid=(2, 2), n_genes=14, seed=0).tables[Key.table]
    # balanced over modules: an epithelial, a stromal, an immune and a lineage marker among the first genes
    assert {"EPCAM", "COL1A1", "PTPRC", "ERBB2"} <= set(small.var_names)
    big = synthetic(1, grid=(2, 2), n_genes=150, seed=0).tables[Key.table]
    names = list(big.var_names)
    assert len(names) == 150 and len(set(names)) == 150
    assert names[-1] == "GENE9" and "KLK3" in names and "MKI67" in names


def test_same_seed_same_data_and_different_seed_differs():
    kw = {"grid": (4, 4), "n_genes": 30}
    a = synthetic(2, seed=5, **kw)
    b = synthetic(2, seed=5, **kw)
    c = synthetic(2, seed=6, **kw)
    np.testing.assert_array_equal(a.tables[Key.table].X.toarray(), b.tables[Key.table].X.toarray())
    np.testing.assert_array_equal(_image(a, "S1"), _image(b, "S1"))
    pd.testing.assert_frame_equal(a.tables[Key.table].obsm["true_programs"], b.tables[Key.table].obsm["true_programs"])
    assert not np.array_equal(a.tables[Key.table].X.toarray(), c.tables[Key.table].X.toarray())
    assert not np.array_equal(_image(a, "S1"), _image(c, "S1"))


def test_programs_and_driven_genes_are_spatially_autocorrelated(table):
    info = table.uns["synthetic"]
    tp = table.obsm["true_programs"]
    logx = np.log1p(table.X.toarray())
    rng = np.random.default_rng(0)
    gene_corrs, shuffled = [], []
    for lib in [f"S{i}" for i in range(6)]:
        mask, xy = _slide_xy_um(table, lib)
        ct = table.obs.loc[mask, Key.cancer_type].iloc[0]
        sub = tp[mask]
        for p in sub.columns:
            if sub[p].std() > 0.03:
                assert _neighbour_corr(sub[p].to_numpy(), xy) > 0.6, (lib, p)
        # the gene most strongly driven by the program that varies most on this slide
        program = sub[SHARED].std().idxmax()
        gene = info["loadings"][ct][program].idxmax()
        values = logx[mask, table.var_names.get_loc(gene)]
        gene_corrs.append(_neighbour_corr(values, xy))
        shuffled.append(_neighbour_corr(rng.permutation(values), xy))
    assert np.mean(gene_corrs) > 0.4 and min(gene_corrs) > 0.05
    assert abs(np.mean(shuffled)) < 0.2  # the statistic is ~0 without spatial structure


def test_image_predicts_programs_but_not_perfectly(sdata, table):
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score
    from sklearn.model_selection import KFold
    from sklearn.preprocessing import StandardScaler

    X = _patch_features(sdata, table)
    Y = table.obsm["true_programs"][SHARED].to_numpy()
    pred = np.zeros_like(Y)
    for train, test in KFold(5, shuffle=True, random_state=0).split(X):
        scaler = StandardScaler().fit(X[train])
        pred[test] = Ridge(alpha=1.0).fit(scaler.transform(X[train]), Y[train]).predict(scaler.transform(X[test]))
    r2 = r2_score(Y, pred)
    assert 0.3 < r2 < 0.98, r2
    # the hidden program leaves no trace in the image
    hidden = table.obsm["true_programs"]["interferon"].to_numpy()
    pred_h = np.zeros_like(hidden)
    for train, test in KFold(5, shuffle=True, random_state=0).split(X):
        scaler = StandardScaler().fit(X[train])
        pred_h[test] = (
            Ridge(alpha=1.0).fit(scaler.transform(X[train]), hidden[train]).predict(scaler.transform(X[test]))
        )
    assert r2_score(hidden, pred_h) < 0.25  # only chance spatial overlap with the visible programs


def test_program_looks_the_same_across_cancer_types(sdata, table):
    info = table.uns["synthetic"]
    app = info["appearance"]
    other = synthetic(1, cancer_types=("LUAD",), grid=(2, 2), n_genes=10, seed=3).tables[Key.table]
    pd.testing.assert_frame_equal(app.loc[SHARED], other.uns["synthetic"]["appearance"].loc[SHARED])
    # empirically: the mean colour of spots dominated by a shared program barely depends on the cancer type
    feats = _patch_features(sdata, table)[:, :3]
    tp = table.obsm["true_programs"]
    ct = table.obs[Key.cancer_type].astype(str).to_numpy()
    colours = {}
    for p in SHARED:
        for t in ["IDC", "PRAD", "COAD"]:
            sel = (tp[p].to_numpy() > 0.6) & (ct == t)
            if sel.sum() >= 3:
                colours[p, t] = feats[sel].mean(0)
    within = [
        np.linalg.norm(colours[p, a] - colours[p, b]) for (p, a) in colours for (q, b) in colours if p == q and a < b
    ]
    between = [np.linalg.norm(colours[p, a] - colours[q, b]) for (p, a) in colours for (q, b) in colours if p < q]
    assert within and between
    assert np.mean(within) < 0.5 * np.mean(between)


def test_cancer_type_specific_genes(table):
    info = table.uns["synthetic"]
    lineage = {t: list(g) for t, g in info["lineage_genes"].items()}
    assert {"ERBB2", "ESR1"} <= set(lineage["IDC"]) and {"KLK3", "AR"} <= set(lineage["PRAD"])
    assert "CDX2" in lineage["COAD"]
    L = info["loadings"]
    for t, genes in lineage.items():
        for u in lineage:
            if u != t:
                assert (L[t].loc[genes, "tumor"] - L[u].loc[genes, "tumor"]).min() > 1.5
    # in the counts: the tumour program raises a type's lineage genes in that type only
    tp = table.obsm["true_programs"]
    design = np.c_[np.ones(table.n_obs), tp.drop(columns="tumor").to_numpy()]
    logx = np.log1p(table.X.toarray())
    ct = table.obs[Key.cancer_type].astype(str).to_numpy()
    for t, genes in lineage.items():
        score = logx[:, table.var_names.get_indexer(genes)].mean(1)
        slopes = {}
        for u in lineage:
            m = ct == u
            coef = np.linalg.lstsq(np.c_[tp["tumor"].to_numpy()[m], design[m]], score[m], rcond=None)[0]
            slopes[u] = coef[0]
        assert all(slopes[t] > slopes[u] + 0.8 for u in lineage if u != t), (t, slopes)


def test_unknown_cancer_type_and_program_counts():
    s = synthetic(2, cancer_types=("LUSC", "XYZ"), grid=(3, 3), n_genes=40, n_specific_programs=2, seed=1)
    t = s.tables[Key.table]
    info = t.uns["synthetic"]
    assert t.obs.groupby(Key.library, observed=True)[Key.organ].first().tolist() == ["Lung", "Unknown"]
    assert list(info["specific_programs"]["XYZ"]) == ["XYZ_specific_1", "XYZ_specific_2"]
    lin = {k: list(v) for k, v in info["lineage_genes"].items()}
    assert len(lin["LUSC"]) >= 2 and len(lin["XYZ"]) >= 2 and not set(lin["LUSC"]) & set(lin["XYZ"])
    none = synthetic(1, grid=(2, 2), n_genes=10, n_specific_programs=0).tables[Key.table]
    assert list(none.obsm["true_programs"].columns) == [*SHARED, "interferon"]


def test_writes_and_reads_back(tmp_path):
    import spatialdata

    s = synthetic(2, grid=(2, 3), n_genes=12, seed=2)
    s.write(tmp_path / "syn.zarr")
    back = spatialdata.read_zarr(tmp_path / "syn.zarr")
    t = back.tables[Key.table]
    np.testing.assert_array_equal(t.X.toarray(), s.tables[Key.table].X.toarray())
    pd.testing.assert_frame_equal(
        t.uns["synthetic"]["loadings"]["IDC"], s.tables[Key.table].uns["synthetic"]["loadings"]["IDC"]
    )
    np.testing.assert_array_equal(_image(back, "S0"), _image(s, "S0"))


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        ({"n_slides": 0}, ValueError, "`n_slides` must be an integer >= 1"),
        ({"cancer_types": ()}, ValueError, "`cancer_types` is empty"),
        ({"cancer_types": ("IDC", "IDC")}, ValueError, "`cancer_types` must be unique"),
        ({"grid": (1, 5)}, ValueError, "`grid` must be at least"),
        ({"grid": 4}, ValueError, "`grid` must be a pair"),
        ({"grid": (4.5, 4)}, ValueError, "`grid` must be a pair"),
        ({"n_genes": 0}, ValueError, "`n_genes` must be an integer >= 1"),
        ({"pixel_size_um": -1.0}, ValueError, "`pixel_size_um` must be positive"),
        ({"pixel_size_um": [1.0, 0.0]}, ValueError, "`pixel_size_um` must be positive"),
        ({"pixel_size_um": [1.0, 0.5, 0.5]}, ValueError, "`pixel_size_um` has 3 values but `n_slides=2`"),
        ({"pixel_size_um": 20.0}, ValueError, "at most 8"),
        ({"spot_diameter_um": 120.0}, ValueError, "spots would overlap"),
        ({"spot_spacing_um": -5.0}, ValueError, "`spot_spacing_um` must be positive"),
        ({"n_specific_programs": -1}, ValueError, "`n_specific_programs` must be an integer >= 0"),
        ({"dispersion": 0.0}, ValueError, "`dispersion` must be positive"),
        ({"length_scale_um": float("inf")}, ValueError, "`length_scale_um` must be positive"),
    ],
)
def test_bad_inputs(kwargs, err, match):
    args = {"n_slides": 2, "grid": (2, 2), "n_genes": 5, **kwargs}
    with pytest.raises(err, match=match):
        synthetic(**args)
