from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from histoflow.pp._normalize import normalize


def test_dense_log1p_and_counts_kept(counts_adata):
    X = counts_adata.X.copy()
    assert normalize(counts_adata) is None
    out = counts_adata.layers["log1p"]
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out, np.log1p(X.astype(np.float64)), rtol=1e-6)
    assert out[X == 0].max() == 0
    # counts copied into layers["counts"], not shared with X
    np.testing.assert_array_equal(counts_adata.layers["counts"], X)
    counts_adata.X[0, 0] += 100
    assert counts_adata.layers["counts"][0, 0] == X[0, 0]
    np.testing.assert_array_equal(counts_adata.X[1:], X[1:])  # X itself is not modified


def test_sparse_stays_sparse(make_counts):
    adata = make_counts(sparse=True)
    dense = adata.X.toarray()
    normalize(adata, key_added="targets")
    out = adata.layers["targets"]
    assert sp.issparse(out) and out.format == "csr" and out.dtype == np.float32
    assert out.nnz == adata.X.nnz
    np.testing.assert_allclose(out.toarray(), np.log1p(dense), rtol=1e-6)
    assert sp.issparse(adata.layers["counts"])
    np.testing.assert_array_equal(adata.layers["counts"].toarray(), dense)
    # CSC input keeps its format
    csc = ad.AnnData(sp.csc_matrix(dense))
    normalize(csc)
    assert csc.layers["log1p"].format == "csc"


def test_counts_from_layer(counts_adata):
    counts = counts_adata.X.copy()
    counts_adata.layers["raw"] = counts
    counts_adata.X = np.log1p(counts)  # X is not counts any more
    normalize(counts_adata, layer="raw")
    np.testing.assert_allclose(counts_adata.layers["log1p"], np.log1p(counts), rtol=1e-6)
    assert "counts" not in counts_adata.layers  # counts already live in a layer


def test_counts_layer_options(counts_adata):
    a = counts_adata.copy()
    normalize(a, counts_layer=None)
    assert set(a.layers) == {"log1p"}
    b = counts_adata.copy()
    b.layers["counts"] = np.zeros_like(b.X)
    normalize(b)
    assert b.layers["counts"].max() == 0  # an existing counts layer is never overwritten


def test_copy(counts_adata, counts_sdata):
    out = normalize(counts_adata, copy=True)
    assert isinstance(out, ad.AnnData) and "log1p" in out.layers
    assert not counts_adata.layers
    sd = normalize(counts_sdata, copy=True)
    assert "log1p" in sd.tables["table"].layers
    assert not counts_sdata.tables["table"].layers
    normalize(counts_sdata)
    assert set(counts_sdata.tables["table"].layers) == {"counts", "log1p"}


def test_logged_input_warns(counts_adata):
    counts_adata.X = np.log1p(counts_adata.X)
    with pytest.warns(UserWarning, match="looks already log-transformed"):
        normalize(counts_adata)
    assert "log1p" in counts_adata.layers


@pytest.mark.parametrize(
    ("change", "exc", "match"),
    [
        (lambda X: -X, ValueError, "negative"),
        (lambda X: np.where(np.arange(X.size).reshape(X.shape) == 3, np.nan, X), ValueError, "NaN or infinite"),
        (lambda X: np.where(np.arange(X.size).reshape(X.shape) == 3, np.inf, X), ValueError, "NaN or infinite"),
        (lambda X: X * 10.5 + 0.25, ValueError, "non-integer"),
    ],
)
def test_bad_counts(counts_adata, change, exc, match):
    counts_adata.X = change(counts_adata.X).astype(np.float32)
    with pytest.raises(exc, match=match):
        normalize(counts_adata)
    assert not counts_adata.layers


def test_bad_keys(counts_adata):
    with pytest.raises(KeyError, match="`layer='raw'` is not in `adata.layers`"):
        normalize(counts_adata, layer="raw")
    counts_adata.layers["raw"] = counts_adata.X.copy()
    with pytest.raises(ValueError, match="would overwrite the counts"):
        normalize(counts_adata, layer="raw", key_added="raw")
    with pytest.raises(ValueError, match="cannot share a layer"):
        normalize(counts_adata, key_added="counts")
    with pytest.raises(KeyError, match="`table_key='other'`"):
        from spatialdata import SpatialData

        normalize(SpatialData(tables={"table": counts_adata}), table_key="other")
    assert set(counts_adata.layers) == {"raw"}
