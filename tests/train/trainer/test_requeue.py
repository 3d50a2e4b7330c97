"""A requeued SLURM job continues its run whatever config set PATH.CHECKPOINT_ROOT: with
`initialize.resume=auto` (what tools/slurm/train.sbatch passes) concept-train resumes a run that
has a checkpoint under the COMPOSED config's root, and starts one that has none. The sbatch script
parsed PATH.CHECKPOINT_ROOT from its arguments only, so a root set in a YAML file of the user's
config dir made every requeue fail with "already holds a run with checkpoints"."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helpers import REPO, TINY, free_port, metric_rows

from concept_train.cli import main as train

STEPS = [*TINY, "model.training.max_steps=4", "model.training.checkpoint_every_n_steps=2"]


def _config_dir(tmp_path: Path, root: Path) -> Path:
    """The user's config dir: scConcept's root config.yaml, with their own PATH.CHECKPOINT_ROOT."""
    conf = tmp_path / "myconf"
    conf.mkdir()
    (conf / "config.yaml").write_text(f"""\
defaults:
  - model: ContrastiveModel
  - datamodule: DataModuleAdvanced
  - _self_
wandb: {{enabled: False, run_name: null, entity: null, project: null}}
initialize: {{resume: False, run_id: null, checkpoint: null, create_new_run: False}}
profiler: {{enabled: False}}
PATH:
  PROJECT_PATH: ???
  LOCAL_DIR: null
  CHECKPOINT_ROOT: '{root}'
  PANELS_PATH: ${{PATH.PROJECT_PATH}}/panels
  GENE_MAPPINGS_PATH: ${{PATH.PROJECT_PATH}}/references/vocabulary/token_mappings_per_specie
  PRETRAINED_VOCABULARY: null
""")
    return conf


def _as_if_killed_after_step_2(run: Path) -> None:
    """The state a job killed (time limit, node failure) right after its step-2 checkpoint leaves."""
    import shutil

    shutil.rmtree(run / "checkpoints/step_4")
    (run / "checkpoints/latest").write_text("step_2")


def test_resume_auto_starts_then_resumes_a_run_whose_root_comes_from_a_yaml_file(
    sharded_project_copy, tmp_path, capsys
):
    root = tmp_path / "scratch" / "ckpts"
    conf = _config_dir(tmp_path, root)
    command = [
        str(sharded_project_copy),
        "--config-dir",
        str(conf),
        *STEPS,
        "initialize.run_id=r1",
        "initialize.resume=auto",
    ]
    assert train(command) == 0
    out = capsys.readouterr().out
    assert f"run r1 in {root} has no checkpoint yet: starting it" in out
    assert not (sharded_project_copy / "model_checkpoints" / "r1").exists()  # the YAML's root, not the default
    first = metric_rows(root / "r1")
    assert sorted(first) == [1, 2, 3, 4]

    _as_if_killed_after_step_2(root / "r1")
    assert train(command) == 0  # the same command again: the requeued job
    out = capsys.readouterr().out
    assert "has a checkpoint: resuming it" in out and f"resumed run r1 from {root / 'r1/checkpoints/step_2'}" in out
    again = metric_rows(root / "r1")
    for step in (3, 4):  # it continued, bit for bit (CPU)
        assert again[step]["loss"] == first[step]["loss"] and again[step]["batch_digest"] == first[step]["batch_digest"]
    assert (root / "r1/checkpoints/latest").read_text().strip() == "step_4"

    # a run whose checkpoints are all damaged is refused, never started over
    _as_if_killed_after_step_2(root / "r1")
    weights = root / "r1/checkpoints/step_2/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"damaged!")
    assert train(command) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "no complete checkpoint to resume from" in err and weights.is_file()


def test_a_resume_value_that_is_no_choice_is_named(sharded_project_copy, capsys):
    assert train([str(sharded_project_copy), *TINY, "initialize.run_id=x", "initialize.resume=maybe"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "initialize.resume" in err and "maybe" in err and "auto" in err


@pytest.mark.slow
def test_train_sbatch_resumes_a_requeued_run_whose_root_comes_from_a_yaml_file(sharded_project_copy, tmp_path):
    """The real tools/slurm/train.sbatch, with a stand-in `srun` that runs its command (one task)."""
    root = tmp_path / "scratch" / "ckpts"
    conf = _config_dir(tmp_path, root)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        f'#!/bin/sh\necho "$@" >> {tmp_path}/srun.log\nwhile [ "${{1#-}}" != "$1" ]; do shift; done\nexec "$@"\n'
    )
    (bin_dir / "srun").chmod(0o755)
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        CONCEPT_VENV=str(REPO / ".venv"),
        SLURM_JOB_ID="4242",
        SLURM_NTASKS="1",
        SLURM_JOB_NUM_NODES="1",
        SLURM_CPUS_PER_TASK="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        TMPDIR=str(tmp_path),
    )
    command = [
        "bash",
        str(REPO / "tools/slurm/train.sbatch"),
        str(sharded_project_copy),
        "--config-dir",
        str(conf),
        *STEPS,
        "initialize.run_id=big1",
    ]

    def job() -> str:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    assert "has no checkpoint yet: starting it" in job()
    assert "initialize.resume=auto" in (tmp_path / "srun.log").read_text()
    _as_if_killed_after_step_2(root / "big1")
    out = job()
    assert f"resumed run big1 from {root / 'big1/checkpoints/step_2'}" in out
    assert sorted(metric_rows(root / "big1")) == [1, 2, 3, 4]
    assert (root / "big1/checkpoints/latest").read_text().strip() == "step_4"
    assert not (sharded_project_copy / "model_checkpoints" / "big1").exists()


@pytest.mark.parametrize("rc,requeued", [(75, True), (2, False), (0, False)])
def test_train_sbatch_requeues_the_job_when_the_run_stopped_resumable(tmp_path, rc, requeued):
    """concept-train exits 75 after a SIGUSR1 (which the script asks SLURM for, before the time limit)
    or a SIGTERM (preemption) with a checkpoint: the job is requeued and ends well; another status is
    the job's own. Stand-ins for srun (the run's exit status) and scontrol (what it was asked)."""
    script = (REPO / "tools/slurm/train.sbatch").read_text()
    assert "#SBATCH --signal=USR1@" in script and "#SBATCH --requeue" in script
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!/bin/sh\nexit {rc}\n")
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.log\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_JOB_ID="4343",
        SLURM_NTASKS="1",
        SLURM_JOB_NUM_NODES="1",
        MASTER_ADDR="127.0.0.1",
    )
    proc = subprocess.run(
        ["bash", str(REPO / "tools/slurm/train.sbatch"), str(tmp_path), "initialize.run_id=r"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    log = tmp_path / "scontrol.log"
    assert proc.returncode == (0 if requeued else rc), proc.stdout + proc.stderr
    assert (log.read_text().split() == ["requeue", "4343"]) if requeued else not log.exists()
