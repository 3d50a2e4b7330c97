"""The whole config's schema, assembled from its sections (defaults included): `project` (PATH,
lamindb, shard, split files), `data` (datamodule), `model` (model), `training` (model.training,
wandb, initialize, profiler). `concept_shard.config` checks every composed config against `Root`
and returns it as a `Root` instance (concept-shard too: one config tree serves both programs)."""

from __future__ import annotations

from dataclasses import dataclass

from .data import DataModuleKeys
from .fields import key
from .model import ModelKeys
from .project import LamindbKeys, PathKeys, ShardKeys
from .training import InitializeKeys, ProfilerKeys, TrainingKeys, WandbKeys


@dataclass
class ModelSection(ModelKeys):
    training: TrainingKeys = key(TrainingKeys())


@dataclass
class Root:
    PATH: PathKeys = key(PathKeys())
    seed: int = key(0, "training batches, panels and gene sampling are a function of (seed, batch index)")
    wandb: WandbKeys = key(WandbKeys())
    initialize: InitializeKeys = key(InitializeKeys())
    profiler: ProfilerKeys = key(ProfilerKeys())
    lamindb: LamindbKeys = key(LamindbKeys())
    shard: ShardKeys = key(ShardKeys())
    model: ModelSection = key(ModelSection())
    datamodule: DataModuleKeys = key(DataModuleKeys())
