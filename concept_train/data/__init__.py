"""Everything between the MDS shards and a model-ready batch (docs/design.md, "Batches, panels and tokens").

catalog    split lists -> shard datasets (local, or in PATH.SHARDS_REMOTE), checked against their sources
store      one mosaicml-streaming dataset (a Stream per file): random access to cells
obs        one obs column of every cell of a dataset, read in bulk (for grouping)
groups     within_group_sampling: the groups of cells that may share a batch, and their fixed cut
plan       (seed, g) -> the cells of global batch g (per-file, per-group or mixed batches, weights)
panels     (seed, g) -> the two gene panels of the batch
tokenize   cells + panels -> packed token batch
filters    the training views' filters: feature drop, QC threshold, token budget
loader     g -> this rank's Batch through DataLoader workers; resumable state
datamodule the training and validation loaders of a composed config
"""

from concept_shard.errors import DataError

from .batch import Batch
from .datamodule import DataModule
from .loader import Loader

__all__ = ["Batch", "DataError", "DataModule", "Loader"]
