"""Random access to the cells of many shard datasets: (dataset index, row within it) to a decoded
sample, or a batch of them decoded a shard at a time.

Batches are planned by `plan.py`; this module only locates and decodes. Local shards are read in
place: `local.py` indexes them and decompresses a `.zstd` shard beside itself on first use (the
copy streaming would make, under the same name). Remote shards (`PATH.SHARDS_REMOTE`), and local
ones under `datamodule.cache_limit`, go through one mosaicml-streaming dataset that holds every
loader's streams (train and val; streaming forbids two live datasets over the same local
directory in one process): it copies a shard into the cache directory the catalog chose (one per
dataset version) on first use and, with `datamodule.cache_limit`, evicts the least recently used
ones to stay under it.
"""

from __future__ import annotations

import mmap
import os
import sys
from time import time_ns
from typing import NamedTuple

import numpy as np

from concept_shard.datasets import index_problem
from concept_shard.entries import with_arrays
from concept_shard.errors import DataError, UserError
from concept_shard.integrity import SHARD_HASH, Damaged, check_file
from concept_shard.mds import SampleDecoder

from .catalog import ShardSet
from .decode import (
    CODE_DTYPE,
    SampleBatch,
    SampleSpans,
    ShardBuffers,
    ShardLayout,
    copy_values,
    copy_varints,
    locate,
    starts_of,
    take_scalars,
)
from .local import LocalShards
from .shm import clean_stale_streaming_shm, registered

_NO_FD = {"trackfd": False} if sys.version_info >= (3, 13) else {}
# streaming.base.dataset._ShardState: only in the source; LOCAL: the shard's files are in the cache
_REMOTE, _PREPARING, _LOCAL = 1, 2, 3


# Shard files are checked against their hashes (integrity.py) when first mapped or prepared;
# tools/bench/verify.py turns this off in a process of its own to measure what the checks cost.
VERIFY = True

# One StreamingDataset per process and list of streams, shared by every SampleStore over them:
# streaming keeps each dataset's shared-memory handles (two file descriptors per segment) alive
# until the process exits (atexit), so building a new one per DataModule would leak descriptors
# in a notebook or a test session that makes many.
_OPEN: dict[tuple, object] = {}


def _shard_index(sets: list[ShardSet], cache_limit, damaged):
    """What indexes the shards of `sets`: LocalShards for datasets read in place, else the one
    StreamingDataset of these streams in this process."""
    directories = tuple(str(s.directory) for s in sets)
    remotes = tuple(s.remote for s in sets)
    if not any(remotes):
        # eviction would delete the shards themselves, so local shards are never cache-limited
        return LocalShards(list(directories), damaged)
    # the catalog names each remote dataset's cache after its dataset.json, so a rebuilt dataset
    # already has another key
    key = (directories, remotes, cache_limit)
    if key not in _OPEN:
        from streaming import Stream, StreamingDataset

        clean_stale_streaming_shm()
        try:
            # batch_size/shuffle only matter to streaming's own iteration, which is not used here
            _OPEN[key] = registered(
                lambda: StreamingDataset(
                    streams=[Stream(local=d, remote=r) for d, r in zip(directories, remotes)],
                    batch_size=1,
                    shuffle=False,
                    cache_limit=cache_limit,
                    # streaming checks each file it downloads or decompresses against index.json
                    validate_hash=SHARD_HASH if VERIFY else None,
                )
            )
        except ValueError as exc:
            raise _explain(exc, directories, remotes) from None
    return _OPEN[key]


def _explain(exc: ValueError, directories, remotes) -> Exception:
    """streaming's ValueErrors about the cache, as errors that say which key to change."""
    text = str(exc)
    if "Reused local directory" in text:
        return DataError(
            "PATH.LOCAL_DIR",
            f"another live process on this node streams {remotes[0]} (and others) "
            f"into the same cache ({os.path.dirname(directories[0])}, ...).",
            "Give this run its own cache: PATH.LOCAL_DIR=<another directory>.",
        )
    if "cache limit" in text.lower() or "cache_limit" in text:
        return DataError(
            "datamodule.cache_limit",
            f"is too small for these shards: {text}",
            "Raise it (at least 4x the largest shard, raw plus compressed), or set it to null.",
        )
    return exc


# shard files kept mapped per process between batches (a batch spanning more keeps them all for
# itself): each mapping holds a file descriptor (before Python 3.13) and keeps an evicted file's
# disk space until it is dropped
MAPPED = 128


class _Group(NamedTuple):
    """The samples of a batch whose shards share one layout (usually all), located in their shards."""

    members: np.ndarray  # their positions in the batch
    slot: np.ndarray  # each one's shard in the store's ShardBuffers
    layout: ShardLayout
    spans: SampleSpans  # where each member's columns and values lie in its shard


class SampleStore:
    def __init__(self, sets: list[ShardSet], cache_limit: str | int | None = None):
        self.sets = list(sets)
        self.index_of = {s.dataset_id: i for i, s in enumerate(self.sets)}
        self.dataset = _shard_index(self.sets, cache_limit, self._damaged)
        self._local = isinstance(self.dataset, LocalShards)
        offsets = np.asarray(self.dataset.sample_offset_per_stream, dtype=np.int64)
        sizes = np.asarray(self.dataset.samples_per_stream, dtype=np.int64)
        for s, n in zip(self.sets, sizes):
            problem = index_problem(n, s.n_samples)
            if problem is not None:
                raise RuntimeError(f"{s.directory}: {problem.reason}; re-run `concept-shard build`.")
        self.offsets = offsets
        self._decoders: dict[int, SampleDecoder] = {}
        self._layouts: dict[tuple, ShardLayout] = {}
        self._layout_keys: dict[int, tuple] = {}
        # shard id -> (mapping, sample offsets, slot in _buffers, which holds its bytes), least
        # recently used first
        self._maps: dict[int, tuple[mmap.mmap, np.ndarray, int]] = {}
        self._buffers: ShardBuffers | None = None  # made on first use (numba's typed List)
        self._free: list[int] = []  # slots of _buffers that hold no shard
        self._keep = MAPPED
        self._verified: set[int] = set()  # shards whose raw file this process has hashed
        self._evicts = self.dataset.cache_limit is not None
        self._shard_ends = np.cumsum(self.dataset.samples_per_shard)

    def get(self, dataset_index: int, row: int) -> dict:
        """The decoded sample (`get_many` of one)."""
        return self.get_many(np.array([dataset_index]), np.array([row]))[0]

    def get_many(self, dataset_indices: np.ndarray, rows: np.ndarray) -> list[dict]:
        """The decoded samples of the (dataset, row) pairs, in order, one dict each: the shard
        codec's own decoder (mds.py), several times faster than streaming's generic one, and the
        reference for `get_batch`."""
        ids, shards, in_shard = self._locate(dataset_indices, rows)
        return [
            self._decode(d, sample_id, shard_id, k)
            for d, sample_id, shard_id, k in zip(
                np.asarray(dataset_indices).tolist(), ids.tolist(), shards.tolist(), in_shard.tolist()
            )
        ]

    def get_batch(
        self,
        dataset_indices: np.ndarray,
        rows: np.ndarray,
        names: list[str],
        compiled: bool = True,
        shard_dtypes: bool = False,
    ) -> SampleBatch:
        """The samples of the (dataset, row) pairs as one SampleBatch (genes and counts
        concatenated, plus the columns `names`), decoded a shard at a time by decode.py's kernels
        (`compiled`), else from `get_many`. A batch with a shard that is not local yet, or of a
        schema the kernels do not read, goes through `get_many` too (streaming prepares the
        shard there). Genes come as int64 and counts as float64 (what tokenizing reads), or with
        `shard_dtypes` in the smallest dtypes that hold every shard's (uint16 genes and uint8
        counts, typically: a fifth of the bytes, for readers of raw counts)."""
        if not compiled:
            return SampleBatch.from_samples(self.get_many(dataset_indices, rows), names, shard_dtypes)
        ids, shards, in_shard = self._locate(dataset_indices, rows)
        groups = self._groups(dataset_indices, shards, in_shard, names)
        if groups is None:
            return SampleBatch.from_samples(self.get_many(dataset_indices, rows), names, shard_dtypes)
        lengths = self._lengths(dataset_indices, groups, len(ids))
        bufs = self._buffers.bufs
        try:
            genes, counts = _values(bufs, groups, lengths, shard_dtypes)
        except ValueError as exc:  # a varint column that does not hold its values
            raise self._unreadable(int(np.asarray(dataset_indices)[0]), exc) from None
        strings, scalars = _columns(bufs, self._buffers.views, groups, len(ids))
        return SampleBatch(genes=genes, counts=counts, lengths=lengths, scalars=scalars, strings=strings)

    def _groups(
        self, dataset_indices: np.ndarray, shards: np.ndarray, in_shard: np.ndarray, names: list[str]
    ) -> list[_Group] | None:
        """The batch's samples located in their mapped shards, grouped by the shards' layout (one
        group unless the batch mixes datasets of other columns); None when a shard is not local
        yet or of a schema the kernels do not read (then `get_many` serves the batch)."""
        unique, inverse = np.unique(shards, return_inverse=True)
        # every shard of this batch stays mapped until it is read: no eviction among them
        self._keep = max(MAPPED, len(unique))
        self._slots(self._keep)
        try:
            for shard_id in unique.tolist():  # the mapped ones first become the most recent
                if shard_id in self._maps:
                    self._maps[shard_id] = self._maps.pop(shard_id)
            slots, layouts = np.empty(len(unique), np.int64), []
            for k, shard_id in enumerate(unique.tolist()):
                slots[k] = self._mapped(shard_id)[2]
                layout = self._layout(shard_id, names)
                if not layout.supported:
                    return None
                layouts.append(layout)
        except FileNotFoundError as exc:
            if self._local:  # deleted under the run
                raise self._unreadable(int(np.asarray(dataset_indices)[0]), exc) from None
            return None  # not in streaming's cache yet: get_many has streaming prepare it
        except UserError:
            raise
        except Exception as exc:
            raise self._unreadable(int(np.asarray(dataset_indices)[0]), exc) from None
        bufs = self._buffers.bufs
        slot = slots[inverse]
        starts = starts_of(bufs, slot, in_shard)
        kinds = {id(layout): layout for layout in layouts}
        if len(kinds) == 1:
            everyone = np.arange(len(slot))
            return [_Group(everyone, slot, layouts[0], locate(layouts[0], bufs, slot, starts))]
        number = {key: k for k, key in enumerate(kinds)}
        kind_of = np.array([number[id(layout)] for layout in layouts])[inverse]
        groups = []
        for k, layout in enumerate(kinds.values()):
            members = np.flatnonzero(kind_of == k)
            groups.append(_Group(members, slot[members], layout, locate(layout, bufs, slot[members], starts[members])))
        return groups

    def _lengths(self, dataset_indices: np.ndarray, groups: list[_Group], n: int) -> np.ndarray:
        """Entries per sample: its genes, which its counts must match."""
        lengths = np.zeros(n, np.int64)
        for group in groups:
            genes, counts = group.spans.count[:, 0], group.spans.count[:, 1]
            lengths[group.members] = genes
            if not np.array_equal(genes, counts) or (genes < 0).any():
                bad = group.members[np.flatnonzero((genes != counts) | (genes < 0))[0]]
                raise self._unreadable(
                    int(np.asarray(dataset_indices)[bad]),
                    ValueError("a sample's genes and counts differ in length"),
                )
        return lengths

    def _locate(self, dataset_indices: np.ndarray, rows: np.ndarray):
        """(sample id, shard, index in shard) of each pair. The shards are found for all at once
        and each shard's access time (streaming's eviction order) written once: per sample, both
        would cost as much as decoding it."""
        ids = self.offsets[np.asarray(dataset_indices, np.int64)] + np.asarray(rows, np.int64)
        shards = np.searchsorted(self._shard_ends, ids, side="right")
        in_shard = ids - self.dataset.sample_offset_per_shard[shards]
        if self._evicts:
            now = time_ns()
            for shard_id in set(shards.tolist()):
                self.dataset._shard_access_times[shard_id] = now
        return ids, shards, in_shard

    def _layout(self, shard_id: int, names: list[str]) -> ShardLayout:
        """The layout of a shard's samples: one object per schema (columns, encodings, sizes) and
        names asked, so that a batch's samples of equal schemas are read together."""
        schema = self._layout_keys.get(shard_id)
        if schema is None:
            reader = self.dataset.shards[shard_id]
            schema = self._layout_keys[shard_id] = (
                tuple(reader.column_names),
                tuple(reader.column_encodings),
                tuple(reader.column_sizes),
            )
        key = (schema, tuple(names))
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._layouts[key] = ShardLayout(*schema, names)
        return layout

    def _unreadable(self, dataset_index: int, exc: Exception) -> DataError:
        """A shard deleted or rebuilt under a running run, as the error that says what to do."""
        s = self.sets[dataset_index]
        return DataError(
            s.remote or s.directory,
            f"could not be read while training ({type(exc).__name__}: "
            f"{exc}); its shards were deleted, rebuilt or damaged after the run started.",
            "Let any `concept-shard build` finish (if none is running, `concept-shard build --verify` "
            "rebuilds damaged datasets), then resume the run (initialize.resume=True): it restarts "
            "from its last checkpoint with the shards as they are then.",
        )

    def _dataset_of(self, shard_id: int) -> int:
        return int(self.dataset.stream_per_shard[shard_id])  # one stream per set, in order

    def _damaged(self, dataset_index: int, exc: Damaged) -> DataError:
        s = self.sets[dataset_index]
        return DataError(
            s.directory,
            f"is damaged: {exc} (dataset {s.dataset_id}).",
            "Run `concept-shard build --verify` with this run's project and overrides: it rebuilds "
            "every damaged dataset. Then resume the run (initialize.resume=True).",
        )

    def _decode(self, dataset_index: int, sample_id: int, shard_id: int, in_shard: int) -> dict:
        try:
            try:
                view, offsets, _ = self._mapped(shard_id)
                data = view[int(offsets[in_shard]) : int(offsets[in_shard + 1])]
            except FileNotFoundError:  # not in the cache yet: streaming prepares the shard
                if self._local:
                    raise
                self._check_compressed(dataset_index, shard_id)
                return self._get_remote(sample_id, shard_id)
        except UserError:
            raise
        except Exception as exc:
            raise self._unreadable(dataset_index, exc) from None
        decoder = self._decoders.get(shard_id)
        if decoder is None:
            reader = self.dataset.shards[shard_id]
            decoder = self._decoders[shard_id] = SampleDecoder(
                reader.column_names, reader.column_encodings, reader.column_sizes
            )
        return decoder(data)

    def _get_remote(self, sample_id: int, shard_id: int) -> dict:
        """streaming's get_item, which downloads the shard (checked against its hash) on first use,
        the shard handed back as remote when that fails: left marked as being prepared, every
        other worker that needs it would wait for good, and the batches queued behind them. The
        error is raised here; the next reader downloads the shard anew and meets its own."""
        states = self.dataset._shard_states
        ours = states[shard_id] == _REMOTE  # then this call downloads it (else it waits for another's)
        try:
            return with_arrays(self.dataset.get_item(sample_id))
        except BaseException:
            if ours and states[shard_id] == _PREPARING:
                states[shard_id] = _REMOTE
            raise

    def _check_compressed(self, dataset_index: int, shard_id: int) -> None:
        """Check a `.zstd` that lies in place against its hash before streaming decompresses it.
        streaming checks it too, but a worker whose check fails there leaves the shard marked as
        being prepared, and another worker waiting for it (and the batches queued behind) waits
        for good. (A shard downloaded from object storage is checked by streaming: `_get_remote`.)"""
        if not VERIFY or shard_id in self._verified:
            return
        reader = self.dataset.shards[shard_id]
        zipped = reader.zip_data
        if zipped is None:
            return
        path = os.path.join(reader.dirname, reader.split or "", zipped.basename)
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:  # not downloaded yet
            return
        try:
            check_file(data, {"bytes": zipped.bytes, "hashes": zipped.hashes}, path)
        except Damaged as exc:
            raise self._damaged(dataset_index, exc) from None

    def _mapped(self, shard_id: int) -> tuple[mmap.mmap, np.ndarray, int]:
        """A decompressed MDS shard file (u32 count, u32 offsets[count + 1] from the file's start,
        then the samples) mapped into memory once per process, as (mapping, sample offsets, its
        slot in the kernels' ShardBuffers, which hold its bytes as an array); streaming's reader
        would open the file, seek and read twice per sample. The MAPPED most recently used shards
        stay mapped (more while a batch spans more). Under a cache limit, a shard streaming
        has evicted is unmapped at once (a deleted file's space is freed only with its last
        mapping) and read again through streaming (FileNotFoundError). The first time a process
        maps a shard, its bytes are checked against the hash index.json records (integrity.py):
        a damaged file is a DataError naming it, never batches of other cells."""
        mapped = self._maps.get(shard_id)
        if self._evicts and self.dataset._shard_states[shard_id] != _LOCAL:
            if mapped is not None:
                self._unmap(shard_id)
            raise FileNotFoundError(shard_id)
        if mapped is None:
            reader = self.dataset.shards[shard_id]
            path = os.path.join(reader.dirname, reader.split or "", reader.raw_data.basename)
            try:
                fh = open(path, "rb")
            except FileNotFoundError:
                if not self._local:
                    raise
                self.dataset.prepare_shard(shard_id, VERIFY)  # a .zstd not decompressed yet
                fh = open(path, "rb")
            with fh:
                view = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ, **_NO_FD)
            if VERIFY and shard_id not in self._verified:
                info = {"bytes": reader.raw_data.bytes, "hashes": reader.raw_data.hashes}
                try:
                    check_file(view, info, path)
                except Damaged as exc:
                    view.close()
                    raise self._damaged(self._dataset_of(shard_id), exc) from None
                self._verified.add(shard_id)
            count = int(np.frombuffer(view, np.uint32, count=1)[0])
            if count != reader.samples:
                raise ValueError(f"{path} holds {count} samples, its index says {reader.samples}")
            offsets = np.frombuffer(view, np.uint32, count=count + 1, offset=4).astype(np.int64)
            buf = np.frombuffer(view, np.uint8)
            while len(self._maps) >= self._keep:
                self._unmap(next(iter(self._maps)))
            slot = self._slots(self._keep).pop()
            self._buffers.put(slot, view, buf)
            mapped = self._maps[shard_id] = (view, offsets, slot)
        return mapped

    def _slots(self, n: int) -> list[int]:
        """The free slots, after growing the kernels' ShardBuffers to n slots at least."""
        if self._buffers is None:
            self._buffers = ShardBuffers(0)
        before = len(self._buffers)
        self._buffers.grow(n)
        self._free += range(before, len(self._buffers))
        return self._free

    def _unmap(self, shard_id: int) -> None:
        """Drop a shard's mapping (closed once nothing holds its bytes) and free its slot."""
        slot = self._maps.pop(shard_id)[2]
        self._buffers.clear(slot)
        self._free.append(slot)


def _values(bufs, groups: list[_Group], lengths: np.ndarray, shard_dtypes: bool) -> tuple[np.ndarray, np.ndarray]:
    """Every sample's genes and counts back to back, as int64 / float64 or, with `shard_dtypes`, in
    the smallest dtypes that hold every shard's: those the per-sample decoder gives (an array
    column's own dtype; for varints, which carry none, the smallest that holds the values, token
    ids at least uint16). Varints are decoded into a first guess (uint16 token ids, uint8 counts
    when every count takes one byte, else uint16) and, in the rare batch that needs it, again wider."""
    dest = np.zeros(len(lengths), np.int64)
    np.cumsum(lengths[:-1], out=dest[1:])
    dtypes = [np.dtype(np.int64), np.dtype(np.float64)]
    if shard_dtypes and groups:
        dtypes = [_first_guess(groups, a) for a in (0, 1)]
    while True:
        out = [np.empty(int(lengths.sum()), dt) for dt in dtypes]
        tops = [-1, -1]  # the largest varint value, per column (-1: none)
        for group in groups:
            at, spans, layout = dest[group.members], group.spans, group.layout
            for a in (0, 1):
                first, count = spans.first[:, a], spans.count[:, a]
                if layout.varint[a]:
                    col = layout.arrays[a]
                    end = spans.pos[:, col] + spans.size[:, col]
                    top = copy_varints(bufs, group.slot, first, end, count, at, out[a], delta=a == 0)
                    tops[a] = max(tops[a], top)
                else:
                    copy_values(bufs, group.slot, first, count, spans.code[:, a], at, out[a])
        if not shard_dtypes:
            return out[0], out[1]
        exact = [_exact(groups, a, tops[a]) for a in (0, 1)]
        if all(np.can_cast(e, d) for e, d in zip(exact, dtypes)):  # narrower where the guess was wide
            return tuple(o if o.dtype == e else o.astype(e) for o, e in zip(out, exact))
        dtypes = exact


_VARINT_FLOOR = (np.dtype(np.uint16), np.dtype(np.uint8))  # the arrays format's genes and counts


def _first_guess(groups: list[_Group], a: int) -> np.dtype:
    """The dtype a batch's genes (a = 0) or counts (a = 1) are first decoded in with `shard_dtypes`."""
    found = []
    for group in groups:
        spans, layout = group.spans, group.layout
        if layout.varint[a]:
            col = layout.arrays[a]
            one_byte = (spans.pos[:, col] + spans.size[:, col] - spans.first[:, a] == spans.count[:, a]).all()
            found.append(_VARINT_FLOOR[a] if a == 0 or one_byte else np.dtype(np.uint16))
        else:
            found.extend(CODE_DTYPE[k] for k in np.unique(spans.code[:, a]).tolist())
    return np.result_type(*found)


def _exact(groups: list[_Group], a: int, top: int) -> np.dtype:
    """The per-sample decoder's dtype for a batch's genes or counts, given the largest varint value."""
    found = [CODE_DTYPE[k] for g in groups if not g.layout.varint[a] for k in np.unique(g.spans.code[:, a]).tolist()]
    if top >= 0:
        found.append(np.result_type(_VARINT_FLOOR[a], np.min_scalar_type(top)))
    return np.result_type(*found)


def _columns(bufs, views: list, groups: list[_Group], n: int) -> tuple[dict[str, list[str]], dict[str, np.ndarray]]:
    """The other columns asked for, one value per sample: (strings, scalars)."""
    strings, parts = {}, {}
    for group in groups:
        pos, size = group.spans.pos, group.spans.size
        for name, enc, c in group.layout.columns:
            if enc == "str":  # a dataset without the column: "" (as get_many's .get)
                col = strings.setdefault(name, [""] * n)
                where = zip(group.members.tolist(), group.slot.tolist(), pos[:, c].tolist(), size[:, c].tolist())
                for i, s, a, k in where:
                    col[i] = views[s][a : a + k].decode()
            else:  # int64 / float64: 8 bytes each
                parts.setdefault(name, []).append((group.members, take_scalars(bufs, group.slot, pos[:, c], enc)))
    scalars = {}
    for name, pieces in parts.items():  # n_counts is int64 in some datasets, float64 in others
        col = scalars[name] = np.empty(n, np.result_type(*[v.dtype.newbyteorder("=") for _, v in pieces]))
        for members, values in pieces:
            col[members] = values
    return strings, scalars
