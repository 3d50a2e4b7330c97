"""How a cell's nonzero entries are stored: its `genes` and `counts` columns as LEB128 varints.

Why: zstd-compressed shards cannot be read in place. Every reader (streaming, the training store)
first decompresses a shard beside itself, so an epoch of random batches over a large file leaves
a decompressed copy of every shard: 2.4x the built dataset on disk. Varints are about as small as
zstd over plain arrays (2.0 bytes per nonzero on the example project's cells, against 2.1 for
the earlier `zstd:1` arrays and 3.7 uncompressed) and decode in place, one pass per cell.

A column of MDS encoding `bytes` named `genes` or `counts` (the default, `shard.entries=varint`)
holds, for one cell of n entries:

    varint(n), then n varints          (unsigned LEB128: 7 bits a byte, low bits first,
                                        the high bit set on every byte but a value's last)
    genes:  the first token id, then each token id minus the one before (tokens ascend, so >= 1)
    counts: the raw counts, in the same order

A reader of the shards outside this project (`streaming.StreamingDataset`) gets these two columns
as bytes: `with_arrays(sample)` gives the sample with arrays in their place (`decode` one column).
`shard.entries=arrays` writes the earlier format (NumPy arrays, usually zstd-compressed).
Non-integral counts (`shard.allow_non_integral`) stay float32 arrays under either setting.
"""

from __future__ import annotations

import numpy as np

try:
    import numba
except ImportError:  # the NumPy encoder serves, byte for byte the same
    numba = None

# the columns stored as varints, and whether each holds differences
DELTA = {"genes": True, "counts": False}
# the dtypes they decode to at least: the arrays format's (vocabulary token ids were uint16 or wider)
MIN_DTYPE = {"genes": np.uint16, "counts": np.uint8}


def _sizes(values: np.ndarray) -> np.ndarray:
    """Bytes of each value's varint (values: uint64)."""
    size = np.ones(len(values), np.int64)
    bound = 1 << 7
    while bound < 1 << 64 and len(values) and values.max() >= bound:
        size += values >= bound
        bound <<= 7
    return size


def encode_cells(indptr: np.ndarray, values: np.ndarray, delta: bool) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's column (cell i: values[indptr[i]:indptr[i + 1]], at least one) as varints:
    (bytes of all cells back to back, uint8; where each cell's bytes end, int64 [cells + 1] from 0).
    Compiled when numba is there (a chunk in ~10 ms), else `encode_cells_numpy` (~10x slower)."""
    if numba is None:
        return encode_cells_numpy(indptr, values, delta)
    indptr = np.asarray(indptr, np.int64)
    values = np.ascontiguousarray(values)
    if values.dtype.kind not in "iu":  # integral floats (validated by cells.map_chunk)
        values = values.astype(np.int64)
    ends = np.zeros(len(indptr), np.int64)
    # room for the longest varints (10 bytes); the pages past the end are never touched
    out = np.empty(10 * (len(values) + len(indptr)), np.uint8)
    used = _encode(indptr, values, delta, out, ends)
    return out[:used], ends


def encode_cells_numpy(indptr: np.ndarray, values: np.ndarray, delta: bool) -> tuple[np.ndarray, np.ndarray]:
    """`encode_cells` in whole-array NumPy passes: the reference, and the path without numba."""
    indptr = np.asarray(indptr, np.int64)
    n_cells = len(indptr) - 1
    lengths = np.diff(indptr)
    v = np.asarray(values).astype(np.uint64)
    if delta and len(v):
        d = v.copy()
        d[1:] -= v[:-1]
        d[indptr[:-1]] = v[indptr[:-1]]  # each cell's first value as it is
        v = d
    # the sequence to encode: each cell's length, then its values
    seq = np.empty(len(v) + n_cells, np.uint64)
    cell_of = np.repeat(np.arange(n_cells, dtype=np.int64), lengths)
    at = np.arange(len(v), dtype=np.int64) + cell_of + 1
    seq[at] = v
    heads = indptr[:-1] + np.arange(n_cells, dtype=np.int64)
    seq[heads] = lengths.astype(np.uint64)
    size = _sizes(seq)
    end = np.cumsum(size)
    start = end - size
    out = np.empty(int(end[-1]) if len(end) else 0, np.uint8)
    top = int(size.max()) if len(size) else 0
    for k in range(top):  # byte k of every value that has one (k > 0: the few large values)
        idx = slice(None) if k == 0 else np.flatnonzero(size > k)
        part = seq[idx] >> np.uint64(7 * k)
        more = (size[idx] > k + 1).astype(np.uint64) << np.uint64(7)
        out[start[idx] + k] = ((part & np.uint64(127)) | more).astype(np.uint8)
    ends = np.zeros(n_cells + 1, np.int64)
    if n_cells:
        ends[1:] = end[indptr[1:] + np.arange(n_cells, dtype=np.int64)]
    return out, ends


def with_arrays(sample: dict) -> dict:
    """A sample as streaming decodes it, with its varint `genes` and `counts` as arrays (uint16 or
    wider token ids, the smallest unsigned dtype for the counts); other samples as they are."""
    out = dict(sample)
    for name, delta in DELTA.items():
        if isinstance(out.get(name), (bytes, bytearray, memoryview)):
            out[name] = decode(out[name], delta, MIN_DTYPE[name])
    return out


_LIMITS = [(np.iinfo(t).max, np.dtype(t)) for t in (np.uint8, np.uint16, np.uint32, np.uint64)]


def decode(data, delta: bool = False, min_dtype=np.uint8) -> np.ndarray:
    """One cell's column (its bytes, as stored) as an array in the smallest unsigned dtype (at
    least `min_dtype`) that holds its values. ValueError when the bytes are not one such column.
    Compiled when numba is there (a cell of 1,500 values in ~5 us, 6x `decode_numpy`)."""
    if numba is None:
        return decode_numpy(data, delta, min_dtype)
    b = np.frombuffer(data, np.uint8)
    values, said, held, top = _decode(b, delta)
    if held < 0:
        raise ValueError("a varint column that ends inside a value")
    if said != held:
        raise ValueError(f"a varint column that says {int(said)} values and holds {held}")
    return _narrowest(values, min_dtype, int(top))


def decode_numpy(data, delta: bool = False, min_dtype=np.uint8) -> np.ndarray:
    """`decode` in whole-array NumPy passes: the reference, and the path without numba."""
    b = np.frombuffer(data, np.uint8)
    last = np.flatnonzero(b < 128)  # each value's last byte
    if len(last) == 0 or last[-1] != len(b) - 1:
        raise ValueError("a varint column that ends inside a value")
    if len(last) == len(b):
        values = b.astype(np.uint64)
    else:
        first = np.concatenate([[0], last[:-1] + 1])
        shift = (np.arange(len(b)) - np.repeat(first, last - first + 1)) * 7
        values = np.add.reduceat((b & 127).astype(np.uint64) << shift.astype(np.uint64), first)
    n, values = int(values[0]), values[1:]
    if n != len(values):
        raise ValueError(f"a varint column that says {n} values and holds {len(values)}")
    if delta:
        values = np.cumsum(values, dtype=np.uint64)
    return _narrowest(values, min_dtype, int(values.max()) if len(values) else 0)


def _narrowest(values: np.ndarray, min_dtype, top: int) -> np.ndarray:
    """The values (at most `top`) in the smallest unsigned dtype that holds them, at least min_dtype."""
    size = np.dtype(min_dtype).itemsize
    return values.astype(next(t for limit, t in _LIMITS if t.itemsize >= size and top <= limit))


if numba is not None:

    @numba.njit(cache=True, nogil=True)
    def _encode(indptr, values, delta, out, ends):
        p = 0
        for i in range(len(indptr) - 1):
            x = indptr[i + 1] - indptr[i]  # the cell's length first
            prev = 0
            for j in range(-1, indptr[i + 1] - indptr[i]):
                if j >= 0:
                    v = np.int64(values[indptr[i] + j])
                    x = v - prev if delta else v
                    prev = v
                while x >= 128:
                    out[p] = (x & 127) | 128
                    p += 1
                    x >>= 7
                out[p] = x
                p += 1
            ends[i + 1] = p
        return p

    @numba.njit(cache=True, nogil=True)
    def _varint(b, p):
        """(the varint at byte p, the byte after it); bits beyond 64 are dropped."""
        x = np.uint64(0)
        shift = np.uint64(0)
        while True:
            y = np.uint64(b[p])
            p += 1
            if shift < 64:
                x |= (y & np.uint64(127)) << shift
            shift += np.uint64(7)
            if y < 128:
                return x, p

    @numba.njit(cache=True, nogil=True)
    def _decode(b, delta):
        """(the values, summed up when `delta`, as uint64; the count the column states; how many
        values its bytes hold after it, -1 when they end inside a value; the largest value). The
        values are decoded only when the two counts agree."""
        top = np.uint64(0)
        if len(b) == 0 or b[len(b) - 1] >= 128:
            return np.zeros(0, np.uint64), np.uint64(0), -1, top
        held = -1
        for p in range(len(b)):
            held += b[p] < 128
        said, p = _varint(b, 0)
        if said != held:
            return np.zeros(0, np.uint64), said, held, top
        out = np.empty(held, np.uint64)
        acc = np.uint64(0)
        for k in range(held):
            x, p = _varint(b, p)
            acc = acc + x if delta else x
            out[k] = acc
            top = max(top, acc)
        return out, said, held, top
