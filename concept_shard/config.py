"""Compose the project config exactly as the trainer will: Hydra, `conf/`, --config-dir, overrides."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError

# The packaged config tree sits beside the packages (repo root); CONCEPT_CONF_DIR overrides it.
PACKAGED_CONF_DIR = Path(os.environ.get("CONCEPT_CONF_DIR", Path(__file__).resolve().parent.parent / "conf"))


def compose_config(
    project_path: str | os.PathLike | None,
    overrides: list[str] | tuple[str, ...] = (),
    config_dir: str | os.PathLike | None = None,
    config_name: str = "config",
) -> DictConfig:
    """Compose `config_name` from the packaged tree, with `config_dir` searched FIRST.

    Putting the user's directory ahead of the packaged one lets it both add groups
    (`datamodule=MyModule`, its own split files) and replace packaged files of the same name.
    """
    from hydra import compose
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from hydra.core.config_search_path import SearchPathQuery

    if not PACKAGED_CONF_DIR.is_dir():
        raise ConfigError(PACKAGED_CONF_DIR, "the packaged config tree is missing.",
                         "Install the repo with `bash tools/install.sh` or set CONCEPT_CONF_DIR.")
    overrides = list(overrides)
    if project_path is not None:
        overrides = [f"PATH.PROJECT_PATH={Path(project_path).resolve()}"] + overrides
    search_path = create_config_search_path(f"file://{PACKAGED_CONF_DIR}")
    if config_dir is not None:
        user_dir = Path(config_dir).resolve()
        if not user_dir.is_dir():
            raise ConfigError(f"--config-dir {config_dir}", "is not a directory.",
                             "Pass the directory that holds your datamodule/ and split YAMLs.")
        search_path.prepend("command-line", f"file://{user_dir}", anchor=SearchPathQuery(provider="main"))
    GlobalHydra.instance().clear()
    Hydra.create_main_hydra2(task_name="concept", config_search_path=search_path)
    try:
        cfg = compose(config_name=config_name, overrides=overrides)
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
    if OmegaConf.is_missing(cfg.PATH, "PROJECT_PATH"):
        raise ConfigError("PATH.PROJECT_PATH", "is not set.", "Pass PROJECT_PATH as the first argument.")
    return cfg
