"""Join a file's finished parts into its dataset directory, and index each species.

Joining hard-links (or copies) the parts' shard files into `<stem>.join.tmp/` under sequential
names, writes one index.json (each shard's hash kept), swaps the directory into place and writes
dataset.json LAST, atomically, with the digest of that index.json. Parts are deleted only after
dataset.json exists, so a kill at any step leaves either the parts (a re-run joins again) or a
complete dataset.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from . import FORMAT_VERSION, __version__
from .integrity import index_digest
from .layout import DatasetLayout, read_json, remove_tree, write_json_atomic


def finished_parts(layout: DatasetLayout, identity: dict) -> dict[tuple[int, int], dict]:
    """Finished parts whose fingerprints match `identity` (source, vocabulary, settings)."""
    parts = {}
    if not layout.parts_dir.is_dir():
        return parts
    for d in layout.parts_dir.glob("part_*"):
        if d.name.endswith(".tmp"):
            continue
        rec = read_json(d / "part.json")
        if rec and all(rec.get(k) == v for k, v in identity.items()):
            parts[(rec["start"], rec["end"])] = rec
    return parts


class PartsMismatch(Exception):
    """The finished parts do not add up to the source file (a part lost shards, or was written by
    two processes at once): publishing them would lose cells for good."""


def check_parts(layout: DatasetLayout, ranges: list[tuple[int, int]], parts: dict, n_cells_source: int) -> None:
    """Before publishing: every part's index lists as many samples as it wrote cells, its shard
    files are on disk at the recorded size, and written + dropped cells add up to the source."""
    total = 0
    contents = {parts[r].get("source_content_hash") for r in ranges}
    if len(contents) > 1:
        raise PartsMismatch(
            "its parts were written from different contents of the source (it changed during the build)"
        )
    for start, end in ranges:
        rec, part = parts[(start, end)], layout.part_dir(start, end) / "mds"
        try:
            shards = json.loads((part / "index.json").read_text())["shards"]
        except (OSError, ValueError, KeyError) as exc:
            raise PartsMismatch(f"rows {start}-{end} have no readable index.json ({type(exc).__name__})") from None
        listed = sum(int(s["samples"]) for s in shards)
        if listed != rec["cells_written"]:
            raise PartsMismatch(f"rows {start}-{end} list {listed} samples but wrote {rec['cells_written']} cells")
        for shard in shards:
            stored = shard.get("zip_data") or shard["raw_data"]
            file = part / stored["basename"]
            if not file.is_file() or file.stat().st_size != int(stored["bytes"]):
                raise PartsMismatch(f"rows {start}-{end} lack shard {stored['basename']} or hold it truncated")
        if rec["cells_written"] + rec["cells_dropped_no_nonzero"] != end - start:
            raise PartsMismatch(
                f"rows {start}-{end} account for {rec['cells_written']} written and "
                f"{rec['cells_dropped_no_nonzero']} dropped cells, not {end - start}"
            )
        total += end - start
    if total != n_cells_source:
        raise PartsMismatch(f"the parts cover {total} of the source's {n_cells_source} cells")


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # filesystems without hard links, or across devices
        shutil.copy2(src, dst)


def join_parts(layout: DatasetLayout, ranges: list[tuple[int, int]], parts: dict, dataset_info: dict) -> dict:
    """Publish the dataset made of `ranges` (all finished, checked by `check_parts` first). Returns
    the dataset.json record. Called under the file's join lock."""
    check_parts(layout, ranges, parts, int(dataset_info["n_cells_source"]))
    join = layout.dataset_dir.with_name(layout.dataset_dir.name + ".join.tmp")
    remove_tree(join)
    join.mkdir(parents=True)
    index_shards = []
    for start, end in ranges:
        part = layout.part_dir(start, end) / "mds"
        for shard in json.loads((part / "index.json").read_text())["shards"]:
            stored = (shard.get("zip_data") or shard["raw_data"])["basename"]  # the file on disk
            for key in ("raw_data", "zip_data"):
                if shard.get(key):  # shard.00003.mds[.zstd] -> shard.<dataset-wide number>.mds[.zstd]
                    name = shard[key]["basename"]
                    shard[key]["basename"] = f"shard.{len(index_shards):05d}." + name.split(".", 2)[2]
            _link_or_copy(part / stored, join / (shard.get("zip_data") or shard["raw_data"])["basename"])
            index_shards.append(shard)
    write_json_atomic(join / "index.json", {"version": 2, "shards": index_shards})
    recs = [parts[r] for r in ranges]
    record = dict(dataset_info)
    record.update(
        format_version=FORMAT_VERSION,
        created_by=f"concept-shard {__version__}",
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        parts=[[a, b] for a, b in ranges],
        cells_written=sum(r["cells_written"] for r in recs),
        cells_dropped={"no_nonzero_in_vocabulary": sum(r["cells_dropped_no_nonzero"] for r in recs)},
        nonzeros=sum(r["nonzeros"] for r in recs),
        n_shards=len(index_shards),
        index_digest=index_digest((join / "index.json").read_bytes()),  # binds the shards' hashes (integrity.py)
        shard_bytes=sum(f.stat().st_size for f in join.iterdir() if f.name.startswith("shard.")),
        obs_keys_absent=sorted({k for r in recs for k in r.get("obs_keys_absent", [])}),
    )
    old = layout.dataset_dir.with_name(layout.dataset_dir.name + f".old.{os.getpid()}.tmp")
    if layout.dataset_dir.exists():
        os.replace(layout.dataset_dir, old)
    os.replace(join, layout.dataset_dir)
    write_json_atomic(layout.dataset_json, record)  # LAST: its presence means complete
    remove_tree(old)
    remove_tree(layout.parts_dir)
    return record


def write_species_indexes(shards_root: Path) -> dict[str, int]:
    """`SHARDS/<species>/index.json` over every complete dataset of the species (merge_index style).

    Lets a user stream a whole species as one `StreamingDataset(local=SHARDS/<species>)`; the
    per-file datasets stay the unit of training streams. Written atomically; idempotent.
    """
    counts = {}
    for species_dir in sorted(p for p in Path(shards_root).iterdir() if p.is_dir() and not p.name.startswith(".")):
        index, listed = species_index(species_dir.name, _complete_datasets(species_dir))
        write_json_atomic(species_dir / "index.json", index)
        write_json_atomic(species_dir / "datasets.json", listed)
        counts[species_dir.name] = len(listed["datasets"])
    return counts


def _complete_datasets(species_dir: Path):
    """(`<source>/<stem>`, dataset.json, index.json) of each complete dataset of a species, in order."""
    for ds_json in sorted(species_dir.glob("*/*/dataset.json")):
        ds_dir = ds_json.parent
        if ds_dir.name.endswith(".tmp") or ds_dir.parent.name.startswith("."):
            continue  # the previous version of a dataset whose join was killed, not a dataset
        info = read_json(ds_json)
        yield ds_dir.relative_to(species_dir).as_posix(), info, json.loads((ds_dir / "index.json").read_text())


def species_index(species: str, datasets) -> tuple[dict, dict]:
    """(index.json, datasets.json) of a species from its datasets, given as (`<source>/<stem>`,
    dataset.json, index.json): every dataset's shards listed under its path, as streaming's
    merge_index does. The one format of a species index, local (above) or remote (remote.py)."""
    shards, listed = [], []
    for rel, info, index in datasets:
        for shard in index["shards"]:
            for key in ("raw_data", "zip_data"):
                if shard.get(key):
                    shard[key]["basename"] = f"{rel}/{shard[key]['basename']}"
            shards.append(shard)
        listed.append({"path": rel, "cells": info["cells_written"], "source_file": info["source_file"]})
    return {"version": 2, "shards": shards}, {"species": species, "datasets": listed}
