"""Random access to the cells of many shard datasets through one mosaicml-streaming dataset.

Every input file's shard dataset is one `streaming.Stream`; one `StreamingDataset` holds the
streams of all loaders (train and val), because streaming forbids two live datasets over the same
local directory in one process. Batches are planned by `plan.py`, not by streaming's sampler, so
this module only maps (dataset index, row within it) to a decoded sample.

Local shards are read in place (streaming decompresses each shard next to its `.zstd` on first use
and keeps the `.zstd`). Remote shards (`PATH.SHARDS_REMOTE`) are streamed into the cache
directories the catalog chose (one per dataset version); streaming downloads a shard on first
use and, with `datamodule.cache_limit`, evicts the least recently used ones to stay under it.
"""

from __future__ import annotations

import os
import struct
from time import time_ns

import numpy as np

from concept_shard.mds import VALUE_DTYPE_CODE

from .catalog import ShardSet
from .errors import DataError
from .shm import clean_stale_streaming_shm


# One StreamingDataset per process and list of streams, shared by every SampleStore over them:
# streaming keeps each dataset's shared-memory handles (two file descriptors per segment) alive
# until the process exits (atexit), so building a new one per DataModule would leak descriptors
# in a notebook or a test session that makes many.
_OPEN: dict[tuple, object] = {}


def _streaming_dataset(sets: list[ShardSet], cache_limit):
    from streaming import Stream, StreamingDataset

    directories = tuple(str(s.directory) for s in sets)
    remotes = tuple(s.remote for s in sets)
    if any(remotes):
        # the catalog names each remote dataset's cache after its dataset.json, so a rebuilt
        # dataset already has another key
        key = (directories, remotes, cache_limit)
    else:
        # a rebuilt local dataset (new index.json) must not be served from the old dataset's index;
        # eviction would delete the shards themselves, so local shards are never cache-limited
        stamps = tuple(os.stat(os.path.join(d, "index.json")).st_mtime_ns for d in directories)
        key, cache_limit = (directories, stamps), None
    if key not in _OPEN:
        clean_stale_streaming_shm()
        streams = [Stream(local=d, remote=r) for d, r in zip(directories, remotes)]
        try:
            # batch_size/shuffle only matter to streaming's own iteration, which is not used here
            _OPEN[key] = StreamingDataset(streams=streams, batch_size=1, shuffle=False, cache_limit=cache_limit)
        except ValueError as exc:
            raise _explain(exc, directories, remotes) from None
    return _OPEN[key]


def _explain(exc: ValueError, directories, remotes) -> Exception:
    """streaming's ValueErrors about the cache, as errors that say which key to change."""
    text = str(exc)
    if "Reused local directory" in text:
        return DataError("PATH.LOCAL_DIR", f"another live process on this node streams {remotes[0]} (and others) "
                         f"into the same cache ({os.path.dirname(directories[0])}, ...).",
                         "Give this run its own cache: PATH.LOCAL_DIR=<another directory>.")
    if "cache limit" in text.lower() or "cache_limit" in text:
        return DataError("datamodule.cache_limit", f"is too small for these shards: {text}",
                         "Raise it (at least 4x the largest shard, raw plus compressed), or set it to null.")
    return exc


class SampleStore:
    def __init__(self, sets: list[ShardSet], cache_limit: str | int | None = None):
        self.sets = list(sets)
        self.index_of = {s.dataset_id: i for i, s in enumerate(self.sets)}
        self.dataset = _streaming_dataset(self.sets, cache_limit)
        offsets = np.asarray(self.dataset.sample_offset_per_stream, dtype=np.int64)
        sizes = np.asarray(self.dataset.samples_per_stream, dtype=np.int64)
        for s, n in zip(self.sets, sizes):
            if int(n) != s.n_samples:
                raise RuntimeError(f"{s.directory}: index.json holds {n} samples but dataset.json says "
                                   f"{s.n_samples}; re-run `concept-shard build`.")
        self.offsets = offsets
        self._decoders: dict[int, SampleDecoder] = {}

    def get(self, dataset_index: int, row: int) -> dict:
        """The decoded sample. The shard's bytes come from streaming (which downloads, decompresses
        and evicts shards); the columns are decoded here by a decoder specialised to the shard
        schema: streaming's generic per-column dispatch costs ~50 us per cell, half the loader's
        time (tests/test_data_store.py checks both decoders agree on every sample)."""
        sample_id = int(self.offsets[dataset_index] + row)
        shard_id, in_shard = self.dataset.spanner[sample_id]
        reader = self.dataset.shards[shard_id]
        try:
            data = reader.get_sample_data(in_shard)
        except FileNotFoundError:        # not local yet: streaming prepares the shard
            return self.dataset.get_item(sample_id)
        self.dataset._shard_access_times[shard_id] = time_ns()   # what get_item does, for cache eviction
        decoder = self._decoders.get(shard_id)
        if decoder is None:
            decoder = self._decoders[shard_id] = SampleDecoder(reader)
        return decoder(data)


_DTYPE_OF_CODE = {code: np.dtype(name) for name, code in VALUE_DTYPE_CODE.items()}
_SHAPE_FORMATS = ("<B", "<H", "<I", "<Q")


class SampleDecoder:
    """Decode one MDS sample of a shard (layout in concept_shard/mds.py) into a dict of columns.

    Handles the encodings concept-shard writes (1-D `ndarray[:dtype]`, `str`, `int64`, `float64`)
    directly and hands anything else to streaming's decoder.
    """

    def __init__(self, reader):
        from streaming.base.format.mds.encodings import mds_decode

        self._fallback = mds_decode
        self.columns = list(zip(reader.column_names, reader.column_encodings, reader.column_sizes))
        self.n_var = sum(1 for _, _, size in self.columns if not size)
        self.header = struct.Struct(f"<{self.n_var}I")

    def __call__(self, data: bytes) -> dict:
        var_sizes = iter(self.header.unpack_from(data, 0))
        pos, out = self.header.size, {}
        for name, enc, size in self.columns:
            size = size or next(var_sizes)
            if enc == "str":
                out[name] = data[pos:pos + size].decode()
            elif enc == "int64":
                out[name] = np.int64(int.from_bytes(data[pos:pos + 8], "little", signed=True))
            elif enc == "float64":
                out[name] = np.float64(struct.unpack_from("<d", data, pos)[0])
            elif enc == "ndarray" or (enc.startswith("ndarray:") and enc.count(":") == 1):
                out[name] = self._ndarray(enc, data, pos, size)
            else:
                out[name] = self._fallback(enc, data[pos:pos + size])
            pos += size
        return out

    @staticmethod
    def _ndarray(enc: str, data: bytes, pos: int, size: int) -> np.ndarray:
        end = pos + size
        if enc == "ndarray":
            dtype = _DTYPE_OF_CODE[data[pos]]
            pos += 1
        else:
            dtype = np.dtype(enc.split(":")[1])
        head = data[pos]
        ndim, fmt = head >> 2, _SHAPE_FORMATS[head & 3]
        step = struct.calcsize(fmt)
        shape = struct.unpack_from(f"<{ndim}{fmt[1]}", data, pos + 1)
        pos += 1 + ndim * step
        return np.frombuffer(data, dtype, count=(end - pos) // dtype.itemsize, offset=pos).reshape(shape)
