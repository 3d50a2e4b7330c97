"""Map a CSR chunk of source rows to cells in the species' token space.

Per cell: the nonzero in-vocabulary genes as token ids (ascending), their raw counts in the
same order, and the library size over ALL source genes. The hot path is vectorised per chunk:
columns are renamed to their rank among the file's in-vocabulary genes ordered by token, so a
linear-time CSR->CSC->CSR round trip (two counting sorts) orders every row by token at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .errors import ShardError
from .vocabulary import Vocabulary, strip_version

# Counts are stored per cell in the smallest unsigned dtype that holds the cell's maximum
# (UMI counts are mostly < 256, so usually 1 byte per value).
_COUNT_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.uint32), np.dtype(np.uint64))


@dataclass
class GeneMap:
    col_rank: np.ndarray     # source column -> rank among in-vocab columns by token, or -1
    rank_token: np.ndarray   # rank -> token id (ascending)
    n_source_genes: int
    dropped_examples: list[str]

    @property
    def n_in_vocab(self) -> int:
        return len(self.rank_token)


def build_gene_map(path: Path, gene_ids: np.ndarray, vocab: Vocabulary, id_column: str | None) -> GeneMap:
    stripped = np.array([strip_version(g) for g in gene_ids], dtype=object)
    uniq, counts = np.unique(stripped, return_counts=True)
    if (counts > 1).any():
        dups = uniq[counts > 1][:5].tolist()
        raise ShardError(path, f"has duplicate gene ids after removing version suffixes ({int((counts > 1).sum())} "
                         f"ids, e.g. {dups}).",
                         "Make the Ensembl ids unique (aggregate or drop duplicated genes) and re-export the file.")
    tokens = np.fromiter((vocab.token_of.get(g, -1) for g in stripped), dtype=np.int64, count=len(stripped))
    in_vocab = np.flatnonzero(tokens >= 0)
    if len(in_vocab) == 0:
        where = f"var column '{id_column}'" if id_column else "var_names"
        example_vocab = list(vocab.token_of)[:2]
        raise ShardError(path, f"shares no gene id with the {vocab.species} vocabulary {vocab.path} "
                         f"(its {where} look like {stripped[:3].tolist()}; the vocabulary has e.g. {example_vocab}).",
                         "If the Ensembl ids are in a var column, set `var_gene_id_column` in the split YAML; "
                         "otherwise check the split's species.")
    order = np.argsort(tokens[in_vocab], kind="stable")
    col_rank = np.full(len(tokens), -1, dtype=np.int64)
    col_rank[in_vocab[order]] = np.arange(len(in_vocab))
    return GeneMap(col_rank, tokens[in_vocab][order], len(tokens), stripped[tokens < 0][:10].tolist())


@dataclass
class ChunkCells:
    """Cells of one chunk, ready to write; empty cells are excluded but counted."""

    rows: np.ndarray          # source row index of each kept cell
    local: np.ndarray         # position of each kept cell within the chunk
    indptr: np.ndarray        # into genes/counts, per kept cell
    genes: np.ndarray         # token ids, vocabulary dtype
    counts: np.ndarray        # values as float64 (exact for integers < 2**53)
    count_dtype: list         # per kept cell: numpy dtype for its counts
    n_counts: np.ndarray      # library size over all source genes, per kept cell
    n_empty: int


def _validate(path: Path, data: np.ndarray, indices: np.ndarray, row0: int, indptr: np.ndarray,
              allow_non_integral: bool) -> None:
    bad = None
    if data.dtype.kind == "f":
        if np.isnan(data).any():
            bad, what = np.flatnonzero(np.isnan(data))[0], "NaN"
        elif (data < 0).any():
            bad, what = np.flatnonzero(data < 0)[0], "negative"
        elif not allow_non_integral and (data != np.floor(data)).any():
            bad, what = np.flatnonzero(data != np.floor(data))[0], "non-integral"
    elif data.dtype.kind == "i" and (data < 0).any():
        bad, what = np.flatnonzero(data < 0)[0], "negative"
    if bad is not None:
        row = row0 + int(np.searchsorted(indptr, bad, side="right") - 1)
        col = int(indices[bad])
        raise ShardError(path, f"holds {what} counts (e.g. {float(data[bad]):g} in row {row}, column {col}); "
                         "concept-shard stores raw "
                         "counts and normalises on the fly.",
                         "Put the raw integer counts in X or in .raw (layers are not read), or set "
                         "shard.allow_non_integral=true to keep non-integral values as float32.")


def map_chunk(path: Path, chunk: sp.csr_matrix, row0: int, gene_map: GeneMap, vocab: Vocabulary,
              allow_non_integral: bool) -> ChunkCells:
    chunk.sum_duplicates()
    data, indptr = chunk.data, chunk.indptr.astype(np.int64)
    _validate(path, data, chunk.indices, row0, indptr, allow_non_integral)
    n_rows = chunk.shape[0]
    row_of = np.repeat(np.arange(n_rows), np.diff(indptr))
    data64 = data.astype(np.float64, copy=False)
    n_counts = np.bincount(row_of, weights=data64, minlength=n_rows)
    ranks = gene_map.col_rank[chunk.indices]
    keep = (ranks >= 0) & (data64 != 0)
    kept_per_row = np.bincount(row_of[keep], minlength=n_rows)
    mapped = sp.csr_matrix((data64[keep], ranks[keep], np.concatenate([[0], np.cumsum(kept_per_row)])),
                           shape=(n_rows, max(gene_map.n_in_vocab, 1)))
    if not mapped.has_sorted_indices:
        mapped = mapped.tocsc().tocsr()   # two counting sorts: rows come out ordered by rank = token
    nonempty = np.flatnonzero(kept_per_row > 0)
    m_indptr = mapped.indptr.astype(np.int64)
    starts, ends = m_indptr[nonempty], m_indptr[nonempty + 1]
    genes = gene_map.rank_token[mapped.indices].astype(vocab.gene_dtype)
    counts = mapped.data
    if allow_non_integral and len(counts) and (counts != np.floor(counts)).any():
        count_dtype = [np.dtype(np.float32)] * len(nonempty)
    else:
        row_max = np.maximum.reduceat(counts, starts) if len(counts) else np.zeros(0)
        level = np.searchsorted([255, 65535, 2**32 - 1], row_max, side="left")
        count_dtype = [_COUNT_DTYPES[i] for i in level]
    # rows without kept genes have empty ranges, so the kept rows' ranges are contiguous
    cell_indptr = np.concatenate([starts, ends[-1:]]) if len(nonempty) else np.zeros(1, np.int64)
    return ChunkCells(rows=row0 + nonempty, local=nonempty, indptr=cell_indptr, genes=genes, counts=counts, count_dtype=count_dtype, n_counts=n_counts[nonempty],
                      n_empty=int(n_rows - len(nonempty)))
