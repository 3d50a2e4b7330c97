"""concept_shard: turn a project's .h5ad / AnnData .zarr files into per-species MDS shards.

Data path: split YAMLs (``splits``) -> source files (``source``) -> cells mapped to the
species vocabulary (``cells``) -> MDS parts (``writer``) -> joined datasets and species
indexes (``finalize``) -> uploaded to ``PATH.SHARDS_REMOTE`` when set (``remote``). ``build``
runs one task of that pipeline; ``cli`` is the program.
"""

__version__ = "0.1.0"
# 2: index.json records each shard file's hash and dataset.json the digest of index.json
FORMAT_VERSION = 2
