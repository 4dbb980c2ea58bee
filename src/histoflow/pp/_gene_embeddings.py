"""Per-gene embedding tables: read them (scGPT, Geneformer, plain tables) or build one from gene sets.

A knowledge-derived table comes from gene sets (gene × set incidence, TF-IDF, truncated SVD).

These tables are the alignment targets of :class:`histoflow.models.FLAG` (``gene_embeddings=``). Nothing here imports
torch at module level; reading ``.pt`` files and model checkpoints imports it on use.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from histoflow._logging import logger
from histoflow.pp._genes import read_gene_sets

__all__ = ["gene_embeddings_from_gene_sets", "read_gene_embeddings", "check_gene_embeddings"]

#: Special (non-gene) tokens of scGPT and Geneformer vocabularies, dropped when reading their tables.
SPECIAL_TOKENS: frozenset[str] = frozenset(
    {"<pad>", "<cls>", "<eoc>", "<mask>", "<eos>", "<unk>", "[PAD]", "[CLS]", "[MASK]", "[SEP]", "[UNK]"}
)
_TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet", ".pt", ".pth", ".pkl", ".pickle")


# --------------------------------------------------------------------------------------------------------------------
# validation


def check_gene_embeddings(table: Any, arg: str = "gene_embeddings") -> pd.DataFrame:
    """Validate a per-gene embedding table and return it as a float32 DataFrame (index = gene names as str).

    Parameters
    ----------
    table
        DataFrame, genes × dimensions.
    arg
        Argument name used in error messages.

    Returns
    -------
    The checked table (a new DataFrame; the input is not modified).
    """
    if not isinstance(table, pd.DataFrame):
        raise TypeError(
            f"`{arg}` must be a DataFrame (index = gene names, columns = embedding dimensions) or a path to a table, "
            f"got {type(table).__name__}."
        )
    if table.shape[0] == 0 or table.shape[1] == 0:
        raise ValueError(f"`{arg}` is empty (shape {table.shape}); it needs at least one gene and one dimension.")
    non_numeric = [str(c) for c in table.columns if not pd.api.types.is_numeric_dtype(table[c])]
    if non_numeric:
        raise ValueError(
            f"`{arg}` has non-numeric columns {non_numeric[:5]}; every column must be an embedding dimension. "
            "Put gene names in the index (e.g. `df.set_index('gene')`)."
        )
    values = table.to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        rows = table.index[bad.any(axis=1)][:5].tolist()
        raise ValueError(f"`{arg}` contains {int(bad.sum())} NaN or infinite value(s) (genes {rows}); remove them.")
    index = pd.Index([str(g) for g in table.index])
    if index.has_duplicates:
        dup = index[index.duplicated()].unique()[:5].tolist()
        raise ValueError(f"`{arg}` has duplicated genes {dup}; keep one row per gene.")
    zero = np.linalg.norm(values, axis=1) == 0
    if zero.all():
        raise ValueError(f"`{arg}` has only all-zero rows; cosine alignment needs non-zero vectors.")
    out = pd.DataFrame(values.astype(np.float32), index=index, columns=[str(c) for c in table.columns])
    out.attrs = dict(table.attrs)
    return out


# --------------------------------------------------------------------------------------------------------------------
# reading


def _from_mapping(obj: Mapping[Any, Any], source: str) -> pd.DataFrame:
    """``{gene: vector}`` → DataFrame (vectors may be lists, numpy arrays or torch tensors)."""
    genes, rows = [], []
    for k, v in obj.items():
        if hasattr(v, "detach"):
            v = v.detach().cpu().numpy()
        arr = np.asarray(v, dtype=np.float64)
        if arr.ndim != 1:
            raise ValueError(
                f"{source}: the value for {k!r} has shape {arr.shape}; a gene → vector mapping needs 1-D vectors."
            )
        genes.append(str(k))
        rows.append(arr)
    if not rows:
        raise ValueError(f"{source} holds no gene vectors.")
    dims = {len(r) for r in rows}
    if len(dims) != 1:
        raise ValueError(f"{source}: gene vectors have different lengths {sorted(dims)[:5]}; they must all match.")
    return pd.DataFrame(np.stack(rows), index=genes, columns=[f"dim_{i}" for i in range(dims.pop())])


def _from_object(obj: Any, source: str) -> pd.DataFrame:
    if isinstance(obj, pd.DataFrame):
        return obj
    if isinstance(obj, Mapping):
        keys = [str(k) for k in obj]
        if any(k.endswith("embedding.weight") or k.endswith("word_embeddings.weight") for k in keys):
            raise ValueError(
                f"{source} looks like a model checkpoint (state dict), not a gene → vector table. Pass the model "
                "folder instead (scGPT: `vocab.json` + `best_model.pt`; Geneformer: `token_dictionary*.pkl` + "
                "`model.safetensors` or `pytorch_model.bin`)."
            )
        return _from_mapping(obj, source)
    raise ValueError(f"{source} holds a {type(obj).__name__}; expected a DataFrame or a dict {{gene: vector}}.")


def _read_table_file(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv", ".txt"):
        sep = "," if suffix == ".csv" else "\t"
        df = pd.read_csv(path, sep=sep, index_col=0)
        if df.shape[1] == 0 and sep == "\t":  # whitespace-separated text
            df = pd.read_csv(path, sep=r"\s+", index_col=0)
        return df
    if suffix == ".parquet":
        df = pd.read_parquet(path)
        if isinstance(df.index, pd.RangeIndex):
            text = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
            if len(text) == 1:
                df = df.set_index(text[0])
        return df
    if suffix in (".pkl", ".pickle"):
        with path.open("rb") as f:
            obj = pickle.load(f)  # user-supplied local file; documented: only load files you trust
        return _from_object(obj, f"`{path}`")
    if suffix in (".pt", ".pth"):
        import torch

        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - numpy arrays and DataFrames need full unpickling
            logger.info("`%s` holds non-tensor objects; loading it with full unpickling (trusted files only).", path)
            obj = torch.load(path, map_location="cpu", weights_only=False)
        return _from_object(obj, f"`{path}`")
    raise ValueError(
        f"`{path}`: unsupported file type {suffix!r}; use one of {list(_TABLE_SUFFIXES)} or a scGPT/Geneformer "
        "model folder."
    )


def _layer_norm(w: np.ndarray, weight: np.ndarray | None, bias: np.ndarray | None, eps: float = 1e-5) -> np.ndarray:
    mu = w.mean(1, keepdims=True)
    var = w.var(1, keepdims=True)
    out = (w - mu) / np.sqrt(var + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def _vocab_table(vocab: Mapping[str, int], weight: np.ndarray, source: str) -> pd.DataFrame:
    genes, idx = [], []
    for g, i in vocab.items():
        if str(g) in SPECIAL_TOKENS:
            continue
        i = int(i)
        if not 0 <= i < weight.shape[0]:
            raise ValueError(
                f"{source}: token {g!r} has index {i}, outside the embedding matrix ({weight.shape[0]} rows); the "
                "vocabulary does not belong to this checkpoint."
            )
        genes.append(str(g))
        idx.append(i)
    return pd.DataFrame(weight[idx], index=genes, columns=[f"dim_{j}" for j in range(weight.shape[1])])


def _read_scgpt(folder: Path) -> pd.DataFrame:
    """Read a scGPT model folder: ``vocab.json`` (token → index) + ``best_model.pt`` (state dict).

    The gene embedding is the model's gene encoder applied to each token: ``encoder.embedding.weight`` followed by the
    encoder's LayerNorm (``encoder.enc_norm``) when the checkpoint has one.
    """
    import torch

    vocab = json.loads((folder / "vocab.json").read_text())
    ckpt = folder / "best_model.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    if "encoder.embedding.weight" not in state:
        raise ValueError(f"`{ckpt}` has no `encoder.embedding.weight`; it is not a scGPT checkpoint.")

    def arr(key: str) -> np.ndarray | None:
        return state[key].float().numpy() if key in state else None

    weight = _layer_norm(arr("encoder.embedding.weight"), arr("encoder.enc_norm.weight"), arr("encoder.enc_norm.bias"))
    df = _vocab_table(vocab, weight, f"`{folder}`")
    df.attrs["source"] = f"scGPT gene encoder embeddings ({folder})"
    return df


def _read_geneformer(folder: Path, token_file: Path) -> pd.DataFrame:
    """Read a Geneformer model folder: ``token_dictionary*.pkl`` (Ensembl ID → token) + the BERT checkpoint.

    The gene embedding is the input token embedding ``bert.embeddings.word_embeddings.weight`` (static, not the
    contextual per-cell embeddings); rows are Ensembl IDs (map symbols with ``gene_map=``, e.g. Geneformer's
    ``gene_name_id_dict.pkl``).
    """
    with token_file.open("rb") as f:
        vocab = pickle.load(f)  # user-supplied local file
    if (folder / "model.safetensors").is_file():
        from safetensors.numpy import load_file

        state: Mapping[str, Any] = load_file(str(folder / "model.safetensors"))
    elif (folder / "pytorch_model.bin").is_file():
        import torch

        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(
            f"`{folder}` has a Geneformer token dictionary but no `model.safetensors` or `pytorch_model.bin`."
        )
    keys = [k for k in state if k.endswith("embeddings.word_embeddings.weight")]
    if not keys:
        raise ValueError(f"`{folder}`: the checkpoint has no `*.embeddings.word_embeddings.weight` (not a BERT model).")
    w = state[keys[0]]
    weight = np.asarray(w.float().numpy() if hasattr(w, "numpy") and hasattr(w, "float") else w, dtype=np.float64)
    df = _vocab_table(vocab, weight, f"`{folder}`")
    df.attrs["source"] = f"Geneformer input token embeddings ({folder})"
    return df


def _read_folder(folder: Path) -> pd.DataFrame:
    if (folder / "vocab.json").is_file() and (folder / "best_model.pt").is_file():
        return _read_scgpt(folder)
    tokens = sorted(folder.glob("token_dictionary*.pkl")) + sorted(folder.glob("*/token_dictionary*.pkl"))
    if tokens:
        return _read_geneformer(folder, tokens[0])
    raise FileNotFoundError(
        f"`{folder}` is neither a scGPT model folder (`vocab.json` + `best_model.pt`) nor a Geneformer one "
        "(`token_dictionary*.pkl` + `model.safetensors`/`pytorch_model.bin`)."
    )


def _apply_gene_map(df: pd.DataFrame, gene_map: Mapping[str, str] | str | os.PathLike[str]) -> pd.DataFrame:
    if not isinstance(gene_map, Mapping):
        path = Path(gene_map)
        if not path.is_file():
            raise FileNotFoundError(f"`gene_map={str(gene_map)!r}`: no such file.")
        if path.suffix.lower() in (".pkl", ".pickle"):
            with path.open("rb") as f:
                gene_map = pickle.load(f)  # user-supplied local file
        elif path.suffix.lower() == ".json":
            gene_map = json.loads(path.read_text())
        else:
            m = pd.read_csv(path, sep="," if path.suffix.lower() == ".csv" else "\t", header=None, dtype=str)
            gene_map = dict(zip(m.iloc[:, 0], m.iloc[:, 1]))
        if not isinstance(gene_map, Mapping):
            raise ValueError(f"`gene_map` file {str(path)!r} does not hold a mapping name → identifier.")
    names, rows = [], []
    for name, ident in gene_map.items():
        if str(ident) in df.index:
            names.append(str(name))
            rows.append(str(ident))
    if not rows:
        raise ValueError(
            "`gene_map` maps no gene onto the table's identifiers (e.g. symbols onto Ensembl IDs); check that it maps "
            f"names to identifiers like {df.index[:3].tolist()}."
        )
    out = df.loc[rows]
    out.index = names
    out = out[~out.index.duplicated()]
    out.attrs = dict(df.attrs)
    return out


def read_gene_embeddings(
    path: str | os.PathLike[str],
    *,
    gene_map: Mapping[str, str] | str | os.PathLike[str] | None = None,
) -> pd.DataFrame:
    """Read a per-gene embedding table (genes × dimensions) from a file or a gene foundation model folder.

    Supported inputs:

    - a table: ``.csv`` / ``.tsv`` / ``.txt`` (first column = gene names) or ``.parquet`` (index, or the one text
      column, = gene names); this covers Geneformer's ``EmbExtractor(emb_mode="gene")`` output (index = Ensembl IDs);
    - a pickled or torch-saved mapping ``{gene: vector}`` (``.pkl``/``.pickle``/``.pt``/``.pth``), as gene embedding
      tables are commonly distributed (e.g. scGPT gene embeddings saved from its gene encoder, GenePT);
    - a scGPT model folder (``vocab.json`` token → index, ``best_model.pt`` state dict): the gene encoder applied to
      each token (``encoder.embedding.weight`` then ``encoder.enc_norm``);
    - a Geneformer model folder (``token_dictionary*.pkl`` Ensembl ID → token, ``model.safetensors`` or
      ``pytorch_model.bin``): the static input token embeddings (``bert.embeddings.word_embeddings.weight``).

    Special tokens (``<pad>``, ``<cls>``, ``<mask>``, ...) are dropped. Pickles are unpickled: only read files you
    trust.

    Parameters
    ----------
    path
        File or model folder.
    gene_map
        Mapping (or a ``.pkl``/``.json``/two-column ``.csv``/``.tsv`` file) from the gene names used in the table to the
        identifiers of the embedding file, e.g. Geneformer's ``gene_name_id_dict.pkl`` (symbol → Ensembl ID); rows are
        then named by the mapped names.

    Returns
    -------
    DataFrame, index = genes, float32 columns = dimensions; ``.attrs["source"]`` says where it came from.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"`gene_embeddings={str(path)!r}`: no such file or folder.")
    df = _read_folder(p) if p.is_dir() else _read_table_file(p)
    df.attrs.setdefault("source", f"gene embedding table {p}")
    df = df[[str(g) not in SPECIAL_TOKENS for g in df.index]] if len(df) else df
    if gene_map is not None:
        df = _apply_gene_map(df, gene_map)
    out = check_gene_embeddings(df, "gene_embeddings")
    logger.info("Read %d gene embeddings of %d dimensions from %s.", out.shape[0], out.shape[1], out.attrs["source"])
    return out


# --------------------------------------------------------------------------------------------------------------------
# knowledge-derived embeddings


def gene_embeddings_from_gene_sets(
    gmt: str | os.PathLike[str] | Mapping[str, Sequence[str]],
    *,
    genes: Sequence[str] | None = None,
    n_components: int = 64,
    min_sets: int = 1,
    seed: int = 0,
) -> pd.DataFrame:
    """A knowledge-derived per-gene embedding from gene sets, for use where no gene foundation model table is at hand.

    This is not a gene foundation model embedding: it encodes only which curated gene sets (pathways, GO terms) each
    gene belongs to. Steps: the binary gene × set incidence matrix; TF-IDF weighting (genes are the documents, sets the
    terms: ``idf = ln((1 + n_genes) / (1 + set size)) + 1``, so membership of small, specific sets weighs more; rows
    L2-normalised); truncated SVD to ``n_components`` dimensions (computed over every gene of the sets, so a gene's
    vector does not depend on ``genes``); rows L2-normalised. Genes that share many specific sets get similar vectors.

    Parameters
    ----------
    gmt
        A GMT file path (e.g. MSigDB Hallmark, an Enrichr GO library), a dict ``{set name: genes}``, or a
        gseapy/Enrichr library name (downloaded; needs internet).
    genes
        Return only these genes (e.g. the model's panel), in this order; genes in fewer than ``min_sets`` sets are
        left out and reported (``.attrs["missing"]``).
    n_components
        Embedding dimensions; lowered (with a warning) to ``min(n_sets, n_genes) - 1`` when larger.
    min_sets
        Keep genes that belong to at least this many sets.
    seed
        Seed of the randomized SVD; the same seed gives the same numbers.

    Returns
    -------
    DataFrame, index = genes (name ``"gene"``), columns ``svd_0``, ``svd_1``, ... (float32, unit-norm rows).
    ``.attrs`` holds ``source`` (what this is), ``n_sets``, ``n_genes_total``, ``n_components``,
    ``explained_variance`` (fraction of the TF-IDF matrix's variance kept) and ``missing`` (requested genes left out).
    """
    from sklearn.decomposition import TruncatedSVD

    if not isinstance(n_components, (int, np.integer)) or isinstance(n_components, bool) or n_components < 1:
        raise ValueError(f"`n_components` must be a positive integer, got {n_components!r}.")
    if not isinstance(min_sets, (int, np.integer)) or isinstance(min_sets, bool) or min_sets < 1:
        raise ValueError(f"`min_sets` must be a positive integer, got {min_sets!r}.")
    sets, source = read_gene_sets(gmt)
    universe = sorted({g for members in sets.values() for g in members})
    pos = {g: i for i, g in enumerate(universe)}
    rows, cols = [], []
    for j, members in enumerate(sets.values()):
        for g in members:
            rows.append(pos[g])
            cols.append(j)
    inc = sp.csr_matrix((np.ones(len(rows), dtype=np.float64), (rows, cols)), shape=(len(universe), len(sets)))
    n_per_gene = np.asarray(inc.sum(1)).ravel()
    keep = n_per_gene >= min_sets
    if keep.sum() < 2:
        raise ValueError(
            f"Only {int(keep.sum())} gene(s) of `gmt` ({source}) belong to at least `min_sets={min_sets}` sets; "
            "lower `min_sets` or use a larger gene set library."
        )
    inc = inc[keep]
    kept = [g for g, k in zip(universe, keep) if k]
    set_size = np.asarray(inc.sum(0)).ravel()
    idf = np.log((1.0 + inc.shape[0]) / (1.0 + set_size)) + 1.0
    tfidf = inc @ sp.diags(idf)
    norms = np.sqrt(np.asarray(tfidf.multiply(tfidf).sum(1)).ravel())
    tfidf = sp.diags(1.0 / np.maximum(norms, 1e-12)) @ tfidf
    used = [j for j in range(inc.shape[1]) if set_size[j] > 0]
    tfidf = sp.csr_matrix(tfidf[:, used])
    limit = min(tfidf.shape) - 1
    k = int(n_components)
    if k > limit:
        logger.warning(
            "`n_components=%d` is more than %s (%d sets, %d genes) allow; using %d.",
            k,
            source,
            tfidf.shape[1],
            tfidf.shape[0],
            limit,
        )
        k = limit
    if k < 1:
        raise ValueError(f"`gmt` ({source}) has too few sets ({tfidf.shape[1]}) for an SVD embedding.")
    svd = TruncatedSVD(n_components=k, algorithm="randomized", n_iter=7, random_state=int(seed))
    emb = svd.fit_transform(tfidf)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    df = pd.DataFrame(emb.astype(np.float32), index=pd.Index(kept, name="gene"), columns=[f"svd_{i}" for i in range(k)])
    missing: list[str] = []
    if genes is not None:
        genes = [str(g) for g in genes]
        missing = [g for g in genes if g not in df.index]
        present = [g for g in genes if g in df.index]
        if missing:
            logger.warning(
                "%d of %d `genes` are in fewer than %d set(s) of %s and get no embedding, e.g. %s.",
                len(missing),
                len(genes),
                min_sets,
                source,
                missing[:5],
            )
        df = df.loc[present]
    df.attrs = {
        "source": (
            f"knowledge-derived gene embedding (not a gene foundation model): gene x gene-set incidence of {source} "
            f"({tfidf.shape[1]} sets, {len(kept)} genes), TF-IDF weighted, truncated SVD to {k} components, rows "
            "L2-normalised"
        ),
        "n_sets": int(tfidf.shape[1]),
        "n_genes_total": len(kept),
        "n_components": k,
        "explained_variance": float(svd.explained_variance_ratio_.sum()),
        "missing": missing,
        "seed": int(seed),
    }
    return df
