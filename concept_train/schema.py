"""The whole config's schema, assembled from the sections each owner declares (defaults included):
`concept_shard.schema` (PATH, seed, lamindb, shard, split files), `concept_train.data.schema`
(datamodule), `concept_train.model.schema` (model), `concept_train.trainer.schema`
(model.training, wandb, initialize, profiler). `concept_shard.config` checks every composed config
against `Root` (concept-shard too: one config tree serves both programs)."""

from __future__ import annotations

from dataclasses import dataclass

from concept_shard.schema import LamindbKeys, PathKeys, ShardKeys
from concept_shard.strict import key

from .data.schema import DataModuleKeys
from .model.schema import ModelKeys
from .trainer.schema import InitializeKeys, ProfilerKeys, TrainingKeys, WandbKeys


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
