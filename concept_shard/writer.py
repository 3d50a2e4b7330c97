"""Write one row range of one source file as an MDS dataset (a "part").

The part is written into `part_<a>_<b>.tmp/` and renamed to `part_<a>_<b>/` only after the
MDS index and `part.json` (its fingerprints and counts) are on disk, so a part directory
without `.tmp` is always complete; a killed writer leaves only a `.tmp` that the next run
deletes. Three things overlap: worker threads read, map and encode the entries of the next
chunks, this thread joins the current one's samples, and the MDS writer writes (and, with
compression, compresses) finished shards on its own thread.
"""

from __future__ import annotations

import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from . import entries
from .cells import GeneMap, map_chunk
from .layout import DatasetLayout, remove_tree, write_json_atomic
from .mds import MDSDatasetWriter, ndarray_prefix
from .source import AnnDataSource
from .vocabulary import Vocabulary

# Chunks read, mapped and encoded ahead on worker threads: numpy, scipy's sparse kernels and the
# varint kernel release the GIL, so two workers keep both cores of a small node busy beside the
# thread that joins the samples.
PREFETCH = 2


@dataclass
class PartSettings:
    """Everything besides the source and vocabulary that changes what a part contains."""

    obs_keys: list[str]
    chunk_size: int
    shard_size_limit: int
    compression: str | None
    allow_non_integral: bool
    entries: str = "varint"  # entries.py: varint (read in place) or arrays (the earlier format)

    def columns(self, vocab: Vocabulary) -> dict[str, str]:
        varint = self.entries == "varint"
        cols = {
            "genes": "bytes" if varint else f"ndarray:{vocab.gene_dtype.name}",
            # as varints, or an array in the smallest dtype that holds the cell's counts (float32
            # when non-integral counts are allowed)
            "counts": "bytes" if varint and not self.allow_non_integral else "ndarray",
            "n_counts": "float64" if self.allow_non_integral else "int64",
            "cell_id": "str",
            "row": "int64",
        }
        cols.update({f"obs.{key}": "str" for key in self.obs_keys})
        return cols

    def digest_fields(self, vocab: Vocabulary) -> dict:
        # (the entries' format shows in the columns: arrays keep the digests of datasets built
        # before varints)
        return {
            "columns": self.columns(vocab),
            "allow_non_integral": self.allow_non_integral,
            "compression": self.compression,
        }


class _CellEncoder:
    """Encodes the cells of a chunk into MDS sample bytes, equal to MDSDatasetWriter.encode_sample.

    Specialised for the shard schema: sorted column order is cell_id, counts, genes, n_counts,
    obs.* (sorted), row, with cell_id, counts, genes and obs.* of variable size.
    """

    def __init__(self, writer: MDSDatasetWriter, settings: PartSettings):
        self.obs_names = sorted(f"obs.{k}" for k in settings.obs_keys)
        expected = ["cell_id", "counts", "genes", "n_counts", *self.obs_names, "row"]
        if writer.names != expected:
            raise AssertionError(f"column order {writer.names} != {expected}")
        self.head = struct.Struct(f"<{3 + len(self.obs_names)}I").pack
        self.integral = not settings.allow_non_integral
        self.varint_genes = writer.encodings[writer.names.index("genes")] == "bytes"
        self.varint_counts = writer.encodings[writer.names.index("counts")] == "bytes"
        self._obs_bytes: dict[str, bytes] = {}

    def _str(self, value: str) -> bytes:
        b = self._obs_bytes.get(value)
        if b is None:
            b = self._obs_bytes[value] = value.encode("utf-8")
        return b

    def entries(self, cells) -> tuple[list, list]:
        """Each cell's genes and counts column as (array header, value bytes): the part of `encode`
        that runs on the reading threads (the varint kernel releases the GIL)."""
        genes = self._column(cells, cells.genes, self.varint_genes, True, None)
        counts = self._column(cells, cells.counts, self.varint_counts, False, cells.count_dtype)
        return genes, counts

    def encode(self, cells, row0: int, cell_ids: list[str], obs: dict[str, list[str]], columns) -> list[bytes]:
        """The chunk's samples; `columns`: what `entries(cells)` gave (on a reading thread)."""
        local = cells.local.tolist()
        # per-cell work hoisted into whole-chunk passes: each cell's genes and counts bytes, the
        # fixed-size columns and the strings; the loop below only joins slices
        genes, counts = columns
        n_counts = cells.n_counts.astype(np.int64 if self.integral else np.float64).tobytes()
        rows = (cells.local.astype(np.int64) + row0).tobytes()
        cids = [cell_ids[c].encode("utf-8") for c in local]
        obs_cols = [[self._str(v) for v in obs[name[4:]]] for name in self.obs_names]
        obs_rows = list(zip(*[[col[c] for c in local] for col in obs_cols])) if obs_cols else [()] * len(local)
        out = []
        append, head = out.append, self.head
        for j, (cid, (c_pre, c_bytes), (g_pre, g_bytes), obs_b) in enumerate(zip(cids, counts, genes, obs_rows)):
            append(
                b"".join(
                    [
                        head(len(cid), len(c_pre) + len(c_bytes), len(g_pre) + len(g_bytes), *map(len, obs_b)),
                        cid,
                        c_pre,
                        c_bytes,
                        g_pre,
                        g_bytes,
                        n_counts[8 * j : 8 * j + 8],
                        *obs_b,
                        rows[8 * j : 8 * j + 8],
                    ]
                )
            )
        return out

    @staticmethod
    def _column(cells, values: np.ndarray, varint: bool, delta: bool, dtypes) -> list[tuple[bytes, memoryview]]:
        """Each cell's (array header, value bytes) of one column: varints (entries.py, no header),
        else an `ndarray` of the vocabulary's dtype (genes: dtypes None) or of the cell's own."""
        ip = cells.indptr
        if varint:
            data, ends = entries.encode_cells(ip, values, delta)
            view, e = memoryview(data), ends.tolist()
            return [(b"", view[a:b]) for a, b in zip(e[:-1], e[1:])]
        starts, n_list = ip[:-1].tolist(), np.diff(ip).tolist()
        if dtypes is None:
            size, view = values.dtype.itemsize, memoryview(np.ascontiguousarray(values)).cast("B")
            return [(ndarray_prefix(None, n), view[s * size : (s + n) * size]) for s, n in zip(starts, n_list)]
        by_dtype = {dt: (dt.name, dt.itemsize, memoryview(values.astype(dt)).cast("B")) for dt in set(dtypes)}
        out = []
        for s, n, dt in zip(starts, n_list, dtypes):
            name, size, view = by_dtype[dt]
            out.append((ndarray_prefix(name, n), view[s * size : (s + n) * size]))
        return out


def write_part(
    src: AnnDataSource,
    layout: DatasetLayout,
    gene_map: GeneMap,
    vocab: Vocabulary,
    start: int,
    end: int,
    settings: PartSettings,
    identity: dict,
    progress=None,
    late=None,
) -> dict:
    """Write rows [start, end) and return the part's record (also saved as part.json). `late()`
    returns fields known only once the rows are written (the source's content hash, computed on
    a thread meanwhile)."""
    tmp, final = layout.part_tmp(start, end), layout.part_dir(start, end)
    remove_tree(tmp)
    tmp.mkdir(parents=True)
    scratch = tmp / "scratch"
    scratch.mkdir()
    step = src.rows_per_read(settings.chunk_size)
    src.csc_prepare(start, end, step, scratch)
    written = empty = nonzeros = 0
    absent_obs: list[str] = []

    def prepare(a: int):
        b = min(a + step, end)
        cells = map_chunk(src.path, src.read_rows(a, b), a, gene_map, vocab, settings.allow_non_integral)
        return a, b, cells, src.obs_strings(settings.obs_keys, a, b), encoder.entries(cells)

    chunk_starts = list(range(start, end, step))
    with (
        MDSDatasetWriter(tmp / "mds", settings.columns(vocab), settings.compression, settings.shard_size_limit) as out,
        ThreadPoolExecutor(PREFETCH, "shard-read") as pool,
    ):
        encoder = _CellEncoder(out, settings)
        # up to PREFETCH chunks are read, mapped and their entries encoded ahead while this thread
        # joins the samples
        pending = [pool.submit(prepare, a) for a in chunk_starts[:PREFETCH]]
        for i in range(len(chunk_starts)):
            a, b, cells, (cell_ids, obs, absent_obs), columns = pending.pop(0).result()
            if i + PREFETCH < len(chunk_starts):
                pending.append(pool.submit(prepare, chunk_starts[i + PREFETCH]))
            for sample in encoder.encode(cells, a, cell_ids, obs, columns):
                out.add(sample)
            written += len(cells.local)
            empty += cells.n_empty
            nonzeros += len(cells.genes)
            if progress is not None:
                progress.update(b - a)
    remove_tree(scratch)
    shard_bytes = sum(f.stat().st_size for f in (tmp / "mds").iterdir())
    record = dict(
        identity,
        start=start,
        end=end,
        cells_written=written,
        cells_dropped_no_nonzero=empty,
        nonzeros=nonzeros,
        shard_bytes=shard_bytes,
        obs_keys_absent=absent_obs,
        **(late() if late else {}),
    )
    write_json_atomic(tmp / "part.json", record)
    remove_tree(final)  # a stale part of an older source, if any
    os.replace(tmp, final)  # the rename publishes the part
    _remove_overlapping_parts(layout, start, end)
    return record


def _remove_overlapping_parts(layout: DatasetLayout, start: int, end: int) -> None:
    """Drop parts of an earlier plan (another part_size) that overlap this one, so the
    finished parts of a file always tile its rows without double counting."""
    for d in layout.parts_dir.glob("part_*_*"):
        if d.name.endswith(".tmp"):
            continue
        a, b = (int(x) for x in d.name.split("_")[1:3])
        if (a, b) != (start, end) and a < end and start < b:
            remove_tree(d)
