"""Start-up errors of the data pipeline: each names the file or config key and what to do."""

from __future__ import annotations

from concept_shard.errors import ShardError


class DataError(ShardError):
    """A problem the user can act on before training starts (missing shards, a bad panel CSV, ...)."""
