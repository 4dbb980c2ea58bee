from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from histoflow.pp._genes import MOLF_TIER_THRESHOLDS, hallmark_tiers, read_gene_sets, select_genes

KEY = "histoflow_panel"
TYPES = ("CCRCC", "IDC", "PRAD")
SETS = {"SET_A": ["JUNB", "ATF3", "NOT_A_GENE"], "SET_B": ["VIM", "GENE00"], "SET_C": ["ABSENT1"]}


def _seurat_v3_top(adata: ad.AnnData, rows: np.ndarray, genes: list[str], n_top: int) -> set[str]:
    sub = adata[rows, genes].copy()
    df = sc.pp.highly_variable_genes(sub, flavor="seurat_v3", n_top_genes=n_top, inplace=False)
    return set(df.index[df["highly_variable"]])


def _candidates(adata: ad.AnnData) -> list[str]:
    return [g for g in adata.var_names if not g.upper().startswith(("MT-", "RPL", "RPS"))]


def _log1p_var(adata: ad.AnnData, genes: list[str], rows: np.ndarray | None = None) -> np.ndarray:
    X = adata[:, genes].X if rows is None else adata[rows, genes].X
    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    return np.log1p(X.astype(np.float64)).var(axis=0, ddof=1)


# ---------------------------------------------------------------- hvg


def test_hvg_per_cancer_type(counts_adata):
    select_genes(counts_adata, "hvg", n_top=8)
    info = counts_adata.uns[KEY]
    assert sorted(info["hvg_by_group"]) == list(TYPES)
    cand = _candidates(counts_adata)
    types = counts_adata.obs["cancer_type"].astype(str).to_numpy()
    union: set[str] = set()
    for t, top in info["hvg_by_group"].items():
        assert len(top) == 8 == len(set(top))
        # the same genes as scanpy on that type's spots alone
        assert set(top) == _seurat_v3_top(counts_adata, np.flatnonzero(types == t), cand, 8)
        union |= set(top)
    panel = counts_adata.var_names[counts_adata.var[KEY].to_numpy()]
    assert set(panel) == union
    assert len(panel) <= len(TYPES) * 8
    # genes listed in var order; per-flavor column equals the panel for a single flavor
    assert info["genes"] == list(panel)
    assert (counts_adata.var[f"{KEY}_hvg"] == counts_adata.var[KEY]).all()
    assert counts_adata.var[KEY].dtype == bool
    assert info["params"]["groupby"] == "cancer_type"
    assert info["params"]["n_obs_used"] == counts_adata.n_obs
    # the markers of each type are among that type's HVGs, never among another type's
    for t in TYPES:
        assert any(g.startswith(f"{t}_M") for g in info["hvg_by_group"][t])
        others = [g for o in TYPES if o != t for g in info["hvg_by_group"][o]]
        assert not any(g.startswith(f"{t}_M") for g in others)


def test_hvg_groupby_none_uses_all_spots(counts_adata):
    select_genes(counts_adata, "hvg", n_top=6, groupby=None)
    info = counts_adata.uns[KEY]
    assert list(info["hvg_by_group"]) == ["all"]
    expected = _seurat_v3_top(counts_adata, np.arange(counts_adata.n_obs), _candidates(counts_adata), 6)
    assert set(info["genes"]) == expected
    assert info["params"]["groupby"] is None


def test_exclude_prefixes(counts_adata):
    select_genes(counts_adata, "hvg", n_top=10, exclude_prefixes=None)
    unfiltered = set(counts_adata.uns[KEY]["genes"])
    mt_rp = {g for g in unfiltered if g.startswith(("MT-", "RPL", "RPS"))}
    assert mt_rp, "the fixture's overdispersed MT/RP genes should be HVGs when not excluded"
    select_genes(counts_adata, "hvg", n_top=10)
    assert not any(g.startswith(("MT-", "RPL", "RPS")) for g in counts_adata.uns[KEY]["genes"])
    # case-insensitive prefixes
    counts_adata.var_names = [g.lower() if g.startswith("MT-") else g for g in counts_adata.var_names]
    select_genes(counts_adata, "hvg", n_top=10)
    assert not any(g.startswith("mt-") for g in counts_adata.uns[KEY]["genes"])


def test_hvg_sparse_equals_dense(make_counts):
    dense, sparse = make_counts(seed=3), make_counts(seed=3, sparse=True)
    select_genes(dense, ["hvg", "hmhvg"], n_top=7)
    select_genes(sparse, ["hvg", "hmhvg"], n_top=7)
    assert dense.uns[KEY]["genes"] == sparse.uns[KEY]["genes"]
    assert dense.uns[KEY]["hvg_by_group"] == sparse.uns[KEY]["hvg_by_group"]


def test_counts_layer_preferred(counts_adata):
    counts_adata.layers["counts"] = counts_adata.X.copy()
    counts_adata.X = np.log1p(counts_adata.X)  # X no longer holds counts
    select_genes(counts_adata, "hvg", n_top=5)
    assert counts_adata.uns[KEY]["params"]["layer"] == "counts"
    # without a counts layer, log1p values in X are rejected
    with pytest.raises(ValueError, match="non-integer"):
        select_genes(ad.AnnData(counts_adata.X, obs=counts_adata.obs), "hvg", n_top=5)


def test_small_group_falls_back_to_larger_span(make_counts):
    adata = make_counts(spots_per_slide=1, slides_per_patient=1, patients_per_type=3)  # 3 spots per type
    select_genes(adata, "hvg", n_top=4)
    spans = adata.uns[KEY]["params"]["loess_span_by_group"]
    assert set(spans) == set(TYPES)
    assert all(s in (0.3, 0.5, 1.0) for s in spans.values())
    assert all(len(v) == 4 for v in adata.uns[KEY]["hvg_by_group"].values())


# ---------------------------------------------------------------- hmhvg


def test_hmhvg_equals_numpy(counts_adata):
    n_top = 12
    select_genes(counts_adata, "hmhvg", n_top=n_top)
    cand = _candidates(counts_adata)
    X = np.asarray(counts_adata[:, cand].X, dtype=np.float64)
    top_mean = set(np.asarray(cand)[np.argsort(-X.mean(0), kind="stable")[:n_top]])
    top_std = set(np.asarray(cand)[np.argsort(-X.std(0), kind="stable")[:n_top]])
    expected = top_mean & top_std
    got = counts_adata.uns[KEY]["genes"]
    assert set(got) == expected
    assert 0 < len(got) <= n_top
    assert counts_adata.uns[KEY]["hvg_by_group"] == {}


def test_hmhvg_respects_mask(counts_adata):
    select_genes(counts_adata, "hmhvg", n_top=12)
    assert "SPIKE" in counts_adata.uns[KEY]["genes"]
    mask = counts_adata.obs["library_id"].astype(str).to_numpy() != "S01"
    select_genes(counts_adata, "hmhvg", n_top=12, mask_obs=mask)
    assert "SPIKE" not in counts_adata.uns[KEY]["genes"]
    cand = np.asarray(_candidates(counts_adata))
    X = np.asarray(counts_adata[mask, cand].X, dtype=np.float64)
    expected = set(cand[np.argsort(-X.mean(0), kind="stable")[:12]]) & set(
        cand[np.argsort(-X.std(0), kind="stable")[:12]]
    )
    assert set(counts_adata.uns[KEY]["genes"]) == expected


# ---------------------------------------------------------------- mask_obs


def test_mask_obs_changes_hvg(counts_adata):
    # SPIKE is expressed only on slide S01 (IDC): a strong signal in the masked-out spots
    select_genes(counts_adata, "hvg", n_top=5, groupby=None)
    assert "SPIKE" in counts_adata.uns[KEY]["genes"]
    counts_adata.obs["is_train"] = counts_adata.obs["library_id"].astype(str) != "S01"
    select_genes(counts_adata, "hvg", n_top=5, groupby=None, mask_obs="is_train")
    by_column = counts_adata.uns[KEY]["genes"]
    assert "SPIKE" not in by_column
    assert counts_adata.uns[KEY]["params"]["mask_obs"] == "is_train"
    assert counts_adata.uns[KEY]["params"]["n_obs_used"] == counts_adata.n_obs - 15
    mask = counts_adata.obs["is_train"].to_numpy()
    expected = _seurat_v3_top(counts_adata, np.flatnonzero(mask), _candidates(counts_adata), 5)
    assert set(by_column) == expected
    select_genes(counts_adata, "hvg", n_top=5, groupby=None, mask_obs=mask)
    assert counts_adata.uns[KEY]["genes"] == by_column
    assert counts_adata.uns[KEY]["params"]["mask_obs"] == "array"
    # a Series indexed by obs_names is aligned by name, not by position
    shuffled = counts_adata.obs["is_train"].sample(frac=1.0, random_state=0)
    select_genes(counts_adata, "hvg", n_top=5, groupby=None, mask_obs=shuffled)
    assert counts_adata.uns[KEY]["genes"] == by_column


# ---------------------------------------------------------------- hallmark


def test_hallmark_dict_exact_intersection(counts_adata):
    select_genes(counts_adata, "hallmark", gene_sets=SETS)
    info = counts_adata.uns[KEY]
    assert set(info["genes"]) == {"JUNB", "ATF3", "VIM", "GENE00"}
    assert info["hallmark_sets"] == {"SET_A": ["JUNB", "ATF3"], "SET_B": ["VIM", "GENE00"]}
    assert set(info["hallmark_tiers"]) == {"JUNB", "ATF3", "VIM", "GENE00"}
    assert info["params"]["gene_sets"] == "a dict of 3 sets"


def test_hallmark_gmt(counts_adata, shared_data):
    gmt = shared_data / "genesets" / "h.all.v7.0.symbols.gmt"
    import gseapy

    sets = gseapy.read_gmt(str(gmt))
    assert len(sets) == 50
    all_genes = {g for v in sets.values() for g in v}
    expected = [g for g in counts_adata.var_names if g in all_genes]
    assert {"JUNB", "VIM", "RPL14", "RPS6"} <= set(expected)  # Hallmark genes are kept despite RPL/RPS prefixes
    select_genes(counts_adata, "hallmark", gene_sets=gmt)
    info = counts_adata.uns[KEY]
    assert info["genes"] == expected
    assert info["params"]["n_gene_sets"] == 50
    assert info["hallmark_sets"]["HALLMARK_HYPOXIA"] == [g for g in sets["HALLMARK_HYPOXIA"] if g in set(expected)]
    assert set(info["hallmark_sets"]["HALLMARK_HYPOXIA"]) == {"PGK1", "VEGFA", "LDHA", "ATF3"}
    assert all(set(v) <= set(expected) for v in info["hallmark_sets"].values())
    # tiers: MoLF thresholds on the variance of log1p counts (ddof=1) over all spots
    v = _log1p_var(counts_adata, expected)
    lo, hi = MOLF_TIER_THRESHOLDS
    direct = {g: ("low" if x < lo else "high" if x > hi else "mid") for g, x in zip(expected, v)}
    assert info["hallmark_tiers"] == direct
    assert set(direct.values()) == {"low", "mid", "high"}  # the fixture covers all three tiers
    assert info["params"]["tier_thresholds"] == [lo, hi]


def test_hallmark_tiers_tertiles_and_mask(counts_adata, shared_data):
    gmt = str(shared_data / "genesets" / "h.all.v7.0.symbols.gmt")
    mask = counts_adata.obs["cancer_type"].astype(str).to_numpy() != "PRAD"
    select_genes(counts_adata, "hallmark", gene_sets=gmt, tiers="tertiles", mask_obs=mask)
    info = counts_adata.uns[KEY]
    genes = info["genes"]
    v = _log1p_var(counts_adata, genes, np.flatnonzero(mask))
    q1, q2 = np.quantile(v, [1 / 3, 2 / 3])
    direct = {g: ("low" if x < q1 else "high" if x > q2 else "mid") for g, x in zip(genes, v)}
    assert info["hallmark_tiers"] == direct
    np.testing.assert_allclose(info["params"]["tier_thresholds"], [q1, q2])
    counts = pd.Series(direct).value_counts()
    assert counts.min() >= 3  # tertiles split the 13 genes roughly evenly


def test_hallmark_tiers_boundaries():
    labels, (lo, hi) = hallmark_tiers(np.array([0.5, 0.9177, 0.9178, 1.0209, 1.0210, 1.0211, 1.0212, 4.0]))
    assert (lo, hi) == (0.9178, 1.0211)
    assert labels == ["low", "low", "mid", "mid", "mid", "mid", "high", "high"]
    labels, (lo, hi) = hallmark_tiers(np.arange(9.0), method="tertiles")
    assert (lo, hi) == pytest.approx((8 / 3, 16 / 3))
    assert labels == ["low"] * 3 + ["mid"] * 3 + ["high"] * 3


def test_union_of_flavors_with_tiers_for_hvg(counts_adata):
    select_genes(counts_adata, ["hvg", "hallmark", "hmhvg"], n_top=6, gene_sets=SETS)
    var = counts_adata.var
    for f in ("hvg", "hallmark", "hmhvg"):
        assert var[f"{KEY}_{f}"].dtype == bool
    union = var[f"{KEY}_hvg"] | var[f"{KEY}_hallmark"] | var[f"{KEY}_hmhvg"]
    assert (union == var[KEY]).all()
    assert counts_adata.uns[KEY]["params"]["flavor"] == ["hvg", "hallmark", "hmhvg"]
    # gene_sets given with hvg only: the panel is the HVGs; tiers/sets cover its Hallmark genes only
    select_genes(counts_adata, "hvg", n_top=6, gene_sets={"S": ["JUNB", "GENE00", *counts_adata.var_names[:40]]})
    info = counts_adata.uns[KEY]
    assert "hallmark" not in info["params"]["flavor"]
    assert set(info["hallmark_tiers"]) == set(info["hallmark_sets"]["S"]) <= set(info["genes"])
    assert f"{KEY}_hallmark" not in counts_adata.var  # stale per-flavor columns of an earlier call are removed
    assert f"{KEY}_hmhvg" not in counts_adata.var
    # without gene sets no tiers are stored
    select_genes(counts_adata, "hvg", n_top=6)
    assert counts_adata.uns[KEY]["hallmark_tiers"] == {}
    assert counts_adata.uns[KEY]["hallmark_sets"] == {}


def test_library_name_offline_error(counts_adata, monkeypatch):
    import gseapy

    def fail(*args, **kwargs):
        raise ConnectionError("no internet")

    monkeypatch.setattr(gseapy, "get_library", fail)
    with pytest.raises(RuntimeError, match="pass the path of a GMT file"):
        select_genes(counts_adata, "hallmark", gene_sets="MSigDB_Hallmark_2020")
    assert KEY not in counts_adata.uns


def test_library_name_fetched(counts_adata, monkeypatch):
    import gseapy

    calls = []

    def fake(name, **kwargs):
        calls.append(name)
        return {"HALLMARK_X": ["VIM", "CDH1"]}

    monkeypatch.setattr(gseapy, "get_library", fake)
    select_genes(counts_adata, "hallmark", gene_sets="MSigDB_Hallmark_2020")
    assert calls == ["MSigDB_Hallmark_2020"]
    assert counts_adata.uns[KEY]["genes"] == ["CDH1", "VIM"]
    assert counts_adata.uns[KEY]["params"]["gene_sets"] == "gseapy library 'MSigDB_Hallmark_2020'"


def test_read_gene_sets_errors(tmp_path):
    with pytest.raises(ValueError, match="MSigDB_Hallmark_2020"):
        read_gene_sets(None)
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_gene_sets(tmp_path / "missing.gmt")
    txt = tmp_path / "sets.txt"
    txt.write_text("A\tdesc\tG1\tG2\n")
    with pytest.raises(ValueError, match="must be a GMT file"):
        read_gene_sets(txt)
    gmt = tmp_path / "sets.gmt"
    gmt.write_text("A\tdesc\tG1\tG2\t\nB\tdesc\tG3\n")
    sets, source = read_gene_sets(gmt)
    assert sets == {"A": ["G1", "G2"], "B": ["G3"]}
    assert source == str(gmt)
    with pytest.raises(TypeError, match="GMT path"):
        read_gene_sets(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no gene set"):
        read_gene_sets({"A": []})


# ---------------------------------------------------------------- containers, copy, subset, I/O


def test_spatialdata_copy_and_subset(counts_sdata):
    original = counts_sdata.tables["table"]
    out = select_genes(counts_sdata, "hvg", n_top=5, copy=True)
    assert KEY not in original.var and KEY not in original.uns
    assert KEY in out.tables["table"].var
    sub = select_genes(counts_sdata, ["hvg", "hallmark"], n_top=5, gene_sets=SETS, subset=True, copy=True)
    table = sub.tables["table"]
    assert list(table.var_names) == table.uns[KEY]["genes"]
    assert table.var[KEY].all()
    assert counts_sdata.tables["table"].n_vars == original.n_vars
    with pytest.raises(ValueError, match="copy=True"):
        select_genes(counts_sdata, "hvg", n_top=5, subset=True)
    assert select_genes(counts_sdata, "hvg", n_top=5) is None
    assert KEY in counts_sdata.tables["table"].var


def test_anndata_subset_inplace_and_copy(counts_adata):
    n_vars = counts_adata.n_vars
    out = select_genes(counts_adata, "hvg", n_top=5, subset=True, copy=True)
    assert counts_adata.n_vars == n_vars and KEY not in counts_adata.var
    assert list(out.var_names) == out.uns[KEY]["genes"]
    assert select_genes(counts_adata, "hvg", n_top=5, subset=True) is None
    assert list(counts_adata.var_names) == out.var_names.tolist()
    assert counts_adata.var[f"{KEY}_hvg"].all()


def test_uns_writable(counts_adata, tmp_path, shared_data):
    gmt = shared_data / "genesets" / "h.all.v7.0.symbols.gmt"
    counts_adata.obs["is_train"] = counts_adata.obs["patient"].astype(str) != "IDC-P1"
    select_genes(counts_adata, ["hvg", "hallmark"], n_top=5, gene_sets=gmt, mask_obs="is_train")
    info = counts_adata.uns[KEY]
    counts_adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    assert list(back.uns[KEY]["genes"]) == info["genes"]
    assert dict(back.uns[KEY]["hallmark_tiers"]) == info["hallmark_tiers"]
    assert {k: list(v) for k, v in back.uns[KEY]["hvg_by_group"].items()} == info["hvg_by_group"]
    assert back.var[KEY].dtype == bool
    counts_adata.write_zarr(tmp_path / "a.zarr")
    back = ad.read_zarr(tmp_path / "a.zarr")
    assert {k: list(v) for k, v in back.uns[KEY]["hallmark_sets"].items()} == info["hallmark_sets"]


# ---------------------------------------------------------------- bad input (nothing written)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"flavor": "pca"}, ValueError, "`flavor='pca'` is not valid"),
        ({"flavor": []}, ValueError, "`flavor` is empty"),
        ({"n_top": 0}, ValueError, "`n_top` must be an integer between 1"),
        ({"n_top": 1000}, ValueError, "`n_top` must be an integer between 1"),
        ({"n_top": 54}, ValueError, "left after `exclude_prefixes"),
        ({"groupby": "tumour"}, KeyError, "`groupby='tumour'` is not a column"),
        ({"mask_obs": np.zeros(180, dtype=bool)}, ValueError, "selects 0 spot"),
        ({"mask_obs": np.ones(10, dtype=bool)}, ValueError, "one value per spot"),
        ({"mask_obs": "patient"}, TypeError, "must be a boolean column"),
        ({"mask_obs": "nope"}, KeyError, "`mask_obs='nope'`"),
        ({"layer": "counts"}, KeyError, "`layer='counts'` is not in `adata.layers`"),
        ({"tiers": "quartiles"}, ValueError, "`tiers='quartiles'`"),
        ({"flavor": "hallmark"}, ValueError, "gene_sets` is required"),
        (
            {"flavor": "hallmark", "gene_sets": {"A": ["X1", "X2"], "B": ["X3"]}},
            ValueError,
            "None of the 3 genes of the 2",
        ),
        ({"flavor": "hallmark", "gene_sets": {"A": ["junb"]}}, ValueError, "1 genes match when ignoring case"),
    ],
)
def test_bad_input(counts_adata, kwargs, exc, match):
    before_var = counts_adata.var.copy()
    with pytest.raises(exc, match=match):
        select_genes(counts_adata, **kwargs)
    assert KEY not in counts_adata.uns
    pd.testing.assert_frame_equal(counts_adata.var, before_var)


def test_bad_input_group_and_counts(counts_adata, shared_data):
    adata = counts_adata[:-14].copy()  # the last slide keeps one spot...
    adata.obs["cancer_type"] = adata.obs["cancer_type"].astype(str)
    adata.obs.loc[adata.obs_names[-1], "cancer_type"] = "LUNG"  # ...as a type of its own
    with pytest.raises(ValueError, match="group 'LUNG' has 1 spot"):
        select_genes(adata, "hvg", n_top=5)
    adata.obs.loc[adata.obs_names[-1], "cancer_type"] = np.nan
    with pytest.raises(ValueError, match="missing value"):
        select_genes(adata, "hvg", n_top=5)
    bad = counts_adata.copy()
    bad.X = np.log1p(bad.X)
    with pytest.raises(ValueError, match="non-integer"):
        select_genes(bad, "hvg", n_top=5)
    bad.X = -counts_adata.X
    with pytest.raises(ValueError, match="negative"):
        select_genes(bad, "hmhvg", n_top=5)
    bad.X = counts_adata.X.copy()
    bad.X[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        select_genes(bad, "hallmark", gene_sets=SETS)
    dup = counts_adata.copy()
    dup.var_names = ["GENE00", *dup.var_names[1:-1], "GENE00"]
    with pytest.raises(ValueError, match="var_names_make_unique"):
        select_genes(dup, "hvg", n_top=5)
    gmt = shared_data / "genesets" / "h.all.v7.0.symbols.gmt"
    noh = counts_adata[:, [g for g in counts_adata.var_names if g.startswith("GENE")]].copy()
    with pytest.raises(ValueError, match="of the 50 gene sets read from"):
        select_genes(noh, "hallmark", gene_sets=gmt)
    assert KEY not in noh.uns


# ---------------------------------------------------------------- real data


@pytest.mark.shared_data
def test_her2st_hvg_on_training_sections(her2st_dir):
    sections = ["C2", "C3", "C4", "C5", "C6"]
    frames = {s: pd.read_csv(her2st_dir / "ST-cnts" / f"{s}.tsv.gz", sep="\t", index_col=0) for s in sections}
    df = pd.concat(frames, join="outer").fillna(0)
    obs = pd.DataFrame(
        {"library_id": [s for s, _ in df.index], "patient": "C", "cancer_type": "HER2+ breast"},
        index=[f"{s}_{spot}" for s, spot in df.index],
    )
    adata = ad.AnnData(sp.csr_matrix(df.to_numpy(dtype=np.float32)), obs=obs, var=pd.DataFrame(index=df.columns))
    train = adata.obs["library_id"] != "C2"
    select_genes(adata, "hvg", n_top=50, mask_obs=train.to_numpy())
    genes = adata.uns[KEY]["genes"]
    assert len(genes) == 50
    assert adata.uns[KEY]["params"]["n_obs_used"] == int(train.sum())
    known = ["FABP7", "IGLC7", "CCL19", "SCGB2A2", "CCL21", "CEACAM6", "CXCL9", "SCD", "KRT86", "TACSTD2"]
    found = [g for g in known if g in genes]
    print(f"HER2ST C3-C6 top-50 HVGs contain {len(found)}/{len(known)} known genes: {found}")
    assert len(found) >= 7
    assert not any(g.startswith(("MT-", "RPL", "RPS")) for g in genes)


def test_hmhvg_empty_panel_errors():
    # gene A: highest mean, constant; gene B: lower mean, highest spread -> top-1 by mean and by std differ
    X = np.array([[10, 0], [10, 8], [10, 0], [10, 8]], dtype=np.float32)
    adata = ad.AnnData(X, var=pd.DataFrame(index=["A", "B"]))
    with pytest.raises(ValueError, match="selected no gene"):
        select_genes(adata, "hmhvg", n_top=1, groupby=None)
    assert KEY not in adata.uns
    select_genes(adata, "hmhvg", n_top=2, groupby=None)
    assert adata.uns[KEY]["genes"] == ["A", "B"]
