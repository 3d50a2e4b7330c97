"""Cells + two panels -> one packed token batch (no padding), vectorised over the batch.

A view of a cell is its nonzero genes inside the panel (`top-nonzero`, `random-nonzero`) or the
panel's genes including zeros (`top`, `random`), normalised, at most `max_tokens` of them (the
top ones by value, or a random subset), ordered by value descending with ties by token id
ascending, after one `<cls>` token. `max_tokens` counts genes: a sequence holds at most
`max_tokens + 1` tokens.

The packed layout puts view 1 of every cell, then view 2 of every cell, back to back:
sequence i is cell i's view 1 and sequence B + i its view 2; `cu_seqlens` delimits them.

The NumPy code here is the reference for every step; the default view (`top-nonzero` without
view filters) and the packing of two views run compiled (../kernels.py) when numba is installed,
with identical output. `CONCEPT_KERNEL=numpy` forces the reference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from concept_shard.cells import TARGET_SUM
from concept_shard.vocabulary import CLS_TOKEN

from .. import kernels
from ..read.decode import SampleBatch
from .batch import Layout


@dataclass
class TokenSpec:
    max_tokens: int
    normalization: str = "raw"
    strategy: str = "top-nonzero"

    def __post_init__(self):  # the schema checked all three (concept_config.data)
        self.n_bins = int(self.normalization.split("/")[1]) if self.normalization.startswith("binning/") else None
        self.max_tokens = int(self.max_tokens)


@dataclass
class Cells:
    """The local slice of a batch, concatenated: entry e belongs to cell `cell[e]`."""

    genes: np.ndarray  # int64 token ids, ascending within each cell
    counts: np.ndarray  # float64 raw values
    cell: np.ndarray  # int64 cell index of each entry
    n_counts: np.ndarray  # float64 library size per cell
    n_cells: int

    @classmethod
    def from_samples(cls, samples: list[dict]) -> Cells:
        return cls.from_batch(SampleBatch.from_samples(samples, ["n_counts"]))

    @classmethod
    def from_batch(cls, columns: SampleBatch) -> Cells:
        n = len(columns.lengths)
        n_counts = columns.scalars["n_counts"] if n else np.zeros(0)
        return cls(
            genes=columns.genes,
            counts=columns.counts,
            cell=np.repeat(np.arange(n, dtype=np.int64), columns.lengths),
            n_counts=n_counts.astype(np.float64),
            n_cells=n,
        )


def _cell_bounds(cell: np.ndarray, n_cells: int) -> np.ndarray:
    """Entries of cell i are [bounds[i], bounds[i + 1]) of arrays sorted by cell."""
    return np.searchsorted(cell, np.arange(n_cells + 1))


def _bins(cells: Cells, n_bins: int) -> np.ndarray:
    """Per cell, nonzero values binned by the cell's own quantiles into 1..n_bins-1 (scGPT's binning)."""
    out = np.zeros(len(cells.counts), np.float64)
    bounds = _cell_bounds(cells.cell, cells.n_cells)
    edges_q = np.linspace(0, 1, n_bins - 1)
    for i in range(cells.n_cells):
        a, b = bounds[i], bounds[i + 1]
        if b > a:
            v = cells.counts[a:b]
            edges = np.quantile(v, edges_q)
            out[a:b] = np.clip(np.digitize(v, edges[1:-1], right=True) + 1, 1, n_bins - 1) if n_bins > 2 else 1
    return out


def normalized(spec: TokenSpec, cells: Cells) -> tuple[np.ndarray, np.ndarray]:
    """(values to embed, integer-or-float key whose descending order is the value order) per entry."""
    c = cells.counts
    norm = spec.normalization
    if spec.n_bins is not None:
        v = _bins(cells, spec.n_bins)
        return v, v
    if norm == "raw":
        v = c
    elif norm == "log1p":
        v = np.log1p(c)
    else:
        v = c / np.maximum(cells.n_counts, 1e-12)[cells.cell] * TARGET_SUM
        if norm == "totalcount/log1p":
            v = np.log1p(v)
    return v, c  # all four are increasing in the count within a cell


def _order(cell: np.ndarray, key: np.ndarray, token: np.ndarray) -> np.ndarray:
    """Permutation sorting entries by (cell, key descending, token ascending).

    Entries arrive sorted by (cell, token), so two stable passes suffice; with small integer keys
    both are 16-bit radix sorts.
    """
    if len(key) == 0:
        return np.zeros(0, np.int64)
    if (
        cell.max(initial=0) < 65536
        and key.min(initial=0) >= 0
        and key.max(initial=0) < 65536
        and np.array_equal(key, np.floor(key))
    ):
        o1 = np.argsort((65535 - key).astype(np.uint16), kind="stable")
        o2 = np.argsort(cell[o1].astype(np.uint16), kind="stable")
        return o1[o2]
    return np.lexsort((token, -key, cell))


def _rank_in_cell(sorted_cell: np.ndarray, n_cells: int) -> np.ndarray:
    return np.arange(len(sorted_cell)) - _cell_bounds(sorted_cell, n_cells)[sorted_cell]


def use_kernel(compiled: bool | None = None) -> bool:
    """`compiled` when given (tests compare both paths), else the kernel unless it is missing or
    CONCEPT_KERNEL=numpy."""
    if compiled is not None:
        return compiled
    return kernels.available() and os.environ.get("CONCEPT_KERNEL", "numba") != "numpy"


def select_view(
    spec: TokenSpec,
    cells: Cells,
    values: np.ndarray,
    keys: np.ndarray,
    panel: np.ndarray,
    vocab_size: int,
    cell_rngs=None,
    keep=None,
    compiled: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cell, token, value) of the kept entries of one view, ordered by cell then position.

    `keep(cell, token) -> bool per entry` (training's `feature_max_drop_rate`): a candidate gene
    it rejects is dropped before the `max_tokens` cut; it must be a pure function of its inputs.
    `compiled`: the kernel (True), the NumPy reference (False), or the kernel where it applies."""
    if spec.strategy == "top-nonzero" and keep is None and use_kernel(compiled):
        return _kernel_views(spec, cells, values, keys, [panel], vocab_size)[0]
    in_panel = np.zeros(vocab_size, bool)
    in_panel[panel] = True
    sel = np.flatnonzero(in_panel[cells.genes] & (cells.counts != 0))  # indices: 4 takes beat 4 masks
    cell, tok, val, key = cells.cell.take(sel), cells.genes.take(sel), values.take(sel), keys.take(sel)
    if keep is not None:
        kept = keep(cell, tok)
        cell, tok, val, key = cell[kept], tok[kept], val[kept], key[kept]
    if spec.strategy in ("top", "random"):
        cell, tok, val, key = _with_zeros(spec, cells.n_cells, cell, tok, val, key, panel, cell_rngs, keep)
    elif spec.strategy == "random-nonzero":
        chosen = _random_subset(cell, cells.n_cells, spec.max_tokens, cell_rngs)
        cell, tok, val, key = cell[chosen], tok[chosen], val[chosen], key[chosen]
    order = _order(cell, key, tok)
    cell, tok, val = cell[order], tok[order], val[order]
    keep = _rank_in_cell(cell, cells.n_cells) < spec.max_tokens
    return cell[keep], tok[keep], val[keep]


def select_views(
    spec: TokenSpec,
    cells: Cells,
    values: np.ndarray,
    keys: np.ndarray,
    panels,
    vocab_size: int,
    cell_rngs=(None, None),
    keeps=(None, None),
    compiled: bool | None = None,
) -> list[tuple]:
    """`select_view` of each panel; the kernel makes both views in one pass over the entries."""
    if spec.strategy == "top-nonzero" and all(k is None for k in keeps) and use_kernel(compiled):
        return _kernel_views(spec, cells, values, keys, panels, vocab_size)
    return [
        select_view(spec, cells, values, keys, panel, vocab_size, rngs, keep, compiled)
        for panel, rngs, keep in zip(panels, cell_rngs, keeps)
    ]


def _kernel_views(spec: TokenSpec, cells: Cells, values, keys, panels, vocab_size: int) -> list[tuple]:
    return kernels.top_nonzero(
        cells.genes,
        cells.counts,
        np.asarray(keys, np.float64),
        np.asarray(values, np.float64),
        _cell_bounds(cells.cell, cells.n_cells),
        panels,
        vocab_size,
        spec.max_tokens,
    )


def _random_subset(cell: np.ndarray, n_cells: int, k: int, cell_rngs) -> np.ndarray:
    """Entry indices: per cell, a uniform random subset of at most k of its entries, in entry order."""
    bounds = _cell_bounds(cell, n_cells)
    keep = []
    for i in range(n_cells):
        a, b = int(bounds[i]), int(bounds[i + 1])
        if b - a <= k:
            keep.append(np.arange(a, b))
        else:
            keep.append(a + np.sort(cell_rngs[i].choice(b - a, k, replace=False)))
    return np.concatenate(keep) if keep else np.zeros(0, np.int64)


def _with_zeros(spec: TokenSpec, n_cells: int, cell, tok, val, key, panel: np.ndarray, cell_rngs, keep=None):
    """`top` / `random`: the panel's genes of each cell including zero-valued ones.

    `top` only needs the nonzeros plus the first zero-valued panel genes (token order) that fill
    up to max_tokens; `random` draws max_tokens of the panel's genes per cell. With `keep`, each
    cell's candidates are the panel genes it keeps (the nonzeros came filtered by the same `keep`).
    """
    k = spec.max_tokens
    bounds = _cell_bounds(cell, n_cells)
    parts_c, parts_t, parts_v, parts_k = [], [], [], []
    all_panel = panel
    for i in range(n_cells):
        a, b = int(bounds[i]), int(bounds[i + 1])
        if keep is not None:
            panel = all_panel[keep(np.full(len(all_panel), i, np.int64), all_panel)]
        nz_t, nz_v, nz_k = tok[a:b], val[a:b], key[a:b]
        if spec.strategy == "top":
            need = k - (b - a)
            if need > 0:
                cand = panel[: k + (b - a)]
                zeros = cand[~np.isin(cand, nz_t, assume_unique=True)][:need]
                t = np.concatenate([nz_t, zeros])
                order = np.argsort(t, kind="stable")
                t = t[order]
                v = np.concatenate([nz_v, np.zeros(len(zeros))])[order]
                kk = np.concatenate([nz_k, np.zeros(len(zeros))])[order]
            else:
                t, v, kk = nz_t, nz_v, nz_k
        else:
            t = panel if len(panel) <= k else np.sort(cell_rngs[i].choice(panel, k, replace=False))
            v, kk = np.zeros(len(t)), np.zeros(len(t))
            if len(nz_t):  # the chosen genes that are nonzero take their values
                pos = np.minimum(np.searchsorted(nz_t, t), len(nz_t) - 1)
                hit = nz_t[pos] == t
                v[hit], kk[hit] = nz_v[pos[hit]], nz_k[pos[hit]]
        parts_c.append(np.full(len(t), i, np.int64))
        parts_t.append(t), parts_v.append(v), parts_k.append(kk)
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
    return cat(parts_c, np.int64), cat(parts_t, np.int64), cat(parts_v, np.float64), cat(parts_k, np.float64)


@dataclass
class Packed:
    tokens: np.ndarray  # int64 [T]
    values: np.ndarray  # float32 [T], 0 for <cls>
    positions: np.ndarray  # int64 [T]: 0 for <cls>, then the rank of the gene in its view (1, 2, ...)
    cu_seqlens: np.ndarray  # int32 [2B + 1]
    max_seqlen: int
    view_lengths: np.ndarray  # int64 [2, B]: genes per view (0 = empty view)
    raw: np.ndarray  # uint8: the one buffer that holds the arrays above and `extra` (layout)
    layout: Layout


def pack(
    n_cells: int,
    views: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    compiled: bool | None = None,
    extra: dict[str, np.ndarray] | None = None,
) -> Packed:
    """Pack the ordered (cell, token, value) entries of the views, one <cls> per sequence, into
    one buffer that also holds copies of the `extra` arrays (the batch's panels: one storage)."""
    extra = extra or {}
    lengths = np.stack([np.diff(_cell_bounds(c, n_cells)) for c, _, _ in views])  # [V, B]
    seq_len = (lengths + 1).reshape(-1)
    total = int(seq_len.sum())
    layout = Layout(
        [
            ("tokens", total, np.int64),
            ("positions", total, np.int64),
            *[(k, len(a), a.dtype) for k, a in extra.items()],
            ("values", total, np.float32),
            ("cu_seqlens", len(seq_len) + 1, np.int32),
        ]
    )
    raw = np.empty(layout.nbytes, np.uint8)
    out = layout.arrays(raw)
    for k, a in extra.items():
        out[k][:] = a
    tokens, values, positions, cu = out["tokens"], out["values"], out["positions"], out["cu_seqlens"]
    if len(views) == 2 and n_cells > 0 and use_kernel(compiled):
        kernels.pack_two(n_cells, views[0], views[1], CLS_TOKEN, lengths, tokens, values, positions, cu)
    else:
        cu[0] = 0
        np.cumsum(seq_len, out=cu[1:])
        tokens[:], values[:], positions[:] = CLS_TOKEN, 0, 0
        for v, (cell, tok, val) in enumerate(views):
            seq = v * n_cells + cell
            rank = _rank_in_cell(cell, n_cells) + 1
            where = cu[seq].astype(np.int64) + rank
            tokens[where], values[where], positions[where] = tok, val, rank
    return Packed(tokens, values, positions, cu, int(seq_len.max(initial=1)), lengths, raw, layout)
