"""Compose the project config exactly as the trainer will: Hydra, `conf/`, the user's config
directory, overrides.

The user's directory is `--config-dir`, else `PROJECT_PATH/conf` when it exists; it is searched
before the packaged `conf/`, so it can add groups (`datamodule=MyModule`, its own split files) and
replace packaged files of the same name, the root `config.yaml` included. A root config that lacks
our own keys (scConcept's, unchanged: no `shard`, `seed`, `lamindb`, `PATH.SHARDS_PATH`, ...) is
completed from `conf/concept/base.yaml`, the user's values winning; overrides of those keys are
applied after the completion.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError

# The packaged config tree sits beside the packages (repo root); CONCEPT_CONF_DIR overrides it.
PACKAGED_CONF_DIR = Path(os.environ.get("CONCEPT_CONF_DIR", Path(__file__).resolve().parent.parent / "conf"))
OUR_KEYS = PACKAGED_CONF_DIR / "concept" / "base.yaml"      # what a foreign root config is completed from


def compose_config(
    project_path: str | os.PathLike | None,
    overrides: list[str] | tuple[str, ...] = (),
    config_dir: str | os.PathLike | None = None,
    config_name: str = "config",
) -> DictConfig:
    """Compose `config_name` from the packaged tree, with the user's config directory searched FIRST."""
    if not PACKAGED_CONF_DIR.is_dir():
        raise ConfigError(PACKAGED_CONF_DIR, "the packaged config tree is missing.",
                          "Install the repo with `bash tools/install.sh` or set CONCEPT_CONF_DIR.")
    overrides = list(overrides)
    if project_path is not None:
        overrides = [f"PATH.PROJECT_PATH={_quoted(Path(project_path).resolve())}"] + overrides
        if config_dir is None and (Path(project_path) / "conf").is_dir():
            config_dir = Path(project_path) / "conf"          # the project's own configs, by convention
    user_dir = None
    if config_dir is not None:
        user_dir = Path(config_dir).resolve()
        if not user_dir.is_dir():
            raise ConfigError(f"--config-dir {config_dir}", "is not a directory.",
                              "Pass the directory that holds your datamodule/ and split YAMLs.")
    root = user_dir / f"{config_name}.yaml" if user_dir is not None else None
    if root is not None and root.is_file() and _lacks_our_keys(root):
        cfg = _compose_foreign(overrides, user_dir, config_name)
    else:
        cfg = _compose(overrides, user_dir, config_name)
    if OmegaConf.is_missing(cfg.PATH, "PROJECT_PATH"):
        raise ConfigError("PATH.PROJECT_PATH", "is not set.", "Pass PROJECT_PATH as the first argument.")
    return cfg


def _quoted(path: Path) -> str:
    """A path as a Hydra override value: quoted, so spaces, commas, parentheses and brackets are
    taken literally."""
    text = str(path).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def _lacks_our_keys(root: Path) -> bool:
    try:
        text = yaml.safe_load(root.read_text()) or {}
    except yaml.YAMLError:
        return False          # _compose reports it with its line
    return isinstance(text, dict) and "shard" not in text and "concept" not in str(text.get("defaults", ""))


def _compose(overrides: list[str], user_dir: Path | None, config_name: str) -> DictConfig:
    from hydra import compose
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    search_path = create_config_search_path(f"file://{PACKAGED_CONF_DIR}")
    if user_dir is not None:
        search_path.prepend("command-line", f"file://{user_dir}", anchor=SearchPathQuery(provider="main"))
    GlobalHydra.instance().clear()
    Hydra.create_main_hydra2(task_name="concept", config_search_path=search_path)
    try:
        return compose(config_name=config_name, overrides=overrides)
    except HydraException as exc:
        raise ConfigError("config", f"Hydra could not compose the config: {exc}",
                          "Check the override keys and group names (`datamodule=...`) and --config-dir.") from exc
    except yaml.YAMLError as exc:         # a config file that is not valid YAML
        mark = getattr(exc, "problem_mark", None)
        where = f"{mark.name}, line {mark.line + 1}" if mark is not None else "a config file"
        problem = " ".join(str(exc).split())
        raise ConfigError(where, f"is not valid YAML ({problem}).",
                          "Fix the file; a list that holds ${...} interpolations must be written one item "
                          "per line (`- ${datamodule.split_x}`), not as [${...}].") from None
    finally:
        GlobalHydra.instance().clear()


def _compose_foreign(overrides: list[str], user_dir: Path, config_name: str) -> DictConfig:
    """The user's root config completed with our keys: theirs win; overrides of keys only we
    define are applied after the completion (Hydra would refuse them as unknown)."""
    def is_group(item: str) -> bool:           # `datamodule=X`, `+experiment=demo`: a config group
        name = item.split("=", 1)[0].lstrip("+~")
        return (user_dir / name).is_dir() or (PACKAGED_CONF_DIR / name).is_dir()

    known = _compose([o for o in overrides if is_group(o)], user_dir, config_name)
    hydra_side, ours = [], []
    for item in overrides:
        key = item.split("=", 1)[0]
        if not is_group(item) and not key.startswith(("+", "~")) and not _has_key(known, key):
            ours.append(item)
        else:
            hydra_side.append(item)
    cfg = _compose(hydra_side, user_dir, config_name)
    merged = OmegaConf.merge(OmegaConf.load(OUR_KEYS), cfg)
    for item in ours:
        key, _, value = item.partition("=")
        if not _has_key(merged, key):
            raise ConfigError(key, "is not a key of the config (nor of concept-pretrain's own keys).",
                              "Check its spelling (docs/config.md lists every key), or add it with +key=value.")
        OmegaConf.update(merged, key, yaml.safe_load(value), merge=True)
    OmegaConf.set_struct(merged, True)
    return merged


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
