"""A batch's samples decoded at once: every sample of the batch, whichever shards hold them, in
two compiled passes, not a Python call per sample and column (nor per shard).

Why: the per-sample decoder (concept_shard/mds.py `SampleDecoder`) walks each sample's nine
columns in Python, ~9 us per cell, a fifth of the loader's time; the training batch needs the
nonzeros of its cells concatenated anyway (`tokenize.Cells`). Here the MDS v2 sample layout
(u32 sizes of the variable-size columns, then every column's bytes in column order; an
`ndarray` column = [dtype code if per sample][ndim<<2 | shape width][shape], then the values)
is read for all of the batch's samples by one kernel (kernels.py), and the `genes` and `counts`
values are copied (or, stored as varints, decoded), cast to int64 / float64, straight into the
batch's arrays by another; both
read the mapped shard files through `ShardBuffers`. Strings
and the fixed-size columns come out of the same column positions.

`SampleDecoder` stays the reference (and the path under `CONCEPT_KERNEL=numpy`);
`tests/train/data/test_data_decode.py` checks that both give the same batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from concept_shard.mds import CODE_DTYPE, native_encoding

from .. import kernels

ARRAYS = ("genes", "counts")


@dataclass
class SampleBatch:
    """Columns of a batch's samples, in the order asked: genes and counts of all samples
    concatenated (what tokenize.Cells holds), the other columns one value per sample."""

    genes: np.ndarray  # int64, every sample's genes back to back
    counts: np.ndarray  # float64, same entries
    lengths: np.ndarray  # int64 entries per sample
    scalars: dict[str, np.ndarray]  # int64 / float64 columns (row, n_counts), one value per sample
    strings: dict[str, list[str]]  # str columns (cell_id, obs.*)

    @classmethod
    def from_samples(cls, samples: list[dict], names: list[str], shard_dtypes: bool = False) -> SampleBatch:
        """The same from per-sample dicts (SampleDecoder's output); `names`: the scalar and
        string columns to keep; `shard_dtypes`: genes and counts in the samples' own dtypes
        (NumPy's concatenation promotes mixed ones), else int64 and float64."""
        genes = [np.asarray(s["genes"]) for s in samples]
        lengths = np.fromiter((len(g) for g in genes), np.int64, count=len(genes))
        scalars, strings = {}, {}
        for name in names:
            having = next((s[name] for s in samples if name in s), None)
            if isinstance(having, str):  # a dataset without the column: ""
                strings[name] = [s.get(name, "") for s in samples]
            elif having is not None:
                scalars[name] = np.array([s[name] for s in samples])
        if shard_dtypes and samples:
            return cls(
                genes=np.concatenate(genes),
                counts=np.concatenate([np.asarray(s["counts"]) for s in samples]),
                lengths=lengths,
                scalars=scalars,
                strings=strings,
            )
        return cls(
            genes=np.concatenate(genes).astype(np.int64) if genes else np.zeros(0, np.int64),
            counts=np.concatenate([np.asarray(s["counts"], np.float64) for s in samples]) if samples else np.zeros(0),
            lengths=lengths,
            scalars=scalars,
            strings=strings,
        )


_ITEMSIZE = np.zeros(256, np.int64)
for _code, _dtype in CODE_DTYPE.items():
    _ITEMSIZE[_code] = _dtype.itemsize


class ShardLayout:
    """How to read a shard's samples (its column names, encodings and sizes in index.json)."""

    def __init__(self, names, encodings, sizes, wanted: list[str]):
        self.names = list(names)
        self.fixed = np.array([-1 if not s else int(s) for s in sizes], np.int64)
        self.arrays = np.array([self.names.index(a) for a in ARRAYS], np.int64)
        encs = [encodings[i] for i in self.arrays]
        self.dynamic = np.array([e == "ndarray" for e in encs], np.bool_)
        # a `bytes` genes or counts column holds varints (concept_shard/entries.py)
        self.varint = np.array([e == "bytes" for e in encs], np.bool_)
        self.codes = np.array([_code_of(e) if e.startswith("ndarray:") else 0 for e in encs], np.int64)
        self.columns = [(n, encodings[self.names.index(n)], self.names.index(n)) for n in wanted if n in self.names]
        # the kernels read what SampleDecoder reads natively, with genes and counts as arrays and
        # every other column asked for a string or an 8-byte scalar
        self.supported = all(native_encoding(e) and (e.startswith("ndarray") or e == "bytes") for e in encs) and all(
            native_encoding(enc) and not enc.startswith("ndarray") for _, enc, _ in self.columns
        )


def _code_of(enc: str) -> int:
    from concept_shard.mds import VALUE_DTYPE_CODE

    return VALUE_DTYPE_CODE[enc.split(":")[1]]


class ShardBuffers:
    """The shard files a process has mapped, in numbered slots: the kernels read all of them at once
    (a numba typed List of their bytes; a plain list without numba, where only the per-sample
    decoder reads), so a batch whose samples lie in many shards is located and copied in one call
    each. `views[slot]` keeps each file's mapping (strings are sliced from it); an emptied slot
    drops both references, so an evicted file's mapping can close."""

    def __init__(self, n: int):
        self.views: list = [None] * n
        self.bufs = kernels.new_buffers(n, _EMPTY) if kernels.available() else [_EMPTY] * n

    def __len__(self) -> int:
        return len(self.views)

    def put(self, slot: int, view, buf: np.ndarray) -> None:
        self.views[slot] = view
        self._set(slot, buf)

    def clear(self, slot: int) -> None:
        self.views[slot] = None
        self._set(slot, _EMPTY)

    def grow(self, n: int) -> None:
        """At least n slots (a batch that spans more shards than are kept mapped between batches)."""
        while len(self.views) < n:
            self.views.append(None)
            if isinstance(self.bufs, list):
                self.bufs.append(_EMPTY)
            else:
                kernels.add_buffer(self.bufs, _EMPTY)

    def _set(self, slot: int, buf: np.ndarray) -> None:
        if isinstance(self.bufs, list):
            self.bufs[slot] = buf
        else:
            kernels.set_buffer(self.bufs, slot, buf)


_EMPTY = np.frombuffer(b"", np.uint8)  # read-only, as a mapped file's bytes


def _buffer(bufs, slot: int) -> np.ndarray:
    return bufs[slot] if isinstance(bufs, list) else kernels.get_buffer(bufs, slot)


class SampleSpans(NamedTuple):
    """Where the columns of some samples lie in their shards' bytes (`locate`), a row per sample."""

    pos: np.ndarray  # int64 [n, columns]: each column's byte position
    size: np.ndarray  # int64 [n, columns]: and its bytes
    first: np.ndarray  # int64 [n, 2]: where the genes' and the counts' values start
    count: np.ndarray  # int64 [n, 2]: how many values each
    code: np.ndarray  # int64 [n, 2]: their dtype code (CODE_DTYPE)


def starts_of(bufs, slot: np.ndarray, in_shard: np.ndarray) -> np.ndarray:
    """Each sample's byte offset in its shard file (sample `in_shard[i]` of shard `bufs[slot[i]]`)."""
    out = np.empty(len(slot), np.int64)
    kernels.sample_starts(bufs, slot, in_shard, out)
    return out


def locate(layout: ShardLayout, bufs, slot: np.ndarray, starts: np.ndarray) -> SampleSpans:
    """The spans of the samples at byte offsets `starts` of shards `bufs[slot]`, all of `layout`."""
    n, n_arr = len(starts), len(ARRAYS)
    pos, size = np.empty((n, len(layout.fixed)), np.int64), np.empty((n, len(layout.fixed)), np.int64)
    first, count = np.empty((n, n_arr), np.int64), np.empty((n, n_arr), np.int64)
    code = np.broadcast_to(layout.codes, (n, n_arr)).copy()
    kernels.sample_layout(
        bufs,
        slot,
        starts,
        layout.fixed,
        layout.arrays,
        layout.dynamic,
        layout.varint,
        _ITEMSIZE,
        pos,
        size,
        first,
        count,
        code,
    )
    return SampleSpans(pos, size, first, count, code)


def copy_values(
    bufs,
    slot: np.ndarray,
    first: np.ndarray,
    count: np.ndarray,
    code: np.ndarray,
    dest: np.ndarray,
    out: np.ndarray,
) -> None:
    """The values of each sample into `out` at `dest`, cast to out's dtype: one kernel call per
    dtype among them; float16 (which numba does not read) through NumPy, a sample at a time."""
    if len(code) and (code == code[0]).all():  # one dtype (a shard's usual case): no sorting, no gathers
        dtype = CODE_DTYPE[int(code[0])]
        if dtype != np.float16:
            kernels.copy_samples(bufs, slot, first, count, dtype.itemsize, dest, out, dtype)
            return
    for k in np.unique(code).tolist():
        dtype, these = CODE_DTYPE[k], np.flatnonzero(code == k)
        if dtype == np.float16:
            for i in these.tolist():
                buf = _buffer(bufs, int(slot[i]))
                out[dest[i] : dest[i] + count[i]] = np.frombuffer(buf, dtype, count=int(count[i]), offset=int(first[i]))
        else:
            kernels.copy_samples(bufs, slot[these], first[these], count[these], dtype.itemsize, dest[these], out, dtype)


def copy_varints(bufs, slot, first, end, count, dest, out: np.ndarray, delta: bool) -> int:
    """The varints of each sample (bytes first[i]:end[i], count[i] values; concept_shard/entries.py)
    into `out` at `dest`, summed up when `delta`; returns the largest value (out may be too narrow
    for it: the caller widens). ValueError when a sample's bytes do not hold its count of values."""
    top, bad = kernels.copy_varints(bufs, slot, first, end, count, dest, out, delta)
    if bad >= 0:
        raise ValueError(f"a varint column that does not hold its {int(count[bad])} values")
    return int(top)


def take_scalars(bufs, slot: np.ndarray, pos: np.ndarray, encoding: str) -> np.ndarray:
    """An 8-byte scalar column (`int64` / `float64`, little-endian) of each sample."""
    raw = np.empty((len(pos), 8), np.uint8)
    kernels.take_bytes(bufs, slot, pos, raw)
    return raw.view(np.dtype(encoding).newbyteorder("<")).ravel()
