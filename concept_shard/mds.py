"""Write MosaicML Streaming MDS datasets fast, byte for byte as `streaming.MDSWriter` does.

Why not `MDSWriter` itself: its per-sample `write()` encodes every column through a generic
dispatcher (~75 us per cell here) and compresses shards on the calling thread, which caps a
sharding process far below the 20,000 cells/s target; importing `streaming` also loads torch and
transformers (6 s, 700 MB per array task). This module writes the same format (MDS version 2:
shard = num_samples:u32, offsets:u32[n+1], JSON config, samples; sample = u32 sizes of the
variable-size columns, then each column's bytes in sorted column order; `index.json` as
`MDSWriter` writes it) from pre-encoded pieces, and compresses finished shards on a worker
thread (zstd releases the GIL). `tests/shard/test_mds.py` checks that both writers produce identical
files, and every test reads shards back with `streaming.StreamingDataset`.

Supported column encodings: `str`, `bytes`, `int64`, `float64`, `ndarray` (dtype per sample) and
`ndarray:<dtype>`, all for 1-D arrays. The `genes` and `counts` columns of encoding `bytes` hold
varints (entries.py), which `SampleDecoder` returns as arrays. Reading: `SampleDecoder` decodes
one sample (the training store hands it the bytes streaming fetched); `read_rows` reads chosen rows
of a dataset in memory, checking each shard file it reads against its hash in index.json.
"""

from __future__ import annotations

import json
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cache
from pathlib import Path

import numpy as np

from . import entries
from .integrity import SHARD_HASH, check_file, shard_hash

# streaming's NDArray codes (streaming/base/format/mds/encodings.py); part of the on-disk format
VALUE_DTYPE_CODE = {
    "uint8": 8,
    "int8": 9,
    "uint16": 16,
    "int16": 17,
    "float16": 18,
    "uint32": 32,
    "int32": 33,
    "float32": 34,
    "uint64": 64,
    "int64": 65,
    "float64": 66,
}
FIXED_SIZE = {"int64": 8, "float64": 8}
ZSTD_LEVELS = range(1, 23)


@cache
def ndarray_prefix(dtype: str | None, length: int) -> bytes:
    """Header of a 1-D array of `length` values: [dtype code if dynamic][ndim<<2 | shape dtype][shape]."""
    if length <= 0:
        raise ValueError("MDS cannot encode an empty array")
    head = bytes([VALUE_DTYPE_CODE[dtype]]) if dtype is not None else b""
    for code, fmt in enumerate(("<B", "<H", "<I", "<Q")):
        if length < 1 << (8 << code):
            return head + bytes([(1 << 2) | code]) + struct.pack(fmt, length)
    raise ValueError(f"array too long: {length}")


def parse_compression(compression: str | None) -> int | None:
    """zstd level for 'zstd' (3, streaming's default) or 'zstd:N'; None for no compression."""
    if not compression:
        return None
    name, _, level = compression.partition(":")
    if name != "zstd" or (level and int(level) not in ZSTD_LEVELS):
        raise ValueError(f"unsupported shard compression {compression!r}: use zstd or zstd:1..22 (or null)")
    return int(level) if level else 3


class MDSDatasetWriter:
    """Collect encoded samples into shards; `finish()` waits for compression and writes index.json."""

    def __init__(self, out_dir: Path, columns: dict[str, str], compression: str | None, size_limit: int):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.names = sorted(columns)
        self.encodings = [columns[n] for n in self.names]
        for enc in self.encodings:
            if not (
                enc in ("str", "bytes")
                or enc in FIXED_SIZE
                or enc == "ndarray"
                or (enc.startswith("ndarray:") and enc.split(":")[1] in VALUE_DTYPE_CODE)
            ):
                raise ValueError(f"unsupported MDS encoding {enc!r}")
        self.sizes = [FIXED_SIZE.get(enc) for enc in self.encodings]
        self.compression, self.size_limit = compression, size_limit
        self.level = parse_compression(compression)
        self.config = {
            "version": 2,
            "format": "mds",
            "compression": compression,
            "hashes": [SHARD_HASH],  # each file's hash in index.json (integrity.py)
            "size_limit": size_limit,
            "column_names": self.names,
            "column_encodings": self.encodings,
            "column_sizes": self.sizes,
        }
        self.config_data = json.dumps(self.config, sort_keys=True).encode("utf-8")
        self._shard_overhead = 4 + 4 + len(self.config_data)
        self._samples: list[bytes] = []
        self._shard_size = self._shard_overhead
        self._entries: list[Future | dict] = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mds-compress")

    def add(self, sample: bytes) -> None:
        """Append one encoded sample (`encode_sample` or the caller's own fast encoder)."""
        size = len(sample) + 4
        # same rule as MDSWriter.write, except that a lone oversized sample never flushes an empty shard
        if self.size_limit and self.size_limit < self._shard_size + size and self._samples:
            self._flush()
        self._samples.append(sample)
        self._shard_size += size

    def encode_sample(self, sample: dict) -> bytes:
        """Generic encoder for one sample dict (the reference for fast callers; used in tests)."""
        sizes, data = [], []
        for name, enc, fixed in zip(self.names, self.encodings, self.sizes):
            value = sample[name]
            if enc == "str":
                datum = value.encode("utf-8")
            elif enc == "bytes":
                datum = bytes(value)
            elif enc in FIXED_SIZE:
                datum = np.array(value, dtype=enc).tobytes()
            else:
                arr = np.ascontiguousarray(value)
                fixed_dtype = enc.split(":")[1] if ":" in enc else None
                if fixed_dtype is not None and arr.dtype.name != fixed_dtype:
                    raise ValueError(f"column {name}: expected {fixed_dtype}, got {arr.dtype.name}")
                datum = ndarray_prefix(None if fixed_dtype else arr.dtype.name, arr.size) + arr.tobytes()
            if fixed is None:
                sizes.append(len(datum))
            data.append(datum)
        return struct.pack(f"<{len(sizes)}I", *sizes) + b"".join(data)

    def _flush(self) -> None:
        samples, self._samples, self._shard_size = self._samples, [], self._shard_overhead
        index = len(self._entries)
        # bound memory: at most one shard waits for the compressor while the next one fills
        if len(self._entries) >= 2 and isinstance(self._entries[-2], Future):
            self._entries[-2].result()
        self._entries.append(self._pool.submit(self._write_shard, index, samples))

    def _write_shard(self, index: int, samples: list[bytes]) -> dict:
        n = len(samples)
        offsets = np.zeros(n + 1, np.uint32)
        np.cumsum([len(s) for s in samples], out=offsets[1:])
        offsets += 4 + 4 * (n + 1) + len(self.config_data)
        raw = b"".join([np.uint32(n).tobytes(), offsets.tobytes(), self.config_data, *samples])
        raw_name = f"shard.{index:05d}.mds"
        raw_info = {"basename": raw_name, "bytes": len(raw), "hashes": {SHARD_HASH: shard_hash(raw)}}
        entry = {"samples": n, "raw_data": raw_info, "zip_data": None}
        data, name = raw, raw_name
        if self.level is not None:
            import zstd

            data = zstd.compress(raw, self.level)
            name = raw_name + ".zstd"
            entry["zip_data"] = {"basename": name, "bytes": len(data), "hashes": {SHARD_HASH: shard_hash(data)}}
        with open(self.out / name, "wb") as fh:
            fh.write(data)
        entry.update(self.config)
        return entry

    def finish(self) -> list[dict]:
        """Write the last shard and index.json; returns the shard entries."""
        if self._samples:
            self._flush()
        entries = [e.result() if isinstance(e, Future) else e for e in self._entries]
        self._pool.shutdown(wait=True)
        with open(self.out / "index.json", "w") as fh:
            json.dump({"version": 2, "shards": entries}, fh, sort_keys=True)
        return entries

    def abort(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.finish()
        else:
            self.abort()


# ---- reading ---------------------------------------------------------------------------------
CODE_DTYPE = {code: np.dtype(name) for name, code in VALUE_DTYPE_CODE.items()}
_SHAPE_FORMATS = ("<B", "<H", "<I", "<Q")


class SampleDecoder:
    """Decode one MDS sample of a shard into a dict of columns: the inverse of `encode_sample`.

    Used by the training store (over the bytes streaming hands it) and by `read_rows`. Specialised
    to the shard schema, it handles the encodings written here (1-D `ndarray[:dtype]`, `str`,
    `int64`, `float64`) directly: streaming's generic per-column dispatch costs ~50 us per cell,
    half the loader's time. Any other encoding goes to streaming's own decoder (imported only
    then: importing streaming loads torch). `tests/train/data/test_data_store.py` checks both agree.
    """

    def __init__(self, column_names, column_encodings, column_sizes):
        self.columns = list(zip(column_names, column_encodings, column_sizes))
        self.n_var = sum(1 for _, _, size in self.columns if not size)
        self.header = struct.Struct(f"<{self.n_var}I")
        self._fallback = None
        if any(not native_encoding(enc) for _, enc, _ in self.columns):
            from streaming.base.format.mds.encodings import mds_decode

            self._fallback = mds_decode

    def __call__(self, data: bytes, wanted=None) -> dict:
        """The sample's columns (only those in `wanted`, when given)."""
        var_sizes = iter(self.header.unpack_from(data, 0))
        pos, out = self.header.size, {}
        for name, enc, size in self.columns:
            size = size or next(var_sizes)
            if wanted is not None and name not in wanted:
                pass
            elif enc == "str":
                out[name] = data[pos : pos + size].decode()
            elif enc == "bytes":
                delta = entries.DELTA.get(name)
                raw = data[pos : pos + size]
                out[name] = bytes(raw) if delta is None else entries.decode(raw, delta, entries.MIN_DTYPE[name])
            elif enc == "int64":
                out[name] = np.int64(int.from_bytes(data[pos : pos + 8], "little", signed=True))
            elif enc == "float64":
                out[name] = np.float64(struct.unpack_from("<d", data, pos)[0])
            elif enc.startswith("ndarray") and native_encoding(enc):
                out[name] = _ndarray(enc, data, pos, size)
            else:
                out[name] = self._fallback(enc, data[pos : pos + size])
            pos += size
        return out


def native_encoding(enc: str) -> bool:
    """Whether a column of encoding `enc` is read here, not by streaming's generic decoder: the
    encodings this module writes. The training store's kernels (decode.py) read the same ones."""
    return enc in ("str", "bytes", "int64", "float64", "ndarray") or (
        enc.startswith("ndarray:") and enc.count(":") == 1
    )


def _ndarray(enc: str, data: bytes, pos: int, size: int) -> np.ndarray:
    """Inverse of `ndarray_prefix(...) + array bytes` at data[pos:pos + size]."""
    end = pos + size
    if enc == "ndarray":
        dtype = CODE_DTYPE[data[pos]]
        pos += 1
    else:
        dtype = _ENC_DTYPE.get(enc) or _ENC_DTYPE.setdefault(enc, np.dtype(enc.split(":")[1]))
    head = data[pos]
    shape_of = _SHAPES.get(head)
    if shape_of is None:  # the shape header's struct, made once per (ndim, width)
        ndim, fmt = head >> 2, _SHAPE_FORMATS[head & 3]
        shape_of = _SHAPES[head] = struct.Struct(f"<{ndim}{fmt[1]}")
    shape = shape_of.unpack_from(data, pos + 1)
    pos += 1 + shape_of.size
    return np.frombuffer(data, dtype, count=(end - pos) // dtype.itemsize, offset=pos).reshape(shape)


_ENC_DTYPE: dict[str, np.dtype] = {}
_SHAPES: dict[int, struct.Struct] = {}


def read_shard_index(read_file) -> list[dict]:
    """The `shards` list of a dataset's `index.json` (`read_file(basename) -> bytes`)."""
    return json.loads(read_file("index.json"))["shards"]


def read_rows(read_file, rows, columns: list[str], shards: list[dict] | None = None):
    """Yield (row, {column: value}) for the ascending dataset `rows`, each shard read once, in memory;
    a shard holding none of them is not read.

    `read_file(basename) -> bytes` reads a file of the dataset directory (local or remote);
    `index.json` (or `shards`, its list when the caller has read it) says which shard holds which
    rows and how its samples are encoded. The samples
    of one MDS v2 shard: u32 count, u32 offsets[count + 1], then each sample as u32 sizes of its
    variable-size columns followed by every column's bytes in column order.
    """
    import zstd

    rows = np.asarray(rows, np.int64)
    if len(rows) == 0:
        return
    if (np.diff(rows) <= 0).any() or rows[0] < 0:
        raise ValueError("read_rows needs ascending, distinct, non-negative rows")
    if shards is None:
        shards = read_shard_index(read_file)
    total = sum(int(shard["samples"]) for shard in shards)
    if rows[-1] >= total:
        raise ValueError(f"row {rows[-1]} asked, but index.json lists {total} samples")
    first = 0
    for shard in shards:
        n = int(shard["samples"])
        mine = rows[(rows >= first) & (rows < first + n)] - first
        if len(mine):
            compression = shard.get("compression")
            if compression and compression.partition(":")[0] != "zstd":
                raise ValueError(f"shard compression {compression!r} is not supported (only zstd)")
            stored = shard.get("zip_data") or shard["raw_data"]  # the file that is always there
            raw = read_file(stored["basename"])
            check_file(raw, stored, stored["basename"])  # integrity.Damaged when it is not the file written
            if shard.get("zip_data"):
                raw = zstd.decompress(raw)
            held = struct.unpack_from("<I", raw, 0)[0]
            if held != n:
                raise ValueError(f"shard {shard['raw_data']['basename']} holds {held} samples, index.json says {n}")
            decode = SampleDecoder(shard["column_names"], shard["column_encodings"], shard["column_sizes"])
            offsets = np.frombuffer(raw, np.uint32, count=n + 1, offset=4)
            wanted = set(columns)
            for r in mine:
                yield first + int(r), decode(raw[offsets[r] : offsets[r + 1]], wanted)
        first += n
