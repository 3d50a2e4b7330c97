"""Resolve the composed config's split entries to the list of source files to shard.

A split entry (scConcept format) is a dict with `source_name`, `species`, `source_path`,
`train`, `val` and optionally `var_gene_id_column`; a list item may also be
`{source: <split>, key: train|val}`. Every file of every referenced split is sharded, train
and val alike, since a file's shards do not depend on how a loader uses them. A file name
`lamindb:<key>` names a lamindb artifact instead of a path under `source_path`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from concept_config.data import DataModuleKeys
from concept_config.project import PathKeys, SplitItem

from .errors import ShardError
from .vocabulary import mapping_file

LAMINDB_PREFIX = "lamindb:"
TRAIN_SPLIT = "datamodule.dataset.train.split"  # the training loader's split list


@dataclass
class SourceFile:
    """One input file and where its shard dataset goes."""

    species: str
    source_name: str
    name: str  # as listed in the split YAML
    path: Path  # resolved local path (.h5ad file or .zarr directory)
    split_key: str  # config key of the split entry, for error messages
    var_gene_id_column: str | None = None
    lamindb_key: str | None = None
    sections: set[str] = field(default_factory=set)

    @property
    def stem(self) -> str:
        base = Path(self.name.removeprefix(LAMINDB_PREFIX)).name
        for suffix in (".h5ad", ".zarr"):
            if base.endswith(suffix):
                return base[: -len(suffix)]
        return base

    @property
    def dataset_id(self) -> str:
        return f"{self.species}/{self.source_name}/{self.stem}"


def check_plain_name(value: str, key: str, error=ShardError) -> str:
    """`value` as one directory name under a root the program owns: not empty, no path separator,
    not `.`/`..`, no leading dot (our own `.parts`, `.tmp` live there). Config values become paths
    (`shards/<species>/<source_name>/`, `model_checkpoints/<run_id>/`); one with `../` would make a
    build or a run write, and replace, directories outside the project."""
    text = str(value)
    if not text or text.startswith(".") or any(c in text for c in "/\\\0") or any(ord(c) < 32 for c in text):
        raise error(
            key,
            f"is {text!r}, which is not a plain name: it would place files outside their directory.",
            "Use a name of letters, digits, '_', '-' and '.', without '/' and not starting with '.'.",
        )
    return text


def loader_split_lists(dm: DataModuleKeys) -> list[tuple[str, list[SplitItem], str]]:
    """(config key, split items, default section) of every loader's split list."""
    lists = [(TRAIN_SPLIT, dm.dataset.train.split, "train")]
    return lists + [(f"datamodule.dataset.val.{name}.split", ds.split, "val") for name, ds in dm.dataset.val.items()]


def _file_entries(paths: PathKeys, dm: DataModuleKeys, only: str | None = None, skip_repeated_splits: bool = False):
    """(config key, section or None, weights, file or None, error or None) per listed file of every
    split item (of the split list `only`); a split item that is itself invalid yields one error."""
    mappings = Path(paths.GENE_MAPPINGS_PATH)
    seen_splits: set[str] = set()
    for list_key, items, _ in loader_split_lists(dm):
        if only is not None and list_key != only:
            continue
        for item in items:
            key, section = item.key, item.section
            if skip_repeated_splits and key in seen_splits and section is None:
                continue
            seen_splits.add(key)
            try:
                entries = _files_of_split(key, item.split, mappings, dm.species)
            except ShardError as err:
                yield key, section, item.weights, None, err
                continue
            for sf, err in entries:
                yield key, section, item.weights, sf, err


def loader_sources(
    paths: PathKeys, dm: DataModuleKeys, list_key: str, default_section: str
) -> tuple[list[tuple[SourceFile, dict]], list[ShardError]]:
    """The files one loader reads: (file, sampling weights of its split entry), in config order.

    A plain split item contributes its `default_section` (`train` for the training loader, `val`
    for validation loaders); `{source: ..., key: ...}` picks the section explicitly.
    """
    out, errors, seen = [], [], set()
    for _, section, weights, sf, err in _file_entries(paths, dm, only=list_key):
        if sf is not None and (section or default_section) not in sf.sections:
            continue
        if err is not None:
            errors.append(err)
        elif sf.dataset_id not in seen:
            seen.add(sf.dataset_id)
            out.append((sf, dict(weights)))
    return out, errors


def collect_source_files(paths: PathKeys, dm: DataModuleKeys) -> tuple[list[SourceFile], list[ShardError]]:
    """All files named by all split entries, deduplicated, with per-entry errors collected."""
    files: dict[str, SourceFile] = {}
    errors: list[ShardError] = []
    for key, _, _, sf, err in _file_entries(paths, dm, skip_repeated_splits=True):
        if err is not None:
            errors.append(err)
            continue
        prev = files.get(sf.dataset_id)
        if prev is not None and prev.path != sf.path:
            errors.append(
                ShardError(
                    key,
                    f"lists `{sf.name}`, which maps to shard dataset {sf.dataset_id} already claimed by {prev.path}.",
                    "Give the two sources different `source_name`s or rename one file.",
                )
            )
            continue
        (prev or files.setdefault(sf.dataset_id, sf)).sections.update(sf.sections)
    return list(files.values()), errors


def _files_of_split(key, split, mappings: Path, allowed_species) -> list[tuple[SourceFile, ShardError | None]]:
    if not isinstance(split, dict):
        raise ShardError(
            key,
            "is not a split dict.",
            "A split item must be a dict with source_name/species/source_path/train/val "
            "or `{source: <split>, key: train|val}`.",
        )
    missing = [k for k in ("source_name", "species", "source_path") if split.get(k) is None]
    if missing:
        raise ShardError(
            key, f"lacks {', '.join(missing)}.", "Every split YAML needs source_name, species and source_path."
        )
    species = check_plain_name(split["species"], f"{key}.species")
    source_name = check_plain_name(split["source_name"], f"{key}.source_name")
    if not mapping_file(mappings, species).is_file() or (
        allowed_species is not None and species not in allowed_species
    ):
        known = sorted(p.stem for p in mappings.glob("*.csv")) if mappings.is_dir() else []
        raise ShardError(
            key,
            f"names species '{species}', which has no token mapping "
            f"{mapping_file(mappings, species)} or is not in datamodule.species {list(allowed_species or [])}.",
            f"Use one of {known} or add the mapping CSV and the species to datamodule.species.",
        )
    source_path = Path(str(split["source_path"]))
    out = []
    for section in ("train", "val"):
        names = split.get(section) or []
        if isinstance(names, str):
            names = [names]
        for name in names:
            name = str(name)
            sf = SourceFile(
                species=species,
                source_name=source_name,
                name=name,
                path=source_path / name,
                split_key=key,
                var_gene_id_column=split.get("var_gene_id_column"),
                sections={section},
            )
            try:
                check_plain_name(sf.stem, f"{key} ({source_name}/{species}): file `{name}`")
            except ShardError as err:
                out.append((sf, err))
                continue
            if name.startswith(LAMINDB_PREFIX):
                sf.lamindb_key = name[len(LAMINDB_PREFIX) :]
                out.append((sf, None))
                continue
            resolved = (source_path / name).resolve()
            if Path(name).is_absolute() or not resolved.is_relative_to(source_path.resolve()):
                out.append(
                    (
                        sf,
                        ShardError(
                            f"{key} ({source_name}/{species})",
                            f"lists `{name}`, which escapes source_path {source_path}.",
                            "List files by their name inside source_path; move the file there "
                            "or point source_path at its directory.",
                        ),
                    )
                )
                continue
            out.append((sf, None))
    return out
