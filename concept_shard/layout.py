"""Where a source file's shard dataset, its in-progress parts and its markers live.

    SHARDS/<species>/<source>/<stem>/                 the dataset (complete iff dataset.json)
    SHARDS/<species>/<source>/.parts/<stem>/part_<start>_<end>/        a finished row range
    SHARDS/<species>/<source>/.parts/<stem>/part_<start>_<end>.tmp/    one being written
    SHARDS/<species>/<source>/.parts/<stem>/failed_<start>.json        why a range failed
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .splits import SourceFile


class DatasetLayout:
    def __init__(self, shards_root: Path, sf: SourceFile):
        self.root = Path(shards_root)
        self.dataset_dir = self.root / sf.species / sf.source_name / sf.stem
        self.parts_dir = self.root / sf.species / sf.source_name / ".parts" / sf.stem

    @property
    def dataset_json(self) -> Path:
        return self.dataset_dir / "dataset.json"

    def part_dir(self, start: int, end: int) -> Path:
        return self.parts_dir / f"part_{start:012d}_{end:012d}"

    def part_tmp(self, start: int, end: int) -> Path:
        return self.parts_dir / f"part_{start:012d}_{end:012d}.tmp"

    def failed_marker(self, start: int) -> Path:
        return self.parts_dir / f"failed_{start:012d}.json"

    def failures(self) -> list[dict]:
        return [read_json(p) for p in sorted(self.parts_dir.glob("failed_*.json"))] if self.parts_dir.is_dir() else []


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_json_atomic(path: Path, obj) -> None:
    """Write to a temp file in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
