"""Compose the project config exactly as the trainer will: Hydra, `conf/`, the user's config
directory, overrides; then check it against the typed schema (`concept_config.Root`) and hand it
out as typed objects: `compose_config` returns a `Root`, and each owner takes its own section.

The user's directory is `--config-dir`, else `PROJECT_PATH/conf` when it exists; it is searched
before the packaged `conf/`, so it can add groups (`datamodule=MyModule`, its own split files) and
replace packaged files of the same name, the root `config.yaml` included: scConcept's root config,
unchanged, works, because every key's default comes from the schema, not from our YAML files.

Overrides: Hydra applies the group choices (`model=X`, `+experiment=demo`) and the `+key` / `++key`
/ `~key` forms; a plain `key=value` is applied after the schema merge, so it may set any key the
schema knows, also one that no YAML file mentions, and an unknown one is refused with a suggestion.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from pathlib import Path

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from concept_config import Root
from concept_config.project import SECTIONS, SPLIT_PREFIX, WEIGHT_KEYS, SplitItem, split_node

from .errors import ConfigError, ShardError
from .strict import check_values, inert_warning, merge_typed, origin_of, set_override, suggestion, unknown_keys
from .yaml_bounds import yaml_problem

# The packaged config tree: conf/ at the repo root, reached through the link concept_shard/conf (which a
# wheel carries as package data); CONCEPT_CONF_DIR overrides it.
_INTERPOLATION = re.compile(r"^\$\{([^}]+)\}$")  # a split list item that names a split file
PACKAGED_CONF_DIR = Path(os.environ.get("CONCEPT_CONF_DIR", (Path(__file__).resolve().parent / "conf").resolve()))


def compose_config(
    project_path: str | os.PathLike | None,
    overrides: list[str] | tuple[str, ...] = (),
    config_dir: str | os.PathLike | None = None,
    **options,
) -> Root:
    """The typed config: composed and checked as `compose_tree` does it (`options`: its
    `config_name` and `log`), as a `concept_config.Root` whose sections each owner takes as they are."""
    return to_root(compose_tree(project_path, overrides, config_dir, **options))


def composed_yaml(project_path, overrides=(), config_dir=None, resolve: bool = False) -> str:
    """`--cfg job|all`: the composed config as YAML (interpolations kept unless `resolve`); the
    tree has no `hydra` node of its own, so both print the same."""
    cfg = compose_tree(project_path, overrides, config_dir, log=lambda line: None)
    return OmegaConf.to_yaml(cfg, resolve=resolve)


def compose_tree(
    project_path: str | os.PathLike | None,
    overrides: list[str] | tuple[str, ...] = (),
    config_dir: str | os.PathLike | None = None,
    config_name: str = "config",
    log=None,
) -> DictConfig:
    """`config_name` composed from the packaged tree, with the user's config directory searched
    FIRST, and checked against the schema: OmegaConf's tree, interpolations unresolved (what
    docs/config.md documents; code works with `compose_config`'s typed object). `log` receives the
    one warning line about scConcept keys that have no effect here (default: stderr)."""
    if not PACKAGED_CONF_DIR.is_dir():
        raise ConfigError(
            PACKAGED_CONF_DIR,
            "the packaged config tree is missing.",
            "Install the repo with `bash tools/install.sh` or set CONCEPT_CONF_DIR.",
        )
    overrides = list(overrides)
    if project_path is None:
        project_path, overrides = _project_path_override(overrides)
    if project_path is not None:
        if not Path(project_path).is_dir():  # before anything is created under a mistyped path
            raise ConfigError(
                f"PROJECT_PATH {project_path}",
                "does not exist (or is not a directory); nothing was created.",
                "Check the path. A project is a directory holding data/ and, usually, conf/ (see the "
                "README's walk-through); create it first.",
            )
        overrides = [f"PATH.PROJECT_PATH={_quoted(Path(project_path).resolve())}"] + overrides
        if config_dir is None and (Path(project_path) / "conf").is_dir():
            config_dir = Path(project_path) / "conf"  # the project's own configs, by convention
    user_dir = None
    if config_dir is not None:
        user_dir = Path(config_dir).resolve()
        if not user_dir.is_dir():
            raise ConfigError(
                f"--config-dir {config_dir}",
                "is not a directory.",
                "Pass the directory that holds your datamodule/ and split YAMLs.",
            )
    search = [d for d in (user_dir, PACKAGED_CONF_DIR) if d is not None]
    hydra_side, settings = _split_overrides(overrides, search)
    cfg = _compose(hydra_side, user_dir, config_name)
    cfg = _typed(cfg, overrides, search)
    for dotted, value in settings:
        parts = dotted.split(".")
        if parts[:3] == ["datamodule", "dataloader", "val"] and len(parts) > 4:
            _check_loader_names(cfg, overrides, search, [parts[3]])
        if not _has_key(cfg, dotted):
            parent = dotted.rsplit(".", 1)[0] if "." in dotted else ""
            node = OmegaConf.select(cfg, parent) if parent else cfg
            siblings = [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
            raise ConfigError(
                dotted, "is not a key of the config (on the command line).", suggestion(dotted, siblings, Root)
            )
        if value is None and dotted in NO_VALIDATION_KEYS:  # scConcept's way of turning validation off
            OmegaConf.update(cfg, dotted, {}, merge=False)
            continue
        set_override(cfg, dotted, value)
    _check_loader_names(cfg, overrides, search)
    if OmegaConf.is_missing(cfg.PATH, "PROJECT_PATH"):
        raise ConfigError("PATH.PROJECT_PATH", "is not set.", "Pass PROJECT_PATH as the first argument.")
    _pickled_mapping(cfg)
    inert = check_values(cfg, Root, dynamic=split_node)
    if any(str(k).startswith(f"{SPLIT_PREFIX}{ROOT_SPLIT_SOURCE}_") for k in cfg.datamodule.keys()):
        inert = [p for p in inert if p not in ROOT_SPLIT_PATHS]  # they locate its files
    for line in (inert_warning(inert), _unchosen_datamodule(user_dir, overrides)):
        if line:
            (log or _stderr)(line)
    return cfg


def _default_choice(config_yaml: Path, group: str) -> str | None:
    """The choice of `group` in a config.yaml's defaults list (None when it names none)."""
    if not config_yaml.is_file() or yaml_problem(config_yaml) is not None:
        return None
    defaults = (yaml.safe_load(config_yaml.read_text()) or {}).get("defaults") or []
    for entry in defaults if isinstance(defaults, list) else []:
        if isinstance(entry, dict) and group in entry:
            return str(entry[group])
    return None


def _unchosen_datamodule(user_dir: Path | None, overrides: list[str]) -> str | None:
    """A word when the project's own conf/datamodule/ holds data modules but none was chosen: the
    packaged default's example files are then the ones listed (and reported missing)."""
    if user_dir is None or any(o.lstrip("+~").split("=", 1)[0] == "datamodule" for o in overrides):
        return None
    own = sorted(p.stem for p in (user_dir / "datamodule").glob("*.yaml")) if (user_dir / "datamodule").is_dir() else []
    packaged = {p.stem for p in (PACKAGED_CONF_DIR / "datamodule").glob("*.yaml")}
    own = [name for name in own if name not in packaged]
    if not own or _default_choice(user_dir / "config.yaml", "datamodule") in own:
        return None
    return (
        f"[config] no datamodule= given: the default data module is used, not {user_dir / 'datamodule'}'s "
        f"{', '.join(own)}; pass datamodule={own[0]} to use {'it' if len(own) == 1 else 'one of them'}."
    )


# `null` for either means no validation loaders (how scConcept's tests turn validation off)
NO_VALIDATION_KEYS = ("datamodule.dataset.val", "datamodule.dataloader.val")


def _no_validation(cfg: DictConfig) -> None:
    """A YAML file's `val: null` under datamodule.dataset / datamodule.dataloader as no loaders."""
    for dotted in NO_VALIDATION_KEYS:
        parent, name = dotted.rsplit(".", 1)
        node = OmegaConf.select(cfg, parent)
        if isinstance(node, DictConfig) and name in node and node._get_node(name)._is_none():
            node[name] = {}


def _renamed_scconcept_keys(cfg: DictConfig, overrides: list[str], search: list[Path]) -> None:
    """The keys scConcept's trees of early 2026 wrote, as their successors (its own renames):
    model.training.use_specie_embs_freq -> use_learnable_embs_freq; PATH.GENE_MAPPING_PATHS (species
    -> <dir>/<species>.csv) and PATH.GENE_MAPPING_PATH (one CSV for every species) ->
    PATH.GENE_MAPPINGS_PATH, when the tree does not set that itself; and freeze_pretrained_vocabulary
    null as false (what scConcept's `if` made of it)."""
    training = OmegaConf.select(cfg, "model.training")
    if isinstance(training, DictConfig) and "use_specie_embs_freq" in training:
        old = training._get_node("use_specie_embs_freq")
        if "use_learnable_embs_freq" in training and training._get_node("use_learnable_embs_freq") != old:
            raise ConfigError(
                "model.training.use_specie_embs_freq",
                f"is set {origin_of('model.training.use_specie_embs_freq', overrides, search)} beside "
                "model.training.use_learnable_embs_freq, its new name, with another value.",
                "Keep one of them (use_learnable_embs_freq).",
            )
        training["use_learnable_embs_freq"] = old
        del training["use_specie_embs_freq"]
    if isinstance(training, DictConfig) and "freeze_pretrained_vocabulary" in training:
        if training._get_node("freeze_pretrained_vocabulary")._is_none():  # off, as scConcept reads null
            training["freeze_pretrained_vocabulary"] = False
    _root_split(cfg, overrides, search)
    paths = cfg.get("PATH")
    if not isinstance(paths, DictConfig) or "GENE_MAPPINGS_PATH" in paths:
        return
    if "GENE_MAPPING_PATHS" in paths:
        per_species = paths.GENE_MAPPING_PATHS
        files = {str(sp): str(per_species._get_node(sp)._value()) for sp in per_species} if per_species else {}
        folders = {f.rsplit("/", 1)[0] for f in files.values()}
        if not files or len(folders) != 1 or any(f.rsplit("/", 1)[-1] != f"{sp}.csv" for sp, f in files.items()):
            raise ConfigError(
                "PATH.GENE_MAPPING_PATHS",
                f"is set {origin_of('PATH.GENE_MAPPING_PATHS', overrides, search)} to files that are not "
                "<one folder>/<species>.csv, which is how token mappings are read here.",
                "Put each species' mapping in one folder as <species>.csv and set PATH.GENE_MAPPINGS_PATH to it.",
            )
        paths["GENE_MAPPINGS_PATH"] = folders.pop()
        del paths["GENE_MAPPING_PATHS"]
    elif "GENE_MAPPING_PATH" in paths and not paths._get_node("GENE_MAPPING_PATH")._is_none():
        paths["GENE_MAPPINGS_PATH"] = paths._get_node("GENE_MAPPING_PATH")._value()
        del paths["GENE_MAPPING_PATH"]


ROOT_SPLIT_SOURCE = "root_split"  # the source name of scConcept v0.1.0's root split
ROOT_SPLIT_PATHS = ("PATH.ADATA_PATH", "PATH.DATASET_PATH", "PATH.PROJECT_DATA_PATH")  # where its files are


def _root_split(cfg: DictConfig, overrides: list[str], search: list[Path]) -> None:
    """scConcept's trees of v0.1.0 (2026-01-05) and the weeks after kept the split at the root: a
    `split` group (train / val / test file names in PATH.ADATA_PATH, read through PATH.SPLIT) and
    one token mapping, PATH.gene_mapping_path. The split becomes a split file mounted under the data
    module (`datamodule.split_root_split_<species>`, source `root_split`) that the training loader
    reads, and every validation loader without a split of its own reads its `val` files, as
    scConcept's loaders did; PATH.SPLIT goes; the mapping becomes PATH.GENE_MAPPINGS_PATH (a pandas
    pickle there, refused by `_pickled_mapping`)."""
    if "split" not in cfg or not isinstance(cfg.get("datamodule"), DictConfig):
        return
    split, dm, paths = cfg._get_node("split"), cfg.datamodule, cfg.get("PATH")
    species = str(dm.species[0]) if "species" in dm and dm.species else "hsapiens"
    name = f"{SPLIT_PREFIX}{ROOT_SPLIT_SOURCE}_{species}"
    node = {"source_name": ROOT_SPLIT_SOURCE, "species": species}
    for section in ("train", "val", "test"):
        if isinstance(split, DictConfig) and section in split:
            node[section] = split._get_node(section)
    if isinstance(paths, DictConfig) and "ADATA_PATH" in paths:
        node["source_path"] = "${PATH.ADATA_PATH}"
    with open_dict(dm):
        dm[name] = node
        ref = "${datamodule." + name + "}"
        dataset = dm.get("dataset")
        if isinstance(dataset, DictConfig):
            train = dataset.get("train")
            if isinstance(train, DictConfig) and "split" not in train:
                train["split"] = [ref]
            val = dataset.get("val")
            if isinstance(val, DictConfig):
                for loader in val.values():
                    if isinstance(loader, DictConfig) and "split" not in loader:
                        loader["split"] = [{"source": ref, "key": "val"}]
    with open_dict(cfg):
        del cfg["split"]
    if not isinstance(paths, DictConfig):
        return
    with open_dict(paths):
        if "SPLIT" in paths:
            del paths["SPLIT"]  # (pop would resolve its ${split} first)
        if "gene_mapping_path" in paths:
            mapping = paths._get_node("gene_mapping_path")
            value = None if mapping._is_none() else str(mapping._value())
            del paths["gene_mapping_path"]
            if "GENE_MAPPINGS_PATH" not in paths and value is not None:
                # a CSV is one token space, as GENE_MAPPING_PATH; a .pkl is refused once the
                # project path is known (`_pickled_mapping`)
                paths["GENE_MAPPINGS_PATH"] = value


def _pickled_mapping(cfg: DictConfig) -> None:
    """A token mapping that is a pandas pickle (scConcept v0.1.0's PATH.gene_mapping_path): refused,
    since loading a pickle runs code from the file, with the one-line conversion to a CSV."""
    mapping = str(cfg.PATH.GENE_MAPPINGS_PATH)
    if not mapping.endswith(".pkl"):
        return
    raise ConfigError(
        "PATH.GENE_MAPPINGS_PATH",
        f"is {mapping}, a pickled pandas Series (scConcept v0.1.0's token mapping, its "
        "PATH.gene_mapping_path): loading a pickle runs code from the file, so it is not read here.",
        "Convert it once to a token mapping CSV (tokens renumbered: <cls> 0, <pad> 1) and set "
        'PATH.GENE_MAPPINGS_PATH to it: python -c "import pandas as pd; '
        f"s = pd.read_pickle('{mapping}'); g = [x for x in s.index if not str(x).startswith('<')]; "
        "pd.DataFrame({'gene_id': ['<cls>', '<pad>'] + g, 'gene_name': '', "
        "'token': range(len(g) + 2)}).to_csv('hsapiens.csv', index=False)\"",
    )


def _stderr(line: str) -> None:
    import sys

    print(line, file=sys.stderr)


def _split_overrides(overrides: list[str], search: list[Path]) -> tuple[list[str], list[tuple[str, object]]]:
    """Hydra's share (group choices, +key, ++key, ~key) and ours (plain key=value, parsed with
    Hydra's grammar: quoting, lists, null)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise ConfigError(
            "command line",
            f"has an override Hydra cannot parse ({exc}).",
            "Write overrides as key=value; quote values with spaces or commas: key='a b'.",
        ) from None
    hydra_side, settings = [], []
    for text, o in zip(overrides, parsed):
        group = o.key_or_group.split("@")[0]
        is_group = any((d / group).is_dir() for d in search)
        if o.type == OverrideType.CHANGE and not is_group and not o.is_sweep_override():
            settings.append((o.key_or_group, o.value()))
        else:
            hydra_side.append(text)
    return hydra_side, settings


def typed_config(cfg: DictConfig | dict) -> Root:
    """A config saved by a run (its resolved `config.yaml`) in the current schema: keys a later
    version added take their defaults, so code reads every key without a fallback of its own."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=False)
    return to_root(_typed(OmegaConf.create(cfg), [], []))


def to_root(cfg: DictConfig) -> Root:
    """The checked tree as typed objects, every interpolation resolved: split files go to
    `datamodule.mounted_splits`, each loader's split list becomes `SplitItem`s."""
    lists = {where: _split_items(cfg, where) for where in _split_lists(cfg)}
    files = {}
    for name in [k for k in cfg.datamodule.keys() if str(k).startswith(SPLIT_PREFIX)]:
        files[str(name)] = _resolved(cfg.datamodule, name)
    tree = OmegaConf.to_container(cfg, resolve=False)
    for name in files:
        del tree["datamodule"][name]
    for where in lists:
        _set(tree, where, [])
    try:
        root = OmegaConf.to_object(merge_typed(OmegaConf.create(tree), Root))
    except OmegaConfBaseException as exc:
        where = getattr(exc, "full_key", None) or "config"
        raise ConfigError(
            where,
            f"cannot be resolved ({str(exc).strip().splitlines()[0]}).",
            "Fix the interpolation ${...} it uses, or set the key to a value.",
        ) from None
    root.datamodule.mounted_splits = files
    for where, items in lists.items():
        _set_attr(root, where, items)
    return root


def as_dict(root: Root) -> dict:
    """The typed config as plain containers, laid out as the YAML tree (split files at
    `datamodule.split_<x>`, split lists as written): what a run records in its config.yaml."""

    def plain(value):
        if isinstance(value, SplitItem):
            return plain(value.written)
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    tree = plain(root)
    tree["datamodule"].update(tree["datamodule"].pop("mounted_splits"))
    return tree


def _split_lists(cfg: DictConfig) -> list[str]:
    """The config keys of every loader's split list."""
    dm = cfg.datamodule
    return ["datamodule.dataset.train.split"] + [f"datamodule.dataset.val.{name}.split" for name in dm.dataset.val]


def _resolved(parent: DictConfig, name) -> object:
    try:
        node = parent._get_node(name)
        return (
            OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else parent[name]
        )
    except OmegaConfBaseException as exc:
        raise ConfigError(
            f"datamodule.{name}",
            f"cannot be resolved ({str(exc).strip().splitlines()[0]}).",
            "Fix the interpolation ${...} it uses, or set the key to a value.",
        ) from None


def _split_items(cfg: DictConfig, where: str) -> list[SplitItem]:
    """A loader's split list as SplitItems: `${datamodule.split_x}` references (keyed by the split
    file), `{source: ..., key: train|val, proportion/repeat}` items and inline split dicts."""
    parent = OmegaConf.select(cfg, where.rsplit(".", 1)[0])
    raw = OmegaConf.to_container(parent, resolve=False)["split"]
    written = _resolved(parent, "split")
    if isinstance(raw, (str, dict)):
        raw, written = [raw], [written]
    items = []
    for i, (item, shown) in enumerate(zip(raw, written)):
        key, section, weights = f"{where}[{i}]", None, {}
        if isinstance(item, dict) and "source" in item:
            section = item.get("key")
            weights = {k: item[k] for k in WEIGHT_KEYS if item.get(k) is not None}
            item = item["source"]
            if section not in SECTIONS:
                raise ShardError(key, f"has `key: {section}`.", "Use `key: train` or `key: val`.")
        if isinstance(item, str) and (m := _INTERPOLATION.match(item)):
            key = m.group(1)
            if OmegaConf.select(cfg, key) is None:
                raise ShardError(
                    key,
                    "is referenced by a split list but not defined.",
                    "Add it to the datamodule's defaults list, e.g. `- split_x_hsapiens: my_split`.",
                )
            split = OmegaConf.to_container(OmegaConf.select(cfg, key), resolve=True)
        elif isinstance(item, dict):  # inline: its ${PATH...} interpolations resolved against PATH
            split = OmegaConf.to_container(
                OmegaConf.merge(OmegaConf.create({"PATH": cfg.PATH}), {"_": item})["_"], resolve=True
            )
        else:
            split = item
        if isinstance(split, dict):
            weights = {k: split[k] for k in WEIGHT_KEYS if split.get(k) is not None} | weights
        items.append(SplitItem(key=key, split=split, section=section, weights=weights, written=shown))
    return items


def _set(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree[part]
    tree[leaf] = value


def _set_attr(root, dotted: str, value) -> None:
    node = root
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    setattr(node, leaf, value)


def _typed(cfg: DictConfig, overrides: list[str], search: list[Path]) -> DictConfig:
    """The composed config merged into the schema: unknown keys named with where they were set and
    the closest known key; wrong types named by key; the schema's defaults filled in."""
    with open_dict(cfg):
        _renamed_scconcept_keys(cfg, overrides, search)
    unknown = unknown_keys(cfg, Root, dynamic=split_node)
    if unknown:
        path, siblings = unknown[0]
        more = f" (and {len(unknown) - 1} more: {', '.join(p for p, _ in unknown[1:4])})" if len(unknown) > 1 else ""
        raise ConfigError(
            path,
            f"is not a key of the config; it is set {origin_of(path, overrides, search)}{more}.",
            suggestion(path, siblings, Root),
        )
    if isinstance(cfg.get("datamodule"), DictConfig) and "mounted_splits" in cfg.datamodule:
        raise ConfigError(
            "datamodule.mounted_splits",
            f"is set {origin_of('datamodule.mounted_splits', overrides, search)}; it is filled from the split files.",
            "Mount split files as datamodule.split_<source>_<species>.",
        )
    OmegaConf.set_struct(cfg, False)
    _no_validation(cfg)
    splits = {}
    if isinstance(cfg.get("datamodule"), DictConfig):
        for name in [k for k in cfg.datamodule.keys() if str(k).startswith(SPLIT_PREFIX)]:
            splits[name] = cfg.datamodule._get_node(name)
            del cfg.datamodule[name]
    typed = merge_typed(cfg, Root)
    # split files keep exactly their own keys (absent `repeat` / `proportion` mean something, and
    # split settings feed the shards' settings digest): checked for unknown keys above and for
    # values by check_values, not filled with defaults
    with open_dict(typed.datamodule):
        for name, node in splits.items():
            typed.datamodule[name] = node
    OmegaConf.set_struct(typed, True)
    return typed


def _quoted(path: Path) -> str:
    """A path as a Hydra override value: quoted, so spaces, commas, parentheses, brackets and `=`
    are taken literally, and `${` escaped, so that OmegaConf never interpolates it (a directory
    named `${oc.env:HOME}` is that directory, not the home directory)."""
    # a quote or `${` is escaped by one backslash, and the backslashes just before it by doubling
    text = re.sub(r"(\\*)(\$\{|')", lambda m: m.group(1) * 2 + "\\" + m.group(2), str(path))
    return f"'{text}'"


_PROJECT_PATH_OVERRIDE = re.compile(r"\+{0,2}PATH\.PROJECT_PATH=(?P<value>[^$]*)")


def _project_path_override(overrides: list[str]) -> tuple[str | None, list[str]]:
    """`PATH.PROJECT_PATH=P` among the overrides (scConcept's documented form) taken as the
    project path, so that P/conf is found as for a positional PROJECT_PATH. A value with an
    interpolation (`${...}`) stays an override: Hydra resolves it, and no conf/ is looked for."""
    for i, override in enumerate(overrides):
        m = _PROJECT_PATH_OVERRIDE.fullmatch(override)
        if m:
            value = m.group("value")
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            return value, overrides[:i] + overrides[i + 1 :]
    return None, overrides


def config_groups(user_dir: Path | None = None) -> dict[str, list[str]]:
    """group -> its choices (the YAML files of `conf/<group>/`), from the packaged tree and the
    user's config directory: what `--help` lists and a wrong choice is answered with."""
    groups: dict[str, set[str]] = {}
    for root in [d for d in (user_dir, PACKAGED_CONF_DIR) if d is not None and Path(d).is_dir()]:
        for group in sorted(p for p in Path(root).iterdir() if p.is_dir()):
            choices = {f.stem for f in group.glob("*.yaml")}
            if choices:
                groups.setdefault(group.name, set()).update(choices)
    return {g: sorted(c) for g, c in sorted(groups.items())}


def groups_help(user_dir: Path | None = None) -> str:
    """The config groups with their choices and the common overrides, for `--help`."""
    lines = ["config groups (group=choice; +experiment=NAME; PROJECT_PATH/conf or --config-dir adds its own):"]
    lines += [f"  {group:<12} {', '.join(choices)}" for group, choices in config_groups(user_dir).items()]
    lines += [
        "",
        "common overrides (every key: docs/config.md; --cfg job prints the composed config):",
        "  model.training.max_steps=1000 model.training.lr=3e-4 datamodule.dataloader.train.batch_size=256",
        "  datamodule.dataset.train.max_tokens=1000 initialize.run_id=NAME initialize.resume=True seed=0",
        "  PATH.SHARDS_PATH=/fast/shards datamodule.dataloader.train.num_workers=4 wandb.enabled=True",
    ]
    return "\n".join(lines)


def _missing_choice(exc, overrides: list[str], user_dir: Path | None) -> ConfigError | None:
    """A `group=choice` (or a defaults entry) naming no file of its group: the choices, one per line's
    worth, and where they were looked for; None when the missing file is not a group choice."""
    missing = str(getattr(exc, "missing_cfg_file", "") or "")
    group, _, choice = missing.rpartition("/")
    if not group:
        return None
    choices = config_groups(user_dir).get(group) or sorted(getattr(exc, "options", None) or [])
    given = next((o for o in overrides if o.lstrip("+~").split("=", 1)[0] == group), None)
    searched = [str(d / group) for d in (user_dir, PACKAGED_CONF_DIR) if d is not None]
    close = difflib.get_close_matches(choice, choices, n=1, cutoff=0.6)
    return ConfigError(
        given or f"{group}: {choice}",
        f"names no config of the group `{group}` (no {choice}.yaml in {', '.join(searched)}).",
        f"Choose one of: {', '.join(choices) or '(none found)'}" + (f" (the closest: {close[0]})." if close else "."),
    )


def _unparsable(user_dir: Path | None) -> ConfigError:
    """The error for a composition that recursed without end, naming every YAML file of the
    project's config directory beyond yaml_bounds' limits (the one composed is among them)."""
    found = []
    for path in sorted(user_dir.rglob("*.yaml")) if user_dir is not None else []:
        problem = yaml_problem(path, "a config file")
        if problem is not None:
            found.append((path, problem))
    fix = "Fix or remove it (configs are a few nested mappings and lists)."
    if len(found) == 1:
        return ConfigError(found[0][0], found[0][1], fix)
    if found:
        listed = "; ".join(f"{path} {problem.rstrip('.')}" for path, problem in found)
        return ConfigError(user_dir, f"holds YAML files that cannot be configs: {listed}.", fix)
    return ConfigError(
        "config", "nests too deep to compose (a file or an interpolation).", "Check the files of --config-dir."
    )


def _compose(overrides: list[str], user_dir: Path | None, config_name: str) -> DictConfig:
    from hydra import compose
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException, MissingConfigException

    search_path = create_config_search_path(f"file://{PACKAGED_CONF_DIR}")
    if user_dir is not None:
        search_path.prepend("command-line", f"file://{user_dir}", anchor=SearchPathQuery(provider="main"))
    GlobalHydra.instance().clear()
    Hydra.create_main_hydra2(task_name="concept", config_search_path=search_path)
    try:
        return compose(config_name=config_name, overrides=overrides)
    except RecursionError:  # PyYAML or OmegaConf on a file nested too deep
        raise _unparsable(user_dir) from None
    except MissingConfigException as exc:
        missing = _missing_choice(exc, overrides, user_dir)
        if missing is None:
            raise ConfigError("config", f"Hydra could not compose the config: {exc}", "Check --config-dir.") from None
        raise missing from None
    except HydraException as exc:
        raise ConfigError(
            "config",
            f"Hydra could not compose the config: {exc}",
            "Check the override keys and group names (`datamodule=...`) and --config-dir.",
        ) from exc
    except yaml.YAMLError as exc:  # a config file that is not valid YAML
        mark = getattr(exc, "problem_mark", None)
        where = f"{mark.name}, line {mark.line + 1}" if mark is not None else "a config file"
        problem = " ".join(str(exc).split())
        raise ConfigError(
            where,
            f"is not valid YAML ({problem}).",
            "Fix the file; a list that holds ${...} interpolations must be written one item "
            "per line (`- ${datamodule.split_x}`), not as [${...}].",
        ) from None
    finally:
        GlobalHydra.instance().clear()


def _check_loader_names(cfg: DictConfig, overrides: list[str], search: list[Path], names=None) -> None:
    """A `dataloader.val.<name>` needs a `dataset.val.<name>`: settings under a misspelled loader
    name would otherwise configure nothing."""

    datasets = [str(k) for k in cfg.datamodule.dataset.val.keys()]
    for name in cfg.datamodule.dataloader.val.keys() if names is None else names:
        if name not in datasets:
            path = f"datamodule.dataloader.val.{name}"
            close = difflib.get_close_matches(str(name), datasets, n=1, cutoff=0.6)
            raise ConfigError(
                path,
                f"configures a validation loader that datamodule.dataset.val does not define "
                f"(set {origin_of(path, overrides, search)}; loaders: {datasets}).",
                f"Did you mean `{close[0]}`?"
                if close
                else f"Add datamodule.dataset.val.{name} (with its split), or remove this entry.",
            )


def _has_key(cfg: DictConfig, dotted: str) -> bool:
    """Whether the key exists (a `???` value counts: it exists, unset)."""
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, DictConfig):
            return False
        node = node._get_node(part, throw_on_missing_key=False, validate_access=False)
        if node is None:
            return False
    return True
