"""Everything between the MDS shards and a model-ready batch (docs/design.md, "Batches, panels and tokens").

catalog    split lists -> shard datasets (local, or in PATH.SHARDS_REMOTE), checked against their sources
store      one mosaicml-streaming dataset (a Stream per file): random access to cells
plan       (seed, g) -> the cells of global batch g (per-dataset or mixed batches, weights)
panels     (seed, g) -> the two gene panels of the batch
tokenize   cells + panels -> packed token batch
loader     g -> this rank's Batch through DataLoader workers; resumable state
datamodule the training and validation loaders of a composed config
"""

from concept_shard.errors import DataError

from .batch import Batch
from .datamodule import DataModule
from .loader import Loader

__all__ = ["Batch", "DataError", "DataModule", "Loader"]
