"""Random access to the cells of many shard datasets through one mosaicml-streaming dataset.

Every input file's shard dataset is one `streaming.Stream`; one `StreamingDataset` holds the
streams of all loaders (train and val), because streaming forbids two live datasets over the same
local directory in one process. Batches are planned by `plan.py`, not by streaming's sampler, so
this module only maps (dataset index, row within it) to a decoded sample.

Local shards are read in place (streaming decompresses each shard next to its `.zstd` on first use
and keeps the `.zstd`). Remote shards (`PATH.SHARDS_REMOTE`, a later issue) are cached under
`PATH.LOCAL_DIR`.
"""

from __future__ import annotations

import numpy as np

from .catalog import ShardSet
from .shm import clean_stale_streaming_shm


class SampleStore:
    def __init__(self, sets: list[ShardSet], cache_limit: str | int | None = None):
        from streaming import Stream, StreamingDataset

        self.sets = list(sets)
        self.index_of = {s.dataset_id: i for i, s in enumerate(self.sets)}
        clean_stale_streaming_shm()
        streams = [Stream(local=str(s.directory)) for s in self.sets]
        # batch_size/shuffle only matter to streaming's own iteration, which is not used here
        self.dataset = StreamingDataset(streams=streams, batch_size=1, shuffle=False, cache_limit=cache_limit)
        offsets = np.asarray(self.dataset.sample_offset_per_stream, dtype=np.int64)
        sizes = np.asarray(self.dataset.samples_per_stream, dtype=np.int64)
        for s, n in zip(self.sets, sizes):
            if int(n) != s.n_samples:
                raise RuntimeError(f"{s.directory}: index.json holds {n} samples but dataset.json says "
                                   f"{s.n_samples}; re-run `concept-shard build`.")
        self.offsets = offsets

    def get(self, dataset_index: int, row: int) -> dict:
        return self.dataset.get_item(int(self.offsets[dataset_index] + row))
