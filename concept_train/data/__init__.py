"""Everything between the MDS shards and a model-ready batch (docs/design.md, "Batches, panels and tokens").

The folders follow the path a batch takes, in order; nothing imports a later step:

read/       catalog      split lists -> shard datasets (local, or in PATH.SHARDS_REMOTE), checked against their sources
            store        one mosaicml-streaming dataset (a Stream per file): random access to cells
            decode       a batch's samples decoded a shard at a time (store's fast path)
            obs          one obs column of every cell of a dataset, read in bulk (for grouping)
            shm          /dev/shm: streaming's segments left by killed processes removed, room checked
order/      groups       within_group_sampling: the groups of cells that may share a batch, and their fixed cut
            plan         (seed, g) -> the cells of global batch g (per-file, per-group or mixed batches, weights)
            permutation  keyed permutations of range(n) evaluated index by index (mixed batches); splitmix64
make/       panels       (seed, g) -> the two gene panels of the batch
            tokenize     cells + panels -> packed token batch
            filters      the training views' filters: feature drop, QC threshold, token budget
            batch        the model-ready Batch: one rank's slice of a global batch
deliver/    loader       g -> this rank's Batch through DataLoader workers; resumable state
            handoff      batches out of DataLoader workers through shared-memory slots made once per pass
            workers      DataLoader workers capped at the CPUs the process is given (SLURM_CPUS_PER_TASK)
kernels     the compiled (numba) passes of decode and tokenize, in one place (their NumPy paths are the reference)
datamodule  the training and validation loaders of a composed config: the route above, assembled
"""

from concept_shard.errors import DataError
from concept_train.lazy import lazy_names

# imported on first use (see concept_train/__init__.py): `concept_train.data.read.obs` loads no torch
_HOMES = {"Batch": ".make.batch", "DataModule": ".datamodule", "Loader": ".deliver.loader"}
__all__ = ["DataError", *sorted(_HOMES)]

__getattr__ = lazy_names(__name__, _HOMES)
