"""A DataLoader worker killed mid-run (the out-of-memory killer's way): a named error that says what
happened and how to go on, never torch's traceback; the run then resumes from its last checkpoint."""

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

RUN = [*TINY_RESUME, "datamodule.dataloader.train.num_workers=1", "initialize.run_id=oom"]


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _train(project: Path, *overrides) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "concept_train.cli", str(project), *RUN, *overrides],
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
