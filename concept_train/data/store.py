"""Random access to the cells of many shard datasets through one mosaicml-streaming dataset.

Every input file's shard dataset is one `streaming.Stream`; one `StreamingDataset` holds the
streams of all loaders (train and val), because streaming forbids two live datasets over the same
local directory in one process. Batches are planned by `plan.py`, not by streaming's sampler, so
this module only maps (dataset index, row within it) to a decoded sample.

Local shards are read in place (streaming decompresses each shard next to its `.zstd` on first use
and keeps the `.zstd`). Remote shards (`PATH.SHARDS_REMOTE`), and local ones under
`datamodule.cache_limit`, are streamed into the cache directories the catalog chose (one per
dataset version); streaming copies a shard on first use and, with `datamodule.cache_limit`,
evicts the least recently used ones to stay under it.
"""

from __future__ import annotations

import os
from time import time_ns

import numpy as np

from concept_shard.errors import DataError
from concept_shard.mds import SampleDecoder

from .catalog import ShardSet
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
        and evicts shards); the columns are decoded by the shard codec's own decoder (mds.py),
        which is several times faster than streaming's generic one."""
        sample_id = int(self.offsets[dataset_index] + row)
        shard_id, in_shard = self.dataset.spanner[sample_id]
        reader = self.dataset.shards[shard_id]
        try:
            try:
                data = reader.get_sample_data(in_shard)
            except FileNotFoundError:        # not local yet: streaming prepares the shard
                return self.dataset.get_item(sample_id)
        except Exception as exc:             # a shard deleted or rebuilt under a running run
            s = self.sets[dataset_index]
            raise DataError(s.remote or s.directory, f"could not be read while training ({type(exc).__name__}: "
                            f"{exc}); its shards were deleted, rebuilt or damaged after the run started.",
                            "Let any `concept-shard build` finish, then resume the run (initialize.resume=True): "
                            "it restarts from its last checkpoint with the shards as they are then.") from None
        self.dataset._shard_access_times[shard_id] = time_ns()   # what get_item does, for cache eviction
        decoder = self._decoders.get(shard_id)
        if decoder is None:
            decoder = self._decoders[shard_id] = SampleDecoder(reader.column_names, reader.column_encodings,
                                                               reader.column_sizes)
        return decoder(data)
