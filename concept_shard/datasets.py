"""A published shard dataset as its readers see it: where it is, its `dataset.json`, and whether it
is complete and current. The one answer to "can this file's shards be used?" for the build (reuse
or rebuild), the training catalog (train from it or stop) and gene-vectors (sample from it).

    <root>/<species>/<source_name>/<stem>/index.json, shard.NNNNN.mds[.zstd], dataset.json

`root` is `PATH.SHARDS_PATH`, or `PATH.SHARDS_REMOTE` (s3://...) when set. `dataset.json` is
written last (finalize.py locally, remote.py in object storage), so a dataset is complete exactly
when its `dataset.json` can be read. It is current when its fingerprints match what would be
written now:

    source_fingerprint       the source file's sampled content hash (fingerprint.py); when the
                             source's mtime is not the recorded `source_mtime_ns`, also the hash
                             of its whole content (`source_content_hash`)
    vocabulary_fingerprint   the species' token mapping (vocabulary.py)
    settings_digest          the shard settings that change the samples (writer.PartSettings),
                             and the split's var_gene_id_column

The build checks all three. Every reader then checks that the dataset's files are the ones
dataset.json describes (`ShardStore.damage`, integrity.py): the fields of both JSON files and the
digest of index.json on every check, each shard file's hash when it is read (or, with `--verify`,
all of them at once). Training checks the source (unless `datamodule.check_sources=false`:
shards copied without their sources) and the vocabulary; gene-vectors checks the vocabulary only.
Neither of them checks the settings: their reader takes any column set it finds. Both, once they
open a dataset's index.json, check that it lists the cells dataset.json wrote (`index_problem`).

Training trusts a source whose size and mtime are the recorded `source_size` and
`source_mtime_ns` (one stat per file, `quick`): at 3,000 files the sampled fingerprints cost 30
s and ~50,000 random reads of a network filesystem before the first batch. Only when size or
mtime differ does it read the source; `datamodule.check_sources=full` (and every build) reads
the sampled fingerprint of every source regardless.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from concept_config.project import PathKeys

from . import FORMAT_VERSION
from .fingerprint import content_hash, source_fingerprint, source_mtime_ns, source_stat
from .integrity import Damaged, check_dataset
from .layout import DatasetLayout, read_json
from .remote import DATASET_JSON, RemoteShards
from .splits import SourceFile
from .vocabulary import Vocabulary

_HASHERS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="content-hash")


def settings_digest(digest_fields: dict, var_gene_id_column: str | None) -> str:
    """The `settings_digest` of dataset.json, from `PartSettings.digest_fields(vocab)`."""
    fields = dict(digest_fields, var_gene_id_column=var_gene_id_column)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Problem:
    """Why a dataset cannot be used as it is."""

    reason: str
    source_gone: bool = False  # the shards may be fine; their source file is not on this machine
    damaged: bool = False  # its files are not what its records say (integrity.py): rebuild it


def index_problem(index_samples: int, cells_written: int) -> Problem | None:
    """None when a dataset's index.json lists as many samples as its dataset.json wrote cells; else
    why not (a shard lost, or an index.json of another build): its rows would not be its cells."""
    if int(index_samples) == int(cells_written):
        return None
    return Problem(f"index.json lists {int(index_samples)} samples, dataset.json {int(cells_written)} cells")


class Expectation:
    """What a dataset must match to be current: always the vocabulary; the source file and the
    settings digest when given. The source's fingerprint is computed once, on first use. `quick`:
    a source whose size and mtime are the recorded ones is current without being read."""

    def __init__(
        self,
        vocab: Vocabulary,
        source: Path | None = None,
        digest: str | None = None,
        quick: bool = False,
        earlier_digest: str | None = None,
    ):
        self.vocab, self.source, self.digest = vocab, None if source is None else Path(source), digest
        self.earlier_digest = earlier_digest  # the same settings in the earlier shard format
        self.quick = quick
        self._fingerprint: tuple[str, int] | None = None
        self._content: Future | None = None

    def start_content_hash(self) -> None:
        """Begin hashing every byte of the source on a thread (hashlib releases the GIL), so that
        the writer's work hides it."""
        if self._content is None:
            self._content = _HASHERS.submit(content_hash, self.source)

    def content_hash(self) -> str:
        self.start_content_hash()
        return self._content.result()

    @property
    def source_fingerprint(self) -> str:
        return self._source()[0]

    @property
    def source_size(self) -> int:
        return self._source()[1]

    def _source(self) -> tuple[str, int]:
        if self._fingerprint is None:
            self._fingerprint = source_fingerprint(self.source)
        return self._fingerprint

    def _unchanged_on_disk(self, record: dict) -> bool:
        size, mtime = record.get("source_size"), record.get("source_mtime_ns")
        return size is not None and mtime is not None and source_stat(self.source) == (size, mtime)

    def _source_problem(self, record: dict) -> Problem | None:
        if record.get("source_fingerprint") != self.source_fingerprint:
            return Problem("the source file changed since it was sharded")
        recorded = record.get("source_mtime_ns")  # absent in datasets built before it was recorded
        if (
            recorded is not None
            and source_mtime_ns(self.source) != recorded
            and record.get("source_content_hash") != self.content_hash()
        ):
            return Problem(
                "the source file changed since it was sharded (found by a full content check "
                "after its modification time changed)"
            )
        return None

    def identity(self) -> dict:
        """The three fingerprints a finished part or dataset must carry (source and digest needed)."""
        return {
            "source_fingerprint": self.source_fingerprint,
            "vocabulary_fingerprint": self.vocab.fingerprint,
            "settings_digest": self.digest,
        }

    def problem(self, record: dict | None, where) -> Problem | None:
        """None when `record` (a dataset.json, or None when there is none at `where`) is complete
        and current; else why not, in the order a user would fix it."""
        if record is None:
            return Problem(f"not sharded (no {where})")
        if not isinstance(record, dict):
            return Problem(f"damaged: {where} does not hold a JSON object", damaged=True)
        if record.get("format_version") != FORMAT_VERSION:
            return Problem(
                f"written by an older concept-shard (format {record.get('format_version')}; this one writes "
                f"{FORMAT_VERSION}, whose shards carry hashes)"
            )
        if self.source is not None:
            if not self.source.exists():
                return Problem(f"its source {self.source} no longer exists", source_gone=True)
            if not (self.quick and self._unchanged_on_disk(record)):
                problem = self._source_problem(record)
                if problem is not None:
                    return problem
        if record.get("vocabulary_fingerprint") != self.vocab.fingerprint:
            return Problem(f"the token mapping {self.vocab.path} changed since it was sharded")
        if self.digest is not None and record.get("settings_digest") != self.digest:
            if self.earlier_digest is not None and record.get("settings_digest") == self.earlier_digest != self.digest:
                return Problem(
                    "written in the earlier shard format (zstd-compressed arrays, which readers "
                    "decompress beside the shards); a build rewrites it with varint entries, read in "
                    "place. Training reads it as it is; to keep it, build with shard.entries=arrays "
                    "shard.compression=zstd:1"
                )
            return Problem("shard settings (obs_keys, var_gene_id_column, entries, compression, ...) changed")
        return None


class ShardStore:
    """The published datasets under one root: local `PATH.SHARDS_PATH`, or `PATH.SHARDS_REMOTE`."""

    def __init__(self, shards_root: Path, remote: RemoteShards | None = None):
        self.root, self.remote = Path(shards_root), remote

    @classmethod
    def from_paths(cls, paths: PathKeys) -> ShardStore:
        """The store `PATH` names; a remote one is checked (bucket, credentials) here."""
        remote = None
        if paths.SHARDS_REMOTE:
            remote = RemoteShards(paths.SHARDS_REMOTE)
            remote.check()
        return cls(Path(paths.SHARDS_PATH), remote)

    def local(self, sf: SourceFile) -> DatasetLayout:
        """The dataset's local directories (the dataset itself, or its staging copy when remote)."""
        return DatasetLayout(self.root, sf)

    def where(self, sf: SourceFile) -> str:
        """Path or URL of the dataset's dataset.json, for messages."""
        if self.remote is not None:
            return self.remote.url_of(f"{sf.dataset_id}/{DATASET_JSON}")
        return str(self.local(sf).dataset_json)

    def record(self, sf: SourceFile) -> dict | None:
        """The published dataset.json, or None when the dataset is not complete."""
        if self.remote is not None:
            return self.remote.read_json(f"{sf.dataset_id}/{DATASET_JSON}")
        return read_json(self.local(sf).dataset_json)

    def reader(self, sf: SourceFile) -> Callable[[str], bytes]:
        """`read(basename) -> bytes` for the files of the dataset (index.json, shards)."""
        if self.remote is not None:
            remote, rel = self.remote, sf.dataset_id
            return lambda name: remote.read_bytes(f"{rel}/{name}")
        directory = self.local(sf).dataset_dir
        return lambda name: (directory / name).read_bytes()

    def damage(self, sf: SourceFile, record: dict, vocab: Vocabulary, full: bool = False) -> Problem | None:
        """None when the files of a current dataset are the ones `record` (its dataset.json)
        describes: its fields, index.json's fields and digest, and with `full` every shard file's
        hash (integrity.py); else why not."""
        return self._damage(sf, record, vocab, full)[1]

    def _damage(self, sf: SourceFile, record: dict, vocab: Vocabulary, full: bool = False):
        try:
            shards = check_dataset(self.reader(sf), record, vocab.size, full=full, raw_copies=self.remote is None)
        except Damaged as exc:
            return None, Problem(f"damaged: {exc}", damaged=True)
        return shards, None

    def check(self, sf: SourceFile, expected: Expectation) -> tuple[dict | None, Problem | None]:
        """(dataset.json or None, why it cannot be used or None): current (`expected`), and its
        files sound as far as the cheap check sees (no shard is hashed here)."""
        record, _, problem = self.check_with_index(sf, expected)
        return record, problem

    def check_with_index(
        self, sf: SourceFile, expected: Expectation
    ) -> tuple[dict | None, list | None, Problem | None]:
        """`check`, with the checked `shards` of index.json (None when there is a problem)."""
        record = self.record(sf)
        problem = expected.problem(record, self.where(sf))
        if problem is not None:
            return record, None, problem
        shards, problem = self._damage(sf, record, expected.vocab)
        return record, shards, problem
