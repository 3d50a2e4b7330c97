"""A DataModule over a composed config with keys set by dotted path (null and lists allowed), for
the data tests: each setting becomes a command-line override, so it goes through the schema's
checks exactly as a user's would."""

from __future__ import annotations

import json

from helpers import ADVANCED


def override(key: str, value) -> str:
    """`key=value` in Hydra's grammar: null, booleans, numbers, quoted strings, lists of them."""

    def text(v):
        if v is None:
            return "null"
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ",".join(text(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ",".join(f"{k}:{text(x)}" for k, x in v.items()) + "}"
        return json.dumps(str(v)).replace('"', "'") if not str(v).isidentifier() else str(v)

    return f"{key}={text(value)}"


def make_dm(project, settings: dict | None = None, overrides=(), rank: int = 0, world_size: int = 1, log=None):
    from concept_shard.config import compose_config
    from concept_train.data import DataModule

    settings = [override(k, v) for k, v in (settings or {}).items()]
    cfg = compose_config(project, list(ADVANCED) + list(overrides) + settings)
    return DataModule(cfg, rank=rank, world_size=world_size, log=log or (lambda *a: None))


def obs_of(dm, sets, key: str) -> list[list[str]]:
    """Every cell's obs value, decoded one sample at a time by the sample store."""
    return [[dm.store.get(dm.store.index_of[s.dataset_id], r)[f"obs.{key}"] for r in range(s.n_samples)] for s in sets]
