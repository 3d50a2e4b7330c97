"""Write one row range of one source file as an MDS dataset (a "part").

The part is written into `part_<a>_<b>.tmp/` and renamed to `part_<a>_<b>/` only after the
MDS writer closed and `part.json` (its fingerprints and counts) is on disk, so a part
directory without `.tmp` is always complete; a killed writer leaves only a `.tmp` that the
next run deletes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from .cells import GeneMap, map_chunk
from .layout import DatasetLayout, remove_tree, write_json_atomic
from .source import AnnDataSource
from .vocabulary import Vocabulary


@dataclass
class PartSettings:
    """Everything besides the source and vocabulary that changes what a part contains."""

    obs_keys: list[str]
    chunk_size: int
    shard_size_limit: int
    compression: str | None
    allow_non_integral: bool

    def columns(self, vocab: Vocabulary) -> dict[str, str]:
        cols = {
            "genes": f"ndarray:{vocab.gene_dtype.name}",
            "counts": "ndarray",        # dtype per cell: the smallest that holds its counts
            "n_counts": "float64" if self.allow_non_integral else "int64",
            "cell_id": "str",
            "row": "int64",
        }
        cols.update({f"obs.{key}": "str" for key in self.obs_keys})
        return cols

    def digest_fields(self, vocab: Vocabulary) -> dict:
        return {"columns": self.columns(vocab), "allow_non_integral": self.allow_non_integral,
                "compression": self.compression}


def write_part(src: AnnDataSource, layout: DatasetLayout, gene_map: GeneMap, vocab: Vocabulary,
               start: int, end: int, settings: PartSettings, identity: dict, progress=None) -> dict:
    """Write rows [start, end) and return the part's record (also saved as part.json)."""
    from streaming import MDSWriter   # imports torch: seconds, so only when there is work

    tmp, final = layout.part_tmp(start, end), layout.part_dir(start, end)
    remove_tree(tmp)
    tmp.mkdir(parents=True)
    scratch = tmp / "scratch"
    scratch.mkdir()
    step = src.rows_per_read(settings.chunk_size)
    src.csc_prepare(start, end, step, scratch)
    integral = not settings.allow_non_integral
    written = empty = nonzeros = 0
    absent_obs: list[str] = []
    with MDSWriter(out=str(tmp / "mds"), columns=settings.columns(vocab), compression=settings.compression,
                   size_limit=settings.shard_size_limit, progress_bar=False) as out:
        for a in range(start, end, step):
            b = min(a + step, end)
            cells = map_chunk(src.sf.path, src.read_rows(a, b), a, gene_map, vocab, settings.allow_non_integral)
            cell_ids, obs, absent_obs = src.obs_strings(settings.obs_keys, a, b)
            obs_items = [(f"obs.{k}", v) for k, v in obs.items()]
            ip, genes, counts = cells.indptr, cells.genes, cells.counts
            for j, local in enumerate(cells.local.tolist()):
                s, e = int(ip[j]), int(ip[j + 1])
                sample = {
                    "genes": genes[s:e],
                    "counts": counts[s:e].astype(cells.count_dtype[j]),
                    "n_counts": int(cells.n_counts[j]) if integral else float(cells.n_counts[j]),
                    "cell_id": cell_ids[local],
                    "row": a + local,
                }
                for key, values in obs_items:
                    sample[key] = values[local]
                out.write(sample)
            written += len(cells.local)
            empty += cells.n_empty
            nonzeros += len(genes)
            if progress is not None:
                progress.update(b - a)
    remove_tree(scratch)
    shard_bytes = sum(f.stat().st_size for f in (tmp / "mds").iterdir())
    record = dict(identity, start=start, end=end, cells_written=written, cells_dropped_no_nonzero=empty,
                  nonzeros=nonzeros, shard_bytes=shard_bytes, obs_keys_absent=absent_obs)
    write_json_atomic(tmp / "part.json", record)
    remove_tree(final)       # a stale part of an older source, if any
    os.replace(tmp, final)   # the rename publishes the part
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
