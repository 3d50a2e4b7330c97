"""Sources of cells: an AnnData file (.h5ad via h5py, .zarr via zarr) read in row chunks without
loading it, or an AnnData object in memory, behind one small interface (`RowSource`).

Counts come from `raw/X` when there is a `.raw`, else from `X`. The matrix may be CSR, CSC or
dense; every source yields CSR chunks over its columns, so memory follows the chunk size, not the
file size. CSC files are transposed out of core (see `_CscRows`). The sharder and the embedder
read through the same sources.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import scipy.sparse as sp

from .errors import ShardError

# Dense chunks and CSC column blocks are sized by element count to bound memory.
MAX_ELEMENTS_PER_READ = 16_000_000


def _attr(node, name, default=None):
    value = node.attrs.get(name, default)
    return value.decode() if isinstance(value, bytes) else value


class RowSource(Protocol):
    """What the cell mapper reads: gene ids and CSR row chunks (`AnnDataSource`, `AnnDataObjectSource`)."""

    n_cells: int

    def gene_ids(self) -> np.ndarray: ...

    def rows_per_read(self, chunk_size: int) -> int: ...

    def csc_prepare(self, start: int, end: int, chunk_size: int, scratch: Path) -> None: ...

    def read_rows(self, start: int, end: int) -> sp.csr_matrix: ...


def row_chunks(src: RowSource, chunk_size: int, scratch: Path) -> Iterator[tuple[int, int]]:
    """The row ranges [a, b) that read all of `src` in order, `rows_per_read(chunk_size)` rows each.
    A CSC matrix is transposed out of core into `scratch` first, so `read_rows(a, b)` costs a chunk,
    not the file. The embedder and the evaluator read so; the sharder reads ahead on threads
    (writer.py)."""
    step = src.rows_per_read(chunk_size)
    src.csc_prepare(0, src.n_cells, step, Path(scratch))
    for a in range(0, src.n_cells, step):
        yield a, min(a + step, src.n_cells)


class AnnDataSource:
    """An open source file: its counts matrix, gene ids and obs columns.

    `gene_id_column` is the var column holding the gene ids (None: var_names); `listed_in` names
    the config entry that listed the file (e.g. "split datamodule.split_x"), for error messages.
    """

    def __init__(
        self, path: Path, gene_id_column: str | None = None, listed_in: str | None = None, layer: str | None = None
    ):
        """`layer`: read the counts from `layers/<layer>` (genes in `var`) instead of `raw/X` or `X`
        (concept-embed's --layer; the sharder reads raw or X only)."""
        self.path, self.gene_id_column, self.listed_in = Path(path), gene_id_column, listed_in
        path = self.path
        if not path.exists():
            raise ShardError(
                path,
                "does not exist.",
                f"Fix the file name in {listed_in} or copy the file to {path.parent}."
                if listed_in
                else "Check the path.",
            )
        if not (path.is_dir() or path.is_file()):  # opening a FIFO waits for a writer, for good
            raise ShardError(
                path,
                "is not a regular file or a directory (a FIFO, socket or device).",
                "List .h5ad files or AnnData .zarr directories only.",
            )
        try:
            if path.is_dir() or path.suffix == ".zarr":
                import zarr

                self.root = zarr.open_group(str(path), mode="r")
            else:
                import h5py

                self.root = h5py.File(path, "r")
            has_raw = "raw" in self.root and "X" in self.root["raw"]
            self.matrix_key = "raw/X" if has_raw else "X"
            self.var_key = "raw/var" if has_raw else "var"
            if layer is not None:
                layers = list(self.root["layers"].keys()) if "layers" in self.root else []
                if layer not in layers:
                    raise ShardError(
                        path, f"has no layer '{layer}' (its layers: {layers}).", "Name one of them, or none for X."
                    )
                self.matrix_key, self.var_key = f"layers/{layer}", "var"
            self.X = self.root[self.matrix_key]
            self.format, self.shape = self._layout(self.X)
            if self.format != "dense" and not hasattr(self.root, "filename"):  # zarr, not h5py
                self._check_chunks()
        except ShardError:
            raise
        except Exception as exc:
            raise ShardError(
                path,
                f"cannot be read as AnnData ({type(exc).__name__}: {exc}); it may be "
                "truncated, still being copied, or not an .h5ad/.zarr.",
                "Re-export or re-copy the file (check its size against the original).",
            ) from None
        self._csc = None
        self._obs_columns: dict[str, _ObsColumn] = {}
        self._index_column: _ObsColumn | None = None

    def _check_chunks(self) -> None:
        """Every chunk of a sparse matrix's `data` and `indices` in a .zarr is present. zarr reads a
        missing chunk as its fill value (0): a store copied in part read as cells without counts,
        built with exit 0. (zarr does not write a chunk that holds only the fill value, but a chunk
        of stored nonzeros, or of column indices all 0, does not occur; a dense X may legitimately
        lack chunks, so it is not checked.)"""
        for name in ("data", "indices"):
            array = self.X[name]
            if array.size and array.nchunks_initialized < array.nchunks:
                raise ShardError(
                    self.path,
                    f"lacks {array.nchunks - array.nchunks_initialized} of the {array.nchunks} chunks of "
                    f"{self.matrix_key}/{name}: the store is incomplete (copied in part, or damaged), and zarr "
                    "would read the missing values as zeros.",
                    "Copy the .zarr again from its origin (or re-export it), then re-run the build.",
                )

    @staticmethod
    def _layout(X) -> tuple[str, tuple[int, int]]:
        enc = _attr(X, "encoding-type") or _attr(X, "h5sparse_format")
        if enc in ("csr_matrix", "csr"):
            return "csr", tuple(int(v) for v in _attr(X, "shape"))
        if enc in ("csc_matrix", "csc"):
            return "csc", tuple(int(v) for v in _attr(X, "shape"))
        if hasattr(X, "shape") and len(X.shape) == 2:
            return "dense", tuple(int(v) for v in X.shape)
        raise ValueError(f"unsupported matrix encoding {enc!r}")

    @property
    def n_cells(self) -> int:
        return self.shape[0]

    def close(self) -> None:
        if hasattr(self.root, "close"):
            self.root.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- annotations ---------------------------------------------------------------------
    def gene_ids(self) -> np.ndarray:
        """The matrix's column ids (var_names, or the `gene_id_column`) as str."""
        var = self.root[self.var_key]
        column = self.gene_id_column
        if column is None:
            ids = _read_strings(var[_attr(var, "_index")])
        else:
            if column not in var:
                cols = [k for k in var.keys() if k != _attr(var, "_index")]
                raise ShardError(
                    self.path,
                    f"has no var column '{column}' in {self.var_key} (columns: {cols}).",
                    f"Fix `var_gene_id_column` in {self.listed_in}, or drop it to use var_names."
                    if self.listed_in
                    else "Pass the var column that holds the Ensembl ids, or none to use var_names.",
                )
            ids = _read_strings(var[column])
        if len(ids) != self.shape[1]:
            raise ShardError(
                self.path,
                f"{self.var_key} has {len(ids)} genes but {self.matrix_key} has {self.shape[1]} columns.",
                "Re-export the AnnData object; it is inconsistent.",
            )
        return ids

    def obs_strings(self, keys: list[str], start: int, end: int) -> tuple[list[str], dict[str, list[str]], list[str]]:
        """(cell ids, {key: values as str, missing -> ""}, keys absent from obs) for rows [start, end)."""
        obs = self.root["obs"]
        if self._index_column is None:  # kept: it may cache the whole column (two reading threads may both build it)
            self._index_column = _ObsColumn(obs[_attr(obs, "_index")])
        cell_ids = self._index_column.strings(start, end)
        values, absent = {}, []
        for key in keys:
            if key not in obs:
                absent.append(key)
                values[key] = [""] * (end - start)
                continue
            if key not in self._obs_columns:
                self._obs_columns[key] = _ObsColumn(obs[key])
            values[key] = self._obs_columns[key].strings(start, end)
        return cell_ids, values, absent

    # ---- counts --------------------------------------------------------------------------
    def read_rows(self, start: int, end: int, scratch: Path | None = None) -> sp.csr_matrix:
        """Rows [start, end) as a valid CSR matrix over the source columns (values as stored, but
        float16 widened to float32). A file whose sparse structure is broken is refused here,
        before any compiled routine sees it (scipy's kernels trust the structure and corrupt
        memory when it lies)."""
        if self.format == "csr":
            indptr = np.asarray(self.X["indptr"][start : end + 1], dtype=np.int64)
            check_indptr(self.path, f"{self.matrix_key}/indptr", indptr, int(self.X["indices"].shape[0]), start)
            lo, hi = int(indptr[0]), int(indptr[-1])
            data = _values(self.path, self.matrix_key, np.asarray(self.X["data"][lo:hi]))
            indices = np.asarray(self.X["indices"][lo:hi])
            check_indices(self.path, f"{self.matrix_key}/indices", indices, indptr - lo, self.shape[1], start)
            return sp.csr_matrix((data, indices, indptr - lo), shape=(end - start, self.shape[1]))
        if self.format == "dense":
            return sp.csr_matrix(_values(self.path, self.matrix_key, np.asarray(self.X[start:end])))
        if self._csc is None:
            raise RuntimeError("call csc_prepare(start, end, chunk_size, scratch) before reading a CSC file")
        return self._csc.read(start, end)

    def csc_prepare(self, start: int, end: int, chunk_size: int, scratch: Path) -> None:
        if self.format == "csc":
            self._csc = _CscRows(self.X, self.shape, start, end, chunk_size, scratch, self.path, self.matrix_key)

    def rows_per_read(self, chunk_size: int) -> int:
        if self.format == "dense":
            return max(1, min(chunk_size, MAX_ELEMENTS_PER_READ // max(1, self.shape[1])))
        return chunk_size


def check_indptr(path, key: str, indptr: np.ndarray, n_stored: int, row0: int) -> None:
    """A sparse matrix's pointer array (a slice of it) must be non-decreasing and within the
    stored entries."""
    steps = np.diff(indptr)
    if len(steps) and steps.min() < 0:
        bad = int(np.flatnonzero(steps < 0)[0])
        raise ShardError(
            path,
            f"has a corrupt {key}: it decreases at position {row0 + bad + 1} "
            f"({int(indptr[bad])} -> {int(indptr[bad + 1])}).",
            "Re-export the file from its original (anndata's write_h5ad writes a valid one).",
        )
    if len(indptr) and (indptr[0] < 0 or indptr[-1] > n_stored):
        raise ShardError(
            path,
            f"has a corrupt {key}: it points outside the {n_stored} stored entries "
            f"(from {int(indptr[0])} to {int(indptr[-1])}).",
            "Re-export the file from its original (anndata's write_h5ad writes a valid one).",
        )


def check_indices(
    path, key: str, indices: np.ndarray, indptr: np.ndarray, n_minor: int, major0: int, major: str = "row"
) -> None:
    """Minor indices (columns of a CSR row, rows of a CSC column) must lie in [0, n_minor) and
    appear at most once per row (a repeated index would store one gene twice). O(nnz): scipy's
    canonical-format check in C, and a counting sort only for files whose rows are unsorted."""
    if len(indices) == 0:
        return
    if int(indices.min()) < 0 or int(indices.max()) >= n_minor:
        bad = int(np.flatnonzero((indices < 0) | (indices >= n_minor))[0])
        at = major0 + int(np.searchsorted(indptr, bad, side="right")) - 1
        raise ShardError(
            path,
            f"has a corrupt {key}: {major} {at} holds index {int(indices[bad])}, outside 0..{n_minor - 1}.",
            "Re-export the file from its original.",
        )
    block = sp.csr_matrix((np.ones(len(indices), np.int8), indices, indptr), shape=(len(indptr) - 1, n_minor))
    if block.has_canonical_format:  # sorted, no duplicates
        return
    ordered = block.tocsc().tocsr()  # sorts each row, keeps duplicates
    repeated = np.diff(ordered.indices) == 0
    starts = ordered.indptr[1:-1]  # entry k and k + 1 straddle a row start at k + 1
    repeated[starts[(starts >= 1) & (starts <= len(repeated))] - 1] = False
    if repeated.any():
        at = int(np.flatnonzero(repeated)[0])
        row = int(np.searchsorted(ordered.indptr, at, side="right")) - 1
        raise ShardError(
            path,
            f"has a corrupt {key}: {major} {major0 + row} lists index {int(ordered.indices[at])} twice.",
            "Sum the duplicates (`adata.X.sum_duplicates()`) and write the file again.",
        )


def _values(path, key: str, data: np.ndarray) -> np.ndarray:
    """The stored values with a supported dtype: integers as they are, float32/float64 as they are,
    float16 widened to float32 (exact); booleans and anything else are refused."""
    kind = data.dtype.kind
    if kind in "iu" or data.dtype in (np.float32, np.float64):
        return data
    if data.dtype == np.float16:
        return data.astype(np.float32)
    raise ShardError(
        path,
        f"stores {key} as {data.dtype}, which is not a count matrix.",
        "Put the raw counts (integers, or floats) in X or in .raw.",
    )


class AnnDataObjectSource:
    """An in-memory (or backed) AnnData object as a `RowSource`: counts from `.raw` when it is set,
    else `X` (the file rule), read in row chunks."""

    def __init__(
        self, adata, gene_id_column: str | None = None, label: str = "AnnData object", layer: str | None = None
    ):
        """`layer`: counts from `adata.layers[layer]` (genes in `adata.var`) instead."""
        has_raw = adata.raw is not None and layer is None
        named = [k for k in adata.layers.keys() if k is not None]  # (anndata 0.13 lists X as None)
        if layer is not None and layer not in named:
            raise ShardError(
                label,
                f"has no layer '{layer}' (its layers: {named}).",
                "Pass layer= naming one of them, or layer=None for adata.raw / adata.X.",
            )
        self.X = adata.layers[layer] if layer is not None else adata.raw.X if has_raw else adata.X
        if sp.issparse(self.X) and self.X.format == "csc":
            self.X = self.X.tocsr()  # row slices of CSC are O(nnz) each
        var = adata.raw.var if has_raw else adata.var
        where = "adata.raw.var" if has_raw else "adata.var"
        if gene_id_column is None:
            self._ids = np.asarray(var.index.astype(str))
        elif gene_id_column not in var.columns:
            raise ShardError(
                label,
                f"has no column '{gene_id_column}' in {where} (columns: {list(var.columns)}).",
                "Pass gene_id_column=None to use var_names, or the column that holds the Ensembl ids.",
            )
        else:
            self._ids = np.asarray(var[gene_id_column].astype(str))
        self.n_cells = int(self.X.shape[0])

    def gene_ids(self) -> np.ndarray:
        return self._ids

    def rows_per_read(self, chunk_size: int) -> int:
        return chunk_size

    def csc_prepare(self, *args) -> None:
        pass

    def read_rows(self, start: int, end: int) -> sp.csr_matrix:
        return sp.csr_matrix(self.X[start:end])


class _ObsColumn:
    """Row slices of one obs column as strings, without reading the whole column per chunk.

    Categoricals read their categories once and slice the codes; plain arrays and nullable string
    arrays (what anndata writes for pandas' string dtype, the default of pandas 3: the obs index
    of such files included) are sliced in place; other encodings (nullable numbers, ...) are read
    once through anndata and cached.
    """

    def __init__(self, node):
        self.node = node
        self.kind = _attr(node, "encoding-type")
        self.categories = self.cached = None
        if self.kind == "categorical":
            # one extra "" category at the end stands for code -1 (missing)
            self.categories = np.append(_read_strings(node["categories"]), "")
        elif self.kind != "array" and not _in_place(node, self.kind):
            from anndata.io import read_elem

            self.cached = np.asarray(read_elem(node), dtype=object)

    def strings(self, start: int, end: int) -> list[str]:
        if self.categories is not None:
            codes = np.asarray(self.node["codes"][start:end])
            return self.categories[np.where(codes >= 0, codes, -1)].tolist()
        if self.cached is None and _in_place(self.node, self.kind):
            return _string_slice(self.node, self.kind, start, end).tolist()
        values = self.cached[start:end] if self.cached is not None else self.node[start:end]
        return ["" if _is_missing(v) else (v.decode() if isinstance(v, bytes) else str(v)) for v in values]


def _in_place(node, kind: str) -> bool:
    """Whether a string column is decoded here, a slice at a time (plain string arrays; nullable
    ones: values and mask) rather than read whole through anndata."""
    return kind == "string-array" or (kind == "nullable-string-array" and "values" in node and "mask" in node)


def _string_slice(node, kind: str, start: int = 0, end: int | None = None) -> np.ndarray:
    """Rows [start, end) of a column `_in_place` reads, as str ("" where a nullable one is missing).
    h5py decodes in C; zarr already returns str."""
    values = node["values"] if kind == "nullable-string-array" else node
    out = np.asarray(values.asstr()[start:end] if hasattr(values, "asstr") else values[start:end], dtype=object)
    out = out.astype(str)
    if kind == "nullable-string-array":
        out[np.asarray(node["mask"][start:end], dtype=bool)] = ""
    return out


def _read_strings(node) -> np.ndarray:
    """A whole string column as a str array. Plain and nullable string arrays are decoded here
    (importing anndata costs 0.3 s per process; missing values as ""); other encodings
    (categoricals, ...) go through anndata."""
    kind = _attr(node, "encoding-type")
    if _in_place(node, kind):
        return _string_slice(node, kind)
    from anndata.io import read_elem

    return np.asarray(read_elem(node), dtype=object).astype(str)


def _is_missing(value) -> bool:
    if value is None:
        return True
    try:
        return bool(np.isnan(value))
    except (TypeError, ValueError):  # a string, or pandas' NA (of nullable arrays), which has no truth value
        import pandas as pd

        return value is pd.NA


class _CscRows:
    """Out-of-core CSC -> row chunks: one pass over column blocks buckets entries by row chunk.

    Each bucket is an append-only file of (row, col, value) records under `scratch`; reading a
    chunk loads one bucket. I/O is linear in the part's nonzeros and memory is bounded by the
    column block size, instead of re-scanning the whole matrix for every row chunk.
    """

    def __init__(self, X, shape, start, end, chunk_size, scratch: Path, path=None, key: str = "X"):
        self.start, self.chunk_size, self.n_cols = start, chunk_size, shape[1]
        self.dir = Path(tempfile.mkdtemp(prefix="csc-", dir=scratch))
        indptr = np.asarray(X["indptr"][:], dtype=np.int64)
        check_indptr(path, f"{key}/indptr", indptr, int(X["indices"].shape[0]), 0)
        value_dtype = np.dtype(X["data"].dtype)
        if value_dtype == np.float16:
            value_dtype = np.dtype(np.float32)
        self.record = np.dtype([("row", np.int64), ("col", np.int32), ("val", value_dtype)])
        self.written: set[int] = set()  # buckets that hold entries: a missing one is an error, not "no nonzeros"
        col = 0
        while col < shape[1]:
            # grow the block until it holds about MAX_ELEMENTS_PER_READ nonzeros
            stop = int(np.searchsorted(indptr, indptr[col] + MAX_ELEMENTS_PER_READ, side="right"))
            stop = min(max(stop - 1, col + 1), shape[1])
            lo, hi = int(indptr[col]), int(indptr[stop])
            rows = np.asarray(X["indices"][lo:hi], dtype=np.int64)
            check_indices(path, f"{key}/indices", rows, indptr[col : stop + 1] - lo, shape[0], col, "column")
            vals = _values(path, key, np.asarray(X["data"][lo:hi]))
            cols = np.repeat(np.arange(col, stop, dtype=np.int32), np.diff(indptr[col : stop + 1]))
            keep = (rows >= start) & (rows < end)
            rows, cols, vals = rows[keep], cols[keep], vals[keep]
            bucket = (rows - start) // chunk_size
            order = np.argsort(bucket, kind="stable")
            rows, cols, vals, bucket = rows[order], cols[order], vals[order], bucket[order]
            bounds = np.flatnonzero(np.diff(bucket)) + 1
            for b_rows, b_cols, b_vals in zip(np.split(rows, bounds), np.split(cols, bounds), np.split(vals, bounds)):
                if len(b_rows) == 0:
                    continue
                rec = np.empty(len(b_rows), dtype=self.record)
                rec["row"], rec["col"], rec["val"] = b_rows, b_cols, b_vals
                bucket_id = int((b_rows[0] - start) // chunk_size)
                self.written.add(bucket_id)
                with open(self.dir / f"{bucket_id}.bin", "ab") as fh:
                    rec.tofile(fh)
            col = stop

    def read(self, start: int, end: int) -> sp.csr_matrix:
        bucket = (start - self.start) // self.chunk_size
        if (start - self.start) % self.chunk_size or end - start > self.chunk_size:
            raise ValueError("CSC chunks must align with the prepared chunk size")
        path = self.dir / f"{bucket}.bin"
        if bucket in self.written and not path.exists():
            raise RuntimeError(
                f"the scratch file {path} of a CSC transpose vanished (another process cleaned this part's directory?)"
            )
        rec = np.fromfile(path, dtype=self.record) if path.exists() else np.empty(0, dtype=self.record)
        if path.exists():
            os.unlink(path)
        return sp.csr_matrix((rec["val"], (rec["row"] - start, rec["col"])), shape=(end - start, self.n_cols))
