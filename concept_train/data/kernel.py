"""Compiled per-batch hot path of the default view (`top-nonzero`): panel membership, nonzero
selection, the order by value then token, the `max_tokens` cap, and the packed output.

tokenize.py keeps the NumPy implementation of the same steps as the reference: every strategy,
the training view filters, and any machine without numba use it; `tests/train/data/
test_data_kernel.py` checks that both give identical batches. The NumPy path spends most of a
batch in whole-batch passes (a mask over every nonzero, two argsorts, a rank per entry, scatters
into the packed arrays); here each cell is one pass over its own entries, in place.

numba compiles on first use (about a second) and caches the machine code beside this file or
in NUMBA_CACHE_DIR, so later processes and DataLoader workers load it.
"""

from __future__ import annotations

import numpy as np

try:
    import numba
except ImportError:                      # the NumPy path serves (tokenize.py)
    numba = None


def available() -> bool:
    return numba is not None


if numba is not None:
    @numba.njit(cache=True, nogil=True)
    def _top_nonzero(genes, counts, keys, bounds, in_panel, max_tokens, out_cell, out_tok, out_val, values):
        """Per cell: its nonzero in-panel entries, stably sorted by key descending (entries come
        in token order, so ties stay by token ascending), the first max_tokens. Returns the count.
        Integer keys below 2^16 (raw counts) take a counting sort, others a merge sort."""
        n = 0
        size = 0
        for i in range(len(bounds) - 1):
            size = max(size, bounds[i + 1] - bounds[i])
        cand = np.empty(size, np.int64)
        ranked = np.empty(size, np.int64)
        tally = np.zeros(65537, np.int64)
        for i in range(len(bounds) - 1):
            m = 0
            top = 0.0
            integral = True
            for e in range(bounds[i], bounds[i + 1]):
                if counts[e] != 0 and in_panel[genes[e]]:
                    cand[m] = e
                    m += 1
                    k = keys[e]
                    if k > top:
                        top = k
                    if not (k >= 0 and k <= 65535 and k == np.floor(k)):
                        integral = False
            if m == 0:
                continue
            if integral:
                hi = int(top)
                for j in range(m):                       # slot hi - key: descending keys
                    tally[hi - int(keys[cand[j]]) + 1] += 1
                for b in range(1, hi + 2):
                    tally[b] += tally[b - 1]
                for j in range(m):                       # in token order: stable
                    slot = hi - int(keys[cand[j]])
                    ranked[tally[slot]] = cand[j]
                    tally[slot] += 1
                tally[:hi + 2] = 0
            else:
                order = np.argsort(-keys[cand[:m]], kind="mergesort")
                for j in range(m):
                    ranked[j] = cand[order[j]]
            for r in range(min(m, max_tokens)):
                e = ranked[r]
                out_cell[n] = i
                out_tok[n] = genes[e]
                out_val[n] = values[e]
                n += 1
        return n

    @numba.njit(cache=True, nogil=True)
    def _pack(n_cells, cells1, toks1, vals1, cells2, toks2, vals2, cls_token, tokens, values, positions, cu,
              lengths):
        """Views 1 and 2 (entries ordered by cell then rank) into one packed batch: sequence v*B + i
        is <cls> then view v of cell i; fills cu (cumulative sequence starts) and lengths [2, B]."""
        for v in range(2):
            cells = cells1 if v == 0 else cells2
            for e in range(len(cells)):
                lengths[v, cells[e]] += 1
        cu[0] = 0
        for s in range(2 * n_cells):
            cu[s + 1] = cu[s] + lengths[s // n_cells, s % n_cells] + 1
        for v in range(2):
            cells = cells1 if v == 0 else cells2
            toks = toks1 if v == 0 else toks2
            vals = vals1 if v == 0 else vals2
            e = 0
            for i in range(n_cells):
                start = cu[v * n_cells + i]
                tokens[start] = cls_token
                values[start] = 0.0
                positions[start] = 0
                for r in range(lengths[v, i]):
                    tokens[start + 1 + r] = toks[e]
                    values[start + 1 + r] = vals[e]
                    positions[start + 1 + r] = r + 1
                    e += 1


def top_nonzero(genes, counts, keys, values, bounds, panel, vocab_size: int, max_tokens: int):
    """(cell, token, value) of one `top-nonzero` view, ordered by cell then rank (tokenize.select_view)."""
    in_panel = np.zeros(vocab_size, np.bool_)
    in_panel[panel] = True
    total = len(genes)
    out_cell, out_tok, out_val = np.empty(total, np.int64), np.empty(total, np.int64), np.empty(total, np.float64)
    n = _top_nonzero(genes, counts, keys, bounds, in_panel, max_tokens, out_cell, out_tok, out_val, values)
    return out_cell[:n], out_tok[:n], out_val[:n]


def pack_two(n_cells: int, view1, view2, cls_token: int):
    """(tokens, values, positions, cu_seqlens, max_seqlen, view_lengths) of two views (tokenize.pack)."""
    total = 2 * n_cells + len(view1[0]) + len(view2[0])
    tokens, values = np.empty(total, np.int64), np.empty(total, np.float32)
    positions, cu = np.empty(total, np.int64), np.empty(2 * n_cells + 1, np.int64)
    lengths = np.zeros((2, n_cells), np.int64)
    _pack(n_cells, *view1, *view2, cls_token, tokens, values, positions, cu, lengths)
    return tokens, values, positions, cu.astype(np.int32), int((lengths + 1).max(initial=1)), lengths
