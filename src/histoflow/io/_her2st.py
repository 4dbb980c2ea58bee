"""Reader for the original HER2ST files (Andersson et al., Nat. Commun. 2021; GitHub ``almaan/her2st``, ``data/``)."""

from __future__ import annotations

import gzip
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from histoflow._constants import Key
from histoflow._logging import logger
from histoflow._validate import check_choice, check_positive
from histoflow.io._build import SlideParts, build_spatialdata

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = ["read_her2st", "HER2ST_PIXEL_SIZE_UM", "her2st_sections"]

#: Micrometres per pixel of the HER2ST full-resolution H&E JPEGs: HEST-1k's estimate for section C2
#: (``pixel_size_um_estimated`` of HEST sample SPA141); HEST-1k's estimates for C3–C6 lie within 0.669–0.698.
HER2ST_PIXEL_SIZE_UM = 0.6961

#: Pathologist-label column written to ``obs``.
LABEL_KEY = "label"

_META = {
    Key.cancer_type: "IDC",  # HER2-positive invasive ductal carcinoma (OncoTree IDC)
    Key.organ: "Breast",
    Key.species: "Homo sapiens",
    Key.technology: "Spatial Transcriptomics",
}
_SPOT_DIAMETER_UM = 100.0
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


def _resolve_root(path: str | Path) -> Path:
    """Find the folder holding ``ST-cnts/``: ``path``, ``path/data`` (a clone of the repository) or ``path/her2st``."""
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(
            f"`path={str(path)!r}` does not exist. Pass the HER2ST folder that holds `ST-cnts/` and `ST-spotfiles/` "
            "(or use `histoflow.datasets.her2st()` to download it)."
        )
    for candidate in (root, root / "data", root / "her2st", root / "her2st" / "data"):
        if (candidate / "ST-cnts").is_dir():
            return candidate
    raise FileNotFoundError(
        f"`path={str(path)!r}` has no `ST-cnts/` folder (looked in it, in `data/` and in `her2st/`). "
        "Pass the HER2ST folder that holds `ST-cnts/` and `ST-spotfiles/`."
    )


def _count_files(root: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for f in sorted((root / "ST-cnts").iterdir()):
        for suffix in (".tsv.gz", ".tsv"):
            if f.name.endswith(suffix):
                files.setdefault(f.name[: -len(suffix)], f)
    return files


def her2st_sections(path: str | Path) -> list[str]:
    """Names of the sections (``"A1"``, ``"C2"``, ...) that have a count matrix under ``path``.

    Parameters
    ----------
    path
        HER2ST folder (holding ``ST-cnts/``), a clone of ``almaan/her2st`` or a folder holding ``her2st/``.

    Returns
    -------
    Sorted section names.
    """
    return sorted(_count_files(_resolve_root(path)))


def _read_counts(file: Path) -> tuple[list[str], list[str], np.ndarray]:
    """Spot ids, gene names and the dense ``(spots, genes)`` counts of one ``ST-cnts`` file."""
    raw = gzip.open(file).read() if file.name.endswith(".gz") else file.read_bytes()
    lines = [line.rstrip(b"\r") for line in raw.split(b"\n") if line.strip()]
    if len(lines) < 2:
        raise ValueError(f"Count file {file} has no spots (found {len(lines)} line(s)); the file is damaged.")
    genes = [g.decode() for g in lines[0].split(b"\t")[1:]]
    spots, body = [], []
    for line in lines[1:]:
        spot, _, values = line.partition(b"\t")
        spots.append(spot.decode())
        body.append(values)
    try:
        counts = np.loadtxt(io.BytesIO(b"\n".join(body)), delimiter="\t", dtype=np.int32, ndmin=2)
    except ValueError as err:
        raise ValueError(f"Count file {file} holds values that are not integer counts: {err}") from None
    if counts.shape[1] != len(genes):
        raise ValueError(f"Count file {file}: {len(genes)} genes in the header but {counts.shape[1]} values per row.")
    return spots, genes, counts


def _read_selection(file: Path) -> pd.DataFrame:
    sel = pd.read_csv(file, sep="\t")
    missing = {"x", "y", "pixel_x", "pixel_y"} - set(sel.columns)
    if missing:
        raise ValueError(f"Spot file {file} lacks the column(s) {sorted(missing)} (columns: {list(sel.columns)}).")
    if "selected" in sel.columns:
        sel = sel[sel["selected"] == 1]
    sel = sel.assign(_key=sel["x"].round().astype(int).astype(str) + "x" + sel["y"].round().astype(int).astype(str))
    return sel.drop_duplicates("_key").set_index("_key")


def _read_labels(file: Path) -> pd.Series:
    lbl = pd.read_csv(file, sep="\t").dropna(subset=["x", "y"])
    key = lbl["x"].round().astype(int).astype(str) + "x" + lbl["y"].round().astype(int).astype(str)
    return pd.Series(lbl["label"].to_numpy(), index=key).loc[lambda s: ~s.index.duplicated()]


def _find_image(root: Path, section: str) -> Path | None:
    folder = root / "ST-imgs" / section[0] / section
    if not folder.is_dir():
        return None
    images = sorted(f for f in folder.iterdir() if f.suffix.lower() in _IMAGE_SUFFIXES)
    if len(images) > 1:
        logger.info("Section %s has %d images; using %s", section, len(images), images[0].name)
    return images[0] if images else None


def _load_rgb(file: Path) -> np.ndarray:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    with Image.open(file) as im:
        if im.mode != "RGB":
            im = im.convert("RGB")
        return np.asarray(im)


def _section_parts(root: Path, section: str, counts_file: Path, pixel_size_um: float, load_images: bool) -> SlideParts:
    spots, genes, counts = _read_counts(counts_file)
    sel_file = root / "ST-spotfiles" / f"{section}_selection.tsv"
    if not sel_file.is_file():
        raise FileNotFoundError(
            f"Section {section!r} has counts but no spot file {sel_file}; the spot coordinates are needed."
        )
    sel = _read_selection(sel_file)
    keep = np.flatnonzero(pd.Index(spots).isin(sel.index))
    if keep.size == 0:
        raise ValueError(f"Section {section!r}: no spot of {counts_file.name} is a selected spot of {sel_file.name}.")
    if keep.size < len(spots):
        logger.info(
            "Section %s: keeping %d of %d spots (those selected in %s)", section, keep.size, len(spots), sel_file
        )
    spot_ids = [spots[i] for i in keep]
    coords = sel.loc[spot_ids]
    spot_obs = pd.DataFrame(
        {
            "array_row": coords["y"].round().astype(int).to_numpy(),
            "array_col": coords["x"].round().astype(int).to_numpy(),
        }
    )
    lbl_file = root / "ST-pat" / "lbl" / f"{section}_labeled_coordinates.tsv"
    labels = _read_labels(lbl_file).reindex(spot_ids).to_numpy(dtype=object) if lbl_file.is_file() else None
    spot_obs[LABEL_KEY] = labels if labels is not None else np.full(len(spot_ids), None, dtype=object)

    image = None
    if load_images:
        img_file = _find_image(root, section)
        if img_file is None:
            logger.info("Section %s has no H&E image; reading counts and coordinates only", section)
        else:
            image = _load_rgb(img_file)
            h, w = image.shape[:2]
            xy = coords[["pixel_x", "pixel_y"]].to_numpy(dtype=float)
            outside = int(((xy < 0) | (xy >= [w, h])).any(axis=1).sum())
            if outside:
                logger.warning("Section %s: %d spot centre(s) lie outside the %d x %d image", section, outside, w, h)
    return SlideParts(
        library_id=section,
        spot_ids=spot_ids,
        centers_px=coords[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64),
        pixel_size_um=pixel_size_um,
        spot_diameter_um=_SPOT_DIAMETER_UM,
        counts=sp.csr_matrix(counts[keep]),
        var_names=genes,
        image=image,
        meta={Key.patient: section[0], **_META},
        spot_obs=spot_obs,
    )


def read_her2st(
    path: str | Path,
    sections: str | Sequence[str] | None = None,
    *,
    load_images: bool = True,
    join: Literal["inner", "outer"] = "inner",
    pixel_size_um: float | Mapping[str, float] = HER2ST_PIXEL_SIZE_UM,
) -> SpatialData:
    """Read the original HER2ST files (HER2-positive breast cancer, legacy Spatial Transcriptomics) into SpatialData.

    Reads the layout of the ``data/`` folder of the GitHub repository ``almaan/her2st``:
    ``ST-cnts/<section>.tsv.gz`` (spots × genes raw counts, rows ``"<x>x<y>"``),
    ``ST-spotfiles/<section>_selection.tsv`` (``pixel_x, pixel_y``: spot centres in full-resolution pixels; only
    spots with ``selected == 1`` that also have counts are kept), ``ST-imgs/<patient>/<section>/*.jpg``
    (full-resolution H&E) and, where present, ``ST-pat/lbl/<section>_labeled_coordinates.tsv``
    (pathologist regions, joined on the rounded array position).

    Parameters
    ----------
    path
        Folder holding ``ST-cnts/`` and ``ST-spotfiles/`` (a clone of ``almaan/her2st`` or a folder holding
        ``her2st/`` works too).
    sections
        Section names such as ``"C2"`` or ``["C2", "C3"]``; None reads every section that has counts.
    load_images
        Whether to read the H&E images. Sections without an image (or with ``load_images=False``) become slides
        with counts and coordinates only.
    join
        How to combine the gene sets, which differ between sections (about 15k genes each, about 12k shared by
        all 30 public sections): ``"inner"`` keeps the shared genes, ``"outer"`` all (see
        :func:`~histoflow.io.build_spatialdata`).
    pixel_size_um
        Micrometres per full-resolution pixel, one number for all sections or a mapping section → value.
        The default 0.6961 is HEST-1k's estimate for these images (``pixel_size_um_estimated`` of sample
        SPA141 = section C2); HEST-1k estimates 0.669–0.698 for C3–C6.

    Returns
    -------
    SpatialData with one slide per section, library id = section name (see :func:`~histoflow.io.build_spatialdata`):
    ``images["<section>_full_image"]`` when an image was read, circle ``shapes["<section>"]`` (100 µm spots) and
    ``tables["table"]`` with raw counts in ``X``, ``obsm["spatial"]`` (full-resolution pixels) and ``obs``
    columns ``library_id``, ``patient`` (first letter), ``cancer_type`` (``"IDC"``), ``organ``, ``species``,
    ``technology``, ``pixel_size_um``, ``spot_diameter_um``, ``array_row``, ``array_col`` and ``label``
    (pathologist region; missing where a section has no labels).
    """
    check_choice(join, ["inner", "outer"], "join")
    root = _resolve_root(path)
    available = _count_files(root)
    if not available:
        raise FileNotFoundError(f"`path={str(path)!r}`: `{root / 'ST-cnts'}` holds no `<section>.tsv.gz` file.")
    if sections is None:
        names = sorted(available)
    else:
        names = [sections] if isinstance(sections, str) else [str(s) for s in sections]
        if not names:
            raise ValueError("`sections` is empty; pass section names such as ['C2', 'C3'] or None for all.")
        if len(set(names)) != len(names):
            raise ValueError(f"`sections` has duplicates: {names}.")
        unknown = [s for s in names if s not in available]
        if unknown:
            raise KeyError(
                f"`sections` contains {unknown}, which have no count matrix in {root / 'ST-cnts'}; "
                f"available sections: {sorted(available)}."
            )
    sizes: dict[str, float] = {}
    for name in names:
        if isinstance(pixel_size_um, Mapping):
            if name not in pixel_size_um:
                raise KeyError(
                    f"`pixel_size_um` has no value for section {name!r} (keys: {sorted(pixel_size_um)}); "
                    "give one for every section read, or a single number."
                )
            value = float(pixel_size_um[name])
        else:
            value = float(pixel_size_um)
        check_positive(value, "pixel_size_um")
        sizes[name] = value

    slides = [_section_parts(root, name, available[name], sizes[name], load_images) for name in names]
    n_genes = {len(s.var_names) for s in slides}
    shared = set.intersection(*(set(s.var_names) for s in slides))
    if len(n_genes) > 1 or len(shared) != len(slides[0].var_names):
        logger.info(
            "HER2ST sections measure different genes (%d-%d per section, %d shared); join=%r",
            min(n_genes),
            max(n_genes),
            len(shared),
            join,
        )
    sdata = build_spatialdata(slides, join=join)
    table = sdata.tables[Key.table]
    table.obs[LABEL_KEY] = pd.Categorical(table.obs[LABEL_KEY].astype(object).where(table.obs[LABEL_KEY].notna()))
    logger.info(
        "Read HER2ST: %d section(s), %d spots, %d genes, %d image(s)",
        len(slides),
        table.n_obs,
        table.n_vars,
        len(sdata.images),
    )
    return sdata
