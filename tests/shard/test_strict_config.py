"""The typed, strict config (concept_shard/strict.py and the schema in concept_config/): unknown keys are
named with the closest known key, wrong types and ranges with the key, scConcept's inert keys in one
warning line; every key of the schema can be set with a plain key=value."""

from __future__ import annotations

import pytest

from concept_shard.config import compose_config
from concept_shard.errors import ConfigError


def compose(project, *overrides, config_dir=None, lines=None):
    return compose_config(project, list(overrides), config_dir, log=(lines.append if lines is not None else None))


def error(project, *overrides, config_dir=None) -> str:
    with pytest.raises(ConfigError) as err:
        compose(project, *overrides, config_dir=config_dir)
    return " ".join(err.value.paragraph().split())


@pytest.mark.parametrize(
    "override,expected",
    [
        ("model.training.lrr=1", "Did you mean `model.training.lr`?"),
        ("model.trainig.lr=1", "Did you mean `model.training.lr`?"),
        ("+model.masking_rate=0.1", "is a key of `model.training.masking_rate`: move it there"),
        ("shard.chunksize=4", "Did you mean `shard.chunk_size`?"),
        ("datamodule.dataset.train.panel_overlaps=0.5", "Did you mean `datamodule.dataset.train.panel_overlap`?"),
        ("+datamodule.dataset.train.panel_overlaps=0.5", "Did you mean `datamodule.dataset.train.panel_overlap`?"),
    ],
)
def test_a_misspelled_key_on_the_command_line_is_named_with_a_suggestion(tmp_path, override, expected):
    text = error(tmp_path, override)
    assert override.lstrip("+").split("=")[0] in text and expected in text


def test_a_misspelled_key_in_a_yaml_file_names_the_file(tmp_path):
    (tmp_path / "conf/model").mkdir(parents=True)
    (tmp_path / "conf/model/Mine.yaml").write_text("defaults:\n  - ContrastiveModel\n  - _self_\nnum_heads: 4\n")
    text = error(tmp_path, "model=Mine")
    assert "model.num_heads" in text and "Mine.yaml" in text and "Did you mean `model.num_head`?" in text


@pytest.mark.parametrize(
    "override,expected",
    [
        ("model.nlayers=2.5", "model.nlayers: cannot take 2.5"),
        ("model.training.lr=abc", "model.training.lr: cannot take 'abc'"),
        ("datamodule.dataloader.train.shuffle=maybe", "datamodule.dataloader.train.shuffle: cannot take 'maybe'"),
        ("datamodule.check_sources=maybe", "datamodule.check_sources: is 'maybe'; it must be true, full or false"),
        ("datamodule.check_sources=0", "datamodule.check_sources: is 0; it must be true, full or false"),
        ("shard.chunk_size=0", "shard.chunk_size: is 0; it must be a number > 0"),
        ("model.training.accumulate_grad_batches=0", "it must be a number >= 1"),
        ("datamodule.dataloader.train.num_workers=-1", "it must be a number >= 0"),
        ("model.dropout=1", "model.dropout: is 1.0; it must be a number < 1"),
        ("datamodule.normalization=zscore", "datamodule.normalization: is 'zscore'"),
        ("shard.compression=gzip", "shard.compression: is 'gzip'"),
        ("model.training.val_check_interval=1.5", "nor a fraction of a training epoch in (0, 1]"),
        ("model.training.limit_train_batches=0", "model.training.limit_train_batches: is 0"),
        ("datamodule.dataset.train.variable_size=true", "datamodule.dataset.train.variable_size: is True"),
        ("datamodule.precomp_embs_key=X_pca", "datamodule.precomp_embs_key: is 'X_pca'"),
    ],
)
def test_a_wrong_type_or_range_names_the_key(tmp_path, override, expected):
    assert expected in error(tmp_path, override)


def test_a_settings_block_for_an_undefined_validation_loader_is_refused(tmp_path):
    text = error(tmp_path, "+datamodule.dataloader.val.within_P200_B265.batch_size=3")
    assert "datamodule.dataloader.val.within_P200_B265" in text and "Did you mean `within_P200_B256`?" in text


def test_every_schema_key_takes_a_plain_override_and_defaults_fill_what_yaml_omits(tmp_path):
    cfg = compose(
        tmp_path,
        "datamodule.dataset.train.epoch_size=500",
        "model.training.masking_rate=0.2",
        "datamodule.dataloader.train.within_group_sampling=[dataset,donor_id]",
    )
    assert cfg.datamodule.dataset.train.epoch_size == 500 and cfg.model.training.masking_rate == 0.2
    assert list(cfg.datamodule.dataloader.train.within_group_sampling) == ["dataset", "donor_id"]
    assert cfg.model.dim_model == 512 and cfg.shard.chunk_size == 2048  # from the schema, not the YAML
    assert cfg.datamodule.dataset.val["within_P200_B256"].max_tokens == 200  # the YAML's own value
    assert cfg.datamodule.dataset.val["within_P6400_B256"].panel_max_drop_rate == 0.5


def test_val_null_means_no_validation_as_in_scconcept(tmp_path):
    """`datamodule.dataset.val=null datamodule.dataloader.val=null` (how scConcept's tests drop
    validation) was refused as a type error; in a YAML file too."""
    cfg = compose(tmp_path, "datamodule.dataset.val=null", "datamodule.dataloader.val=null")
    assert dict(cfg.datamodule.dataset.val) == {} and dict(cfg.datamodule.dataloader.val) == {}
    (tmp_path / "conf/datamodule").mkdir(parents=True)
    (tmp_path / "conf/datamodule/NoVal.yaml").write_text(
        "defaults:\n  - DataModuleBasic\n  - _self_\ndataset:\n  val: null\ndataloader:\n  val: null\n"
    )
    cfg = compose(tmp_path, "datamodule=NoVal")
    assert dict(cfg.datamodule.dataset.val) == {} and dict(cfg.datamodule.dataloader.val) == {}
    assert cfg.datamodule.dataset.train.max_tokens == 1000  # the rest of the module as it was


def test_scconcept_trees_of_early_2026_compose_with_their_keys_meaning_what_they_meant(tmp_path):
    """Keys scConcept wrote between January and March 2026 and later renamed or dropped: each
    composed every tree of those months (checked against its history) where they were refused."""
    from concept_shard.vocabulary import load_vocabulary
    from concept_train.trainer.loop import validation_steps

    lines = []
    cfg = compose(
        tmp_path,
        "+model.training.use_specie_embs_freq=0.25",  # renamed use_learnable_embs_freq in March
        "++model.training.freeze_pretrained_vocabulary=null",  # scConcept's `if` read null as off
        "model.training.val_check_interval=1.0",  # Lightning's fraction of an epoch
        "+PATH.DATASET_PATH=${PATH.PROJECT_PATH}/data/cxg",  # January's helper paths
        "+datamodule.dataloader.val.within_P200_B256.max_samples_per_group=5000",
        lines=lines,
    )
    training = cfg.model.training
    assert training.use_learnable_embs_freq == 0.25 and training.freeze_pretrained_vocabulary is False
    assert [validation_steps(v, 40) for v in (1.0, 0.25, 100, 0, None)] == [40, 10, 100, 0, 0]
    assert "PATH.DATASET_PATH" in lines[0] and "max_samples_per_group" in lines[0]
    # PATH.GENE_MAPPING_PATHS (March 17): species -> <folder>/<species>.csv is that folder
    folder = "${PATH.PROJECT_PATH}/references/vocabulary/token_mappings_per_specie"
    plural = f"+PATH.GENE_MAPPING_PATHS={{hsapiens:'{folder}/hsapiens.csv',mmusculus:'{folder}/mmusculus.csv'}}"
    cfg = compose(tmp_path, plural)
    assert cfg.PATH.GENE_MAPPINGS_PATH == f"{tmp_path.resolve()}/references/vocabulary/token_mappings_per_specie"
    text = error(tmp_path, "+PATH.GENE_MAPPING_PATHS={hsapiens:/a/human.csv}")
    assert "PATH.GENE_MAPPING_PATHS" in text and "<one folder>/<species>.csv" in text
    # PATH.GENE_MAPPING_PATH (February): one CSV, one token space, for every species
    (tmp_path / "all.csv").write_text("gene_id,gene_name,token\n<cls>,,0\n<pad>,,1\nENSG1,A,2\nENSMUSG1,a,3\n")
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf/config.yaml").write_text(
        "defaults:\n  - model: ContrastiveModel\n  - datamodule: DataModuleBasic\n  - _self_\n"
        "PATH:\n  PROJECT_PATH: ???\n  GENE_MAPPING_PATH: ${PATH.PROJECT_PATH}/all.csv\n"
    )
    cfg = compose(tmp_path)
    assert cfg.PATH.GENE_MAPPINGS_PATH == f"{tmp_path.resolve()}/all.csv"
    human, mouse = (load_vocabulary(cfg.PATH.GENE_MAPPINGS_PATH, sp) for sp in ("hsapiens", "mmusculus"))
    assert human.token_of == mouse.token_of and human.token_of["ENSMUSG1"] == 3


def test_inert_reference_keys_are_listed_in_one_warning_line(tmp_path):
    lines = []
    compose(
        tmp_path,
        "model.training.accelerator=gpu",
        "datamodule.dataloader.train.pin_memory=true",
        "model.training.devices=-1",
        lines=lines,
    )
    assert len(lines) == 1
    for key in ("model.training.accelerator", "datamodule.dataloader.train.pin_memory", "model.training.devices"):
        assert key in lines[0]
    quiet = []
    compose(tmp_path, lines=quiet)
    assert quiet == []  # the packaged config sets none of them


def test_scconcept_v010_root_split_composes_as_a_mounted_split(tmp_path):
    """scConcept v0.1.0 (2026-01-05) and the weeks after: the split a root group of its own, read
    through PATH.SPLIT from PATH.ADATA_PATH; the token mapping a pandas pickle (refused with the
    conversion), or a CSV."""
    conf = tmp_path / "conf"
    (conf / "split").mkdir(parents=True)
    (conf / "datamodule").mkdir()
    (conf / "datamodule" / "DataModuleV1.yaml").write_text(  # its loaders name no split
        "name: DataModule\nnormalization: raw\ndataset:\n  train:\n    max_tokens: 100\n  val:\n    same:\n"
        "      max_tokens: ${datamodule.dataset.train.max_tokens}\n    within_P200_B256:\n      max_tokens: 200\n"
        "dataloader:\n  train:\n    batch_size: 8\n  val:\n    same:\n      batch_size: 8\n"
        "    within_P200_B256:\n      batch_size: 8\n"
    )
    (conf / "config.yaml").write_text(
        "defaults:\n  - model: ContrastiveModel\n  - datamodule: DataModuleV1\n  - split: split_v1\n  - _self_\n"
        "PATH:\n  PROJECT_PATH: ???\n  PROJECT_DATA_PATH: ${PATH.PROJECT_PATH}/data\n"
        "  DATASET_PATH: ${PATH.PROJECT_DATA_PATH}/cxg\n  ADATA_PATH: ${PATH.DATASET_PATH}/h5ads\n"
        "  SPLIT: ${split}\n  gene_mapping_path: ${PATH.DATASET_PATH}/pc_gene_token_mapping.pkl\n"
    )
    (conf / "split" / "split_v1.yaml").write_text("test: null\nval:\n- v1.h5ad\ntrain:\n- t1.h5ad\n- t2.h5ad\n")
    text = error(tmp_path)
    pickle = f"{tmp_path.resolve()}/data/cxg/pc_gene_token_mapping.pkl"
    assert text.startswith(f"PATH.GENE_MAPPINGS_PATH: is {pickle}, a pickled pandas Series")
    assert f"pd.read_pickle('{pickle}')" in text and "PATH.GENE_MAPPINGS_PATH" in text

    config = (conf / "config.yaml").read_text().replace("pc_gene_token_mapping.pkl", "mapping.csv")
    (conf / "config.yaml").write_text(config)
    lines = []
    cfg = compose(tmp_path, lines=lines)
    assert cfg.PATH.GENE_MAPPINGS_PATH == f"{tmp_path.resolve()}/data/cxg/mapping.csv"
    split = cfg.datamodule.mounted_splits["split_root_split_hsapiens"]
    assert split["train"] == ["t1.h5ad", "t2.h5ad"] and split["val"] == ["v1.h5ad"]
    assert split["source_path"] == f"{tmp_path.resolve()}/data/cxg/h5ads"
    assert [item.key for item in cfg.datamodule.dataset.train.split] == ["datamodule.split_root_split_hsapiens"]
    for loader in cfg.datamodule.dataset.val.values():
        assert [(item.key, item.section) for item in loader.split] == [("datamodule.split_root_split_hsapiens", "val")]
    assert not any("PATH.ADATA_PATH" in line for line in lines)  # it locates the split's files
