"""Rows are put in token order by a compiled radix sort (cells._sort_rows), in the order of the
reference (scipy's CSR->CSC->CSR round trip), ties included, for vocabularies of one to three
bytes of token id and every dtype the build meets."""

from __future__ import annotations

import numpy as np
import pytest

from concept_shard import cells


def rows(rng, n_rows: int, n_tokens: int, token_dtype, data_dtype):
    """Random rows, some empty, some of one entry, some naming a token twice (values distinct, so
    the order of a tie shows)."""
    lengths = rng.choice([0, 1, 2, 7, 300, 1500], n_rows)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = rng.integers(0, n_tokens, int(indptr[-1])).astype(token_dtype)
    tokens[1::97] = tokens[::97][: len(tokens[1::97])]  # ties within a row
    data = np.arange(len(tokens)).astype(data_dtype)
    return tokens, data, indptr


@pytest.mark.skipif(cells.numba is None, reason="the compiled sort needs numba")
@pytest.mark.parametrize("n_tokens", [200, 256, 60_626, 65_536, 200_000])
@pytest.mark.parametrize("dtypes", [(np.int32, np.float32), (np.int64, np.int64), (np.int32, np.uint16)])
def test_the_compiled_sort_orders_rows_as_the_reference(n_tokens, dtypes):
    rng = np.random.default_rng(n_tokens)
    tokens, data, indptr = rows(rng, 120, n_tokens, *dtypes)
    got = cells._sort_rows(tokens, data, indptr, n_tokens)
    want = cells._sort_rows_scipy(tokens, data, indptr, n_tokens)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)
    for r in range(len(indptr) - 1):  # the reference is what it claims: sorted, ties in entry order
        t = got[0][indptr[r] : indptr[r + 1]]
        assert (np.diff(t) >= 0).all()
        d = got[1][indptr[r] : indptr[r + 1]]
        assert all((np.diff(d[t == x]) > 0).all() for x in np.unique(t))


def test_no_rows_and_one_row_of_nothing():
    for indptr in (np.zeros(1, np.int64), np.zeros(2, np.int64)):
        empty_t, empty_d = np.zeros(0, np.int32), np.zeros(0, np.float32)
        t, d = cells._sort_rows(empty_t, empty_d, indptr, 60_000)
        assert len(t) == len(d) == 0
