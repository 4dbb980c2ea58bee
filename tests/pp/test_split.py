from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from histoflow.pp._split import split_from_csv, split_slides

SPLITS = ["train", "val", "test"]


def _unit_splits(adata: ad.AnnData, unit: str, key: str = "split") -> dict[str, str]:
    df = adata.obs[[unit, key]].astype(str).drop_duplicates()
    assert not df[unit].duplicated().any(), f"a {unit} landed in two splits"
    return dict(zip(df[unit], df[key]))


def _type_of(adata: ad.AnnData, unit: str) -> dict[str, str]:
    df = adata.obs[[unit, "cancer_type"]].astype(str).drop_duplicates()
    return dict(zip(df[unit], df["cancer_type"]))


# ---------------------------------------------------------------- split_slides


def test_slide_level_stratified(counts_adata):
    assert split_slides(counts_adata) is None
    col = counts_adata.obs["split"]
    assert isinstance(col.dtype, pd.CategoricalDtype) and list(col.cat.categories) == SPLITS
    assert not col.isna().any()
    by_slide = _unit_splits(counts_adata, "library_id")
    types = _type_of(counts_adata, "library_id")
    # 4 slides per type: round(0.2 * 4) = 1 val, 1 test, 2 train in every type
    for t in set(types.values()):
        got = sorted(by_slide[s] for s in by_slide if types[s] == t)
        assert got == ["test", "train", "train", "val"]
    info = counts_adata.uns["split"]
    assert {k: sorted(v) for k, v in info["units"].items()} == {
        k: sorted(s for s, v in by_slide.items() if v == k) for k in SPLITS
    }
    assert info["slides"] == info["units"]
    assert info["params"]["level"] == "slide" and info["params"]["seed"] == 0


def test_patient_level_keeps_patients_together(make_counts):
    adata = make_counts(patients_per_type=3, slides_per_patient=2, spots_per_slide=4)
    split_slides(adata, level="patient")
    by_patient = _unit_splits(adata, "patient")
    by_slide = _unit_splits(adata, "library_id")  # also: no slide in two splits
    slide_patient = dict(adata.obs[["library_id", "patient"]].astype(str).drop_duplicates().to_numpy())
    assert all(by_slide[s] == by_patient[p] for s, p in slide_patient.items())
    types = _type_of(adata, "patient")
    for t in set(types.values()):  # 3 patients per type: one of each split
        assert sorted(by_patient[p] for p in by_patient if types[p] == t) == sorted(SPLITS)
    info = adata.uns["split"]
    assert sorted(info["units"]["test"]) == sorted(p for p, v in by_patient.items() if v == "test")
    assert len(info["slides"]["test"]) == 2 * len(info["units"]["test"])


def test_seed(make_counts):
    def run(seed):
        a = make_counts(patients_per_type=4, slides_per_patient=2, spots_per_slide=2)
        split_slides(a, seed=seed)
        return _unit_splits(a, "library_id")

    assert run(0) == run(0)
    assert run(np.random.default_rng(5)) == run(np.random.default_rng(5))
    others = [run(s) for s in (1, 2, 3)]
    assert any(o != run(0) for o in others)


def test_unstratified_and_counts(counts_adata):
    split_slides(counts_adata, stratify=None, val_frac=0.25, test_frac=0.25)
    counts = pd.Series(_unit_splits(counts_adata, "library_id")).value_counts()
    assert counts.to_dict() == {"train": 6, "val": 3, "test": 3}
    # integer counts are per stratum
    split_slides(counts_adata, val_frac=1, test_frac=2, key_added="fold")
    by_slide = _unit_splits(counts_adata, "library_id", key="fold")
    types = _type_of(counts_adata, "library_id")
    for t in set(types.values()):
        assert sorted(by_slide[s] for s in by_slide if types[s] == t) == ["test", "test", "train", "val"]
    assert "split" in counts_adata.obs  # other keys untouched
    # no test set when test_frac=0
    split_slides(counts_adata, test_frac=0.0)
    assert set(counts_adata.obs["split"].astype(str)) == {"train", "val"}


def test_two_unit_strata_go_to_test(make_counts):
    adata = make_counts(patients_per_type=1, slides_per_patient=3, spots_per_slide=2)
    adata.obs["cancer_type"] = adata.obs["cancer_type"].astype(str)
    # make one type hold 2 slides: its held-out slide goes to test
    adata = adata[adata.obs["library_id"].astype(str) != "S09"].copy()
    split_slides(adata)
    by_slide = _unit_splits(adata, "library_id")
    types = _type_of(adata, "library_id")
    assert sorted(v for s, v in by_slide.items() if types[s] == "CCRCC") == ["test", "train"]


def test_copy_spatialdata(counts_sdata):
    out = split_slides(counts_sdata, copy=True)
    assert "split" in out.tables["table"].obs
    assert "split" not in counts_sdata.tables["table"].obs


def test_mixed_patient_warns(make_counts):
    adata = make_counts(patients_per_type=3, slides_per_patient=2, spots_per_slide=2)
    adata.obs["cancer_type"] = adata.obs["cancer_type"].astype(str)
    adata.obs.loc[adata.obs["library_id"] == "S01", "cancer_type"] = "PRAD"  # patient IDC-P1 spans 2 types
    with pytest.warns(UserWarning, match=r"1 patient\(s\) span several `cancer_type` values"):
        split_slides(adata, level="patient")
    assert _unit_splits(adata, "patient")


def test_strata_of_two_alternate_between_test_and_val(make_counts):
    adata = make_counts(patients_per_type=1, slides_per_patient=2, spots_per_slide=3)  # 2 slides per type
    split_slides(adata)
    units = _unit_splits(adata, "library_id")
    counts = {k: sum(v == k for v in units.values()) for k in ("train", "val", "test")}
    assert counts == {"train": 3, "val": 1, "test": 2}
    per_type = adata.obs.groupby("cancer_type", observed=True)["split"].agg(lambda x: sorted(set(x.astype(str))))
    assert all("train" in v and len(v) == 2 for v in per_type)  # each type: one train slide, one held out


def test_no_validation_slides(make_counts):
    adata = make_counts(patients_per_type=1, slides_per_patient=2, spots_per_slide=3)
    one_type = adata[adata.obs["cancer_type"] == adata.obs["cancer_type"].iloc[0]].copy()  # 2 slides, 1 type
    with pytest.raises(ValueError, match=r"gives no val slide: the data has 2 slide\(s\)") as err:
        split_slides(one_type)
    assert "stratify=None" in str(err.value)
    assert "split" not in one_type.obs and "split" not in one_type.uns
    split_slides(one_type, test_frac=0.0)  # the fix the message suggests
    assert set(one_type.obs["split"].astype(str)) == {"train", "val"}
    two = adata[adata.obs["library_id"].isin(["S01", "S02"])].copy()
    with pytest.raises(ValueError, match=r"the data has 2 slide\(s\)"):
        split_slides(two, stratify=None)


def test_no_test_slides(make_counts):
    adata = make_counts(patients_per_type=1, slides_per_patient=1, spots_per_slide=3)  # 3 slides
    split_slides(adata, stratify=None)  # 3 slides are enough for one of each
    assert sorted(_unit_splits(adata, "library_id").values()) == ["test", "train", "val"]
    two = make_counts(patients_per_type=1, slides_per_patient=1, spots_per_slide=3)
    two = two[two.obs["library_id"] != "S03"].copy()
    with pytest.raises(ValueError, match="`test_frac=0.1` gives no test slide"):
        split_slides(two, stratify=None, val_frac=0.5, test_frac=0.1)
    assert "split" not in two.obs


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"level": "spot"}, ValueError, "`level='spot'` is not valid"),
        ({"library_key": "slide"}, KeyError, "`library_key='slide'` is not a column"),
        ({"level": "patient", "patient_key": "donor"}, KeyError, "`patient_key='donor'`"),
        ({"stratify": "organ"}, KeyError, "`stratify='organ'`"),
        ({"val_frac": 0.6, "test_frac": 0.5}, ValueError, "must be below 1"),
        ({"val_frac": 1.5}, ValueError, r"in \[0, 1\)"),
        ({"test_frac": -1}, ValueError, "non-negative"),
        ({"val_frac": True}, TypeError, "float fraction or an integer count"),
    ],
)
def test_split_bad_input(counts_adata, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        split_slides(counts_adata, **kwargs)
    assert "split" not in counts_adata.obs


def test_split_missing_values_and_multi_patient_slides(counts_adata):
    a = counts_adata.copy()
    a.obs["library_id"] = a.obs["library_id"].astype(object)
    a.obs.iloc[0, a.obs.columns.get_loc("library_id")] = np.nan
    with pytest.raises(ValueError, match="`library_key='library_id'` has 1 missing value"):
        split_slides(a)
    b = counts_adata.copy()
    b.obs["patient"] = b.obs["patient"].astype(str)
    b.obs.iloc[0, b.obs.columns.get_loc("patient")] = "OTHER"
    with pytest.raises(ValueError, match="belong to several patients"):
        split_slides(b, level="patient")
    assert "split" not in b.obs


def test_split_writable(counts_adata, tmp_path):
    split_slides(counts_adata)
    counts_adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    assert list(back.obs["split"].cat.categories) == SPLITS
    assert list(back.uns["split"]["units"]["val"]) == counts_adata.uns["split"]["units"]["val"]


# ---------------------------------------------------------------- split_from_csv


def _write_csv(path, ids):
    pd.DataFrame(
        {
            "sample_id": ids,
            "patches_path": [f"patches/{i}.h5" for i in ids],
            "expr_path": [f"adata/{i}.h5ad" for i in ids],
        }
    ).to_csv(path, index=False)


def test_split_from_csv(counts_adata, tmp_path):
    _write_csv(tmp_path / "train_0.csv", ["S01", "S02", "S03", "S04", "S05", "S06", "SPA999"])
    _write_csv(tmp_path / "test_0.csv", ["S07", "S08", "S09"])
    with pytest.warns(UserWarning, match=r"1 sample id\(s\) of the split files are not in the data.*SPA999"):
        assert split_from_csv(counts_adata, tmp_path) is None
    by_slide = counts_adata.obs.groupby("library_id", observed=True)["split"].first().astype(object).to_dict()
    assert all(by_slide[f"S{i:02d}"] == "train" for i in range(1, 7))
    assert all(by_slide[f"S{i:02d}"] == "test" for i in range(7, 10))
    unused = counts_adata.obs["library_id"].isin(["S10", "S11", "S12"]).to_numpy()
    assert counts_adata.obs["split"][unused].isna().all()
    assert not counts_adata.obs["split"][~unused].isna().any()
    assert list(counts_adata.obs["split"].cat.categories) == SPLITS
    info = counts_adata.uns["split"]
    assert info["units"] == {
        "train": ["S01", "S02", "S03", "S04", "S05", "S06"],
        "val": [],
        "test": ["S07", "S08", "S09"],
    }
    assert info["unused"] == ["S10", "S11", "S12"]
    assert info["missing"] == ["SPA999"]
    assert info["params"]["fold"] == 0 and len(info["params"]["files"]) == 2


def test_split_from_csv_val_fold_copy(counts_sdata, tmp_path):
    _write_csv(tmp_path / "train_1.csv", ["S01", "S02"])
    _write_csv(tmp_path / "val_1.csv", ["S03"])
    _write_csv(tmp_path / "test_1.csv", ["S04"])
    _write_csv(tmp_path / "train_0.csv", ["S05"])
    out = split_from_csv(counts_sdata, str(tmp_path), fold=1, copy=True, key_added="hest_split")
    table = out.tables["table"]
    by_slide = table.obs.groupby("library_id", observed=True)["hest_split"].first().astype(object).to_dict()
    assert {k: v for k, v in by_slide.items() if isinstance(v, str)} == {
        "S01": "train",
        "S02": "train",
        "S03": "val",
        "S04": "test",
    }
    assert "hest_split" not in counts_sdata.tables["table"].obs


def test_split_from_csv_bad_input(counts_adata, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        split_from_csv(counts_adata, tmp_path / "nope")
    _write_csv(tmp_path / "train_0.csv", ["S01"])
    with pytest.raises(FileNotFoundError, match=r"no `test_0.csv` for `fold=0` \(CSV files there: \['train_0.csv'\]\)"):
        split_from_csv(counts_adata, tmp_path)
    _write_csv(tmp_path / "test_0.csv", ["S01"])
    with pytest.raises(ValueError, match="'S01' is listed in both `train_0.csv` and `test_0.csv`"):
        split_from_csv(counts_adata, tmp_path)
    _write_csv(tmp_path / "test_0.csv", ["SPA1"])
    _write_csv(tmp_path / "train_0.csv", ["SPA2"])
    with pytest.raises(ValueError, match="None of the 2 sample ids"):
        split_from_csv(counts_adata, tmp_path)
    pd.DataFrame({"id": ["S01"]}).to_csv(tmp_path / "test_0.csv", index=False)
    with pytest.raises(KeyError, match="no `sample_id` column"):
        split_from_csv(counts_adata, tmp_path)
    with pytest.raises(ValueError, match="`fold` must be a non-negative integer"):
        split_from_csv(counts_adata, tmp_path, fold=-1)
    with pytest.raises(KeyError, match="`library_key='sample'`"):
        split_from_csv(counts_adata, tmp_path, library_key="sample")
    assert "split" not in counts_adata.obs and "split" not in counts_adata.uns
