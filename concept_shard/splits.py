"""Resolve the composed config's split entries to the list of source files to shard.

A split entry (scConcept format) is a dict with `source_name`, `species`, `source_path`,
`train`, `val` and optionally `var_gene_id_column`; a list item may also be
`{source: <split>, key: train|val}`. Every file of every referenced split is sharded, train
and val alike, since a file's shards do not depend on how a loader uses them. A file name
`lamindb:<key>` names a lamindb artifact instead of a path under `source_path`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .errors import ShardError

LAMINDB_PREFIX = "lamindb:"
TRAIN_SPLIT = "datamodule.dataset.train.split"      # the training loader's split list
_INTERPOLATION = re.compile(r"^\$\{([^}]+)\}$")


@dataclass
class SourceFile:
    """One input file and where its shard dataset goes."""

    species: str
    source_name: str
    name: str                     # as listed in the split YAML
    path: Path                    # resolved local path (.h5ad file or .zarr directory)
    split_key: str                # config key of the split entry, for error messages
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
    if (not text or text.startswith(".") or any(c in text for c in "/\\\0")
            or any(ord(c) < 32 for c in text)):
        raise error(key, f"is {text!r}, which is not a plain name: it would place files outside their directory.",
                    "Use a name of letters, digits, '_', '-' and '.', without '/' and not starting with '.'.")
    return text


def loader_split_keys(cfg: DictConfig) -> list[tuple[str, str]]:
    """(config key of a loader's split list, its default section) for every loader in the datamodule."""
    dm = cfg.datamodule
    lists: list[tuple[str, str]] = []
    if OmegaConf.select(dm, "dataset.train.split") is not None:
        lists.append(("datamodule.dataset.train.split", "train"))
    val = OmegaConf.select(dm, "dataset.val")
    if val is not None:
        for loader in val:
            if OmegaConf.select(val[loader], "split") is not None:
                lists.append((f"datamodule.dataset.val.{loader}.split", "val"))
    return lists


# Per-source sampling weights a split list item or a split YAML may carry (used by the trainer).
WEIGHT_KEYS = ("proportion", "repeat")


def _split_items(cfg: DictConfig, only: str | None = None) -> list[tuple[str, object, str | None, dict]]:
    """(config key, split dict, section or None, weights) for every split list item in the datamodule,
    or in the one split list `only` (e.g. `datamodule.dataset.train.split`)."""
    items = []
    for list_key, _ in loader_split_keys(cfg):
        if only is not None and list_key != only:
            continue
        raw = OmegaConf.to_container(OmegaConf.select(cfg, list_key.rsplit(".", 1)[0]), resolve=False)["split"]
        if isinstance(raw, (str, dict)):
            raw = [raw]
        for i, item in enumerate(raw):
            key, section, weights = f"{list_key}[{i}]", None, {}
            if isinstance(item, dict) and "source" in item:
                section = item.get("key")
                weights = {k: item[k] for k in WEIGHT_KEYS if item.get(k) is not None}
                item = item["source"]
                if section not in ("train", "val"):
                    raise ShardError(key, f"has `key: {section}`.", "Use `key: train` or `key: val`.")
            if isinstance(item, str) and (m := _INTERPOLATION.match(item)):
                key = m.group(1)
                split = OmegaConf.select(cfg, key)
                if split is None:
                    raise ShardError(key, "is referenced by a split list but not defined.",
                                     "Add it to the datamodule's defaults list, e.g. `- split_x_hsapiens: my_split`.")
            else:
                split = OmegaConf.create(item) if isinstance(item, dict) else item
                split = OmegaConf.merge(OmegaConf.create({"PATH": cfg.PATH}), {"_": split})["_"]
            if isinstance(split, DictConfig):
                weights = {k: split[k] for k in WEIGHT_KEYS if split.get(k) is not None} | weights
            items.append((key, split, section, weights))
    return items


def _file_entries(cfg: DictConfig, only: str | None = None, skip_repeated_splits: bool = False):
    """(config key, section or None, weights, file or None, error or None) per listed file of every
    split item (of the split list `only`); a split item that is itself invalid yields one error."""
    mappings = Path(cfg.PATH.GENE_MAPPINGS_PATH)
    allowed_species = OmegaConf.select(cfg, "datamodule.species")
    seen_splits: set[str] = set()
    for key, split, section, weights in _split_items(cfg, only=only):
        if skip_repeated_splits and key in seen_splits and section is None:
            continue
        seen_splits.add(key)
        try:
            entries = _files_of_split(key, split, mappings, allowed_species)
        except ShardError as err:
            yield key, section, weights, None, err
            continue
        for sf, err in entries:
            yield key, section, weights, sf, err


def loader_sources(cfg: DictConfig, list_key: str, default_section: str) -> tuple[list[tuple[SourceFile, dict]], list[ShardError]]:
    """The files one loader reads: (file, sampling weights of its split entry), in config order.

    A plain split item contributes its `default_section` (`train` for the training loader, `val`
    for validation loaders); `{source: ..., key: ...}` picks the section explicitly.
    """
    out, errors, seen = [], [], set()
    for _, section, weights, sf, err in _file_entries(cfg, only=list_key):
        if sf is not None and (section or default_section) not in sf.sections:
            continue
        if err is not None:
            errors.append(err)
        elif sf.dataset_id not in seen:
            seen.add(sf.dataset_id)
            out.append((sf, dict(weights)))
    return out, errors


def collect_source_files(cfg: DictConfig) -> tuple[list[SourceFile], list[ShardError]]:
    """All files named by all split entries, deduplicated, with per-entry errors collected."""
    files: dict[str, SourceFile] = {}
    errors: list[ShardError] = []
    for key, _, _, sf, err in _file_entries(cfg, skip_repeated_splits=True):
        if err is not None:
            errors.append(err)
            continue
        prev = files.get(sf.dataset_id)
        if prev is not None and prev.path != sf.path:
            errors.append(ShardError(key, f"lists `{sf.name}`, which maps to shard dataset {sf.dataset_id} "
                                     f"already claimed by {prev.path}.",
                                     "Give the two sources different `source_name`s or rename one file."))
            continue
        (prev or files.setdefault(sf.dataset_id, sf)).sections.update(sf.sections)
    return list(files.values()), errors


def _files_of_split(key, split, mappings: Path, allowed_species) -> list[tuple[SourceFile, ShardError | None]]:
    if not isinstance(split, (DictConfig, dict)):
        raise ShardError(key, "is not a split dict.",
                         "A split item must be a dict with source_name/species/source_path/train/val "
                         "or `{source: <split>, key: train|val}`.")
    missing = [k for k in ("source_name", "species", "source_path") if OmegaConf.select(split, k) is None]
    if missing:
        raise ShardError(key, f"lacks {', '.join(missing)}.", "Every split YAML needs source_name, species and source_path.")
    species = check_plain_name(split.species, f"{key}.species")
    source_name = check_plain_name(split.source_name, f"{key}.source_name")
    if not (mappings / f"{species}.csv").is_file() or (allowed_species is not None and species not in allowed_species):
        known = sorted(p.stem for p in mappings.glob("*.csv")) if mappings.is_dir() else []
        raise ShardError(key, f"names species '{species}', which has no token mapping "
                         f"{mappings / (species + '.csv')} or is not in datamodule.species {list(allowed_species or [])}.",
                         f"Use one of {known} or add the mapping CSV and the species to datamodule.species.")
    source_path = Path(str(split.source_path))
    out = []
    for section in ("train", "val"):
        names = OmegaConf.select(split, section) or []
        if isinstance(names, str):
            names = [names]
        for name in names:
            name = str(name)
            sf = SourceFile(species=species, source_name=source_name, name=name, path=source_path / name,
                            split_key=key, var_gene_id_column=OmegaConf.select(split, "var_gene_id_column"),
                            sections={section})
            try:
                check_plain_name(sf.stem, f"{key} ({source_name}/{species}): file `{name}`")
            except ShardError as err:
                out.append((sf, err))
                continue
            if name.startswith(LAMINDB_PREFIX):
                sf.lamindb_key = name[len(LAMINDB_PREFIX):]
                out.append((sf, None))
                continue
            resolved = (source_path / name).resolve()
            if Path(name).is_absolute() or not resolved.is_relative_to(source_path.resolve()):
                out.append((sf, ShardError(f"{key} ({source_name}/{species})",
                                           f"lists `{name}`, which escapes source_path {source_path}.",
                                           "List files by their name inside source_path; move the file there "
                                           "or point source_path at its directory.")))
                continue
            out.append((sf, None))
    return out
