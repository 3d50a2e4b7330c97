"""The SLURM scripts run as an array (SLURM variables, no scheduler) and --config-dir works as documented."""

from __future__ import annotations

import os
import subprocess

import pytest
from helpers import ADVANCED, REPO, dataset_dirs, shard


@pytest.mark.slow
def test_shard_array_sbatch_then_merge(project, tmp_path):
    venv = os.environ.get("CONCEPT_VENV", str(REPO / ".venv"))
    env = dict(
        os.environ,
        CONCEPT_VENV=venv,
        SLURM_ARRAY_TASK_COUNT="2",
        SLURM_ARRAY_TASK_MIN="0",
        SLURM_ARRAY_JOB_ID="42",
        PATH=f"{tmp_path}:{os.environ['PATH']}",
    )
    # a stand-in `sbatch` on PATH records what the first task queues
    (tmp_path / "sbatch").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/queued\n')
    (tmp_path / "sbatch").chmod(0o755)
    for task in ("0", "1"):
        env["SLURM_ARRAY_TASK_ID"] = task
        proc = subprocess.run(
            ["bash", str(REPO / "tools/slurm/shard_array.sbatch"), str(project), *ADVANCED, "shard.part_size=100"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr
    queued = (tmp_path / "queued").read_text().split()
    assert "--dependency=afterany:42" in queued and str(project) in queued and "datamodule=DataModuleAdvanced" in queued
    proc = subprocess.run(
        ["bash", str(REPO / "tools/slurm/shard_merge.sbatch"), str(project), *ADVANCED],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "9 done" in proc.stdout
    assert len(dataset_dirs(project)) == 9


def test_config_dir_is_searched_before_the_packaged_tree(project, tmp_path):
    from concept_shard.config import compose_config

    conf = tmp_path / "conf"
    (conf / "datamodule/split_synth_hsapiens").mkdir(parents=True)
    # a user file with a packaged file's name wins over it
    (conf / "datamodule/split_synth_hsapiens/synth_hsapiens.yaml").write_text(
        "source_name: synth_hsapiens\nspecies: hsapiens\n"
        "source_path: ${PATH.PROJECT_PATH}/data/${.source_name}/h5ads\ntrain: [hs_blood_a.h5ad]\nval: []\n"
    )
    (conf / "datamodule/Mine.yaml").write_text("defaults:\n  - DataModuleBasic\n  - _self_\nobs_keys: [cell_type]\n")
    cfg = compose_config(project, ["datamodule=Mine", "shard.chunk_size=64"], config_dir=conf)
    assert list(cfg.datamodule.obs_keys) == ["cell_type"] and cfg.shard.chunk_size == 64
    assert cfg.datamodule.mounted_splits["split_synth_hsapiens"]["train"] == ["hs_blood_a.h5ad"]
    assert shard("build", project, "--config-dir", conf, "datamodule=Mine", "--no-progress") == 0
    built = sorted(d.name for d in dataset_dirs(project))
    assert built == ["celltypist_sample", "hs_blood_a"]
    import json

    info = json.loads((project / "shards/hsapiens/synth_hsapiens/hs_blood_a/dataset.json").read_text())
    assert info["obs_keys"] == ["cell_type"] and "obs.cell_type" in info["columns"]


def test_missing_config_dir_and_project_path_are_clear_errors(tmp_path, capsys):
    assert shard("build", tmp_path, "--config-dir", tmp_path / "nope") == 2
    assert "is not a directory" in " ".join(capsys.readouterr().err.split())  # wrapped at the terminal width


def test_project_path_given_as_an_override_finds_its_conf(project):
    """`concept-train PATH.PROJECT_PATH=P ...` (scConcept's documented form) did not find P/conf."""
    from concept_shard.config import compose_config

    (project / "conf/datamodule").mkdir(parents=True)
    mine = "defaults:\n  - DataModuleBasic\n  - _self_\nobs_keys: [tissue]\n"
    (project / "conf/datamodule/Mine.yaml").write_text(mine)
    for given in (f"PATH.PROJECT_PATH={project}", f"PATH.PROJECT_PATH='{project}'"):
        cfg = compose_config(None, [given, "datamodule=Mine"])
        assert list(cfg.datamodule.obs_keys) == ["tissue"] and cfg.PATH.PROJECT_PATH == str(project.resolve())


def test_hydra_habits_cfg_job_help_with_groups_and_a_wrong_choice_answered_with_the_choices(project, capsys):
    """`--cfg job` was rejected after 23 s; --help showed no groups; a wrong group name printed
    Hydra's search path folded into one paragraph."""
    from concept_train.cli import main as train

    before = sorted(p.relative_to(project) for p in project.rglob("*"))
    assert shard("status", project, "--cfg", "job", "datamodule=DataModuleBasic") == 0
    out = capsys.readouterr().out
    assert f"PROJECT_PATH: {project.resolve()}" in out and "CHECKPOINT_ROOT: ${PATH.PROJECT_PATH}" in out
    assert train([str(project), "--cfg", "all", "--resolve", "model.training.max_steps=7"]) == 0
    out = capsys.readouterr().out
    assert f"CHECKPOINT_ROOT: {project.resolve()}/model_checkpoints" in out and "max_steps: 7" in out
    assert sorted(p.relative_to(project) for p in project.rglob("*")) == before  # nothing written
    for run in (lambda: train(["--help"]), lambda: shard("--help")):
        with pytest.raises(SystemExit):
            run()
        text = capsys.readouterr().out
        assert "datamodule   DataModuleAdvanced, DataModuleBasic" in text and "model        ContrastiveModel" in text
        assert "common overrides" in text and "examples:" in text
    assert train([str(project), "datamodule=DataModuleBasik"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "datamodule=DataModuleBasik: names no config of the group `datamodule`" in err
    assert "Choose one of: DataModuleAdvanced, DataModuleBasic (the closest: DataModuleBasic)" in err


def test_a_project_with_its_own_data_module_is_told_to_choose_it(project):
    """`concept-shard status` without datamodule= listed the packaged example's files as failed."""
    from concept_shard.config import compose_config

    (project / "conf/datamodule").mkdir(parents=True)
    (project / "conf/datamodule/Mine.yaml").write_text("defaults:\n  - DataModuleBasic\n  - _self_\n")
    lines = []
    compose_config(project, [], log=lines.append)
    assert any("no datamodule= given" in line and "pass datamodule=Mine" in line for line in lines)
    lines.clear()
    compose_config(project, ["datamodule=Mine"], log=lines.append)
    assert not any("no datamodule=" in line for line in lines)
    (project / "conf/config.yaml").write_text(
        "defaults:\n  - model: ContrastiveModel\n  - datamodule: Mine\n  - _self_\nPATH:\n  PROJECT_PATH: ???\n"
    )
    compose_config(project, [], log=lines.append)  # chosen by the project's own config.yaml
    assert not any("no datamodule=" in line for line in lines)


def test_a_config_file_that_is_not_yaml_names_its_line(tmp_path):
    from concept_shard.config import compose_config
    from concept_shard.errors import UserError

    (tmp_path / "datamodule").mkdir()
    (tmp_path / "datamodule" / "Broken.yaml").write_text("dataset:\n  train:\n    split: [${datamodule.split_x}]\n")
    with pytest.raises(UserError) as err:
        compose_config(tmp_path, ["datamodule=Broken"], config_dir=tmp_path)
    assert err.value.where.endswith("Broken.yaml, line 3") and "not valid YAML" in err.value.problem


def test_a_config_file_nested_too_deep_is_named_not_a_recursion_error(tmp_path):
    """A project YAML nested 100,000 deep ended in a raw RecursionError from inside PyYAML."""
    from concept_shard.config import compose_config
    from concept_shard.errors import ConfigError

    (tmp_path / "datamodule").mkdir()
    deep = tmp_path / "datamodule" / "Deep.yaml"
    deep.write_text("x: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ConfigError) as err:
        compose_config(tmp_path, ["datamodule=Deep"], config_dir=tmp_path)
    assert err.value.where == str(deep) and "nested too deep" in err.value.problem
    assert not (tmp_path / "shards").exists() and not (tmp_path / "model_checkpoints").exists()


def test_a_user_project_built_with_the_packaged_splits_is_told_where_its_configs_go(example_source, tmp_path, capsys):
    """`concept-shard build PROJECT_PATH` on a user's project reported the example's files as
    missing, with no hint."""
    import shutil

    project = tmp_path / "mine"
    shutil.copytree(example_source / "references", project / "references")
    assert shard("build", project, "--no-progress") == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "packaged example's" in err and "PROJECT_PATH/conf/datamodule/" in err and "--config-dir" in err


def test_shard_array_sbatch_refuses_a_listed_array_before_queuing_or_building(project, tmp_path):
    """`sbatch --array=0,1,5`: every task stops with the reason; the first queues no merge."""
    venv = os.environ.get("CONCEPT_VENV", str(REPO / ".venv"))
    (tmp_path / "sbatch").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/queued\n')
    (tmp_path / "sbatch").chmod(0o755)
    for task in ("0", "1", "5"):
        env = dict(
            os.environ,
            CONCEPT_VENV=venv,
            PATH=f"{tmp_path}:{os.environ['PATH']}",
            SLURM_ARRAY_JOB_ID="42",
            SLURM_ARRAY_TASK_ID=task,
            SLURM_ARRAY_TASK_MIN="0",
            SLURM_ARRAY_TASK_MAX="5",
            SLURM_ARRAY_TASK_STEP="1",
            SLURM_ARRAY_TASK_COUNT="3",
        )
        proc = subprocess.run(
            ["bash", str(REPO / "tools/slurm/shard_array.sbatch"), str(project), *ADVANCED],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "evenly spaced" in " ".join(proc.stderr.split())
    assert not (tmp_path / "queued").exists() and not (project / "shards").exists()


def test_project_path_is_data_and_a_missing_one_is_refused(tmp_path, capsys):
    """A PROJECT_PATH holding `${oc.env:HOME}` was interpolated (the run landed elsewhere), one
    holding `=` was parsed as an override, and a mistyped one was created."""
    from concept_shard.config import compose_config
    from concept_shard.errors import ConfigError
    from concept_train.cli import main as train_main

    for name in ("${oc.env:HOME}/a=b c", "q'uote\\${x}", "back\\slash"):
        weird = tmp_path / name
        weird.mkdir(parents=True)
        cfg = compose_config(weird, log=lambda *a: None)
        assert cfg.PATH.PROJECT_PATH == str(weird.resolve())
        assert cfg.PATH.SHARDS_PATH == f"{weird.resolve()}/shards"
    missing = tmp_path / "typo=1" / "project"
    with pytest.raises(ConfigError, match=r"does not\s+exist"):
        compose_config(missing)
    assert shard("status", missing) == 2
    assert train_main([str(missing), "model.training.max_steps=1"]) == 2  # a path with `=`, not an override
    err = " ".join(capsys.readouterr().err.split())
    assert f"PROJECT_PATH {missing}: does not exist" in err and "nothing was created" in err
    assert not (tmp_path / "typo=1").exists()
