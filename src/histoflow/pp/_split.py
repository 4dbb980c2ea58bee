"""Train/validation/test splits of whole slides (or patients), stratified by cancer type, or read from CSVs."""

from __future__ import annotations

import math
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from histoflow._constants import Key
from histoflow._docs import doc_params
from histoflow._logging import logger
from histoflow._utils import as_rng, copy_data, get_table, log_write
from histoflow._validate import check_choice, check_obs_key

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["split_slides", "split_from_csv", "SPLITS"]

#: Categories of the split column, in this order.
SPLITS: tuple[str, str, str] = ("train", "val", "test")
_ALL = "all"


@doc_params()
def split_slides(
    sdata: SpatialData | AnnData,
    *,
    table_key: str = Key.table,
    level: Literal["slide", "patient"] = "slide",
    library_key: str = Key.library,
    patient_key: str = Key.patient,
    stratify: str | None = Key.cancer_type,
    val_frac: float | int = 0.2,
    test_frac: float | int = 0.2,
    seed: int | np.random.Generator | None = 0,
    key_added: str = Key.split,
    copy: bool = False,
) -> SpatialData | AnnData | None:
    """Assign whole slides (or all slides of a patient) to ``train``, ``val`` and ``test``.

    Spots are never split: a unit (a slide for ``level="slide"``, a patient for ``level="patient"``) goes
    to one split with all its spots. Units are grouped by ``stratify`` (the cancer type) and each group is
    split on its own, so every cancer type is represented in every split when it has enough units.

    Sizes per stratum of ``n`` units: a float is a fraction, rounded half up; when the fraction is positive
    and ``n >= 3`` the split gets at least one unit. A stratum of 2 units holds out one unit: strata of 2
    alternate it between ``test`` and ``val`` (test first), so that several such strata fill both splits (only
    ``val`` when ``test_frac`` is 0); a stratum of 1 unit stays in ``train``. An integer is a number of
    units per stratum (per data set when ``stratify=None``). Every stratum keeps at least one training
    unit (validation is reduced first, then test, when both do not fit). Units are shuffled with ``seed``
    after sorting, so the same data and seed give the same split.

    Parameters
    ----------
    {doc_sdata}
    level
        ``"slide"`` splits slides; ``"patient"`` keeps all slides of a patient in the same split.
    library_key
        ``obs`` column with the slide id.
    patient_key
        ``obs`` column with the patient id (used for ``level="patient"``).
    stratify
        ``obs`` column to stratify by (cancer type), or ``None``. A unit whose spots carry several values is
        assigned to its most frequent one, with a warning (a patient spanning cancer types).
    val_frac
        Fraction (float in ``[0, 1)``) or number (int) of units per stratum for validation.
    test_frac
        Fraction (float in ``[0, 1)``) or number (int) of units per stratum for testing.
    seed
        Random seed or :class:`numpy.random.Generator`.
    key_added
        ``obs`` column and ``uns`` entry written.
    {doc_copy}

    Returns
    -------
    ``None``, or the modified copy when ``copy=True``. Writes ``obs[key_added]`` (categorical with
    categories ``["train", "val", "test"]``) and ``uns[key_added]`` = ``{"params": {...},
    "units": {split: [unit ids]}, "slides": {split: [slide ids]}}``.
    """
    adata = get_table(sdata, table_key)
    check_choice(level, ("slide", "patient"), "level")
    _check_size(val_frac, "val_frac")
    _check_size(test_frac, "test_frac")
    if isinstance(val_frac, float) and isinstance(test_frac, float) and val_frac + test_frac >= 1:
        raise ValueError(
            f"`val_frac + test_frac` must be below 1 to leave training units, got {val_frac} + {test_frac}."
        )
    slides = _obs_str(adata, library_key, "library_key")
    if level == "patient":
        patients = _obs_str(adata, patient_key, "patient_key")
        per_slide = pd.Series(patients).groupby(slides).nunique()
        multi = per_slide[per_slide > 1]
        if len(multi):
            raise ValueError(
                f"`patient_key={patient_key!r}`: slide(s) {multi.index[:5].tolist()} belong to several patients; "
                "a slide must have one patient."
            )
        units = patients
    else:
        units = slides
    strat = _obs_str(adata, stratify, "stratify") if stratify is not None else np.full(adata.n_obs, _ALL)

    # stratum of each unit: the most frequent value over its slides (patients) or spots (slides)
    unit_stratum: dict[str, str] = {}
    mixed: dict[str, list[str]] = {}
    per_slide_stratum = {s: _mode(strat[slides == s]) for s in np.unique(slides)}
    for u in np.unique(units):
        rows = units == u
        if level == "patient":
            values = [per_slide_stratum[s] for s in np.unique(slides[rows])]
        else:
            values = list(strat[rows])
        distinct = sorted(set(values))
        if len(distinct) > 1:
            mixed[u] = distinct
        unit_stratum[u] = _mode(values)
    if mixed and stratify is not None:
        shown = {k: mixed[k] for k in list(mixed)[:5]}
        warnings.warn(
            f"{len(mixed)} {level}(s) span several `{stratify}` values (e.g. {shown}); each is stratified by its "
            f"most frequent value.",
            UserWarning,
            stacklevel=2,
        )

    rng = as_rng(seed)
    assigned: dict[str, str] = {}
    strata = sorted(set(unit_stratum.values()))
    held = {"val": 0, "test": 0}
    for s in strata:
        members = sorted(u for u, st in unit_stratum.items() if st == s)
        n_val, n_test = _sizes(len(members), val_frac, test_frac, s)
        both = _is_frac(val_frac) and _is_frac(test_frac) and val_frac > 0 and test_frac > 0
        if len(members) == 2 and both and (n_val, n_test) == (0, 1) and held["val"] < held["test"]:
            n_val, n_test = 1, 0  # strata of 2 alternate their held-out unit between test and val
        held["val"] += n_val
        held["test"] += n_test
        order = [members[i] for i in rng.permutation(len(members))]
        for i, u in enumerate(order):
            assigned[u] = "test" if i < n_test else "val" if i < n_test + n_val else "train"

    by_split = {k: sorted(u for u, v in assigned.items() if v == k) for k in SPLITS}
    n_units = len(unit_stratum)
    sizes = dict(Counter(unit_stratum.values()))
    for name, frac in (("val", val_frac), ("test", test_frac)):
        if frac and not by_split[name]:
            arg = f"{name}_frac"
            raise ValueError(
                f"`{arg}={frac!r}` gives no {name} {level}: the data has {n_units} {level}(s)"
                + (f", per `{stratify}`: {sizes}" if stratify is not None else "")
                + f". Every stratum keeps at least one training {level}, and a stratum of 2 holds out one {level} "
                f"(alternating between test and val). Use more {level}s, `stratify=None`, an integer `{arg}=1`, "
                f"or `{arg}=0`."
            )

    labels = pd.Categorical([assigned[u] for u in units], categories=list(SPLITS))
    slides_by_split = {k: sorted(set(slides[np.asarray(labels == k)])) for k in SPLITS}
    info: dict[str, Any] = {
        "params": {
            "method": "split_slides",
            "level": level,
            "library_key": library_key,
            "patient_key": patient_key if level == "patient" else None,
            "stratify": stratify,
            "val_frac": val_frac,
            "test_frac": test_frac,
            "seed": seed if isinstance(seed, int | np.integer) and not isinstance(seed, bool) else None,
        },
        "units": by_split,
        "slides": slides_by_split,
    }
    logger.info("Split %d %ss: %s.", n_units, level, ", ".join(f"{k} {len(v)}" for k, v in by_split.items()))
    return _write(sdata, table_key, key_added, labels, info, copy)


@doc_params()
def split_from_csv(
    sdata: SpatialData | AnnData,
    splits_dir: str | os.PathLike[str],
    *,
    table_key: str = Key.table,
    fold: int = 0,
    library_key: str = Key.library,
    key_added: str = Key.split,
    copy: bool = False,
) -> SpatialData | AnnData | None:
    """Assign slides to splits from HEST-benchmark split files.

    Reads ``splits_dir/train_{fold}.csv`` and ``splits_dir/test_{fold}.csv`` (and ``val_{fold}.csv`` when it
    exists); their ``sample_id`` column names the samples (HEST ids, matched against ``obs[library_key]``).
    Other columns (``patches_path``, ``expr_path``) are ignored.

    Slides of the data that no file lists get a missing value (NaN) in ``obs[key_added]``: they are unused
    and are listed in ``uns[key_added]["unused"]``. Sample ids listed in a file but absent from the data
    give a warning.

    Parameters
    ----------
    {doc_sdata_only}
    splits_dir
        Folder with the split CSVs (e.g. ``bench_data/<task>/splits`` of HEST-benchmark).
    {doc_table_key}
    fold
        Fold number in the file names.
    library_key
        ``obs`` column with the slide (sample) id.
    key_added
        ``obs`` column and ``uns`` entry written.
    {doc_copy}

    Returns
    -------
    ``None``, or the modified copy when ``copy=True``. Writes ``obs[key_added]`` (categorical with
    categories ``["train", "val", "test"]``, NaN for unused slides) and ``uns[key_added]`` =
    ``{"params": {...}, "units": {split: [ids]}, "slides": {split: [ids]}, "unused": [ids],
    "missing": [ids in the files but not in the data]}``.
    """
    adata = get_table(sdata, table_key)
    if isinstance(fold, bool) or not isinstance(fold, int | np.integer) or fold < 0:
        raise ValueError(f"`fold` must be a non-negative integer, got {fold!r}.")
    folder = Path(splits_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"`splits_dir={str(splits_dir)!r}` is not a folder.")
    slides = _obs_str(adata, library_key, "library_key")

    ids: dict[str, list[str]] = {}
    files: list[str] = []
    for name in SPLITS:
        path = folder / f"{name}_{fold}.csv"
        if not path.is_file():
            if name == "val":
                continue
            present = sorted(p.name for p in folder.glob("*.csv"))
            raise FileNotFoundError(
                f"`splits_dir` has no `{path.name}` for `fold={fold}` (CSV files there: {present}); "
                "HEST-benchmark folders hold `train_<fold>.csv` and `test_<fold>.csv`."
            )
        df = pd.read_csv(path)
        if "sample_id" not in df.columns:
            raise KeyError(f"`{path}` has no `sample_id` column (columns: {list(df.columns)}).")
        values = df["sample_id"].dropna().astype(str).str.strip()
        ids[name] = list(dict.fromkeys(v for v in values if v))
        files.append(str(path))

    seen: dict[str, str] = {}
    for name, members in ids.items():
        for sid in members:
            if sid in seen:
                raise ValueError(f"Sample {sid!r} is listed in both `{seen[sid]}_{fold}.csv` and `{name}_{fold}.csv`.")
            seen[sid] = name
    present = set(slides)
    missing = sorted(sid for sid in seen if sid not in present)
    matched = {k: sorted(v for v in m if v in present) for k, m in ids.items()}
    if not any(matched.values()):
        raise ValueError(
            f"None of the {len(seen)} sample ids in the split files (e.g. {sorted(seen)[:5]}) is in "
            f"`obs[{library_key!r}]` (e.g. {sorted(present)[:5]}); pass the `library_key=` that holds HEST ids."
        )
    if missing:
        warnings.warn(
            f"{len(missing)} sample id(s) of the split files are not in the data and are ignored: {missing[:10]}"
            + (" ..." if len(missing) > 10 else ""),
            UserWarning,
            stacklevel=2,
        )
    unused = sorted(present - set(seen))
    if unused:
        logger.info("%d slide(s) are in no split file and stay unassigned (NaN): %s", len(unused), unused[:10])

    labels = pd.Categorical([seen.get(s, np.nan) for s in slides], categories=list(SPLITS))
    by_split = {k: matched.get(k, []) for k in SPLITS}
    info: dict[str, Any] = {
        "params": {"method": "split_from_csv", "splits_dir": str(folder), "fold": int(fold), "files": files},
        "units": by_split,
        "slides": by_split,
        "unused": unused,
        "missing": missing,
    }
    return _write(sdata, table_key, key_added, labels, info, copy)


def _write(
    sdata: SpatialData | AnnData,
    table_key: str,
    key_added: str,
    labels: pd.Categorical,
    info: dict[str, Any],
    copy: bool,
) -> SpatialData | AnnData | None:
    target = copy_data(sdata, table_key) if copy else sdata
    table = get_table(target, table_key)
    table.obs[key_added] = pd.Categorical(labels, categories=list(SPLITS))
    log_write("obs", key_added)
    table.uns[key_added] = info
    log_write("uns", key_added)
    return target if copy else None


def _check_size(value: Any, arg: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"`{arg}` must be a float fraction or an integer count, got {value!r}.")
    if isinstance(value, float | np.floating):
        if not (0 <= value < 1) or math.isnan(value):
            raise ValueError(f"`{arg}` as a fraction must be in [0, 1), got {value!r}; pass an int for a count.")
    elif value < 0:
        raise ValueError(f"`{arg}` as a count must be non-negative, got {value!r}.")


def _obs_str(adata: AnnData, key: str, arg: str) -> np.ndarray:
    check_obs_key(adata, key, arg)
    col = adata.obs[key]
    n_missing = int(col.isna().sum())
    if n_missing:
        raise ValueError(f"`{arg}={key!r}` has {n_missing} missing value(s) in `obs`; fill them first.")
    return col.astype(str).to_numpy()


def _mode(values: Any) -> str:
    counts = Counter(str(v) for v in values)
    best = max(counts.values())
    return sorted(k for k, c in counts.items() if c == best)[0]


def _count(value: float | int, n: int) -> int:
    if _is_frac(value):
        return int(math.floor(value * n + 0.5))
    return int(value)


def _is_frac(value: float | int) -> bool:
    return isinstance(value, float | np.floating)


def _sizes(n: int, val: float | int, test: float | int, stratum: str) -> tuple[int, int]:
    """``(n_val, n_test)`` for a stratum of ``n`` units; at least one unit stays in train."""
    n_val, n_test = _count(val, n), _count(test, n)
    if n >= 3:
        if _is_frac(val) and val > 0:
            n_val = max(n_val, 1)
        if _is_frac(test) and test > 0:
            n_test = max(n_test, 1)
    elif n == 2 and n_val + n_test == 0:
        if _is_frac(test) and test > 0:
            n_test = 1
        elif _is_frac(val) and val > 0:
            n_val = 1
    capped = False
    while n_val + n_test > n - 1:
        capped = True
        if n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    if capped and not (_is_frac(val) and _is_frac(test)):
        logger.warning(
            "Stratum %r has %d unit(s): held out %d for val and %d for test to keep one for training.",
            stratum,
            n,
            n_val,
            n_test,
        )
    return n_val, n_test


def _rotated_split(split: np.ndarray, libraries: np.ndarray, strata: np.ndarray | None, shift: int) -> np.ndarray:
    """Move the validation slides ``shift`` places along the non-test slides, within each stratum.

    Per stratum (cancer type; ``None``: one stratum) the non-test slides are ordered validation slides first, then
    training slides, each in order of first appearance; the ``n_val`` slides from position ``shift · n_val``
    (cyclically) validate and the others train. Test spots stay ``test``; a stratum without validation slides keeps
    its split. ``shift = 0`` returns the split unchanged; shifts 0, 1, 2, … give every non-test slide of a stratum a
    turn as validation slide. Raises when no slide validates.
    """
    split = np.asarray(split).astype(str)
    libraries = np.asarray(libraries).astype(str)
    strata = np.zeros(len(split), dtype=str) if strata is None else np.asarray(strata).astype(str)
    if not (split == "val").any():
        raise ValueError("The split has no `val` slides to rotate; make one with `histoflow.pp.split_slides` first.")
    out = split.copy()
    slide_stratum = {lib: _mode(strata[libraries == lib]) for lib in pd.unique(libraries)}
    for stratum in pd.unique(pd.Series(list(slide_stratum.values()))):
        in_stratum = np.isin(libraries, [lib for lib, s in slide_stratum.items() if s == stratum])
        val = list(pd.unique(libraries[in_stratum & (split == "val")]))
        if not val:
            continue
        order = val + list(pd.unique(libraries[in_stratum & (split == "train")]))
        start = shift * len(val)
        new_val = {order[(start + j) % len(order)] for j in range(len(val))}
        rows = in_stratum & (split != "test")
        out[rows] = np.where(np.isin(libraries[rows], list(new_val)), "val", "train")
    return out
