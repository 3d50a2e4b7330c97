"""A DataModule over a composed config with keys set by dotted path (null and lists allowed), for
the data tests that set keys the way the lead's strict schema expects (OmegaConf.update)."""

from __future__ import annotations

from omegaconf import OmegaConf

from helpers import ADVANCED


def make_dm(project, settings: dict | None = None, overrides=(), rank: int = 0, world_size: int = 1, log=None):
    from concept_shard.config import compose_config
    from concept_train.data import DataModule
    cfg = compose_config(project, list(ADVANCED) + list(overrides))
    for key, value in (settings or {}).items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return DataModule(cfg, rank=rank, world_size=world_size, log=log or (lambda *a: None))


def obs_of(dm, sets, key: str) -> list[list[str]]:
    """Every cell's obs value, decoded one sample at a time by the sample store."""
    return [[dm.store.get(dm.store.index_of[s.dataset_id], r)[f"obs.{key}"] for r in range(s.n_samples)] for s in sets]
