"""Which shard datasets each loader reads, checked against their sources before training starts.

A loader's split list (scConcept format) names source files; `concept-shard` wrote one MDS
dataset per file under `PATH.SHARDS_PATH/<species>/<source>/<stem>/`. Here every listed file is
resolved to that dataset, and a dataset that is missing, half-written or stale (its `dataset.json`
fingerprints no longer match the source file or the token mapping) stops start-up with one error
that lists them all and says which command rebuilds them.

With `PATH.SHARDS_REMOTE` (s3://...) the datasets are read from there: `dataset.json` is fetched
for the checks, and each dataset gets a local cache directory for streaming under
`PATH.LOCAL_DIR` (default `PROJECT_PATH/shard_cache`), named after the remote URL and a digest of
the `dataset.json`. streaming trusts whatever `index.json` a cache directory already holds, so a
dataset rebuilt remotely must get a new directory rather than the old one.

Local shards are read in place, unless `datamodule.cache_limit` is set: then they take the same
path as remote ones, the local dataset directory being the "remote" (streaming copies a shard's
`.zstd` into the cache, decompresses it there, deletes the copy and evicts least recently used
shards). Read in place (read/local.py), a decompressed copy of every shard read stays beside the
shards, about twice their size, for good; through the cache the disk used stays the shards
plus the limit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from concept_config.data import DataModuleKeys
from concept_config.project import PathKeys
from concept_shard.datasets import Expectation, ShardStore
from concept_shard.errors import DataError
from concept_shard.splits import SourceFile, loader_sources
from concept_shard.vocabulary import Vocabulary, load_vocabulary


@dataclass
class ShardSet:
    """One input file's shard dataset, as a loader sees it."""

    dataset_id: str  # <species>/<source_name>/<stem>, stable across runs
    species: str
    directory: Path  # the dataset (local shards) or its local cache (remote shards)
    n_samples: int
    genes: np.ndarray  # the file's in-vocabulary genes as token ids, ascending
    source_file: str
    weights: dict = field(default_factory=dict)  # `proportion` / `repeat` of its split entry
    # what streaming copies shards from into `directory`: s3://.../<species>/<source>/<stem> for
    # object storage, the local dataset directory under datamodule.cache_limit, else None
    remote: str | None = None
    obs_keys_absent: tuple = ()  # obs keys the source file had no column for

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @property
    def dataset_dir(self) -> Path | None:
        """The dataset's own directory on this machine (what `concept-shard build` wrote, not a
        cache of it), or None for a dataset in object storage."""
        if self.remote is None:
            return Path(self.directory)
        return None if "://" in self.remote else Path(self.remote)


class Catalog:
    """All shard datasets of all loaders of a composed config, and the species' vocabularies."""

    def __init__(self, paths: PathKeys, dm: DataModuleKeys, log=print):
        self.paths, self.dm, self.log = paths, dm, log
        self.store = ShardStore.from_paths(paths)
        self.remote = self.store.remote
        # PATH.LOCAL_DIR, else the node-local scratch a launcher names (tools/slurm/train.sbatch
        # exports CONCEPT_LOCAL_DIR, so a LOCAL_DIR set in a YAML file still wins)
        local_dir = Path(
            paths.LOCAL_DIR or os.environ.get("CONCEPT_LOCAL_DIR") or Path(paths.PROJECT_PATH) / "shard_cache"
        )
        self.cache_local = self.remote is None and dm.cache_limit is not None
        if self.remote is not None:
            self.cache_root = local_dir / self.remote.bucket / self.remote.prefix
        elif self.cache_local:  # one cache per shards root, wherever LOCAL_DIR is shared
            root = str(self.store.root.resolve())
            self.cache_root = local_dir / "local" / hashlib.sha256(root.encode()).hexdigest()[:12]
        self.vocabs: dict[str, Vocabulary] = {}
        self._sets: dict[str, ShardSet] = {}
        # off (`datamodule.check_sources=false`) where the shards were copied to this machine, or
        # live in object storage, without the source files they were built from; `true` trusts a
        # source whose size and mtime are unchanged, `full` reads every source (datasets.py)
        mode = dm.check_sources
        self._check_sources, self._quick = mode is not False, mode is True

    def vocab(self, species: str) -> Vocabulary:
        if species not in self.vocabs:
            self.vocabs[species] = load_vocabulary(Path(self.paths.GENE_MAPPINGS_PATH), species)
        return self.vocabs[species]

    def loader(self, list_key: str, default_section: str) -> list[ShardSet]:
        """The shard datasets of one loader's split list, in config order; raises DataError listing
        every file whose dataset is not usable."""
        sources, errors = loader_sources(self.paths, self.dm, list_key, default_section)
        if errors:
            raise DataError(
                list_key,
                "has invalid split entries: " + " ".join(e.paragraph() for e in errors),
                "Fix the split YAMLs (`concept-shard status` reports the same problems).",
            )
        if not sources:
            raise DataError(list_key, "lists no files.", "Add files to the split's train/val lists.")
        out, problems, sources_gone = [], [], 0
        for sf, weights in sources:
            try:
                out.append(self._shard_set(sf, weights))
            except _NotUsable as exc:
                problems.append(f"{sf.dataset_id} ({sf.name}): {exc.problem.reason}")
                sources_gone += exc.problem.source_gone
        if problems:
            shown = "; ".join(problems[:20]) + (f"; ... and {len(problems) - 20} more" if len(problems) > 20 else "")
            rebuild = (
                f"Run `concept-shard build {self.paths.PROJECT_PATH}` with the same --config-dir "
                "and overrides as this run, then start again."
            )
            copied = (
                "If the shards were copied to this machine without their source files, add "
                "`datamodule.check_sources=false` to train from them as they are."
            )
            if sources_gone == len(problems):  # the shards are there, only their sources are not
                raise DataError(
                    list_key,
                    f"names {len(problems)} file(s) whose source is not on this machine: {shown}.",
                    f"{copied} Otherwise put the files back where they were sharded from.",
                )
            raise DataError(
                list_key,
                f"names {len(problems)} file(s) whose shards are missing, stale or damaged: {shown}.",
                rebuild + (f" {copied}" if sources_gone else ""),
            )
        empty = [s for s in out if s.n_samples == 0]
        if empty:  # a file whose cells all lacked in-vocabulary genes: no stream can hold it
            for s in empty:
                self._sets.pop(s.dataset_id, None)
            if len(empty) == len(out):
                raise DataError(
                    list_key,
                    f"names only files whose shards hold no cells: {', '.join(s.dataset_id for s in empty[:10])}.",
                    "Add files with cells (`concept-shard status` and each dataset.json say why cells were dropped).",
                )
            self.log(
                f"[data] {list_key}: skipping {len(empty)} file(s) whose shards hold no cells: "
                f"{', '.join(s.dataset_id for s in empty[:10])}"
            )
            out = [s for s in out if s.n_samples > 0]
        return out

    def _shard_set(self, sf: SourceFile, weights: dict) -> ShardSet:
        if sf.dataset_id in self._sets:
            return replace(self._sets[sf.dataset_id], weights=dict(weights))
        # the shard settings are not checked: the reader takes whatever columns the shards hold
        source = sf.path if self._check_sources and sf.lamindb_key is None else None
        record, problem = self.store.check(sf, Expectation(self.vocab(sf.species), source, quick=self._quick))
        if problem is not None:
            raise _NotUsable(problem)
        directory, remote = self.store.local(sf).dataset_dir, None
        if self.remote is not None:
            directory, remote = self._cache_dir(sf.dataset_id, record), self.remote.url_of(sf.dataset_id)
        elif self.cache_local:
            directory, remote = self._cache_dir(sf.dataset_id, record), str(directory)
        shard_set = ShardSet(
            dataset_id=sf.dataset_id,
            species=sf.species,
            directory=directory,
            n_samples=int(record["cells_written"]),
            genes=np.asarray(record["genes"], np.int64),
            source_file=str(record.get("source_file", sf.name)),
            weights=dict(weights),
            remote=remote,
            obs_keys_absent=tuple(record.get("obs_keys_absent", ())),
        )
        self._sets[sf.dataset_id] = shard_set
        return shard_set

    def _cache_dir(self, dataset_id: str, record: dict) -> Path:
        """`<cache root>/<dataset id>/<digest of dataset.json>`; caches of older versions are removed."""
        version = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]
        parent = self.cache_root / dataset_id
        if parent.is_dir():
            for old in parent.iterdir():
                if old.name != version:
                    shutil.rmtree(old, ignore_errors=True)
        return parent / version

    def reader(self, shard_set: ShardSet):
        """`read(basename) -> bytes` for the files of a dataset: its local directory, or for remote
        shards the local cache (what streaming downloaded) and else the object store. A raw
        (decompressed) shard that is not local raises FileNotFoundError: remotely only the
        compressed one exists."""
        dataset = shard_set.dataset_dir  # local shards, also when streaming reads them through a cache
        if dataset is not None:
            return lambda name: (dataset / name).read_bytes()
        local, remote, rel = Path(shard_set.directory), self.remote, shard_set.dataset_id

        def read(name: str) -> bytes:
            path = local / name
            if path.is_file():
                return path.read_bytes()
            if name.endswith(".mds"):
                raise FileNotFoundError(path)
            return remote.read_bytes(f"{rel}/{name}")

        return read

    def all_sets(self) -> list[ShardSet]:
        """Every dataset resolved so far, in a stable order (by id): the streams of the sample store."""
        return [self._sets[k] for k in sorted(self._sets)]


class _NotUsable(Exception):
    def __init__(self, problem):
        super().__init__(problem.reason)
        self.problem = problem
