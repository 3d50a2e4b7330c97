"""A composed config checked against the typed schema: unknown keys, types, ranges, reference keys.

The schema is a tree of dataclasses (OmegaConf structured configs, as lingua declares its
configs) in the package `concept_config` (one module per section; defaults live there only).
`merge_typed` merges a composed config into it, `check_values` checks what types cannot say:

- a key the schema does not know is an error naming the key, the config file or command-line
  override it came from, and the closest known key (`difflib`), also when it sits one level off
  (`model.masking_rate` -> `model.training.masking_rate`);
- a value of the wrong type is an error naming the key (OmegaConf's validation of typed nodes);
- ranges and choices declared in a field's metadata are checked with the key in the message;
- reference keys that mean nothing for a shard-streaming trainer (Lightning's machinery, h5ad
  copying) are accepted; those a config sets are listed in ONE warning line.

Field metadata: see `concept_config.fields.key`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError


# ---- unknown keys ---------------------------------------------------------------------------------
def _schema_fields(schema_type) -> dict[str, dataclasses.Field] | None:
    return {f.name: f for f in dataclasses.fields(schema_type)} if dataclasses.is_dataclass(schema_type) else None


@functools.cache
def _hints(schema_type) -> dict:
    """The schema class's field types: evaluated once per class (its annotations are strings, and
    each evaluation compiles them anew: ~0.1 s per composed config otherwise)."""
    import typing

    return typing.get_type_hints(schema_type)


def _value_type(schema_type, name: str):
    """The declared type of a field (the dataclass for nested nodes, the value type of Dict[str, X])."""
    import typing

    t = _hints(schema_type)[name]
    origin = typing.get_origin(t)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(t) if a is not type(None)]
        t = args[0] if len(args) == 1 else t
        origin = typing.get_origin(t)
    return t, origin


def _all_paths(schema_type, prefix: str = "") -> list[str]:
    """Every dotted key the schema knows (dict-valued fields as `<name>`)."""
    import typing

    out = []
    for name in _schema_fields(schema_type) or {}:
        t, origin = _value_type(schema_type, name)
        path = f"{prefix}{name}"
        out.append(path)
        if dataclasses.is_dataclass(t):
            out += _all_paths(t, path + ".")
        elif origin is dict and dataclasses.is_dataclass(typing.get_args(t)[1]):
            out += _all_paths(typing.get_args(t)[1], path + ".<name>.")
    return out


def unknown_keys(
    cfg: DictConfig, schema_type, prefix: str = "", dynamic: Callable[[str, str], Any] | None = None
) -> list[tuple[str, list[str]]]:
    """(dotted key, its known siblings) for every key of `cfg` that the schema lacks.

    `dynamic(path, name)` returns the schema type of a key the dataclass leaves open (split files
    mounted at `datamodule.split_<x>`), or None."""
    import typing

    fields = _schema_fields(schema_type)
    if fields is None or not isinstance(cfg, DictConfig):
        return []
    found = []
    for name in cfg.keys():
        path = f"{prefix}{name}"
        if name not in fields:
            sub = dynamic(prefix.rstrip("."), str(name)) if dynamic else None
            if sub is None:
                found.append((path, sorted(fields)))
            else:
                node = cfg._get_node(name)
                if isinstance(node, DictConfig) and not node._is_interpolation():
                    found += unknown_keys(node, sub, path + ".", dynamic)
            continue
        node = cfg._get_node(name)
        if not isinstance(node, DictConfig) or node._is_interpolation() or node._is_none():
            continue
        t, origin = _value_type(schema_type, name)
        if dataclasses.is_dataclass(t):
            found += unknown_keys(node, t, path + ".", dynamic)
        elif origin is dict and dataclasses.is_dataclass(typing.get_args(t)[1]):
            for entry in node.keys():
                child = node._get_node(entry)
                if isinstance(child, DictConfig) and not child._is_interpolation():
                    found += unknown_keys(child, typing.get_args(t)[1], f"{path}.{entry}.", dynamic)
    return found


def suggestion(path: str, siblings: list[str], schema_type) -> str:
    """'Did you mean ...' for an unknown key: a close sibling, else the same name elsewhere."""
    leaf = path.rsplit(".", 1)[-1]
    generic = re.sub(r"\.val\.[^.]+\.", ".val.<name>.", path)  # a loader's name is free
    paths = _all_paths(schema_type)
    whole = difflib.get_close_matches(generic, paths, n=1, cutoff=0.85)
    if whole and whole[0].rsplit(".", 1)[-1] != leaf:  # a typo in the leaf: the sibling test says it
        whole = []
    if whole and whole[0] != generic:
        return f"Did you mean `{whole[0]}`?"
    elsewhere = [p for p in paths if p.rsplit(".", 1)[-1] == leaf]
    if elsewhere:  # the right name one level off: `model.masking_rate`
        return f"`{leaf}` is a key of `{'`, `'.join(elsewhere[:3])}`: move it there."
    close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
    if close:
        return f"Did you mean `{path.rsplit('.', 1)[0] + '.' if '.' in path else ''}{close[0]}`?"
    near = difflib.get_close_matches(leaf, sorted({p.rsplit(".", 1)[-1] for p in paths}), n=1, cutoff=0.75)
    if near:
        where = [p for p in paths if p.rsplit(".", 1)[-1] == near[0]]
        return f"Did you mean `{where[0]}`?"
    return "Check its spelling; docs/config.md lists every key."


def origin_of(path: str, overrides: list[str], config_dirs: list[Path]) -> str:
    """Where an unknown key was set: a command-line override, else the config files that define a
    key of that name (searched in the order Hydra searches the directories)."""
    for item in overrides:
        name = item.split("=", 1)[0].lstrip("+~")
        if name == path or name.startswith(path + "."):
            return f"on the command line (`{item}`)"
    leaf = re.escape(path.rsplit(".", 1)[-1])
    pattern = re.compile(rf"^\s*(-\s+)?['\"]?{leaf}['\"]?\s*:", re.M)
    group = path.split(".", 1)[0]
    hits = []
    for base in config_dirs:
        candidates = sorted(base.rglob("*.yaml"))
        # files of the key's own group first (model/..., datamodule/...), then the others
        candidates.sort(key=lambda p: 0 if p.relative_to(base).parts[0] == group else 1)
        for file in candidates:
            try:
                if pattern.search(file.read_text(errors="replace")):
                    hits.append(file)
            except OSError:
                continue
        if hits:
            break
    if not hits:
        return "in the composed config"
    return "in " + ", ".join(str(h) for h in hits[:2]) + (" (and others)" if len(hits) > 2 else "")


# ---- values ---------------------------------------------------------------------------------------
def _walk(cfg: DictConfig, schema_type, prefix: str, dynamic):
    """(dotted key, value, field) for every schema-declared leaf of cfg (resolved values)."""
    import typing

    fields = _schema_fields(schema_type) or {}
    for name in cfg.keys():
        path = f"{prefix}{name}"
        f = fields.get(name)
        node = cfg._get_node(name)
        if f is None:
            sub = dynamic(prefix.rstrip("."), str(name)) if dynamic else None
            if sub is not None and isinstance(node, DictConfig):
                yield from _walk(node, sub, path + ".", dynamic)
            continue
        t, origin = _value_type(schema_type, name)
        if dataclasses.is_dataclass(t) and isinstance(node, DictConfig):
            yield from _walk(node, t, path + ".", dynamic)
        elif origin is dict and dataclasses.is_dataclass(typing.get_args(t)[1]) and isinstance(node, DictConfig):
            for entry in node.keys():
                child = node._get_node(entry)
                if isinstance(child, DictConfig):
                    yield from _walk(child, typing.get_args(t)[1], f"{path}.{entry}.", dynamic)
        else:
            yield path, f, cfg, name


def _problem(value, meta: dict) -> str | None:
    if value is None:
        return None
    if meta.get("choices") is not None and value not in meta["choices"]:
        return f"must be one of {list(meta['choices'])}"
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    for bound, test, word in (
        ("ge", lambda v, b: v >= b, ">="),
        ("gt", lambda v, b: v > b, ">"),
        ("le", lambda v, b: v <= b, "<="),
        ("lt", lambda v, b: v < b, "<"),
    ):
        if bound in meta and (not number or not test(value, meta[bound])):
            return f"must be a number {word} {meta[bound]}"
    if meta.get("check") is not None:
        return meta["check"](value)
    return None


def check_values(cfg: DictConfig, schema_type, dynamic=None) -> list[str]:
    """Range/choice problems and refused reference values; returns the inert keys the config sets."""
    inert = []
    for path, f, parent, name in _walk(cfg, schema_type, "", dynamic):
        try:
            value = parent[name]
        except OmegaConfBaseException as exc:
            raise ConfigError(
                path,
                f"cannot be resolved ({_first_line(exc)}).",
                "Fix the interpolation ${...} it uses, or set the key to a value.",
            ) from None
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
        meta = f.metadata
        if "inert" in meta:
            if value != f.default and value is not None:
                inert.append(path)
            continue
        if "refuse_unless" in meta and value != meta["refuse_unless"]:
            raise ConfigError(
                path,
                f"is {value!r}: {meta['doc']}",
                f"Set it to {meta['refuse_unless']!r} "
                "or remove it (docs/migrating.md lists what each scConcept key does here).",
            )
        problem = _problem(value, meta)
        if problem:
            raise ConfigError(path, f"is {value!r}; it {problem}.", f"Set {path} to a valid value (docs/config.md).")
    return inert


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def merge_typed(cfg: DictConfig, schema_type) -> DictConfig:
    """The schema's defaults under the config's values, with OmegaConf's type validation; a value of
    the wrong type is a ConfigError naming the key."""
    try:
        return OmegaConf.merge(OmegaConf.structured(schema_type), cfg)
    except OmegaConfBaseException as exc:
        where = getattr(exc, "full_key", None) or "config"
        raise ConfigError(
            where,
            f"has a value of the wrong type ({_first_line(exc)}).",
            f"Give {where} a value of the type docs/config.md lists.",
        ) from None


def set_override(cfg: DictConfig, dotted: str, value: Any) -> None:
    """A command-line `key=value` on the typed config (wrong types named by key)."""
    try:
        OmegaConf.update(cfg, dotted, value, merge=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(
            dotted,
            f"cannot take {value!r} ({_first_line(exc)}).",
            f"Give {dotted} a value of the type docs/config.md lists.",
        ) from None


def inert_warning(paths: list[str]) -> str | None:
    """ONE line listing the reference keys a config sets that have no effect here."""
    if not paths:
        return None
    collapsed = sorted({re.sub(r"\.val\.[^.]+\.", ".val.<loader>.", p) for p in paths})
    return (
        "[config] accepted from scConcept's config tree, no effect here: "
        + ", ".join(collapsed)
        + " (docs/migrating.md says why for each)."
    )
