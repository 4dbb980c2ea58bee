from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from histoflow._constants import Key
from histoflow.io._her2st import HER2ST_PIXEL_SIZE_UM, her2st_sections, read_her2st

C_SPOTS = {"C2": 187, "C3": 180, "C4": 184, "C5": 181, "C6": 178}


def _raw_counts(her2st_dir: Path, section: str) -> pd.DataFrame:
    return pd.read_csv(her2st_dir / "ST-cnts" / f"{section}.tsv.gz", sep="\t", index_col=0)


@pytest.fixture(scope="module")
def her2st_c(her2st_dir):
    """Sections C2-C6 with their full-resolution images (read once for this module)."""
    return read_her2st(her2st_dir, list(C_SPOTS))


def test_c2_c6_spots_genes_and_metadata(her2st_c, her2st_dir):
    table = her2st_c.tables[Key.table]
    assert table.n_obs == sum(C_SPOTS.values()) == 910
    assert table.obs[Key.library].value_counts().to_dict() == C_SPOTS
    assert sorted(her2st_c.shapes) == sorted(C_SPOTS)
    assert sorted(her2st_c.images) == sorted(f"{s}_full_image" for s in C_SPOTS)
    # the sections measure different genes; the inner join keeps exactly the shared ones
    headers = [set(_raw_counts(her2st_dir, s).columns) for s in ("C2", "C3")]
    assert set(table.var_names) <= headers[0] & headers[1]
    assert table.n_vars == 14382
    obs = table.obs
    assert set(obs[Key.patient]) == {"C"}
    assert set(obs[Key.cancer_type]) == {"IDC"}
    assert set(obs[Key.organ]) == {"Breast"}
    assert set(obs[Key.species]) == {"Homo sapiens"}
    assert set(obs[Key.technology]) == {"Spatial Transcriptomics"}
    np.testing.assert_allclose(obs[Key.pixel_size], HER2ST_PIXEL_SIZE_UM)
    np.testing.assert_allclose(obs[Key.spot_diameter], 100.0)
    # array position = spot id "<x>x<y>"
    xy = obs[Key.instance].str.split("x", expand=True).astype(int)
    np.testing.assert_array_equal(obs["array_col"], xy[0])
    np.testing.assert_array_equal(obs["array_row"], xy[1])
    # no pathologist labels for C2-C6
    assert obs["label"].isna().all()


def test_counts_and_coordinates_match_the_files(her2st_c, her2st_dir):
    table = her2st_c.tables[Key.table]
    raw = _raw_counts(her2st_dir, "C4")
    sel = pd.read_csv(her2st_dir / "ST-spotfiles" / "C4_selection.tsv", sep="\t")
    sel.index = sel["x"].astype(str) + "x" + sel["y"].astype(str)
    sub = table[table.obs[Key.library] == "C4"]
    assert list(sub.obs[Key.instance]) == [s for s in raw.index if s in sel.index]
    expected = raw.loc[sub.obs[Key.instance], table.var_names].to_numpy()
    np.testing.assert_array_equal(sub.X.toarray(), expected)
    np.testing.assert_allclose(sub.obsm[Key.spatial], sel.loc[sub.obs[Key.instance], ["pixel_x", "pixel_y"]])
    # circles: spot radius in full-resolution pixels
    radius = her2st_c.shapes["C4"]["radius"].to_numpy()
    np.testing.assert_allclose(radius, 100.0 / HER2ST_PIXEL_SIZE_UM / 2)


def test_spot_centres_lie_on_tissue(her2st_c, image_level0):
    """Under the spot centres the H&E is darker and more coloured than the white glass around the tissue."""
    table = her2st_c.tables[Key.table]
    for section in C_SPOTS:
        img = image_level0(her2st_c, f"{section}_full_image")
        h, w, _ = img.shape
        assert (w, h) in {(9274, 9911), (9270, 9936), (9278, 9916), (9272, 9901), (9288, 9907)}
        xy = np.rint(table.obsm[Key.spatial][table.obs[Key.library] == section]).astype(int)
        assert (xy >= 0).all() and (xy[:, 0] < w).all() and (xy[:, 1] < h).all()

        def on_glass(points: np.ndarray, img: np.ndarray = img, w: int = w, h: int = h) -> float:
            """Fraction of spots whose 21 x 21 px centre window is as light as bare glass."""
            keep = (points[:, 0] >= 10) & (points[:, 0] < w - 10) & (points[:, 1] >= 10) & (points[:, 1] < h - 10)
            grey = [img[y - 10 : y + 11, x - 10 : x + 11].mean() for x, y in points[keep]]
            return float(np.mean(np.asarray(grey) > 215))

        patches = np.stack([img[y - 10 : y + 11, x - 10 : x + 11] for x, y in xy]).astype(float)
        grey = patches.mean(axis=(1, 2, 3))
        chroma = (patches.max(-1) - patches.min(-1)).mean(axis=(1, 2))
        thumb = img[::16, ::16].astype(float)
        background = np.percentile(thumb.mean(-1), 95)
        assert background > 225  # white glass
        assert np.median(grey) < background - 50
        assert np.median(chroma) > 25 > np.median(thumb.max(-1) - thumb.min(-1))
        assert on_glass(xy) <= 0.05
        # classic mistakes (x and y swapped, an axis flipped) put many spots on bare glass
        wrong = [on_glass(p) for p in (xy[:, ::-1], np.c_[xy[:, 0], h - xy[:, 1]], np.c_[w - xy[:, 0], xy[:, 1]])]
        assert min(wrong) >= 0.08 and max(wrong) >= 0.3, wrong


def test_join_outer_keeps_every_gene(her2st_dir):
    inner = read_her2st(her2st_dir, ["C2", "C3"], load_images=False).tables[Key.table]
    outer = read_her2st(her2st_dir, ["C2", "C3"], load_images=False, join="outer").tables[Key.table]
    g2, g3 = (set(_raw_counts(her2st_dir, s).columns) for s in ("C2", "C3"))
    assert set(inner.var_names) == g2 & g3
    assert set(outer.var_names) == g2 | g3
    only_c3 = sorted(g3 - g2)[0]
    c2_rows = (outer.obs[Key.library] == "C2").to_numpy()
    col = outer.var_names.get_loc(only_c3)
    assert outer.X[c2_rows][:, col].nnz == 0
    mask = outer.uns["histoflow_gene_mask"]
    assert not mask.loc["C2", only_c3] and mask.loc["C3", only_c3]


def test_pathologist_labels_joined_on_array_position(her2st_dir):
    sdata = read_her2st(her2st_dir, ["A1", "C2"], load_images=False)
    table = sdata.tables[Key.table]
    a1 = table.obs[table.obs[Key.library] == "A1"]
    lbl = pd.read_csv(her2st_dir / "ST-pat" / "lbl" / "A1_labeled_coordinates.tsv", sep="\t")
    lbl.index = [f"{round(x)}x{round(y)}" for x, y in zip(lbl["x"], lbl["y"])]
    expected = lbl.loc[a1[Key.instance], "label"].to_numpy()
    np.testing.assert_array_equal(a1["label"].astype(str).to_numpy(), expected)
    assert a1["label"].value_counts()["invasive cancer"] > 250
    assert table.obs.loc[table.obs[Key.library] == "C2", "label"].isna().all()
    assert isinstance(table.obs["label"].dtype, pd.CategoricalDtype)
    assert len(sdata.images) == 0  # A1 has no image and images were not requested


def test_sections_none_reads_every_counted_section_and_clone_layout(her2st_dir, tmp_path):
    data = tmp_path / "her2st" / "data"  # a clone of almaan/her2st keeps the files under data/
    for sub in ("ST-cnts", "ST-spotfiles"):
        (data / sub).mkdir(parents=True)
    for s in ("C2", "A1"):
        (data / "ST-cnts" / f"{s}.tsv.gz").symlink_to(her2st_dir / "ST-cnts" / f"{s}.tsv.gz")
        (data / "ST-spotfiles" / f"{s}_selection.tsv").symlink_to(her2st_dir / "ST-spotfiles" / f"{s}_selection.tsv")
    assert her2st_sections(tmp_path) == ["A1", "C2"]
    table = read_her2st(tmp_path / "her2st", load_images=True).tables[Key.table]
    assert table.obs[Key.library].value_counts().to_dict() == {"A1": 346, "C2": 187}
    assert her2st_sections(her2st_dir)[:3] == ["A1", "A2", "A3"] and len(her2st_sections(her2st_dir)) == 30


def test_pixel_size_per_section(her2st_dir):
    table = read_her2st(her2st_dir, ["C2", "C3"], load_images=False, pixel_size_um={"C2": 0.7, "C3": 0.65}).tables[
        Key.table
    ]
    assert table.obs.groupby(Key.library, observed=True)[Key.pixel_size].first().to_dict() == {"C2": 0.7, "C3": 0.65}


def test_write_and_read_back_zarr(her2st_dir, tmp_path):
    import spatialdata as sd

    sdata = read_her2st(her2st_dir, ["A1", "C2"], load_images=False)
    sdata.write(tmp_path / "h.zarr")
    back = sd.read_zarr(tmp_path / "h.zarr").tables[Key.table]
    assert back.n_obs == 533
    assert back.obs["label"].isna().sum() == 187


def _copy_section(her2st_dir: Path, dest: Path, section: str) -> None:
    for sub in ("ST-cnts", "ST-spotfiles"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy(her2st_dir / "ST-cnts" / f"{section}.tsv.gz", dest / "ST-cnts")
    shutil.copy(her2st_dir / "ST-spotfiles" / f"{section}_selection.tsv", dest / "ST-spotfiles")


def test_bad_input(her2st_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_her2st(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="has no `ST-cnts/` folder"):
        read_her2st(tmp_path)
    with pytest.raises(KeyError, match=r"\['Z9'\].*available sections: \['A1', 'A2'"):
        read_her2st(her2st_dir, ["C2", "Z9"], load_images=False)
    with pytest.raises(ValueError, match="`sections` is empty"):
        read_her2st(her2st_dir, [], load_images=False)
    with pytest.raises(ValueError, match="duplicates"):
        read_her2st(her2st_dir, ["C2", "C2"], load_images=False)
    with pytest.raises(ValueError, match=r"`join='left'` is not valid"):
        read_her2st(her2st_dir, "C2", join="left")
    with pytest.raises(ValueError, match="`pixel_size_um` must be positive"):
        read_her2st(her2st_dir, "C2", load_images=False, pixel_size_um=-1.0)
    with pytest.raises(KeyError, match="`pixel_size_um` has no value for section 'C3'"):
        read_her2st(her2st_dir, ["C2", "C3"], load_images=False, pixel_size_um={"C2": 0.7})


def test_bad_files(her2st_dir, tmp_path):
    root = tmp_path / "h"
    _copy_section(her2st_dir, root, "C2")
    (root / "ST-spotfiles" / "C2_selection.tsv").unlink()
    with pytest.raises(FileNotFoundError, match="has counts but no spot file"):
        read_her2st(root, "C2")
    _copy_section(her2st_dir, root, "C2")
    with gzip.open(root / "ST-cnts" / "C2.tsv.gz", "rt") as fh:
        text = fh.read().replace("\t1\t", "\t1.5\t", 1)
    with gzip.open(root / "ST-cnts" / "C2.tsv.gz", "wt", compresslevel=1) as fh:
        fh.write(text)
    with pytest.raises(ValueError, match="not integer counts"):
        read_her2st(root, "C2")
    # spots that are not selected (or have no coordinates) are dropped, none in common is an error
    _copy_section(her2st_dir, root, "C2")
    sel = pd.read_csv(root / "ST-spotfiles" / "C2_selection.tsv", sep="\t")
    sel.iloc[:10].assign(selected=0).to_csv(root / "ST-spotfiles" / "C2_selection.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match="no spot of C2.tsv.gz is a selected spot"):
        read_her2st(root, "C2")
    sel.assign(selected=[0] * 7 + [1] * (len(sel) - 7)).to_csv(
        root / "ST-spotfiles" / "C2_selection.tsv", sep="\t", index=False
    )
    assert read_her2st(root, "C2").tables[Key.table].n_obs == 187 - 7
