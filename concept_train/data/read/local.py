"""The shards of local datasets, indexed and decompressed here rather than by mosaicml-streaming.

Training decodes every sample itself (store.py maps a decompressed shard file and reads it with
decode.py's kernels); what it needs besides is each dataset's index (which shard holds which rows,
with which columns) and, for a `.zstd` shard, the decompressed copy beside it. For datasets read in
place (no `PATH.SHARDS_REMOTE`, no `datamodule.cache_limit`) both come from here, because a
`StreamingDataset` costs every process that builds one: `import streaming` loads transformers and
scikit-learn (3 s and 300 MB on top of torch), and each dataset holds shared-memory segments to the
end of the process. Remote and cache-limited datasets still go through streaming (downloads,
eviction).

`LocalShards` carries the fields of a `StreamingDataset` that store.py reads (sample offsets per
dataset and per shard, each shard's files and columns), so the store reads both alike. The copy a
shard is decompressed into has the name and bytes streaming gives it: either reader can use it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from concept_shard.integrity import Damaged, check_dataset, check_file
from concept_shard.layout import read_json
from concept_shard.remote import DATASET_JSON


class FileInfo(NamedTuple):
    """One file of a shard as index.json records it."""

    basename: str
    bytes: int
    hashes: dict


class LocalShard(NamedTuple):
    """One shard of a dataset read in place: its files and columns."""

    dirname: str  # the dataset's directory
    raw_data: FileInfo  # shard.NNNNN.mds
    zip_data: FileInfo | None  # shard.NNNNN.mds.zstd, when compressed
    samples: int
    column_names: list
    column_encodings: list
    column_sizes: list
    split: None = None  # (streaming's readers name a sub-directory here; ours have none)


def _shards_of(directory: str) -> list[LocalShard]:
    """The checked shard entries of the dataset in `directory` (integrity.check_dataset: its
    dataset.json and the index.json that record names); Damaged otherwise."""
    record = read_json(Path(directory) / DATASET_JSON)
    if not isinstance(record, dict):
        raise Damaged("dataset.json is missing or not a JSON object")
    entries = check_dataset(lambda name: (Path(directory) / name).read_bytes(), record)
    return [
        LocalShard(
            dirname=directory,
            raw_data=FileInfo(**entry["raw_data"]),
            zip_data=FileInfo(**entry["zip_data"]) if entry.get("zip_data") else None,
            samples=int(entry["samples"]),
            column_names=entry["column_names"],
            column_encodings=entry["column_encodings"],
            column_sizes=entry["column_sizes"],
        )
        for entry in entries
    ]


class LocalShards:
    """Every shard of a list of local datasets, numbered across them in order (as streaming numbers
    the shards of its streams)."""

    cache_limit = None  # read in place: nothing is evicted

    def __init__(self, directories: list[str], damaged):
        """`damaged(dataset_index, Damaged) -> Exception`: the error to raise for a dataset whose
        files are not what its records say."""
        self.damaged = damaged
        self.shards: list[LocalShard] = []
        streams, per_stream = [], []
        for i, directory in enumerate(directories):
            try:
                shards = _shards_of(str(directory))
            except Damaged as exc:
                raise damaged(i, exc) from None
            self.shards += shards
            streams += [i] * len(shards)
            per_stream.append(sum(s.samples for s in shards))
        self.stream_per_shard = np.asarray(streams, np.int64)
        self.samples_per_stream = np.asarray(per_stream, np.int64)
        self.sample_offset_per_stream = np.concatenate([[0], np.cumsum(self.samples_per_stream)[:-1]]).astype(np.int64)
        self.samples_per_shard = np.asarray([s.samples for s in self.shards], np.int64)
        self.sample_offset_per_shard = np.concatenate([[0], np.cumsum(self.samples_per_shard)[:-1]]).astype(np.int64)

    def prepare_shard(self, shard_id: int, verify: bool) -> None:
        """Decompress a `.zstd` shard into the raw file beside it, once its bytes match their
        recorded hash (`verify`). Written under a name of this process's and renamed into place, so
        workers and ranks that decompress the same shard at once never see a partial file; the
        raw file is checked against its own hash when it is mapped."""
        import zstd

        shard = self.shards[shard_id]
        directory = shard.dirname
        raw_path = os.path.join(directory, shard.raw_data.basename)
        if shard.zip_data is None:
            raise FileNotFoundError(raw_path)
        zip_path = os.path.join(directory, shard.zip_data.basename)
        with open(zip_path, "rb") as fh:
            data = fh.read()
        if verify:
            try:
                check_file(data, shard.zip_data._asdict(), zip_path)
            except Damaged as exc:
                raise self.damaged(int(self.stream_per_shard[shard_id]), exc) from None
        tmp = f"{raw_path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as fh:
                fh.write(zstd.decompress(data))
            os.replace(tmp, raw_path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
