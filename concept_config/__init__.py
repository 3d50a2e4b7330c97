"""The config tree's schema: every key both programs read, with its type, default, range or
choices, as dataclasses (one module per section). Nothing here imports numpy, torch or the two
programs' packages, so `concept-shard` and `concept-train` share it at no cost.

`concept_shard.config.compose_config` composes a project's YAML files with Hydra, checks them
against `Root` and returns a `Root` instance: the typed object the code works with.

fields    `key()`: a field's default, doc line and checks
project   PATH, lamindb, shard, split files and the resolved split list items
data      datamodule (loaders, panels, tokens)
model     model (architecture, loss)
training  model.training, wandb, initialize, profiler
root      Root: all of them
"""

from .root import ModelSection, Root

__all__ = ["ModelSection", "Root"]
