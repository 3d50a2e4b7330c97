"""Map a CSR chunk of source rows to cells in the species' token space.

Per cell: the nonzero in-vocabulary genes as token ids (ascending), their raw counts in the
same order, and the library size over ALL source genes. Vectorised per chunk: columns are
renamed to token ids by one lookup, and rows are ordered by token (skipped when the file's genes
already come in token order): a compiled radix sort per row, or without numba scipy's counting
sorts in C (the reference: the same order).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

try:
    import numba
except ImportError:  # scipy's counting sorts serve (_sort_rows_scipy), in the same order
    numba = None

from .errors import ShardError
from .vocabulary import Vocabulary, strip_versions

# The library size cells are scaled to by `totalcount` normalisation (training) and before log1p
# (gene-vectors): scanpy's usual choice.
TARGET_SUM = 1e4

# A cell's library size is stored as int64 (float64 with allow_non_integral) and summed in float64:
# exact below 2^53. Raw counts are far below; a larger total means the matrix holds something else.
MAX_LIBRARY_SIZE = 2.0**53

# Counts are stored per cell in the smallest unsigned dtype that holds the cell's maximum
# (UMI counts are mostly < 256, so usually 1 byte per value).
_COUNT_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.uint32), np.dtype(np.uint64))


@dataclass
class GeneMap:
    col_token: np.ndarray  # source column -> token id, or -1 outside the vocabulary (int32)
    tokens: np.ndarray  # the file's in-vocabulary genes as token ids, ascending
    has_oov: bool  # some columns are outside the vocabulary
    token_ordered: bool  # in-vocabulary columns already appear in ascending token order
    n_source_genes: int
    dropped_examples: list[str]

    @property
    def n_in_vocab(self) -> int:
        return len(self.tokens)


def build_gene_map(path: Path, gene_ids: np.ndarray, vocab: Vocabulary, id_column: str | None) -> GeneMap:
    stripped = strip_versions(gene_ids)
    repeated = pd.Index(stripped).duplicated()
    if repeated.any():
        dups = np.unique(stripped[repeated])
        raise ShardError(
            path,
            f"has duplicate gene ids after removing version suffixes ({len(dups)} ids, e.g. {dups[:5].tolist()}).",
            "Make the Ensembl ids unique (aggregate or drop duplicated genes) and re-export the file.",
        )
    col_token = vocab.tokens_of(stripped)
    in_vocab = col_token[col_token >= 0]
    if len(in_vocab) == 0:
        where = f"var column '{id_column}'" if id_column else "var_names"
        example_vocab = list(vocab.token_of)[:2]
        raise ShardError(
            path,
            f"shares no gene id with the {vocab.species} vocabulary {vocab.path} "
            f"(its {where} look like {stripped[:3].tolist()}; the vocabulary has e.g. {example_vocab}).",
            "If the Ensembl ids are in a var column, set `var_gene_id_column` in the split YAML; "
            "otherwise check the split's species.",
        )
    return GeneMap(
        col_token,
        np.sort(in_vocab),
        bool((col_token < 0).any()),
        bool((np.diff(in_vocab) > 0).all()),
        len(col_token),
        stripped[col_token < 0][:10].tolist(),
    )


@dataclass
class ChunkCells:
    """Cells of one chunk, ready to write; empty cells are excluded but counted."""

    local: np.ndarray  # position of each kept cell within the chunk
    indptr: np.ndarray  # into genes/counts, per kept cell
    genes: np.ndarray  # token ids, vocabulary dtype, ascending within each cell
    counts: np.ndarray  # values in the source dtype, same order
    count_dtype: list  # per kept cell: the numpy dtype to store its counts in
    n_counts: np.ndarray  # library size over all source genes, per kept cell
    n_empty: int


def _validate(
    path: Path,
    data: np.ndarray,
    indices: np.ndarray,
    row0: int,
    indptr: np.ndarray,
    allow_non_integral: bool,
    fix: str | None = None,
) -> float:
    """Raise on NaN, infinite, negative or (unless allowed) non-integral values; return the minimum.
    `fix`: what the error tells the caller to do (default: the sharder's keys)."""
    if len(data) == 0:
        return 1.0
    low = data.min()
    if data.dtype.kind == "u" or (data.dtype.kind == "i" and low >= 0):
        return float(low)
    finite = data.dtype.kind != "f" or bool(np.isfinite(data.max()))  # NaN or inf: max is not finite
    if finite and low >= 0 and (allow_non_integral or np.array_equal(np.floor(data), data)):
        return float(low)  # NaN fails both tests above (min of data with NaN is NaN)
    if data.dtype.kind == "f" and np.isnan(data).any():
        bad, what = np.flatnonzero(np.isnan(data))[0], "NaN"
    elif data.dtype.kind == "f" and np.isinf(data).any():
        bad, what = np.flatnonzero(np.isinf(data))[0], "infinite"
    elif (data < 0).any():
        bad, what = np.flatnonzero(data < 0)[0], "negative"
    else:
        bad, what = np.flatnonzero(data != np.floor(data))[0], "non-integral"
    row = row0 + int(np.searchsorted(indptr, bad, side="right") - 1)
    col = int(indices[bad])
    raise ShardError(
        path,
        f"holds {what} counts (e.g. {float(data[bad]):g} in row {row}, column {col}); "
        "concept-shard stores raw counts and normalises on the fly.",
        fix
        or "Put the raw integer counts in X or in .raw (layers are not read), or set "
        "shard.allow_non_integral=true to keep non-integral values as float32.",
    )


def _row_sums(data: np.ndarray, starts: np.ndarray, integral: bool) -> np.ndarray:
    """Per-row sums in float64. Summing non-negative integers in float32 is exact while every
    partial sum stays below 2**24, which a final sum below 2**24 guarantees; else redo in float64."""
    if integral and data.dtype == np.float32:
        sums = np.add.reduceat(data, starts)
        if sums.max() < 2**24:
            return sums.astype(np.float64)
    return np.add.reduceat(data, starts, dtype=np.float64)


# Without numba, rows are put in token order by a CSR->CSC->CSR round trip (two counting sorts,
# in C) over blocks of rows small enough for the scatter to stay in cache.
SORT_BLOCK_ROWS = 128


def map_chunk(
    path: Path,
    chunk: sp.csr_matrix,
    row0: int,
    gene_map: GeneMap,
    vocab: Vocabulary,
    allow_non_integral: bool,
    counts_fix: str | None = None,
) -> ChunkCells:
    """A chunk of source rows as cells of the vocabulary; values that are not counts are refused
    (the error says `counts_fix`, or what the sharder's keys can do)."""
    data, indices = chunk.data, chunk.indices
    indptr = chunk.indptr.astype(np.int64, copy=False)
    n_rows = chunk.shape[0]
    low = _validate(path, data, indices, row0, indptr, allow_non_integral, counts_fix)
    lengths = np.diff(indptr)
    n_counts = np.zeros(n_rows, np.float64)
    has_values = lengths > 0
    if has_values.any():
        n_counts[has_values] = _row_sums(data, indptr[:-1][has_values], not allow_non_integral)
        if n_counts.max() >= MAX_LIBRARY_SIZE:
            row = int(np.argmax(n_counts))
            raise ShardError(
                path,
                f"holds a cell whose counts add up to {n_counts[row]:.3g} (row {row0 + row}), "
                f"beyond what is stored exactly (2^53).",
                "Put the raw counts in X or in .raw; values this large are not counts.",
            )
    tokens = gene_map.col_token[indices]
    if gene_map.has_oov or low == 0:  # drop genes outside the vocabulary and stored zeros
        keep = (tokens >= 0) & (data != 0)
        row_of = np.repeat(np.arange(n_rows), lengths)
        lengths = np.bincount(row_of[keep], minlength=n_rows)
        tokens, data = tokens[keep], data[keep]
        indptr = np.concatenate([[0], np.cumsum(lengths)])
    if not (gene_map.token_ordered and chunk.has_sorted_indices):
        tokens, data = _sort_rows(tokens, data, indptr, vocab.size)
    nonempty = np.flatnonzero(lengths > 0)
    starts, ends = indptr[nonempty], indptr[nonempty + 1]
    genes = tokens.astype(vocab.gene_dtype, copy=False) if vocab.gene_dtype.itemsize != 4 else tokens.view(np.uint32)
    if allow_non_integral and len(data) and data.dtype.kind == "f" and not np.array_equal(np.floor(data), data):
        count_dtype = [np.dtype(np.float32)] * len(nonempty)
    else:
        row_max = np.maximum.reduceat(data, starts) if len(starts) else np.zeros(0)
        level = np.searchsorted([255, 65535, 2**32 - 1], row_max, side="left")
        count_dtype = [_COUNT_DTYPES[i] for i in level]
    # rows without kept genes have empty ranges, so the kept rows' ranges are contiguous
    cell_indptr = np.concatenate([starts, ends[-1:]]) if len(nonempty) else np.zeros(1, np.int64)
    return ChunkCells(
        local=nonempty,
        indptr=cell_indptr,
        genes=genes,
        counts=data,
        count_dtype=count_dtype,
        n_counts=n_counts[nonempty],
        n_empty=int(n_rows - len(nonempty)),
    )


def _sort_rows(tokens: np.ndarray, data: np.ndarray, indptr: np.ndarray, n_tokens: int):
    """Order every row's (token, value) pairs by token, stably (a token twice in a row keeps its
    pairs' order). Compiled: a radix sort of each row a byte of the token at a time (2 passes for
    vocabularies below 65,536 tokens), in cache: 1.8x scipy's round trip, one of the build's largest
    steps after encoding."""
    if numba is None:
        return _sort_rows_scipy(tokens, data, indptr, n_tokens)
    out_tokens, out_data = np.empty_like(tokens), np.empty_like(data)
    passes = max(1, (int(n_tokens - 1).bit_length() + 7) // 8)
    _radix_rows(tokens, data, np.asarray(indptr, np.int64), passes, out_tokens, out_data)
    return out_tokens, out_data


def _sort_rows_scipy(tokens: np.ndarray, data: np.ndarray, indptr: np.ndarray, n_tokens: int):
    out_tokens, out_data = np.empty_like(tokens), np.empty_like(data)
    n_rows = len(indptr) - 1
    for a in range(0, n_rows, SORT_BLOCK_ROWS):
        b = min(a + SORT_BLOCK_ROWS, n_rows)
        lo, hi = int(indptr[a]), int(indptr[b])
        block = sp.csr_matrix((data[lo:hi], tokens[lo:hi], indptr[a : b + 1] - lo), shape=(b - a, n_tokens))
        block = block.tocsc().tocsr()
        out_tokens[lo:hi], out_data[lo:hi] = block.indices, block.data
    return out_tokens, out_data


if numba is not None:

    @numba.njit(cache=True, nogil=True)
    def _radix_rows(tokens, data, indptr, passes, out_tokens, out_data):
        """Each row of (tokens, data) into out_* in token order: least significant byte first,
        each pass a stable counting sort of the row; the passes alternate between out_* and a
        scratch pair, arranged so the last one writes out_*."""
        size = 0
        for r in range(len(indptr) - 1):
            size = max(size, indptr[r + 1] - indptr[r])
        tmp_t, tmp_d = np.empty(size, tokens.dtype), np.empty(size, data.dtype)
        alt_t, alt_d = np.empty(size, tokens.dtype), np.empty(size, data.dtype)
        slot = np.zeros(256, np.int64)
        for r in range(len(indptr) - 1):
            a, b = indptr[r], indptr[r + 1]
            n = b - a
            for e in range(n):
                tmp_t[e], tmp_d[e] = tokens[a + e], data[a + e]
            for k in range(passes):
                shift = 8 * k
                slot[:] = 0
                for e in range(n):
                    slot[(tmp_t[e] >> shift) & 255] += 1
                start = 0
                for v in range(256):
                    c = slot[v]
                    slot[v] = start
                    start += c
                for e in range(n):
                    v = (tmp_t[e] >> shift) & 255
                    alt_t[slot[v]], alt_d[slot[v]] = tmp_t[e], tmp_d[e]
                    slot[v] += 1
                tmp_t, alt_t = alt_t, tmp_t
                tmp_d, alt_d = alt_d, tmp_d
            for e in range(n):
                out_tokens[a + e], out_data[a + e] = tmp_t[e], tmp_d[e]
