"""Lineage of one `concept-shard` invocation in lamindb: sources in, shard datasets out.

A thin adapter between the build (which knows files and datasets) and `lamin.py` (which
knows lamindb). lamindb errors become ShardErrors of the file they concern.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ShardError
from .lamin import INIT_HINT, LaminError, LaminRun, check_instance, resolve_artifact_key


class ShardLineage:
    def __init__(self, project_path: str, datamodule_name: str, command: str):
        self.project = Path(project_path).resolve()
        self.command, self.datamodule = command, datamodule_name
        self._run: LaminRun | None = None  # created on the first registration only
        try:
            check_instance(self.project)
        except LaminError as err:
            raise ShardError("lamindb", str(err), INIT_HINT) from None

    @property
    def run(self) -> LaminRun:
        if self._run is None:
            try:
                self._run = LaminRun(
                    f"concept-shard {self.command}",
                    params={"project": str(self.project), "datamodule": self.datamodule},
                )
            except LaminError as err:
                raise ShardError("lamindb", str(err), INIT_HINT) from None
        return self._run

    def resolve_key(self, key: str) -> Path:
        try:
            return resolve_artifact_key(key)
        except LaminError as err:
            raise ShardError(f"lamindb key {key}", str(err), "Fix the key in the split YAML.") from None

    def register(self, sf, dataset_dir: Path, record: dict) -> None:
        """Register the source (input) and its shard dataset (output of this run); idempotent."""
        try:
            source_key = sf.lamindb_key or record["source_file"]
            source = self.run.register_source(sf.path, key=source_key)
            self.run.register_output(
                dataset_dir,
                key=f"shards/{sf.dataset_id}",
                inputs=[source],
                description=f"MDS shards of {source_key} ({record['cells_written']} cells)",
            )
        except LaminError as err:
            raise ShardError(sf.path, f"was sharded but could not be registered in lamindb: {err}", INIT_HINT) from None

    def close(self, failed: bool = False) -> None:
        if self._run is not None:
            self._run.__exit__(RuntimeError if failed else None, None, None)
