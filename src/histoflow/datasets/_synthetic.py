"""A seeded, offline, pan-cancer-like spatial transcriptomics dataset with H&E-like images and known ground truth.

Generative model (all lengths in micrometres, so slides scanned at different pixel sizes look the same):

1. Spots sit on a Visium-like hexagonal grid (odd rows shifted by half a spacing).
2. Latent *tissue programs* are smooth random fields (Gaussian-smoothed white noise, correlated over a few spot
   spacings). Four programs are shared by every cancer type (``tumor``, ``stroma``, ``immune``,
   ``necrosis``); each cancer type has its own extra program(s). A softmax turns the fields of the programs present on
   a slide into a per-location composition; a spot's composition is its average over the spot disk. A *hidden*
   program (``interferon``) is a further smooth field that drives genes but leaves no trace in the image.
3. The image is rendered with the Beer-Lambert law from haematoxylin and eosin concentrations: every program has a
   background stain mix, nuclei (density, size, darkness) and optionally fibres (orientation, period). The look of a
   program is the same in every cancer type; each slide gets its own stain strengths (scanner/staining variation)
   and pixel noise.
4. Expression: ``mean = library size * exp(gene bias + loadings @ programs + noise)`` with counts drawn from a negative
   binomial. Named marker genes load on their programs; part of the loadings are cancer-type specific (the same
   ``tumor`` morphology drives ERBB2/ESR1 in IDC but KLK3/AR in PRAD), which a mixture of experts can separate.
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from histoflow._constants import Key
from histoflow._logging import logger
from histoflow._utils import log_write
from histoflow._validate import check_positive

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = ["synthetic", "SYNTHETIC_GENE_MODULES"]

#: Built-in gene symbols (HGNC) by module; many are MSigDB Hallmark genes.
SYNTHETIC_GENE_MODULES: dict[str, tuple[str, ...]] = {
    "epithelial": (
        "EPCAM", "KRT8", "KRT18", "KRT19", "CDH1", "CLDN4", "CLDN7", "ELF3", "SPINT2", "TACSTD2", "MUC1", "KRT7",
        "CD24",
    ),
    "proliferation": (
        "MKI67", "TOP2A", "CCNB1", "CDK1", "BIRC5", "PCNA", "MCM2", "TYMS", "UBE2C", "CENPF", "RRM2", "AURKA",
    ),
    "stromal": (
        "COL1A1", "COL1A2", "COL3A1", "COL5A1", "COL6A3", "DCN", "LUM", "FN1", "SPARC", "POSTN", "ACTA2", "TAGLN",
        "MYL9", "VIM", "PDGFRB", "FAP", "THY1", "MGP", "BGN",
    ),
    "immune": (
        "PTPRC", "CD3E", "CD3D", "CD2", "CD8A", "CD4", "CD19", "MS4A1", "CD79A", "CD74", "HLA-DRA", "HLA-DRB1",
        "CD68", "CD14", "LYZ", "CXCL13", "CCL19", "CCL21", "IGKC", "IGHG1", "JCHAIN", "GZMB", "NKG7",
    ),
    "hypoxia": (
        "VEGFA", "CA9", "SLC2A1", "LDHA", "PGK1", "ENO1", "BNIP3", "NDRG1", "ADM", "P4HA1", "ALDOA", "PFKFB3", "HK2",
    ),
    "interferon": (
        "ISG15", "IFI6", "IFI27", "IFIT1", "IFIT3", "MX1", "OAS1", "STAT1", "IRF7", "IFI44L", "RSAD2", "BST2",
    ),
    "housekeeping": (
        "ACTB", "GAPDH", "B2M", "RPLP0", "TPT1", "EEF1A1", "MALAT1", "FTL", "TMSB4X", "HLA-A", "HLA-B", "UBC",
    ),
    "lineage_IDC": ("ERBB2", "GRB7", "ESR1", "PGR", "GATA3", "FOXA1", "SCGB2A2", "TFF1", "AGR2"),
    "lineage_PRAD": ("KLK3", "KLK2", "AR", "NKX3-1", "TMPRSS2", "FOLH1", "ACP3", "AMACR", "MSMB"),
    "lineage_COAD": ("CDX2", "CDX1", "VIL1", "LGALS4", "CEACAM5", "MUC2", "SATB2", "OLFM4", "LGR5"),
    "lineage_LUAD": ("NKX2-1", "NAPSA", "SFTPB", "SFTPC", "SFTPA1"),
    "lineage_SKCM": ("PMEL", "MLANA", "TYR", "MITF", "SOX10"),
}  # fmt: skip

_ORGANS = {
    "IDC": "Breast", "ILC": "Breast", "BRCA": "Breast", "PRAD": "Prostate", "COAD": "Bowel", "READ": "Bowel",
    "COADREAD": "Bowel", "LUAD": "Lung", "LUSC": "Lung", "SKCM": "Skin", "CCRCC": "Kidney", "KIRC": "Kidney",
    "PAAD": "Pancreas", "HCC": "Liver", "LIHC": "Liver", "GBM": "Brain", "OV": "Ovary", "CSCC": "Skin",
}  # fmt: skip

SHARED_PROGRAMS = ("tumor", "stroma", "immune", "necrosis")
HIDDEN_PROGRAMS = ("interferon",)
# gene module -> (program, loading range) shared by every cancer type
_MODULE_PROGRAM = {
    "epithelial": ("tumor", (1.5, 2.5)),
    "proliferation": ("tumor", (0.8, 1.6)),
    "stromal": ("stroma", (1.5, 2.5)),
    "immune": ("immune", (1.5, 2.5)),
    "hypoxia": ("necrosis", (1.2, 2.2)),
    "interferon": ("interferon", (1.5, 2.5)),
}
_SHARED_OFFSETS = {"tumor": 0.6, "stroma": 0.4, "immune": -0.2, "necrosis": -0.8}
_CONTRAST = 2.5  # softmax gain on unit-variance fields
_MARGIN_UM = 100.0  # tissue beyond the outermost spot centres (>= 56 µm so 112 µm patches fit)
_COARSE_UM = 10.0  # resolution of the latent fields
_WARP_SCALE_UM = 30.0  # correlation length of the fibre waviness
_H_VECTOR = np.array([0.650, 0.704, 0.286], dtype=np.float32)  # haematoxylin optical density (Ruifrok & Johnston)
_E_VECTOR = np.array([0.11, 0.88, 0.41], dtype=np.float32)  # eosin (pink, a little blue absorbed)
_BACKGROUND_OD = np.array([0.03, 0.04, 0.03], dtype=np.float32)


@dataclass(frozen=True)
class _Look:
    """How one program looks: stain concentrations, nuclei and fibres (lengths in µm)."""

    haematoxylin: float
    eosin: float
    nuclei_per_1000um2: float
    nucleus_radius_um: float
    nucleus_haematoxylin: float
    fibre_eosin: float = 0.0
    fibre_period_um: float = 10.0
    fibre_angle_deg: float = 0.0


_SHARED_LOOKS = {
    # dense large pale-ish vesicular nuclei on a purple-pink cytoplasm
    "tumor": _Look(0.28, 0.32, 8.0, 4.2, 0.85),
    # pink collagen fibres, sparse thin nuclei
    "stroma": _Look(0.05, 0.60, 1.2, 2.2, 1.0, fibre_eosin=0.45, fibre_period_um=9.0, fibre_angle_deg=35.0),
    # crowded small dark round lymphocyte nuclei
    "immune": _Look(0.22, 0.18, 20.0, 2.6, 1.35),
    # pale eosinophilic background with small nuclear debris
    "necrosis": _Look(0.10, 0.45, 12.0, 1.1, 0.75),
}


def _random_look(rng: np.random.Generator) -> _Look:
    fibrous = rng.random() < 0.5
    return _Look(
        haematoxylin=float(rng.uniform(0.08, 0.35)),
        eosin=float(rng.uniform(0.2, 0.6)),
        nuclei_per_1000um2=float(rng.uniform(2.0, 15.0)),
        nucleus_radius_um=float(rng.uniform(1.8, 4.8)),
        nucleus_haematoxylin=float(rng.uniform(0.7, 1.3)),
        fibre_eosin=float(rng.uniform(0.2, 0.4)) if fibrous else 0.0,
        fibre_period_um=float(rng.uniform(6.0, 16.0)),
        fibre_angle_deg=float(rng.uniform(0.0, 180.0)),
    )


# --------------------------------------------------------------------------------------------------------------------
# validation


def _check_int(value: Any, arg: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"`{arg}` must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _check_inputs(
    n_slides: Any,
    cancer_types: Any,
    grid: Any,
    n_genes: Any,
    pixel_size_um: Any,
    spot_diameter_um: float,
    spot_spacing_um: float,
) -> tuple[int, list[str], tuple[int, int], int, list[float]]:
    n_slides = _check_int(n_slides, "n_slides", 1)
    if isinstance(cancer_types, str):
        cancer_types = [cancer_types]
    cancer_types = [str(c) for c in cancer_types]
    if not cancer_types:
        raise ValueError("`cancer_types` is empty; pass at least one cancer type, e.g. `cancer_types=('IDC',)`.")
    if len(set(cancer_types)) != len(cancer_types):
        raise ValueError(f"`cancer_types` must be unique, got {cancer_types}.")
    try:
        rows, cols = grid
    except (TypeError, ValueError):
        raise ValueError(f"`grid` must be a pair (n_rows, n_cols) of integers, got {grid!r}.") from None
    if not all(isinstance(g, numbers.Integral) and not isinstance(g, bool) for g in (rows, cols)):
        raise ValueError(f"`grid` must be a pair (n_rows, n_cols) of integers, got {grid!r}.")
    rows, cols = int(rows), int(cols)
    if rows < 2 or cols < 2:
        raise ValueError(f"`grid` must be at least (2, 2) spots, got {tuple(grid)}; pass e.g. `grid=(16, 16)`.")
    n_genes = _check_int(n_genes, "n_genes", 1)
    if isinstance(pixel_size_um, numbers.Real):
        sizes = [float(pixel_size_um)] * n_slides
    else:
        sizes = [float(p) for p in pixel_size_um]
        if len(sizes) != n_slides:
            raise ValueError(
                f"`pixel_size_um` has {len(sizes)} values but `n_slides={n_slides}`; pass one number or one per slide."
            )
    for p in sizes:
        check_positive(p, "pixel_size_um")
        if p > 8.0:
            raise ValueError(f"`pixel_size_um` must be at most 8 µm per pixel (nuclei must be visible), got {p}.")
    check_positive(spot_diameter_um, "spot_diameter_um")
    check_positive(spot_spacing_um, "spot_spacing_um")
    if spot_diameter_um > spot_spacing_um:
        raise ValueError(
            f"`spot_diameter_um={spot_diameter_um}` is larger than `spot_spacing_um={spot_spacing_um}`: spots would "
            "overlap. Pass a spacing at least as large as the diameter."
        )
    return n_slides, cancer_types, (rows, cols), n_genes, sizes


# --------------------------------------------------------------------------------------------------------------------
# genes and loadings


def _gene_panel(n_genes: int, rng: np.random.Generator) -> pd.DataFrame:
    """Take the first ``n_genes`` built-in genes round-robin over modules, then ``GENE<i>`` with random modules."""
    queues = {m: list(g) for m, g in SYNTHETIC_GENE_MODULES.items()}
    names: list[str] = []
    modules: list[str] = []
    while len(names) < n_genes and any(queues.values()):
        for m, q in queues.items():
            if q and len(names) < n_genes:
                names.append(q.pop(0))
                modules.append(m)
    extra = n_genes - len(names)
    if extra > 0:
        pool = [*_MODULE_PROGRAM, "none", "none", "none"]
        names += [f"GENE{i}" for i in range(1, extra + 1)]
        modules += [str(m) for m in rng.choice(pool, size=extra)]
    return pd.DataFrame({"module": modules}, index=pd.Index(names, name="gene"))


def _lineage_genes(genes: pd.DataFrame, cancer_types: list[str], rng: np.random.Generator) -> dict[str, list[str]]:
    """Marker genes per cancer type: the built-in lineage module, else unused lineage/other genes."""
    module = genes["module"]
    out: dict[str, list[str]] = {}
    taken: set[str] = set()
    for ct in cancer_types:
        own = [str(g) for g in module.index[module == f"lineage_{ct}"]]
        if len(own) >= 2:
            out[ct] = own
            taken.update(own)
    for ct in cancer_types:
        if ct in out:
            continue
        is_lineage = module.str.startswith("lineage_")
        pool = [g for g in module.index[is_lineage] if g not in taken and module[g][8:] not in cancer_types]
        if len(pool) < 3:
            pool = [g for g in module.index[module.isin(["none", "epithelial"])] if g not in taken]
        if len(pool) < 3:
            pool = [g for g in module.index[module != "housekeeping"] if g not in taken] or list(module.index)
        chosen = [str(g) for g in rng.choice(pool, size=min(5, len(pool)), replace=False)]
        out[ct] = chosen
        taken.update(chosen)
    return out


def _loadings(
    genes: pd.DataFrame,
    cancer_types: list[str],
    specific: dict[str, list[str]],
    lineage: dict[str, list[str]],
    rng: np.random.Generator,
) -> dict[str, pd.DataFrame]:
    """Genes × programs log-scale loadings, one table per cancer type."""
    programs = [*SHARED_PROGRAMS, *[p for ct in cancer_types for p in specific[ct]], *HIDDEN_PROGRAMS]
    n = len(genes)
    col = {p: i for i, p in enumerate(programs)}
    base = np.zeros((n, len(programs)))
    base[:, : len(SHARED_PROGRAMS)] = rng.normal(0.0, 0.15, size=(n, len(SHARED_PROGRAMS)))
    module = genes["module"].to_numpy()
    for m, (program, (lo, hi)) in _MODULE_PROGRAM.items():
        rows = np.flatnonzero(module == m)
        base[rows, col[program]] += rng.uniform(lo, hi, size=len(rows))
    base[module == "housekeeping"] = 0.0
    any_lineage = genes.index.isin([g for genes_ in lineage.values() for g in genes_])
    candidates = np.flatnonzero((module != "housekeeping") & (module != "interferon") & ~any_lineage)
    if candidates.size == 0:  # tiny panels
        candidates = np.arange(n)
    out = {}
    for ct in cancer_types:
        L = base.copy()
        own = genes.index.get_indexer(lineage[ct])
        # the shared tumour morphology drives this cancer type's lineage genes only
        L[own, col["tumor"]] += rng.uniform(2.0, 3.0, size=len(own))
        # cancer-type-specific rewiring of part of the genes onto the shared programs
        rewired = rng.choice(candidates, size=max(1, int(round(0.15 * len(candidates)))), replace=False)
        targets = rng.integers(0, len(SHARED_PROGRAMS), size=len(rewired))
        L[rewired, targets] += rng.normal(0.0, 1.2, size=len(rewired))
        # this cancer type's own programs drive its own gene sets (and, weakly, its lineage genes)
        for p in specific[ct]:
            driven = rng.choice(candidates, size=min(6, len(candidates)), replace=False)
            L[driven, col[p]] += rng.uniform(1.5, 2.5, size=len(driven))
            L[own, col[p]] += rng.uniform(0.5, 1.0, size=len(own))
        out[ct] = pd.DataFrame(L, index=genes.index.copy(), columns=pd.Index(programs))
    return out


# --------------------------------------------------------------------------------------------------------------------
# fields and rendering


def _interp_matrix(u: np.ndarray, n_src: int) -> np.ndarray:
    """Linear interpolation weights ``(len(u), n_src)`` from source nodes ``0..n_src-1`` to positions ``u``."""
    u = np.clip(u, 0, n_src - 1 - 1e-6)
    i0 = np.floor(u).astype(int)
    w = (u - i0).astype(np.float32)
    M = np.zeros((len(u), n_src), dtype=np.float32)
    M[np.arange(len(u)), i0] = 1.0 - w
    M[np.arange(len(u)), i0 + 1] = w
    return M


def _smooth_fields(rng: np.random.Generator, n: int, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """``n`` stationary unit-variance Gaussian random fields of ``shape`` with a Gaussian correlation of ``sigma`` px.

    Large correlation lengths are generated on a grid up to ``sigma / 4`` times coarser and interpolated.
    """
    from scipy.ndimage import gaussian_filter, gaussian_filter1d

    factor = max(1, int(sigma // 4))
    s = sigma / factor
    small = (int(np.ceil((shape[0] - 1) / factor)) + 2, int(np.ceil((shape[1] - 1) / factor)) + 2)
    pad = int(np.ceil(3 * s)) + 1
    noise = rng.standard_normal((n, small[0] + 2 * pad, small[1] + 2 * pad))
    smooth = gaussian_filter(noise, sigma=(0, s, s), mode="wrap")[:, pad:-pad, pad:-pad]
    delta = np.zeros(2 * pad + 1)
    delta[pad] = 1.0
    k = gaussian_filter1d(delta, s, mode="constant")
    smooth /= np.sum(k**2)  # variance of the 2-D filter output is (sum k^2)^2
    if factor == 1:
        return smooth[:, : shape[0], : shape[1]]
    My = _interp_matrix(np.arange(shape[0]) / factor, small[0])
    Mx = _interp_matrix(np.arange(shape[1]) / factor, small[1])
    return np.stack([My @ f.astype(np.float32) @ Mx.T for f in smooth]).astype(np.float64)


def _bilinear(fields: np.ndarray, xy_um: np.ndarray) -> np.ndarray:
    """Values of coarse ``fields`` (k, hc, wc) at points ``xy_um`` (m, 2) → (k, m)."""
    from scipy.ndimage import map_coordinates

    coords = np.stack([xy_um[:, 1] / _COARSE_UM, xy_um[:, 0] / _COARSE_UM])
    return np.stack([map_coordinates(f, coords, order=1, mode="nearest") for f in fields])


def _disk_offsets(radius: float, n: int = 64) -> np.ndarray:
    """``n`` points evenly spread over a disk (sunflower pattern), as (n, 2) offsets."""
    i = np.arange(n) + 0.5
    r = radius * np.sqrt(i / n)
    phi = i * np.pi * (3.0 - np.sqrt(5.0))
    return np.stack([r * np.cos(phi), r * np.sin(phi)], axis=1)


def _render(
    rng: np.random.Generator,
    comp: np.ndarray,
    looks: list[_Look],
    warp: np.ndarray,
    size_um: tuple[float, float],
    pixel_size: float,
    stain: tuple[float, float],
) -> tuple[np.ndarray, int]:
    """Render an RGB uint8 (y, x, 3) image from the coarse composition ``comp`` (k, hc, wc)."""
    from scipy.ndimage import distance_transform_edt

    f32 = np.float32
    width_um, height_um = size_um
    W = int(np.ceil(width_um / pixel_size))
    H = int(np.ceil(height_um / pixel_size))
    My = _interp_matrix((np.arange(H) + 0.5) * pixel_size / _COARSE_UM, comp.shape[1])
    Mx = _interp_matrix((np.arange(W) + 0.5) * pixel_size / _COARSE_UM, comp.shape[2])

    def up(channel: np.ndarray) -> np.ndarray:
        return My @ channel.astype(f32) @ Mx.T

    h = up(np.tensordot([lk.haematoxylin for lk in looks], comp, axes=1))
    e = up(np.tensordot([lk.eosin for lk in looks], comp, axes=1))
    # fibres: oriented, wavy stripes in the eosin channel of fibrous programs
    fibrous = [k for k, lk in enumerate(looks) if lk.fibre_eosin > 0 and comp[k].max() > 0]
    if fibrous:
        wobble = up(warp * 2.0)
        x = ((np.arange(W, dtype=f32) + 0.5) * f32(pixel_size))[None, :]
        y = ((np.arange(H, dtype=f32) + 0.5) * f32(pixel_size))[:, None]
        for k in fibrous:
            lk = looks[k]
            a = np.deg2rad(lk.fibre_angle_deg)
            freq = 2 * np.pi / lk.fibre_period_um
            stripes = (f32(freq * np.cos(a)) * x + f32(freq * np.sin(a)) * y) + wobble
            np.cos(stripes, out=stripes)
            stripes += 1.0
            stripes *= 0.5
            fibre = stripes * stripes
            fibre *= stripes
            fibre *= up(comp[k] * lk.fibre_eosin)
            e += fibre
            del stripes, fibre
    # nuclei: thinned Poisson process, each nucleus drawn from one program in proportion to its local density
    dens = np.array([lk.nuclei_per_1000um2 / 1000.0 for lk in looks])
    dmax = float(dens.max())
    n_cand = int(rng.poisson(dmax * width_um * height_um))
    pos = rng.uniform((0.0, 0.0), (width_um, height_um), size=(n_cand, 2))
    rates = _bilinear(comp, pos) * dens[:, None]  # (k, m)
    total = rates.sum(0)
    keep = rng.uniform(0.0, dmax, size=n_cand) < total
    pos, rates, total = pos[keep], rates[:, keep], total[keep]
    cum = np.cumsum(rates, axis=0) / total
    which = np.minimum((rng.uniform(size=len(pos))[None, :] > cum).sum(0), len(looks) - 1)
    radius = np.array([lk.nucleus_radius_um for lk in looks])[which] * rng.uniform(0.8, 1.25, size=len(pos))
    dark = np.array([lk.nucleus_haematoxylin for lk in looks])[which] * rng.uniform(0.8, 1.2, size=len(pos))
    n_nuclei = len(pos)
    if n_nuclei:
        labels = np.zeros((H, W), dtype=np.int32)
        ix = np.clip((pos[:, 0] / pixel_size).astype(int), 0, W - 1)
        iy = np.clip((pos[:, 1] / pixel_size).astype(int), 0, H - 1)
        labels[iy, ix] = np.arange(1, n_nuclei + 1, dtype=np.int32)
        dist, (ny, nx) = distance_transform_edt(labels == 0, return_indices=True)
        nearest = labels.ravel()[ny.ravel() * W + nx.ravel()].reshape(H, W)
        del ny, nx, labels
        nearest -= 1
        # soft-edged discs: 1 inside, 0 outside, a ramp of about one pixel (or 0.5 µm) at the rim
        edge = max(pixel_size, 0.5)
        alpha = (radius.astype(f32) / f32(edge))[nearest]
        alpha -= (dist * (pixel_size / edge)).astype(f32)
        del dist
        alpha += 0.5
        np.clip(alpha, 0.0, 1.0, out=alpha)
        h += alpha * dark.astype(f32)[nearest]
        alpha *= -0.5
        alpha += 1.0
        e *= alpha
        del nearest, alpha
    h *= f32(stain[0])
    e *= f32(stain[1])
    # Beer-Lambert: intensity = exp(-optical density), plus sensor noise
    noise = rng.standard_normal(size=(H, W), dtype=f32)
    noise *= f32(3.0)
    rgb = np.empty((H, W, 3), dtype=np.uint8)
    for c in range(3):
        od = h * -_H_VECTOR[c]
        od -= e * _E_VECTOR[c]
        od -= _BACKGROUND_OD[c]
        np.exp(od, out=od)
        od *= 255.0
        od += noise
        np.clip(od, 0, 255, out=od)
        rgb[..., c] = od + 0.5
    return rgb, n_nuclei


def _softmax(logits: np.ndarray, axis: int = 0) -> np.ndarray:
    z = logits - logits.max(axis=axis, keepdims=True)
    ez = np.exp(z)
    return ez / ez.sum(axis=axis, keepdims=True)


# --------------------------------------------------------------------------------------------------------------------
# public API


def synthetic(
    n_slides: int = 6,
    *,
    cancer_types: Sequence[str] = ("IDC", "PRAD", "COAD"),
    grid: tuple[int, int] = (16, 16),
    n_genes: int = 100,
    pixel_size_um: float | Sequence[float] = 1.0,
    spot_diameter_um: float = 55.0,
    spot_spacing_um: float = 100.0,
    seed: int | np.random.Generator | None = 0,
    n_specific_programs: int = 1,
    length_scale_um: float | None = None,
    sections_per_patient: int = 2,
    noise_sd: float = 0.3,
    dispersion: float = 5.0,
) -> SpatialData:
    """Generate a synthetic pan-cancer spatial transcriptomics dataset with H&E-like images and known tissue programs.

    Built offline in seconds, seeded, and with exactly the layout of every histoflow reader
    (:func:`histoflow.io.build_spatialdata`). Smooth latent *tissue programs* drive both the look of the image
    (stain colour, nuclei, fibres) and the expression of named marker genes, so predicting expression from the image
    is possible but not trivial: a hidden program (``interferon``) and per-spot noise are invisible in the image, each
    slide has its own staining, and part of the gene loadings are cancer-type specific (the same ``tumor`` morphology
    drives ``ERBB2``/``ESR1`` in IDC but ``KLK3``/``AR`` in PRAD), which a mixture of experts can separate.

    Parameters
    ----------
    n_slides
        Number of slides; slide ``i`` (library id ``"S<i>"``) gets cancer type ``cancer_types[i % len(cancer_types)]``.
    cancer_types
        Cancer type codes (OncoTree-like, e.g. ``"IDC"``, ``"PRAD"``, ``"COAD"``, ``"LUAD"``, ``"SKCM"``). Known codes
        get real lineage marker genes; others get marker genes drawn from the panel.
    grid
        ``(n_rows, n_cols)`` spots per slide on a Visium-like hexagonal grid (at least 2 × 2).
    n_genes
        Number of genes: built-in HGNC symbols (141 marker and housekeeping genes, balanced over modules when fewer
        are asked for), then ``GENE1``, ``GENE2``, ... with random program loadings.
    pixel_size_um
        Micrometres per image pixel, one number or one per slide (slides scanned at different resolutions).
    spot_diameter_um
        Spot diameter in micrometres.
    spot_spacing_um
        Centre-to-centre distance of neighbouring spots in micrometres.
    seed
        Seed or :class:`numpy.random.Generator`; the same seed gives the same counts and images.
    n_specific_programs
        Number of extra tissue programs specific to each cancer type.
    length_scale_um
        Spatial scale of the tissue programs in micrometres (default 1.5 spot spacings): white noise smoothed with a
        Gaussian kernel of this standard deviation, so two points ``d`` apart correlate as ``exp(-d² / (4 ℓ²))``.
    sections_per_patient
        Consecutive slides of one cancer type that come from the same patient.
    noise_sd
        Standard deviation of the per-spot, per-gene log-scale noise on the mean expression.
    dispersion
        Inverse overdispersion of the negative binomial counts (larger is closer to Poisson).

    Returns
    -------
    A :class:`~spatialdata.SpatialData` with, per slide ``S<i>``, ``images["S<i>_full_image"]`` (RGB uint8 at that
    slide's pixel size), circle shapes ``shapes["S<i>"]`` and one ``tables["table"]`` with raw counts in ``X``, the
    usual ``obs`` columns (``library_id``, ``patient``, ``cancer_type``, ``organ``, ``pixel_size_um``, ...) plus
    ``array_row``/``array_col``, and ``obsm["spatial"]`` (spot centres in full-resolution pixels). The ground truth:
    ``obsm["true_programs"]`` (DataFrame, spots × programs: the composition of the visible programs, which sums to 1,
    and the activity in ``[0, 1]`` of the hidden program) and ``uns["synthetic"]`` (``programs``,
    ``shared_programs``, ``specific_programs`` per cancer type, ``hidden_programs``, ``loadings`` (genes × programs
    DataFrame per cancer type), ``genes`` (module and log-scale bias per gene), ``lineage_genes`` per cancer type,
    ``appearance`` (look of each program), ``slides`` (per-slide stain strengths), ``params`` and ``seed``).

    Examples
    --------
    >>> import histoflow as hf
    >>> sdata = hf.datasets.synthetic(3, grid=(8, 8), n_genes=50)
    >>> sdata.tables["table"].obsm["true_programs"].columns[:4].tolist()
    ['tumor', 'stroma', 'immune', 'necrosis']
    """
    from histoflow.io._build import SlideParts, build_spatialdata

    start = time.perf_counter()
    n_slides, cancer_types, (n_rows, n_cols), n_genes, sizes = _check_inputs(
        n_slides, cancer_types, grid, n_genes, pixel_size_um, spot_diameter_um, spot_spacing_um
    )
    n_specific_programs = _check_int(n_specific_programs, "n_specific_programs", 0)
    sections_per_patient = _check_int(sections_per_patient, "sections_per_patient", 1)
    length_scale = 1.5 * float(spot_spacing_um) if length_scale_um is None else float(length_scale_um)
    check_positive(length_scale, "length_scale_um")
    check_positive(noise_sd, "noise_sd", allow_zero=True)
    check_positive(dispersion, "dispersion")
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        seed_int = int(seed)
    else:
        seed_int = int(np.random.default_rng(seed).integers(2**63 - 1))
    seq = np.random.SeedSequence(seed_int)
    global_seq, *slide_seqs = seq.spawn(1 + n_slides)
    rng = np.random.default_rng(global_seq)

    # programs, their looks, genes and loadings (shared by all slides)
    if n_specific_programs == 1:
        specific = {ct: [f"{ct}_specific"] for ct in cancer_types}
    else:
        specific = {ct: [f"{ct}_specific_{j + 1}" for j in range(n_specific_programs)] for ct in cancer_types}
    visible = [*SHARED_PROGRAMS, *[p for ct in cancer_types for p in specific[ct]]]
    programs = [*visible, *HIDDEN_PROGRAMS]
    looks = [_SHARED_LOOKS[p] if p in _SHARED_LOOKS else _random_look(rng) for p in visible]
    offsets = np.array([_SHARED_OFFSETS.get(p, 0.0) for p in visible])
    genes = _gene_panel(n_genes, rng)
    lineage = _lineage_genes(genes, cancer_types, rng)
    loadings = _loadings(genes, cancer_types, specific, lineage, rng)
    bias = rng.normal(1.2, 0.7, size=n_genes)
    bias[genes["module"].to_numpy() == "housekeeping"] += 2.0
    bias[genes["module"].str.startswith("lineage_").to_numpy()] -= 1.0  # lineage markers: low outside their tumour
    genes["bias"] = bias

    # Visium-like hexagonal grid (µm), shared by all slides
    rr, cc = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    rr, cc = rr.ravel(), cc.ravel()
    spot_xy = np.stack(
        [
            _MARGIN_UM + spot_spacing_um * (cc + 0.5 * (rr % 2)),
            _MARGIN_UM + spot_spacing_um * np.sqrt(3.0) / 2.0 * rr,
        ],
        axis=1,
    )
    width_um = 2 * _MARGIN_UM + spot_spacing_um * (n_cols - 0.5)
    height_um = 2 * _MARGIN_UM + spot_spacing_um * np.sqrt(3.0) / 2.0 * (n_rows - 1)
    coarse_shape = (int(np.ceil(height_um / _COARSE_UM)) + 2, int(np.ceil(width_um / _COARSE_UM)) + 2)
    disk = _disk_offsets(spot_diameter_um / 2.0)
    spot_ids = [f"{c * 2 + r % 2}x{r}" for r, c in zip(rr, cc)]  # Visium-style "<array_col>x<array_row>"
    spot_obs = pd.DataFrame({"array_row": rr, "array_col": cc * 2 + rr % 2})

    slides = []
    truths = []
    slide_rows = []
    seen_in_type: dict[str, int] = {}
    patients: dict[tuple[str, int], str] = {}
    for i in range(n_slides):
        srng = np.random.default_rng(slide_seqs[i])
        ct = cancer_types[i % len(cancer_types)]
        j = seen_in_type.get(ct, 0)
        seen_in_type[ct] = j + 1
        patient = patients.setdefault((ct, j // sections_per_patient), f"P{len(patients)}")
        lib = f"S{i}"
        present = np.array([p in SHARED_PROGRAMS or p in specific[ct] for p in visible])

        fields = _smooth_fields(srng, len(visible) + len(HIDDEN_PROGRAMS), coarse_shape, length_scale / _COARSE_UM)
        logits = _CONTRAST * fields[: len(visible)] + offsets[:, None, None]
        logits[~present] = -np.inf
        comp = _softmax(logits)
        comp[~present] = 0.0
        hidden = 1.0 / (1.0 + np.exp(-_CONTRAST * fields[len(visible) :]))
        warp = _smooth_fields(srng, 1, coarse_shape, _WARP_SCALE_UM / _COARSE_UM)[0]

        # spot-level truth: average over the spot disk
        pts = (spot_xy[:, None, :] + disk[None, :, :]).reshape(-1, 2)
        spot_comp = _bilinear(comp, pts).reshape(len(visible), len(spot_xy), len(disk)).mean(-1).T
        spot_comp /= spot_comp.sum(1, keepdims=True)
        spot_hidden = _bilinear(hidden, pts).reshape(len(HIDDEN_PROGRAMS), len(spot_xy), len(disk)).mean(-1).T
        truth = np.concatenate([spot_comp, spot_hidden], axis=1)

        # image
        stain = (float(srng.uniform(0.85, 1.15)), float(srng.uniform(0.85, 1.15)))
        image, n_nuclei = _render(srng, comp, looks, warp, (width_um, height_um), sizes[i], stain)

        # expression
        L = loadings[ct].to_numpy()
        eta = bias[None, :] + truth @ L.T + noise_sd * srng.standard_normal((len(spot_xy), n_genes))
        log_lib = srng.normal(0.0, 0.25, size=len(spot_xy)) - 0.7 * spot_comp[:, visible.index("necrosis")]
        mu = np.exp(eta + log_lib[:, None])
        counts = srng.poisson(srng.gamma(dispersion, mu / dispersion)).astype(np.float32)

        slides.append(
            SlideParts(
                library_id=lib,
                spot_ids=spot_ids,
                centers_px=spot_xy / sizes[i],
                pixel_size_um=sizes[i],
                spot_diameter_um=float(spot_diameter_um),
                counts=counts,
                var_names=list(genes.index),
                image=image,
                meta={
                    Key.patient: patient,
                    Key.cancer_type: ct,
                    Key.organ: _ORGANS.get(ct.upper(), "Unknown"),
                    Key.species: "Homo sapiens",
                    Key.technology: "Visium",
                },
                spot_obs=spot_obs,
            )
        )
        truths.append(pd.DataFrame(truth, index=[f"{lib}_{s}" for s in spot_ids], columns=programs))
        slide_rows.append(
            {
                Key.library: lib,
                Key.cancer_type: ct,
                Key.patient: patient,
                Key.pixel_size: sizes[i],
                "stain_haematoxylin": stain[0],
                "stain_eosin": stain[1],
                "n_nuclei": n_nuclei,
            }
        )

    sdata = build_spatialdata(slides)
    table = sdata.tables[Key.table]
    true_programs = pd.concat(truths).loc[table.obs_names]
    true_programs.columns = pd.Index(programs, name=None)
    table.obsm["true_programs"] = true_programs
    log_write("obsm", "true_programs")
    appearance = pd.DataFrame([asdict(lk) for lk in looks], index=pd.Index(visible, name="program"))
    appearance["logit_offset"] = offsets
    table.uns["synthetic"] = {
        "programs": programs,
        "shared_programs": list(SHARED_PROGRAMS),
        "specific_programs": specific,
        "hidden_programs": list(HIDDEN_PROGRAMS),
        "loadings": loadings,
        "genes": genes,
        "lineage_genes": lineage,
        "appearance": appearance,
        "slides": pd.DataFrame(slide_rows).set_index(Key.library),
        "params": {
            "n_slides": n_slides,
            "cancer_types": cancer_types,
            "grid": [n_rows, n_cols],
            "n_genes": n_genes,
            "pixel_size_um": sizes,
            "spot_diameter_um": float(spot_diameter_um),
            "spot_spacing_um": float(spot_spacing_um),
            "n_specific_programs": n_specific_programs,
            "length_scale_um": length_scale,
            "sections_per_patient": sections_per_patient,
            "noise_sd": float(noise_sd),
            "dispersion": float(dispersion),
            "margin_um": _MARGIN_UM,
            "softmax_contrast": _CONTRAST,
        },
        "seed": seed_int,
    }
    log_write("uns", "synthetic")
    logger.info(
        "Generated synthetic dataset: %d slides, %d spots, %d genes, programs %s in %.1f s",
        n_slides,
        table.n_obs,
        n_genes,
        programs,
        time.perf_counter() - start,
    )
    return sdata
