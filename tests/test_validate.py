"""Shared input checks."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from histoflow._validate import check_finite


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_finite_names_the_argument_and_counts_bad_values(bad):
    X = np.ones((50, 8), dtype=np.float32)
    X[3, 2] = X[40, 7] = bad
    with pytest.raises(ValueError, match=r"`adata.obsm\['X'\]` contains 2 NaN or infinite"):
        check_finite(X, "adata.obsm['X']")
    with pytest.raises(ValueError, match="contains 2 NaN"):
        check_finite(sp.csr_matrix(X), "adata.X")


def test_check_finite_catches_opposite_infinities_and_passes_sums_that_overflow():
    X = np.zeros(10, dtype=np.float32)
    X[[1, 2]] = [np.inf, -np.inf]  # the sum is NaN, not inf
    with pytest.raises(ValueError, match="contains 2 NaN"):
        check_finite(X, "x")
    big = np.full(10, np.finfo(np.float32).max, dtype=np.float32)  # finite values whose sum is inf
    with np.errstate(all="raise"):  # and no overflow warning escapes
        check_finite(big, "x")
    check_finite(np.arange(5), "x")  # integers are always finite
    check_finite(np.array([1 + 2j, 3j]), "x")
    with pytest.raises(ValueError, match="contains 1 NaN"):
        check_finite(np.array([1 + 2j, complex(0, np.nan)]), "x")
