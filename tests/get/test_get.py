"""``histoflow.get``: stored predictions, routing and metrics, read back exactly as written."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

import histoflow as hf
from histoflow.tl._write import write_predictions


@pytest.fixture
def table() -> AnnData:
    """3 slides × 10 spots, 5 genes; predictions (with std, latent, routing) for the first 25 spots only."""
    rng = np.random.default_rng(0)
    n, g = 30, 5
    obs = pd.DataFrame(
        {
            "library_id": pd.Categorical(np.repeat(["S0", "S1", "S2"], 10)),
            "cancer_type": pd.Categorical(np.repeat(["IDC", "PRAD", "IDC"], 10)),
        },
        index=[f"s{i}" for i in range(n)],
    )
    a = AnnData(sp.csr_matrix(rng.poisson(3, size=(n, g)).astype(np.float32)), obs=obs)
    a.var_names = [f"G{j}" for j in range(g)]
    a.layers["log1p"] = sp.csr_matrix(np.log1p(a.X.toarray()))
    a.obsm["spatial"] = rng.uniform(0, 1000, size=(n, 2))
    rows = np.arange(25)
    write_predictions(
        a,
        "molf",
        rows=rows,
        genes=list(a.var_names),
        mean=rng.uniform(0, 2, size=(25, g)),
        std=rng.uniform(0, 0.3, size=(25, g)),
        latent=rng.normal(size=(25, 4)),
        routing=rng.dirichlet(np.ones(3), size=25),
        uns={"params": {"steps": 1}, "genes": list(a.var_names)},
    )
    return a


def test_predictions_anndata(table):
    before = sorted(table.obsm), sorted(table.layers), table.obs.copy()
    p = hf.get.predictions(table)
    assert p.n_obs == 25 and list(p.obs_names) == list(table.obs_names[:25])
    assert list(p.var_names) == list(table.var_names)
    np.testing.assert_array_equal(p.X, table.obsm["molf"].to_numpy()[:25])
    np.testing.assert_array_equal(p.layers["std"], table.obsm["molf_std"].to_numpy()[:25])
    np.testing.assert_allclose(p.layers["true"], table.layers["log1p"].toarray()[:25])
    np.testing.assert_array_equal(p.obsm["spatial"], table.obsm["spatial"][:25])
    np.testing.assert_array_equal(p.obsm["X_latent"], table.obsm["X_molf_latent"][:25])
    assert list(p.obsm["routing"].columns) == ["expert_0", "expert_1", "expert_2"]
    pd.testing.assert_frame_equal(p.obs, table.obs.iloc[:25])
    assert p.uns["histoflow"]["params"] == {"steps": 1}
    p.X[:] = -1  # a new object: the table is untouched
    assert (table.obsm["molf"].to_numpy()[:25] >= 0).all()
    assert (sorted(table.obsm), sorted(table.layers)) == before[:2]
    pd.testing.assert_frame_equal(table.obs, before[2])
    assert "true" not in hf.get.predictions(table, true_layer=None).layers


def test_predictions_from_spatialdata_works_with_squidpy():
    import squidpy as sq

    sdata = hf.datasets.synthetic(2, grid=(4, 4), n_genes=8, seed=0)
    t = sdata.tables["table"]
    write_predictions(t, "m", rows=np.arange(t.n_obs), genes=list(t.var_names[:3]), mean=np.ones((t.n_obs, 3)))
    p = hf.get.predictions(sdata, "m")
    assert p.shape == (t.n_obs, 3) and "std" not in p.layers and "true" not in p.layers  # no log1p layer yet
    sq.gr.spatial_neighbors(p, library_key="library_id", coord_type="generic", n_neighs=4)
    assert p.obsp["spatial_connectivities"].nnz == t.n_obs * 4


def test_routing_wide_and_tidy(table):
    wide = hf.get.routing(table)
    assert list(wide.columns) == ["library_id", "cancer_type", "expert_0", "expert_1", "expert_2"]
    assert len(wide) == 25
    np.testing.assert_allclose(wide[["expert_0", "expert_1", "expert_2"]].sum(1), 1.0, rtol=1e-5)
    tidy = hf.get.routing(table, obs_keys=["cancer_type"], tidy=True)
    assert list(tidy.columns) == ["obs_name", "cancer_type", "expert", "weight"] and len(tidy) == 75
    w = tidy[(tidy.obs_name == "s3") & (tidy.expert == "expert_1")]["weight"].item()
    assert w == pytest.approx(float(table.obsm["molf_routing"].loc["s3", "expert_1"]))


def test_metrics(table):
    a = table.copy()
    a.obsm["molf"] = a.obsm["molf"].fillna(0.5)
    df = hf.tl.evaluate(a, pred_key="molf", metrics=["pcc", "gsc"], k=None)
    pd.testing.assert_frame_equal(hf.get.metrics(a), df)
    assert hf.get.metrics(a, part="gene_corr_true").shape == (5, 5)
    assert hf.get.metrics(a, part="params")["n_spots"] == 30


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda a: hf.get.predictions(a, "nope"), KeyError, r"obsm\['nope'\].*fit_molf"),
        (lambda a: hf.get.routing(a, "nope"), KeyError, r"nope_routing.*fit_molf"),
        (lambda a: hf.get.routing(a, obs_keys=["tissue"]), KeyError, r"obs_keys.*tissue"),
        (lambda a: hf.get.metrics(a), KeyError, r"molf_metrics.*tl\.evaluate"),
        (lambda a: hf.get.metrics(a, part="everything"), ValueError, r"part='everything'"),
    ],
)
def test_bad_input(table, call, error, match):
    with pytest.raises(error, match=match):
        call(table)


def test_missing_part_and_empty_predictions(table):
    a = table.copy()
    a.obsm["molf"] = a.obsm["molf"].fillna(0.5)
    hf.tl.evaluate(a, pred_key="molf", metrics=["pcc"], k=None)
    with pytest.raises(KeyError, match="'ssc' in `metrics=`"):
        hf.get.metrics(a, part="morans_i_true_by_slide")
    a.obsm["molf"] = a.obsm["molf"] * np.nan
    with pytest.raises(ValueError, match="holds no prediction"):
        hf.get.predictions(a)


def test_routing_default_columns_are_those_present(table):
    a = table.copy()
    del a.obs["cancer_type"]
    assert list(hf.get.routing(a).columns) == ["library_id", "expert_0", "expert_1", "expert_2"]
    assert list(hf.get.routing(a, obs_keys=[]).columns) == ["expert_0", "expert_1", "expert_2"]
