"""A project that brings a scConcept-shaped config tree, written from the reference's layout and
keys (docs/migrating.md, theislab/scConcept's conf/) and used unchanged: a root config.yaml without any of our keys, the
reference's model file (Lightning and sanity-check keys included), a data module with a
donor-grouped validation loader and split files. It shards and trains; the keys that mean nothing
here are named in one warning line; a misspelled key in one of its files stops with a suggestion."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import shard

from concept_shard.config import compose_config
from concept_shard.errors import ConfigError
from concept_train.cli import main as train

ROOT = """\
defaults:
  - model: ContrastiveModel
  - datamodule: DataModuleLab
  - _self_

wandb:
  enabled: False
  run_name: null
  entity: null
  project: null

initialize:
  resume: False
  run_id: null
  checkpoint: null
  create_new_run: False

profiler:
  enabled: False

PATH:
  PROJECT_PATH: ???
  LOCAL_DIR: null
  CHECKPOINT_ROOT: ${PATH.PROJECT_PATH}/model_checkpoints
  PANELS_PATH: ${PATH.PROJECT_PATH}/panels
  GENE_MAPPINGS_PATH: ${PATH.PROJECT_PATH}/references/vocabulary/token_mappings_per_specie
  SPECIES:
    - hsapiens
  PRETRAINED_VOCABULARY: null
"""
MODEL = """\
name: ContrastiveModel
flash_attention: True
dim_gene_embs: 16
dim_pretrained_vocab: 640
dim_model: 16
num_head: 2
dim_hid: 32
projection_dim: null
nlayers: 1
dropout: 0.1
decoder_head: False
norm_scheme: pre
activation: gelu
values_only_sanity_check: False
data_loading_speed_sanity_check: False
mlm_loss_weight: 0.0
cont_loss_weight: 1.0
contrastive_loss: multiclass
logit_scale_init_value: 3.0
mask_value: -1
cls_value: -2
mask_padding: True
pe_max_len: 5000
input_encoding: "rank_encoding"
loss_switch_step: 10000
training:
  resume_from_checkpoint: False
  validate_before_training: True
  masking_rate: 0
  lr: 1e-4
  weight_decay: 0.0
  optimizer_class: AdamW
  scheduler: "warmup"
  freeze_pretrained_vocabulary: False
  use_learnable_embs_freq: null
  warmup: 10
  max_steps: 3
  min_lr: 0.0
  accelerator: gpu
  devices: -1
  num_nodes: 1
  limit_train_batches: 1.0
  val_check_interval: 100000
  check_val_every_n_epoch: null
  accumulate_grad_batches: 1
  gradient_clip_val: 1.0
  log_every_n_steps: 1
"""
MODULE = """\
defaults:
  - split_lab_hsapiens: lab_v1

name: DataModule
species:
  - hsapiens
obs_keys: ["dataset", "donor_id", "tissue", "cell_type"]
columns: ["cell_type", "donor_id"]
label_keys_to_monitor: ["cell_type"]
batch_keys_to_monitor: ["donor_id"]
normalization: raw
gene_sampling_strategy: top-nonzero
model_speed_sanity_check: False
precomp_embs_key: null
dataset:
  train:
    split:
      - ${datamodule.split_lab_hsapiens}
    max_tokens: 50
    panel_overlap: False
    panel_selection: random
    panel_selection_mixed_prob: 0.25
    panel_filter_regex: ".*"
    panel_size_min: 400
    panel_size_max: 60000
    panel_max_drop_rate: 0.5
    feature_max_drop_rate: null
    qc_threshold: null
    max_total_seq_length: null
  val:
    within_donor_P200_B32:
      split:
        - ${datamodule.split_lab_hsapiens}
      panel_selection: random
      panel_size_min: 200
      panel_size_max: 200

dataloader:
  train:
    within_group_sampling: "dataset"
    batch_size: 32
    shuffle: True
    num_workers: 0
    pin_memory: True
    drop_last: True
    num_samples: null
    num_groups: null
  val:
    within_donor_P200_B32:
      within_group_sampling: ["dataset", "donor_id"]
      batch_size: 32
      shuffle: True
      num_workers: 0
      pin_memory: False
      drop_last: True
      num_samples: 100000
      num_groups: null
      sample_groups_equally: True
"""
SPLIT = """\
source_name: lab
species: hsapiens
source_path: ${PATH.PROJECT_PATH}/data/${.source_name}/h5ads
train:
  - hs_blood_a.h5ad
val:
  - hs_val_e.h5ad
"""


@pytest.fixture
def their_project(example_source, tmp_path):
    project = tmp_path / "lab project"
    (project / "data/lab/h5ads").mkdir(parents=True)
    for name in ("hs_blood_a.h5ad", "hs_val_e.h5ad"):
        shutil.copy(example_source / "data/synth_hsapiens/h5ads" / name, project / "data/lab/h5ads/")
    shutil.copytree(example_source / "references", project / "references")
    conf = project / "conf"
    (conf / "model").mkdir(parents=True)
    (conf / "datamodule/split_lab_hsapiens").mkdir(parents=True)
    (conf / "config.yaml").write_text(ROOT)
    (conf / "model/ContrastiveModel.yaml").write_text(MODEL)
    (conf / "datamodule/DataModuleLab.yaml").write_text(MODULE)
    (conf / "datamodule/split_lab_hsapiens/lab_v1.yaml").write_text(SPLIT)
    return project


@pytest.mark.slow
def test_a_scconcept_tree_shards_and_trains_unchanged(their_project, capsys):
    project = their_project
    lines = []
    cfg = compose_config(project, log=lines.append)
    assert cfg.datamodule.dataloader.val["within_donor_P200_B32"].within_group_sampling == ["dataset", "donor_id"]
    assert (
        cfg.shard.chunk_size == 2048 and cfg.PATH.SHARDS_PATH == f"{project.resolve()}/shards"
    )  # ours, from the schema
    assert len(lines) == 1  # ONE line names every key that has no effect here
    for inert in (
        "model.training.accelerator",
        "model.training.devices",
        "datamodule.dataloader.train.pin_memory",
        "datamodule.columns",
        "PATH.SPECIES",
        "datamodule.label_keys_to_monitor",
    ):
        assert inert in lines[0]
    assert "model.dropout" not in lines[0] and "within_group_sampling" not in lines[0]

    assert shard("build", project, "--no-progress") == 0
    for stem in ("hs_blood_a", "hs_val_e"):
        assert json.loads((project / f"shards/hsapiens/lab/{stem}/dataset.json").read_text())["cells_written"] == 300
    capsys.readouterr()
    assert train([str(project), "initialize.run_id=lab1"]) == 0
    err = capsys.readouterr().err
    assert "no effect here" in err and "model.training.accelerator" in err
    rows = [json.loads(line) for line in (project / "model_checkpoints/lab1/metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert steps[-1] == 3
    val = [r for r in rows if r["kind"] == "val"]
    assert val and any("within_donor_P200_B32" in json.dumps(r) for r in val)


def test_a_misspelled_key_in_their_files_names_file_and_suggestion(their_project):
    module = their_project / "conf/datamodule/DataModuleLab.yaml"
    module.write_text(MODULE.replace("sample_groups_equally: True", "sample_group_equally: True"))
    with pytest.raises(ConfigError) as err:
        compose_config(their_project)
    text = " ".join(str(err.value).split())
    assert "datamodule.dataloader.val.within_donor_P200_B32.sample_group_equally" in text
    assert "DataModuleLab.yaml" in text and "sample_groups_equally" in text


def test_a_wrong_type_in_their_files_is_named_by_key(their_project):
    model = their_project / "conf/model/ContrastiveModel.yaml"
    model.write_text(MODEL.replace("nlayers: 1", "nlayers: one"))
    with pytest.raises(ConfigError) as err:
        compose_config(their_project)
    assert "model.nlayers" in str(err.value)
    model.write_text(MODEL.replace("accumulate_grad_batches: 1", "accumulate_grad_batches: 0"))
    with pytest.raises(ConfigError) as err:
        compose_config(their_project)
    assert "model.training.accumulate_grad_batches" in str(err.value) and ">= 1" in str(err.value)
