from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from anndata import AnnData

from histoflow._constants import Key
from histoflow.io._build import SlideParts, build_spatialdata
from histoflow.io._resolve import ImageLevel
from histoflow.pp._patches import _choose_level, crop_patches, embed_patches

RNG = np.random.default_rng(0)


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _slide(lib: str, n: int = 6, h: int = 300, w: int = 400, px: float = 0.5, seed: int = 0, margin: int = 40):
    rng = np.random.default_rng(seed)
    centers = np.column_stack([rng.uniform(margin, w - margin, n), rng.uniform(margin, h - margin, n)])
    counts = rng.poisson(3.0, size=(n, 5))
    return SlideParts(
        library_id=lib,
        spot_ids=[f"s{i}" for i in range(n)],
        centers_px=centers,
        pixel_size_um=px,
        spot_diameter_um=55.0,
        counts=counts,
        var_names=[f"G{i}" for i in range(5)],
        image=_image(h, w, seed),
        meta={Key.cancer_type: "IDC"},
    )


@pytest.fixture
def sdata():
    return build_spatialdata([_slide("A", seed=1), _slide("B", n=4, seed=2, px=0.25, h=500, w=500)])


def _manual(img: np.ndarray, center: np.ndarray, side: int, pad: int = 255) -> np.ndarray:
    tl = np.round(center - side / 2).astype(int)
    h, w = img.shape[:2]
    out = np.full((side, side, 3), pad, np.uint8)
    y0, x0 = tl[1], tl[0]
    ys, xs = slice(max(y0, 0), min(y0 + side, h)), slice(max(x0, 0), min(x0 + side, w))
    out[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0] = img[ys, xs]
    return out


def test_crop_without_resize_is_exact_slicing(sdata):
    # 16 µm at 0.5 µm/px = 32 px source side = patch_px: no resize, pure slicing
    parts = _slide("A", seed=1)
    patches = crop_patches(sdata, patch_size_um=16.0, patch_px=32)
    table = sdata.tables["table"]
    assert patches.shape == (table.n_obs, 32, 32, 3) and patches.dtype == np.uint8
    rows = np.flatnonzero(table.obs[Key.library] == "A")
    for j, r in enumerate(rows):
        np.testing.assert_array_equal(patches[r], _manual(parts.image, parts.centers_px[j], 32))


def test_physical_size_follows_pixel_size(sdata):
    # slide B is scanned at 0.25 µm/px: 16 µm = 64 source px, resized to 32
    patches = crop_patches(sdata, patch_size_um=16.0, patch_px=32)
    table = sdata.tables["table"]
    parts = _slide("B", n=4, seed=2, px=0.25, h=500, w=500)
    r = np.flatnonzero(table.obs[Key.library] == "B")[0]
    from PIL import Image

    src = _manual(parts.image, parts.centers_px[0], 64)
    expected = np.asarray(Image.fromarray(src).resize((32, 32), Image.BILINEAR))
    np.testing.assert_array_equal(patches[r], expected)


def test_rows_joined_on_instance_key_not_order(sdata):
    before = crop_patches(sdata, patch_size_um=16.0, patch_px=32)
    table = sdata.tables["table"]
    perm = RNG.permutation(table.n_obs)
    shuffled = table[perm].copy()
    sdata.tables["table"] = shuffled
    after = crop_patches(sdata, patch_size_um=16.0, patch_px=32)
    np.testing.assert_array_equal(after, before[perm])


def test_banded_reads_equal_single_read(sdata):
    one = crop_patches(sdata, patch_size_um=30.0, patch_px=24)
    from histoflow.io._resolve import resolve_slides
    from histoflow.pp._patches import iter_patches

    table = sdata.tables["table"]
    slides = resolve_slides(sdata, table)
    out = np.empty_like(one)
    n_batches = 0
    for rows, patches in iter_patches(slides, patch_size_um=30.0, patch_px=24, max_read_pixels=5000, batch_size=2):
        out[rows] = patches
        n_batches += 1
    np.testing.assert_array_equal(out, one)
    assert n_batches >= 5


def test_patch_beyond_border_is_padded():
    parts = _slide("A", n=1, seed=3)
    parts.centers_px = np.array([[2.0, 150.0]])  # 2 px from the left edge
    sd = build_spatialdata([parts])
    patch = crop_patches(sd, patch_size_um=16.0, patch_px=32, pad_value=7)[0]
    assert (patch[:, :14] == 7).all()  # left part outside the image
    np.testing.assert_array_equal(patch, _manual(parts.image, parts.centers_px[0], 32, pad=7))


def test_choose_level_prefers_coarsest_sufficient_level():
    levels = [
        ImageLevel(np.zeros((3, 8, 8)), 1.0),
        ImageLevel(np.zeros((3, 4, 4)), 2.0),
        ImageLevel(np.zeros((3, 2, 2)), 4.0),
    ]
    assert _choose_level(levels, 0.25, 0.5) == 1  # 0.25 × 2 = 0.5 µm/px is enough
    assert _choose_level(levels, 0.1, 0.5) == 2
    assert _choose_level(levels, 0.7, 0.5) == 0  # coarser than wanted: the finest level


def test_multiscale_image_uses_pyramid_level():
    # a 9000-px image gets a pyramid; at 0.125 µm/px a 0.5 µm/px target reads level 2 (4× down)
    parts = _slide("A", n=3, h=9000, w=300, px=0.125, seed=4, margin=120)
    sd = build_spatialdata([parts])
    assert len(sd.images[Key.full_image("A")].children) > 1
    p = crop_patches(sd, patch_size_um=16.0, patch_px=32)
    assert p.shape == (3, 32, 32, 3)
    # level 1 (2×) of a random image differs from level 0; compare with the dask-downsampled level 2 slicing
    tree = sd.images[Key.full_image("A")]
    lvl = np.moveaxis(np.asarray(tree["scale2"]["image"].data), 0, -1)
    c = parts.centers_px[0] / (parts.image.shape[0] / lvl.shape[0])
    np.testing.assert_array_equal(p[0], _manual(lvl, c, 32))


def test_anndata_scanpy_layout():
    img = _image(200, 300, seed=5)
    coords = np.array([[100.0, 120.0], [400.0, 300.0]])  # full-res px; hires scale 0.5
    adata = AnnData(np.ones((2, 3), dtype=np.float32))
    adata.obsm["spatial"] = coords
    adata.obs["pixel_size_um"] = 0.5
    adata.uns["spatial"] = {"lib": {"images": {"hires": img}, "scalefactors": {"tissue_hires_scalef": 0.5}}}
    patches = crop_patches(adata, patch_size_um=16.0, patch_px=16)
    # hires pixels are 1 µm: 16 µm = 16 px, no resize
    np.testing.assert_array_equal(patches[0], _manual(img, coords[0] * 0.5, 16))


def test_bad_inputs(sdata):
    with pytest.raises(ValueError, match="patch_size_um"):
        crop_patches(sdata, patch_size_um=-1)
    with pytest.raises(ValueError, match="patch_px"):
        crop_patches(sdata, patch_px=3)
    with pytest.raises(KeyError, match="image_key"):
        crop_patches(sdata, image_key="nope")
    with pytest.raises(KeyError, match="obs_names"):
        crop_patches(sdata, obs_names=["missing"])
    with pytest.raises(KeyError, match="table_key"):
        crop_patches(sdata, table_key="nope")


def test_spots_outside_image_error():
    parts = _slide("A", n=2, seed=6)
    parts.centers_px = np.array([[50.0, 50.0], [5000.0, 50.0]])
    sd = build_spatialdata([parts])
    with pytest.raises(ValueError, match="outside its image"):
        crop_patches(sd)


def test_image_in_other_coordinate_system_error():
    from spatialdata.transformations import Identity, set_transformation

    sd = build_spatialdata([_slide("A", seed=7)])
    img = sd.images[Key.full_image("A")]
    set_transformation(img, {"elsewhere": Identity()}, set_all=True)
    with pytest.raises(ValueError, match="coordinate system"):
        crop_patches(sd)


def test_missing_pixel_size_error(sdata):
    table = sdata.tables["table"]
    del table.obs[Key.pixel_size]
    del table.obs[Key.spot_diameter]
    with pytest.raises(KeyError, match="pixel_size"):
        crop_patches(sdata)


class _MeanColour(torch.nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))


def test_embed_custom_module_values_and_keys(sdata):
    table = sdata.tables["table"]
    before = {
        "obs": list(table.obs.columns),
        "obsm": set(table.obsm),
        "layers": set(table.layers),
        "uns": set(table.uns),
    }
    X_before = table.X.copy()
    embed_patches(
        sdata,
        _MeanColour(),
        patch_size_um=16.0,
        patch_px=32,
        show_progress_bar=False,
        key_added="X_mean",
    )
    patches = crop_patches(sdata, patch_size_um=16.0, patch_px=32)
    from histoflow.pp._encoders import IMAGENET_MEAN, IMAGENET_STD

    expected = (patches.mean(axis=(1, 2)) / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(table.obsm["X_mean"], expected, rtol=1e-4, atol=1e-4)
    assert set(table.obsm) == before["obsm"] | {"X_mean"}
    assert set(table.uns) == before["uns"] | {"X_mean"}
    assert list(table.obs.columns) == before["obs"] and set(table.layers) == before["layers"]
    assert (table.X != X_before).nnz == 0
    assert table.uns["X_mean"]["patch_size_um"] == 16.0


def test_embed_copy_leaves_input_untouched(sdata):
    out = embed_patches(sdata, _MeanColour(), patch_size_um=16.0, patch_px=32, show_progress_bar=False, copy=True)
    assert "X__meancolour" not in sdata.tables["table"].obsm
    assert "X__meancolour" in out.tables["table"].obsm


class _NaN(torch.nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3)) * float("nan")


def test_embed_failure_writes_nothing(sdata):
    table = sdata.tables["table"]
    keys = set(table.obsm), set(table.uns)
    with pytest.raises(FloatingPointError, match="NaN"):
        embed_patches(sdata, _NaN(), patch_size_um=16.0, patch_px=32, show_progress_bar=False)
    assert (set(table.obsm), set(table.uns)) == keys


def test_embed_efficientnet_lite0_deterministic(sdata):
    embed_patches(sdata, "efficientnet_lite0", patch_size_um=16.0, patch_px=32, batch_size=4, show_progress_bar=False)
    table = sdata.tables["table"]
    f1 = table.obsm["X_efficientnet_lite0"].copy()
    assert f1.shape == (table.n_obs, 1280) and f1.dtype == np.float32
    assert np.isfinite(f1).all() and f1.std() > 0
    embed_patches(sdata, "efficientnet_lite0", patch_size_um=16.0, patch_px=32, batch_size=3, show_progress_bar=False)
    np.testing.assert_allclose(table.obsm["X_efficientnet_lite0"], f1, rtol=1e-5, atol=1e-5)
    # resizing to the encoder input: patch_px 32 ≠ 224
    assert table.uns["X_efficientnet_lite0"]["encoder"] == "efficientnet_lite0"


def _hest_barcodes(path):
    with h5py.File(path) as f:
        return f["img"][:], [b[0].decode() if isinstance(b[0], bytes) else str(b[0]) for b in f["barcode"][:]]


def test_patches_match_hest_spa141(her2st_dir):
    """Patches cut from the raw HER2ST C2 image equal HEST-1k's own patches for that section (SPA141)."""
    from histoflow.io import read_her2st

    sd = read_her2st(her2st_dir, sections=["C2"])
    hest_img, barcodes = _hest_barcodes(her2st_dir / "hest_layout" / "patches" / "SPA141.h5")
    table = sd.tables["table"]
    by_spot = pd.Series(table.obs_names, index=table.obs[Key.instance].astype(str))
    ours = crop_patches(sd, obs_names=by_spot.loc[barcodes].tolist())
    assert ours.shape == hest_img.shape == (len(barcodes), 224, 224, 3)
    identical = (ours == hest_img).mean()
    assert identical == 1.0, f"only {identical:.4%} of pixels identical"


class _TopRow(torch.nn.Module):
    """Mean colour of the patch's top row of pixels: changes when the patch is turned."""

    def forward(self, x):
        return x[:, :, 0, :].mean(dim=2)


def _edge_means(sdata, size_um: float = 16.0) -> np.ndarray:
    """Per-channel mean colour of each of the 4 edges of every patch, normalised as the encoder input: (n, 4, 3)."""
    from histoflow.pp._encoders import IMAGENET_MEAN, IMAGENET_STD

    p = crop_patches(sdata, patch_size_um=size_um, patch_px=32).astype(np.float64)
    edges = np.stack([p[:, 0].mean(1), p[:, -1].mean(1), p[:, :, 0].mean(1), p[:, :, -1].mean(1)], axis=1)
    return (edges / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)


def test_embed_dihedral_averages_the_eight_rotations_and_flips(sdata):
    kw = {"patch_size_um": 16.0, "patch_px": 32, "show_progress_bar": False}
    embed_patches(sdata, _TopRow(), key_added="plain", **kw)
    embed_patches(sdata, _TopRow(), key_added="d4", dihedral=True, **kw)
    table = sdata.tables["table"]
    edges = _edge_means(sdata)
    np.testing.assert_allclose(table.obsm["plain"], edges[:, 0], rtol=1e-4, atol=1e-4)
    # every edge comes to the top twice among the 8 views (a flip keeps the top edge's mean)
    np.testing.assert_allclose(table.obsm["d4"], edges.mean(axis=1), rtol=1e-4, atol=1e-4)
    assert table.uns["d4"]["dihedral"] is True and table.uns["plain"]["dihedral"] is False
    with pytest.raises(TypeError, match="`dihedral` must be True or False"):
        embed_patches(sdata, _TopRow(), dihedral="yes", **kw)


def test_embed_context_patches_are_concatenated_after_the_spot_patch(sdata):
    """Multi-scale features: [spot patch | each context patch], every block the encoder's output on that crop."""
    kw = {"patch_size_um": 16.0, "patch_px": 32, "show_progress_bar": False}
    embed_patches(sdata, _TopRow(), key_added="ms", context_size_um=[40.0, 24.0], dihedral=True, **kw)
    table = sdata.tables["table"]
    expected = np.hstack([_edge_means(sdata, size).mean(axis=1) for size in (16.0, 40.0, 24.0)])
    assert table.obsm["ms"].shape == (table.n_obs, 9) and table.obsm["ms"].dtype == np.float32
    np.testing.assert_allclose(table.obsm["ms"], expected, rtol=1e-4, atol=1e-4)
    rec = table.uns["ms"]
    assert rec["context_size_um"] == [40.0, 24.0] and rec["patch_size_um"] == 16.0 and rec["n_features"] == 9
    embed_patches(sdata, _TopRow(), key_added="one", context_size_um=40, **kw)  # a single size is a number
    np.testing.assert_allclose(table.obsm["one"][:, 3:], _edge_means(sdata, 40.0)[:, 0], rtol=1e-4, atol=1e-4)
    embed_patches(sdata, _TopRow(), key_added="none", **kw)
    assert table.uns["none"]["context_size_um"] == [] and table.obsm["none"].shape[1] == 3


@pytest.mark.parametrize(
    ("bad", "err", "match"),
    [
        (0.0, ValueError, "`context_size_um` must be positive and finite, got 0.0"),
        ([224.0, np.nan], ValueError, "`context_size_um` must be positive and finite"),
        ("224", TypeError, "`context_size_um` must be a number or a sequence of numbers"),
        ([True], TypeError, "`context_size_um` must be a number or a sequence of numbers"),
    ],
)
def test_embed_rejects_bad_context_sizes_and_writes_nothing(sdata, bad, err, match):
    table = sdata.tables["table"]
    before = (set(table.obsm), set(table.uns))
    with pytest.raises(err, match=match):
        embed_patches(sdata, _TopRow(), patch_size_um=16.0, patch_px=32, context_size_um=bad, show_progress_bar=False)
    assert (set(table.obsm), set(table.uns)) == before


def test_embed_on_two_cpu_processes_matches_single_process(sdata):
    """Lightning DDP (2 CPU processes, gloo, ddp_spawn): same features as the single-process run."""
    kw = {"patch_size_um": 16.0, "patch_px": 32, "show_progress_bar": False, "dihedral": True, "context_size_um": 24}
    embed_patches(sdata, _TopRow(), key_added="one", **kw)
    embed_patches(sdata, _TopRow(), key_added="two", accelerator="cpu", devices=2, strategy="ddp_spawn", **kw)
    table = sdata.tables["table"]
    np.testing.assert_allclose(table.obsm["two"], table.obsm["one"], rtol=1e-5, atol=1e-6)
    expected = np.hstack([_edge_means(sdata, size).mean(axis=1) for size in (16.0, 24.0)])
    np.testing.assert_allclose(table.obsm["two"], expected, rtol=1e-4, atol=1e-4)


def test_slides_are_dealt_by_size():
    from histoflow.io._resolve import Slide
    from histoflow.models._train import default_strategy
    from histoflow.pp._distributed import _deal

    slides = [Slide(str(i), np.arange(n), np.zeros((n, 2)), 1.0) for i, n in enumerate([10, 8, 3, 2, 1])]
    r0, r1 = _deal(slides, 2, 0), _deal(slides, 2, 1)
    assert sorted(s.library_id for s in r0 + r1) == ["0", "1", "2", "3", "4"]
    assert abs(sum(len(s.rows) for s in r0) - sum(len(s.rows) for s in r1)) <= 3
    assert default_strategy("cpu", 1) == "auto" and default_strategy("cpu", 2) == "ddp_spawn"
