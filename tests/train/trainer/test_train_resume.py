"""Stop-and-go: a run killed (kill -9) after a checkpoint and resumed continues with the same
batches and bit-identical losses (CPU), in one process, in two torchrun processes (gloo), and in
two processes started as `srun` starts them (SLURM variables only, no torchrun), each against the
uninterrupted run of its size (torchrun's for both 2-process launchers)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TINY_RESUME as TINY
from helpers import free_port
from helpers import metric_rows as _rows

from concept_train.trainer.metrics import read_rows


def _cmd(project, nproc, *overrides):
    base = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(free_port()),
            "-m",
        ]
        if nproc > 1
        else [sys.executable, "-m"]
    )
    return base + ["concept_train.cli", str(project), *TINY, *overrides]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


class Launch:
    """One run's processes: a plain process, torchrun, or `srun`-style tasks (one per rank,
    told only SLURM's variables; the rendezvous port comes from the job id as on a cluster)."""

    def __init__(self, project, nproc, launcher, overrides, **popen):
        self.procs = []
        if launcher != "srun":
            self.procs.append(subprocess.Popen(_cmd(project, nproc, *overrides), env=_env(), **popen))
            return
        job_id = str(free_port() - 20000)
        for rank in range(nproc):
            env = {k: v for k, v in _env().items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
            env.update(
                SLURM_PROCID=str(rank),
                SLURM_LOCALID=str(rank),
                SLURM_NTASKS=str(nproc),
                SLURM_NNODES="1",
                SLURM_NTASKS_PER_NODE=str(nproc),
                SLURM_JOB_NODELIST="localhost",
                SLURM_JOB_ID=job_id,
            )
            self.procs.append(subprocess.Popen(_cmd(project, 1, *overrides), env=env, **popen))

    def wait(self, timeout=600) -> tuple[int, str]:
        out = []
        for p in self.procs:
            o, e = p.communicate(timeout=timeout)
            out.append((o or "")[-3000:] + (e or "")[-3000:])
        return max((p.returncode for p in self.procs), key=abs), "\n".join(out)

    def running(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def kill(self) -> None:
        for p in self.procs:
            os.killpg(p.pid, signal.SIGKILL)


PIPES = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _says_processes(out: str, nproc: int) -> bool:
    return (f"{nproc} processes, FSDP2 over gloo" if nproc > 1 else "1 process") in out


@pytest.fixture(scope="module")
def uninterrupted(sharded_example, tmp_path_factory):
    """uninterrupted(nproc, workers): the run directory of the uninterrupted run (torchrun for 2
    processes), made once per (nproc, workers): the srun-style tasks are held to torchrun's run."""
    made = {}

    def get(nproc: int, workers: int) -> Path:
        if (nproc, workers) not in made:
            project = tmp_path_factory.mktemp(f"full_{nproc}_{workers}") / "project"
            shutil.copytree(sharded_example, project, symlinks=True)
            overrides = [f"datamodule.dataloader.train.num_workers={workers}", "initialize.run_id=full"]
            rc, out = Launch(project, nproc, "torchrun", overrides, **PIPES).wait()
            assert rc == 0 and _says_processes(out, nproc), out
            made[nproc, workers] = project / "model_checkpoints" / "full"
        return made[nproc, workers]

    return get


def _stop_and_go(project: Path, full: Path, nproc: int, workers: int, launcher: str = "torchrun"):
    root = project / "model_checkpoints"
    common = [f"datamodule.dataloader.train.num_workers={workers}"]

    # the same run, killed with SIGKILL as soon as its step-10 checkpoint is complete
    killed = Launch(
        project,
        nproc,
        launcher,
        [*common, "initialize.run_id=killed"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    latest = root / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 600
    while time.time() < deadline and killed.running():
        if latest.is_file() and latest.read_text().strip() == "step_10":
            killed.kill()
            break
        time.sleep(0.02)
    rc, out = killed.wait(timeout=60)
    assert rc == -signal.SIGKILL, out
    # a checkpoint write that was cut short is ignored
    (root / "killed" / "checkpoints" / "step_15.tmp").mkdir(exist_ok=True)
    (root / "killed" / "checkpoints" / "step_15.tmp" / "garbage").write_text("half")

    rc, out = Launch(
        project, nproc, launcher, [*common, "initialize.run_id=killed", "initialize.resume=True"], **PIPES
    ).wait()
    assert rc == 0, out
    assert "resumed run killed" in out and _says_processes(out, nproc)
    a, b = _rows(full), _rows(root / "killed")
    assert sorted(a) == sorted(b) == list(range(1, 21))
    for step in range(1, 21):
        assert a[step]["batch_digest"] == b[step]["batch_digest"], step
        assert a[step]["loss"] == b[step]["loss"], (step, a[step]["loss"], b[step]["loss"])  # bit-identical
    assert len({a[s]["batch_digest"] for s in a}) == 20
    ckpts = sorted(p.name for p in (root / "killed" / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_10", "step_15", "step_20"]  # keep-last-3, no .tmp left
    assert (full / "curves.png").is_file() and (full / "config.yaml").is_file()


@pytest.mark.slow
def test_stop_and_go_one_process(sharded_project_copy, uninterrupted):
    _stop_and_go(sharded_project_copy, uninterrupted(1, 2), nproc=1, workers=2)


@pytest.mark.slow
def test_stop_and_go_two_torchrun_processes(sharded_project_copy, uninterrupted):
    _stop_and_go(sharded_project_copy, uninterrupted(2, 0), nproc=2, workers=0)


@pytest.mark.slow
def test_stop_and_go_two_srun_style_processes(sharded_project_copy, uninterrupted):
    _stop_and_go(sharded_project_copy, uninterrupted(2, 0), nproc=2, workers=0, launcher="srun")


def _signal_at(project: Path, run_id: str, at_step: int, sig: signal.Signals, *overrides) -> str:
    """Start (or resume) the run, send `sig` to its whole process group (as SLURM and a terminal
    do: its loader workers too) once step `at_step` is logged; returns its output (exit 75)."""
    common = ["datamodule.dataloader.train.num_workers=2", f"initialize.run_id={run_id}", *overrides]
    run = Launch(project, 1, "torchrun", common, **PIPES)
    metrics = project / "model_checkpoints" / run_id / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and run.running():
        if metrics.is_file() and at_step in _rows_in_file(metrics):
            for p in run.procs:
                os.killpg(p.pid, sig)
            break
        time.sleep(0.02)
    rc, out = run.wait()
    assert rc == 75, out
    return out


def _rows_in_file(metrics: Path) -> list[int]:
    """The steps of the train rows, in file order (a row being written is skipped)."""
    return [row["step"] for row in read_rows(metrics) if row.get("kind") == "train"]


@pytest.mark.slow
def test_sigterm_and_sigint_stop_with_a_checkpoint_and_the_run_resumes_bit_identically(
    sharded_project_copy, uninterrupted
):
    """What SLURM sends at a time limit or on preemption (SIGTERM; SIGUSR1 with `sbatch --signal`)
    and Ctrl-C (SIGINT): the step finishes, a checkpoint is written, the exit status says resumable
    (75), nothing is lost, and the resumed run goes on with the uninterrupted run's batches and
    bit-identical losses; each step is logged once."""
    project, root = sharded_project_copy, sharded_project_copy / "model_checkpoints"
    out = _signal_at(project, "sig", 4, signal.SIGTERM)
    assert "stopped by SIGTERM after step" in out and "initialize.resume=True" in out
    stopped_at = int((root / "sig" / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 4 <= stopped_at < 17
    out = _signal_at(project, "sig", stopped_at + 3, signal.SIGINT, "initialize.resume=True")
    assert "stopped by SIGINT after step" in out
    rc, out = Launch(
        project,
        1,
        "torchrun",
        ["datamodule.dataloader.train.num_workers=2", "initialize.run_id=sig", "initialize.resume=True"],
        **PIPES,
    ).wait()
    assert rc == 0, out
    assert _rows_in_file(root / "sig" / "metrics.jsonl") == list(range(1, 21))  # each step once
    a, b = _rows(uninterrupted(1, 2)), _rows(root / "sig")
    for step in range(1, 21):
        assert a[step]["batch_digest"] == b[step]["batch_digest"], step
        assert a[step]["loss"] == b[step]["loss"], (step, a[step]["loss"], b[step]["loss"])
