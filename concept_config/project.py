"""The config keys concept-shard owns: `PATH`, `seed`, `lamindb`, `shard` and the split files
(mounted at `datamodule.split_<source>_<species>`). Their defaults live here only
(docs/config.md documents them; tests/shard/test_config_doc.py checks the page against this)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .fields import MISSING, key


def _compression(value) -> str | None:
    if value is None or value == "zstd" or re.fullmatch(r"zstd:([1-9]|1\d|2[0-2])", str(value)):
        return None
    return "must be `zstd` (level 3), `zstd:N` with N in 1..22, or null (no compression)"


# concept_shard/entries.py: how shards store a cell's genes and counts
ENTRIES = ("varint", "arrays")


@dataclass
class PathKeys:
    PROJECT_PATH: str = key(MISSING, "the project root (the positional PROJECT_PATH)")
    CHECKPOINT_ROOT: str = key("${PATH.PROJECT_PATH}/model_checkpoints", "runs live in <CHECKPOINT_ROOT>/<run_id>/")
    PANELS_PATH: str = key("${PATH.PROJECT_PATH}/panels", "designed panels: <PANELS_PATH>/<species>/<panel>.csv")
    GENE_MAPPINGS_PATH: str = key(
        "${PATH.PROJECT_PATH}/references/vocabulary/token_mappings_per_specie",
        "one token mapping <species>.csv per species",
    )
    PRETRAINED_VOCABULARY: Optional[str] = key(None, "dir of <species>.csv gene vectors, or null")
    LOCAL_DIR: Optional[str] = key(None, "node-local cache of remote shards, or null")
    SHARDS_PATH: str = key("${PATH.PROJECT_PATH}/shards", "where concept-shard writes the shards")
    SHARDS_REMOTE: Optional[str] = key(None, "s3://bucket/prefix the shards live in, or null")
    # scConcept's own keys that mean nothing here (listed in one warning when set)
    GENE_MAPPING_PATH: Optional[str] = key(
        None,
        inert="scConcept's single mapping file of early 2026: read for every species when the tree sets "
        "no PATH.GENE_MAPPINGS_PATH, else without effect",
    )
    SPECIES: Optional[List[str]] = key(None, inert="the species come from datamodule.species and the split files")
    # scConcept's trees of January 2026: paths its own files interpolate (${PATH.DATASET_PATH}/...)
    PROJECT_DATA_PATH: Optional[str] = key(None, inert="a path scConcept's tree interpolates into others")
    DATASET_PATH: Optional[str] = key(None, inert="a path scConcept's tree interpolates into others")
    ADATA_PATH: Optional[str] = key(None, inert="a path scConcept's tree interpolates into others")


@dataclass
class LamindbKeys:
    enabled: bool = key(False, "register sources and shard datasets in the current lamindb instance")


@dataclass
class ShardKeys:
    chunk_size: int = key(2048, "rows read at once", gt=0)
    part_size: int = key(1_000_000, "files with more cells are split into row-range parts", gt=0)
    shard_size_limit: int = key(1 << 25, "raw MDS bytes per shard file before compression", ge=1024)
    entries: str = key(
        "varint", "a cell's genes and counts: varint (read in place) | arrays (earlier format)", choices=ENTRIES
    )
    compression: Optional[str] = key(None, "compression of the shard files (copies them on read)", check=_compression)
    allow_non_integral: bool = key(False, "store float32 counts instead of rejecting normalised data")


@dataclass
class SplitKeys:
    """One split file (scConcept's format), mounted at `datamodule.split_<source>_<species>`."""

    source_name: str = key(MISSING, "the source's name: shards/<species>/<source_name>/")
    species: str = key(MISSING, "the species (token space) of all its files")
    source_path: str = key("${PATH.PROJECT_PATH}/data/${.source_name}/h5ads", "the folder of its files")
    var_gene_id_column: Optional[str] = key(None, "the var column holding Ensembl ids; null = var_names")
    train: List[str] = key([], "training files")
    val: List[str] = key([], "validation files")
    test: Optional[List[str]] = key(None, inert="scConcept's held-out files: neither trained nor validated on")
    repeat: Optional[float] = key(None, "the split's files count `repeat` times per epoch", ge=0)
    proportion: Optional[float] = key(None, "the split's share of an epoch", ge=0)


SPLIT_PREFIX = "split_"  # data-module keys of this prefix hold split files
WEIGHT_KEYS = ("proportion", "repeat")  # per-source sampling weights a split (or its list item) may carry
SECTIONS = ("train", "val")  # the file lists of a split


@dataclass
class SplitItem:
    """One item of a loader's split list (`datamodule.dataset.<loader>.split`), resolved when the
    config is typed (concept_shard.config): in the typed config a loader's `split` holds these.
    Its split's own keys are checked file by file where they are used (concept_shard.splits), so
    that `concept-shard status` can report every bad entry at once."""

    key: str  # the split file's config key (datamodule.split_x) or the item's own
    split: Any  # the split's keys, resolved (a dict; anything else is reported)
    section: Optional[str] = None  # `key:` of a `{source: ..., key: train|val}` item, else the loader's
    weights: Dict[str, float] = field(default_factory=dict)  # WEIGHT_KEYS of the item and of its split
    written: Any = None  # the item as the config gave it, resolved: what a run's config.yaml records


def split_node(parent: str, name: str) -> Any:
    """The schema of a key the data module's dataclass leaves open: split files."""
    return SplitKeys if parent == "datamodule" and name.startswith(SPLIT_PREFIX) else None
