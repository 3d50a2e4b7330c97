"""A project that brings scConcept's own root config.yaml (none of our keys), in PROJECT_PATH/conf
(found without --config-dir), under a path with spaces, commas, parentheses and non-ASCII letters:
it shards and trains unchanged, and our own keys can still be overridden."""

from __future__ import annotations

import json
import shutil

from helpers import shard

from concept_shard.config import compose_config
from concept_train.cli import main as train

ROOT = """\
# scConcept's root config: no shard, seed, lamindb or PATH.SHARDS_PATH
defaults:
  - model: ContrastiveModel
  - datamodule: TheirModule
  - _self_
wandb: {enabled: False, run_name: null, entity: null, project: null}
initialize: {resume: False, run_id: null, checkpoint: null, create_new_run: False}
profiler: {enabled: False}
PATH:
  PROJECT_PATH: ???
  LOCAL_DIR: null
  CHECKPOINT_ROOT: ${PATH.PROJECT_PATH}/model_checkpoints
  PANELS_PATH: ${PATH.PROJECT_PATH}/panels
  GENE_MAPPINGS_PATH: ${PATH.PROJECT_PATH}/references/vocabulary/token_mappings_per_specie
  PRETRAINED_VOCABULARY: null
"""
MODULE = """\
defaults:
  - split_lab_hsapiens: lab
  - _self_
species: [hsapiens]
obs_keys: [cell_type]
dataset:
  train:
    split:
      - ${datamodule.split_lab_hsapiens}
    max_tokens: 50
    panel_selection: random
dataloader:
  train: {batch_size: 16, num_workers: 0}
"""
SPLIT = """\
source_name: lab
species: hsapiens
source_path: ${PATH.PROJECT_PATH}/data/${.source_name}/h5ads
train: [hs_blood_a.h5ad]
"""
TINY = [
    "model.dim_model=16",
    "model.nlayers=1",
    "model.num_head=2",
    "model.dim_hid=32",
    "model.dim_gene_embs=16",
    "model.training.max_steps=2",
    "model.training.warmup=1",
    "model.training.val_check_interval=0",
    "model.training.validate_before_training=False",
]


def test_a_foreign_root_config_shards_and_trains_unchanged(example_source, tmp_path, capsys):
    project = tmp_path / "my lab, run (2) – Zürich"
    (project / "data/lab/h5ads").mkdir(parents=True)
    shutil.copy(example_source / "data/synth_hsapiens/h5ads/hs_blood_a.h5ad", project / "data/lab/h5ads/")
    shutil.copytree(example_source / "references", project / "references")
    conf = project / "conf"
    (conf / "datamodule/split_lab_hsapiens").mkdir(parents=True)
    (conf / "config.yaml").write_text(ROOT)
    (conf / "datamodule/TheirModule.yaml").write_text(MODULE)
    (conf / "datamodule/split_lab_hsapiens/lab.yaml").write_text(SPLIT)

    cfg = compose_config(project, ["shard.chunk_size=128", "PATH.LOCAL_DIR=/scratch"])
    assert cfg.shard.chunk_size == 128 and cfg.seed == 0 and cfg.PATH.LOCAL_DIR == "/scratch"  # ours, completed
    assert cfg.PATH.SHARDS_PATH == f"{project.resolve()}/shards"
    assert cfg.PATH.PRETRAINED_VOCABULARY is None  # theirs kept

    assert shard("build", project, "shard.chunk_size=128", "--no-progress") == 0
    record = json.loads((project / "shards/hsapiens/lab/hs_blood_a/dataset.json").read_text())
    assert record["cells_written"] == 300
    assert train([str(project), *TINY, "initialize.run_id=theirs", "seed=3"]) == 0
    assert (project / "model_checkpoints/theirs/checkpoints/step_2/model.safetensors").is_file()
    assert train([str(project), *TINY, "shard.chunksize=1"]) == 2
    assert "shard.chunksize" in " ".join(capsys.readouterr().err.split())
