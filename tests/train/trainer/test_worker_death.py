"""A DataLoader worker killed mid-run (the out-of-memory killer's way): a named error that says what
happened and how to go on, never torch's traceback; the run then resumes from its last checkpoint.
The main process killed instead: its workers end with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TINY_RESUME

from concept_train.trainer.metrics import read_rows

RUN = [*TINY_RESUME, "initialize.run_id=oom"]


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _train(project: Path, *overrides, workers: int = 1) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "concept_train.cli",
            str(project),
            *RUN,
            f"datamodule.dataloader.train.num_workers={workers}",
            *overrides,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.mark.slow
def test_a_killed_worker_is_named_and_the_run_resumes(sharded_project_copy):
    project = sharded_project_copy
    metrics = project / "model_checkpoints" / "oom" / "metrics.jsonl"
    run = _train(project, "model.training.max_steps=400")
    try:
        deadline = time.time() + 300
        while time.time() < deadline and run.poll() is None:
            steps = [r["step"] for r in read_rows(metrics)] if metrics.is_file() else []
            if steps and max(steps) >= 7:  # past the checkpoint of step 5
                break
            time.sleep(0.05)
        workers = _children(run.pid)
        assert workers, "no DataLoader worker found"
        os.kill(workers[0], signal.SIGKILL)
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    said = " ".join(err.split())
    assert run.returncode == 2, out + err
    assert "Traceback" not in err
    assert said.startswith("concept-train: datamodule.dataloader.*.num_workers: DataLoader worker (pid")
    assert "out-of-memory killer" in said and "initialize.resume=True initialize.run_id=oom" in said
    last = said.split("its last checkpoint, ")[1].split(",")[0]  # step_5, or later on a fast machine
    assert (project / "model_checkpoints" / "oom" / "checkpoints" / last).is_dir()

    resumed = _train(project, f"model.training.max_steps={int(last.split('_')[1]) + 3}", "initialize.resume=True")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out + err
    assert f"resumed run oom from {project / 'model_checkpoints' / 'oom' / 'checkpoints' / last}" in out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # a zombie is dead, waiting to be reaped


@pytest.mark.slow
def test_workers_end_with_a_killed_main_process(sharded_project_copy):
    """The out-of-memory killer or `kill -9` of the main pid ends the main process alone: its
    workers are ended with it at once, where they stayed alive, orphaned (seen in a futex wait),
    or lived on until torch's watchdog looked (every 5 s, and never while a worker is blocked)."""
    run = _train(sharded_project_copy, "model.training.max_steps=400", workers=2)
    metrics = sharded_project_copy / "model_checkpoints" / "oom" / "metrics.jsonl"
    workers: list[int] = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline and run.poll() is None:
            if metrics.is_file() and any(r["step"] >= 2 for r in read_rows(metrics)):
                break
            time.sleep(0.05)
        workers = _children(run.pid)
        assert len(workers) >= 2 and all(_alive(w) for w in workers), workers
        os.kill(run.pid, signal.SIGKILL)  # the main process only
        run.wait(timeout=30)
        deadline = time.time() + 2.0
        while time.time() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.02)
        assert not [w for w in workers if _alive(w)], "workers outlived their main process"
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        for w in workers:  # the orphans of a failed check must not outlive the test
            if _alive(w):
                os.kill(w, signal.SIGKILL)
