"""A species index (`<species>/index.json` and `datasets.json`) has one format, written by
finalize.species_index: the local writer and the object-store writer give the same files."""

from __future__ import annotations

import json

from concept_shard.finalize import write_species_indexes
from concept_shard.remote import RemoteShards


class _Bucket(RemoteShards):
    """A RemoteShards whose objects are the files of a local tree; what it writes is kept."""

    def __init__(self, root):
        super().__init__("s3://bucket")
        self.root, self.written = root, {}

    def list_keys(self, rel: str) -> list[str]:
        base = self.root / rel
        return sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())

    def read_json(self, rel: str):
        """As RemoteShards.read_json: None for no object, or one that is not JSON."""
        try:
            return json.loads((self.root / rel).read_text())
        except (OSError, ValueError):
            return None

    def put_json(self, rel: str, obj) -> None:
        self.written[rel] = obj


def _dataset(root, rel: str, cells: list[int], zipped: bool) -> None:
    directory = root / rel
    directory.mkdir(parents=True)
    shards = []
    for i, n in enumerate(cells):
        raw = {"basename": f"shard.{i:05d}.mds", "bytes": 100 + n, "hashes": {}}
        shards.append(
            {
                "samples": n,
                "raw_data": raw,
                "format": "mds",
                "zip_data": {"basename": raw["basename"] + ".zstd", "bytes": 50, "hashes": {}} if zipped else None,
            }
        )
    (directory / "index.json").write_text(json.dumps({"version": 2, "shards": shards}))
    (directory / "dataset.json").write_text(
        json.dumps({"cells_written": sum(cells), "source_file": f"/data/{rel}.h5ad"})
    )


def test_local_and_remote_species_indexes_are_the_same_files(tmp_path):
    _dataset(tmp_path, "hsapiens/src_a/blood", [3, 2], zipped=True)
    _dataset(tmp_path, "hsapiens/src_b/lung", [4], zipped=False)
    _dataset(tmp_path, "mmusculus/src_c/brain", [5], zipped=True)
    bucket = _Bucket(tmp_path)
    assert bucket.write_species_indexes(["hsapiens", "mmusculus"]) == {"hsapiens": 2, "mmusculus": 1}
    assert write_species_indexes(tmp_path) == {"hsapiens": 2, "mmusculus": 1}
    for species in ("hsapiens", "mmusculus"):
        for name in ("index.json", "datasets.json"):
            assert bucket.written[f"{species}/{name}"] == json.loads((tmp_path / species / name).read_text())
    index = bucket.written["hsapiens/index.json"]
    assert [(s["raw_data"]["basename"], (s["zip_data"] or {}).get("basename")) for s in index["shards"]] == [
        ("src_a/blood/shard.00000.mds", "src_a/blood/shard.00000.mds.zstd"),
        ("src_a/blood/shard.00001.mds", "src_a/blood/shard.00001.mds.zstd"),
        ("src_b/lung/shard.00000.mds", None),
    ]
    assert bucket.written["hsapiens/datasets.json"] == {
        "species": "hsapiens",
        "datasets": [
            {"path": "src_a/blood", "cells": 5, "source_file": "/data/hsapiens/src_a/blood.h5ad"},
            {"path": "src_b/lung", "cells": 4, "source_file": "/data/hsapiens/src_b/lung.h5ad"},
        ],
    }


def test_a_remote_species_without_readable_datasets_gets_no_index(tmp_path):
    _dataset(tmp_path, "hsapiens/src_a/blood", [3], zipped=True)
    (tmp_path / "hsapiens/src_a/blood/index.json").write_text("not json")  # a half-uploaded index
    bucket = _Bucket(tmp_path)
    assert bucket.write_species_indexes(["hsapiens"]) == {"hsapiens": 0}
    assert bucket.written == {}
