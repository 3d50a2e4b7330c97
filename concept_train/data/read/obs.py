"""One obs column (`obs.<key>`) of every cell of a shard dataset, read in bulk for batch grouping.

`within_group_sampling` needs the group of every cell of a loader before the first batch. The
sample store decodes one sample at a time (~5 us of Python per cell), so here each shard is read
whole and the column is cut out of all its samples at once with numpy: the shard's offsets give
every sample's start, the u32 size header of each sample gives the column's position and length,
and one fancy index copies all values into a fixed-width bytes array (`S<width>`), whose
`np.unique` gives categories and codes. No Python runs per cell.

What it costs: a column is read from every shard of the file. Shards of the earlier format are
zstd-compressed whole, so there it cannot be read without decompressing every shard (genes and
counts included); the default shards (varint entries, uncompressed) are read as they are. Measured with
`python tests/train/data/bench_obs_columns.py DIR` (200,000 synthetic cells of the shard layout,
1,000-2,000 nonzeros, 4.6 kB raw and 3.9 kB compressed per cell) on a shared, loaded 2-core
machine: 15-24 s per million cells from compressed shards (decompression at ~200 MB/s is nearly
all of it: the per-sample decoder is no slower there), 2.5-3.3 s per million cells once streaming
has decompressed them (`shard.NNNNN.mds` next to the `.zstd`, read as they are; the per-sample
decoder needs ~20 s there too, as it always decompresses). Grouping the codes (groups.py) adds
0.4-0.8 s per million cells. The codes are kept next to the shards (`column_codes(cache_dir=)`):
the next start (a resume, a later run) reads them in 0.01 s per
million cells. A sidecar obs table written by the sharder would remove the first read too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from concept_shard.errors import DataError

Reader = Callable[[str], bytes]
MISSING = b""  # the sharder writes a missing obs value as an empty string
CACHE_DIR = ".obs_codes"


def obs_columns(read: Reader) -> list[str]:
    """The obs keys a dataset's shards hold (`obs.<key>` columns), from its index.json."""
    shards = json.loads(read("index.json"))["shards"]
    names = shards[0]["column_names"] if shards else []
    return sorted(n[4:] for n in names if n.startswith("obs."))


def _shard_bytes(read: Reader, shard: dict) -> bytes:
    raw_name = shard["raw_data"]["basename"]
    if shard.get("zip_data"):
        try:  # decompressed by streaming already (complete: it renames into place)
            raw = read(raw_name)
            if len(raw) == int(shard["raw_data"]["bytes"]):
                return raw
        except (FileNotFoundError, OSError):
            pass
        import zstd

        return zstd.decompress(read(shard["zip_data"]["basename"]))
    return read(raw_name)


def _str_column(raw: bytes, shard: dict, column: str) -> np.ndarray:
    """Every sample's `column` (a `str` column) of one raw MDS shard, as fixed-width bytes."""
    buf = np.frombuffer(raw, np.uint8)
    n = struct.unpack_from("<I", raw, 0)[0]
    if n == 0:
        return np.zeros(0, "S1")
    starts = np.frombuffer(raw, "<u4", count=n + 1, offset=4)[:-1].astype(np.int64)
    sizes = shard["column_sizes"]
    n_var = sum(1 for s in sizes if not s)
    header = buf[starts[:, None] + np.arange(4 * n_var)].view("<u4").astype(np.int64)  # [n, n_var]
    pos, k = starts + 4 * n_var, 0
    for name, size in zip(shard["column_names"], sizes):
        length = header[:, k] if not size else size
        if name == column:
            break
        pos = pos + length
        k += 0 if size else 1
    else:
        raise KeyError(column)
    width = int(length.max())
    if width == 0:
        return np.zeros(n, "S1")
    cols = np.arange(width)
    chars = buf[np.minimum(pos[:, None] + cols, len(buf) - 1)]
    chars[cols[None, :] >= length[:, None]] = 0
    return np.ascontiguousarray(chars).view(f"S{width}").ravel()


def column_codes(
    read: Reader, key: str, where: str, threads: int = 4, cache_dir: Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(categories as bytes, ascending; codes int32 per cell, -1 where the value is missing) of the
    obs column `key` of one dataset. A DataError names the key and the columns there are when the
    shards have no such column.

    With `cache_dir` (the dataset's local directory) the result is kept there as
    `.obs_codes/<key>.<digest of index.json>.npz`, so the next start (a resume, a later run) reads
    ~4 MB per million cells instead of every shard. A rebuilt dataset has
    another index.json, hence another file; a directory that cannot be written is not an error."""
    index = read("index.json")
    cache = None
    if cache_dir is not None:
        digest = hashlib.sha256(index).hexdigest()[:16]
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", key) + "-" + hashlib.sha256(key.encode()).hexdigest()[:6]
        cache = Path(cache_dir) / CACHE_DIR / f"{safe}.{digest}.npz"
        try:
            with np.load(cache) as held:
                return held["categories"], held["codes"]
        except (OSError, KeyError, ValueError):
            pass
    categories, codes = _column_codes(index, read, key, where, threads)
    if cache is not None:
        try:
            cache.parent.mkdir(exist_ok=True)
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as fh:
                np.savez(fh, categories=categories, codes=codes)
            os.replace(tmp, cache)
        except OSError:
            pass
    return categories, codes


def _column_codes(index: bytes, read: Reader, key: str, where: str, threads: int) -> tuple[np.ndarray, np.ndarray]:
    shards = json.loads(index)["shards"]
    column = f"obs.{key}"
    if shards and column not in shards[0]["column_names"]:
        have = sorted(n[4:] for n in shards[0]["column_names"] if n.startswith("obs."))
        raise DataError(
            where,
            f"names the obs key '{key}', which the shards do not hold (their obs columns: "
            f"{have + ['dataset (the input file)']}).",
            "Use one of those, or add the key to datamodule.obs_keys and rebuild the shards (`concept-shard build`).",
        )

    def one(shard):
        return _str_column(_shard_bytes(read, shard), shard, column)

    if len(shards) > 1 and threads > 1:
        with ThreadPoolExecutor(min(threads, len(shards))) as pool:
            parts = list(pool.map(one, shards))
    else:
        parts = [one(s) for s in shards]
    values = np.concatenate(parts) if parts else np.zeros(0, "S1")
    categories, codes = np.unique(values, return_inverse=True)
    codes = codes.astype(np.int32).ravel()
    if len(categories) and categories[0] == MISSING:  # b"" sorts first
        categories, codes = categories[1:], codes - 1
    return categories, codes
