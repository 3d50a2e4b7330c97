"""A training run as a tracked lamindb run (`lamindb.enabled=true`): shard datasets in,
checkpoint, resolved config and metrics out.

The same instance rules as `concept-shard --lamindb` (concept_shard/lamin.py): a local instance
whose storage root holds PROJECT_PATH, files registered in place, nothing sent to LaminHub.
The inputs are the artifacts `shards/<species>/<source>/<stem>` that `concept-shard build
--lamindb` registered; a dataset sharded without lamindb is registered here under that key.
Only rank 0 talks to lamindb.
"""

from __future__ import annotations

from pathlib import Path

from concept_config import Root
from concept_shard.errors import TrainError
from concept_shard.lamin import INIT_HINT, LaminError, LaminRun, check_instance

TRANSFORM = "concept-train"


class TrainLineage:
    def __init__(self, cfg: Root, run_id: str, run_dir: Path, resumed_from: Path | None):
        self.project = Path(cfg.PATH.PROJECT_PATH).resolve()
        self.run_id, self.run_dir = run_id, Path(run_dir)
        if cfg.PATH.SHARDS_REMOTE:
            raise TrainError(
                "lamindb.enabled",
                f"cannot track a run that streams from {cfg.PATH.SHARDS_REMOTE}: "
                "lamindb registers local files in place only.",
                "Train from local shards, or set lamindb.enabled=false.",
            )
        try:
            check_instance(self.project)
            self.run = LaminRun(
                TRANSFORM,
                params={
                    "run_id": run_id,
                    "project": str(self.project),
                    "datamodule": cfg.datamodule.name,
                    "model": {k: getattr(cfg.model, k) for k in ("dim_model", "nlayers", "num_head", "dim_hid")},
                    "max_steps": cfg.model.training.max_steps,
                    "seed": cfg.seed,
                    "resumed_from": str(resumed_from) if resumed_from else None,
                },
            )
        except LaminError as err:
            raise TrainError("lamindb.enabled", str(err), INIT_HINT) from None

    def add_inputs(self, shard_sets) -> None:
        """Every shard dataset the run reads (training and validation) as an input artifact."""
        for s in shard_sets:
            key = f"shards/{s.dataset_id}"
            try:
                self.run.register_source(s.dataset_dir or Path(s.directory), key=key)
            except LaminError as err:
                raise TrainError(
                    s.directory, f"is read by this run but cannot be registered in lamindb: {err}", INIT_HINT
                ) from None

    def add_outputs(self, checkpoint: Path) -> None:
        prefix = f"model_checkpoints/{self.run_id}"
        outputs = [
            (checkpoint, f"{prefix}/{checkpoint.name}", "DCP checkpoint (model, optimizer, loader state)"),
            (self.run_dir / "config.yaml", f"{prefix}/config.yaml", "resolved config of the run"),
            (self.run_dir / "metrics.jsonl", f"{prefix}/metrics.jsonl", "training and validation metrics"),
        ]
        for path, key, description in outputs:
            if not path.exists():
                continue
            try:
                self.run.register_output(path, key=key, inputs=[], description=description)
            except LaminError as err:
                raise TrainError(
                    path, f"was written but could not be registered in lamindb: {err}", INIT_HINT
                ) from None

    def close(self, failed: bool = False) -> None:
        self.run.__exit__(RuntimeError if failed else None, None, None)
