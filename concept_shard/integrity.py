"""What makes a published dataset trustworthy before a reader uses it: every shard file's hash in
`index.json`, the digest of `index.json` in `dataset.json`, and every field of both checked.

    shard files   xxh3_64 of each raw (`.mds`) and compressed (`.mds.zstd`) file, recorded as MDS
                  records hashes (`"hashes": ["xxh3_64"]`, `raw_data.hashes.xxh3_64`). Checked by
                  training when a process first maps a shard (its decompressed bytes), by
                  streaming when it downloads or decompresses one (`validate_hash`), by `read_rows`
                  (gene-vectors), and for every file by `concept-shard status --verify` / `build
                  --verify`.
    index.json    sha256 of its bytes, `index_digest` in dataset.json, checked whenever a dataset is
                  opened (one small read): a shard or index.json replaced by another dataset's, with
                  the same cell count, no longer matches.
    fields        basenames are the plain names the writer gives (`shard.NNNNN.mds[.zstd]`: nothing
                  can name a path outside the dataset directory); counts are non-negative integers
                  that agree with dataset.json's `cells_written` and `n_shards`; genes are token ids
                  of the species' vocabulary.

xxh3_64 is not a cryptographic hash: it finds damage (bit rot, a truncated or half-copied file, a
file swapped for another) at ~10 GB/s; the sha256 of index.json binds those hashes to the record.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable

import xxhash

from concept_config.fields import whole

from .layout import decode_json

SHARD_HASH = "xxh3_64"  # one of streaming's hash names (streaming.base.hashing)
INDEX_JSON = "index.json"
_HEX16 = re.compile(r"[0-9a-f]{16}")


class Damaged(Exception):
    """A dataset's files are not what its records say; the message says which file and how."""


def shard_hash(data) -> str:
    """The SHARD_HASH of a shard file's bytes (bytes, or any buffer: an mmap)."""
    return xxhash.xxh3_64_hexdigest(data)


def index_digest(index_bytes: bytes) -> str:
    """dataset.json's `index_digest`: the sha256 of index.json's bytes."""
    return hashlib.sha256(index_bytes).hexdigest()


def check_file(data, info: dict, name: str) -> None:
    """Raise Damaged unless `data` (the bytes of the file `info` describes: a shard entry's
    raw_data or zip_data, or streaming's FileInfo as a dict) has the recorded size and hash."""
    if len(data) != info["bytes"]:
        raise Damaged(f"{name} holds {len(data)} bytes; index.json records {info['bytes']}")
    if shard_hash(data) != info["hashes"][SHARD_HASH]:
        raise Damaged(f"{name}: its bytes do not match the {SHARD_HASH} hash index.json records")


def check_record(record: dict, n_tokens: int | None = None) -> None:
    """Raise Damaged unless dataset.json's fields that readers use have their types and ranges
    (`n_tokens`: the species vocabulary's size, which every gene id must be below)."""
    if not isinstance(record, dict):
        raise Damaged("dataset.json does not hold a JSON object")
    for key in ("cells_written", "n_shards"):
        if not whole(record.get(key)):
            raise Damaged(f"dataset.json's {key} is {record.get(key)!r}, not a non-negative integer")
    digest = record.get("index_digest")
    if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise Damaged(f"dataset.json's index_digest is {digest!r}, not a sha256")
    genes = record.get("genes")
    if not (isinstance(genes, list) and all(whole(g) for g in genes)):
        raise Damaged("dataset.json's genes is not a list of token ids")
    if any(b <= a for a, b in zip(genes, genes[1:])) or (n_tokens is not None and genes and genes[-1] >= n_tokens):
        raise Damaged(f"dataset.json's genes are not ascending token ids below the vocabulary's {n_tokens}")
    absent = record.get("obs_keys_absent", [])
    if not (isinstance(absent, list) and all(isinstance(k, str) for k in absent)):
        raise Damaged("dataset.json's obs_keys_absent is not a list of column names")
    if not isinstance(record.get("source_file", ""), str):
        raise Damaged("dataset.json's source_file is not a string")


def check_index(index_bytes: bytes, record: dict) -> list[dict]:
    """The `shards` of index.json, once its bytes are the ones dataset.json was published with and
    every field a reader uses is sound; else Damaged."""
    if index_digest(index_bytes) != record["index_digest"]:
        raise Damaged("index.json is not the one dataset.json was published with (replaced, edited or damaged)")
    try:
        index = decode_json(index_bytes)
    except ValueError as exc:
        raise Damaged(f"index.json is not valid JSON ({exc})") from None
    shards = index.get("shards") if isinstance(index, dict) else None
    if not isinstance(shards, list) or index.get("version") != 2:
        raise Damaged("index.json is not an MDS version 2 index")
    if len(shards) != record["n_shards"]:
        raise Damaged(f"index.json lists {len(shards)} shards, dataset.json {record['n_shards']}")
    for number, shard in enumerate(shards):
        _check_shard_entry(shard, number)
    listed = sum(shard["samples"] for shard in shards)
    if listed != record["cells_written"]:
        raise Damaged(f"index.json lists {listed} samples, dataset.json {record['cells_written']} cells")
    return shards


def _check_shard_entry(shard, number: int) -> None:
    raw = shard.get("raw_data") if isinstance(shard, dict) else None
    name = f"shard.{number:05d}.mds"
    if not (isinstance(raw, dict) and raw.get("basename") == name):
        raise Damaged(f"index.json's shard {number} is not named {name}")
    if not whole(shard.get("samples"), 1):
        raise Damaged(f"index.json's {name} holds {shard.get('samples')!r} samples, not a positive integer")
    zipped = shard.get("zip_data")
    compression = shard.get("compression")
    zstd = isinstance(compression, str) and compression.partition(":")[0] == "zstd"
    if (zipped is None) != (compression is None) or (compression is not None and not zstd):
        raise Damaged(f"index.json's {name} has compression {compression!r} and zip_data {zipped!r}")
    for info, expected in ((raw, name), (zipped, name + ".zstd")):
        if info is None:
            continue
        if not (
            isinstance(info, dict)
            and info.get("basename") == expected
            and whole(info.get("bytes"), 1)
            and isinstance(info.get("hashes"), dict)
            and isinstance(info["hashes"].get(SHARD_HASH), str)
            and _HEX16.fullmatch(info["hashes"][SHARD_HASH])
        ):
            raise Damaged(f"index.json's entry for {expected} lacks a size or its {SHARD_HASH} hash")
    names, encodings, sizes = (shard.get(k) for k in ("column_names", "column_encodings", "column_sizes"))
    if not (
        isinstance(names, list)
        and isinstance(encodings, list)
        and isinstance(sizes, list)
        and len(names) == len(encodings) == len(sizes)
        and all(isinstance(x, str) for x in names + encodings)
        and all(s is None or whole(s, 1) for s in sizes)
    ):
        raise Damaged(f"index.json's {name} has malformed column_names / column_encodings / column_sizes")


def check_dataset(
    read: Callable[[str], bytes], record: dict, n_tokens: int | None = None, full: bool = False, raw_copies: bool = True
) -> list[dict]:
    """The `shards` of the dataset's index.json; raise Damaged unless the dataset that
    `read(basename) -> bytes` reads is the one `record` (its dataset.json) describes: the fields of
    both and index.json's digest; with `full`, every shard file's hash too: each compressed file,
    and with `raw_copies` each raw copy beside it that exists (what streaming decompressed in
    place, and what training reads)."""
    check_record(record, n_tokens)
    try:
        index_bytes = read(INDEX_JSON)
    except FileNotFoundError:
        raise Damaged("index.json is missing") from None
    shards = check_index(index_bytes, record)
    if not full:
        return shards
    for shard in shards:
        for key in ("zip_data", "raw_data"):
            info = shard.get(key)
            if info is None or (key == "raw_data" and shard.get("zip_data") and not raw_copies):
                continue
            try:
                data = read(info["basename"])
            except FileNotFoundError:
                if key == "raw_data" and shard.get("zip_data"):
                    continue  # not decompressed (yet): nothing to check
                raise Damaged(f"{info['basename']} is missing") from None
            check_file(data, info, info["basename"])
    return shards
