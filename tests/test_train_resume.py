"""Stop-and-go: a run killed (kill -9) after a checkpoint and resumed continues with the same
batches and bit-identical losses (CPU), in one process and in two torchrun processes (gloo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TINY = ["model.dim_model=32", "model.nlayers=2", "model.num_head=2", "model.dim_hid=64", "model.dim_gene_embs=32",
        "model.training.lr=1e-3", "model.training.warmup=4", "model.training.max_steps=20",
        "model.training.log_every_n_steps=1", "model.training.checkpoint_every_n_steps=5",
        "model.training.val_check_interval=0", "model.training.validate_before_training=False",
        "datamodule.dataloader.train.batch_size=32", "datamodule.dataset.train.max_tokens=100",
        "datamodule=DataModuleAdvanced"]


def _cmd(project, nproc, *overrides):
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(29500 + os.getpid() % 1000), "-m"] if nproc > 1 else [sys.executable, "-m"]
    return base + ["concept_train.cli", str(project), *TINY, *overrides]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _rows(run_dir: Path) -> dict[int, dict]:
    """The last row written for each step (a resumed run rewrites the steps after its checkpoint)."""
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "train":
            rows[r["step"]] = r
    return rows


def _stop_and_go(project: Path, nproc: int, workers: int):
    root = project / "model_checkpoints"
    common = [f"datamodule.dataloader.train.num_workers={workers}"]
    full = subprocess.run(_cmd(project, nproc, *common, "initialize.run_id=full"), env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]

    # the same run, killed with SIGKILL as soon as its step-10 checkpoint is complete
    proc = subprocess.Popen(_cmd(project, nproc, *common, "initialize.run_id=killed"), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    latest = root / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and latest.read_text().strip() == "step_10":
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:]
    # a checkpoint write that was cut short is ignored
    (root / "killed" / "checkpoints" / "step_15.tmp").mkdir(exist_ok=True)
    (root / "killed" / "checkpoints" / "step_15.tmp" / "garbage").write_text("half")

    resumed = subprocess.run(_cmd(project, nproc, *common, "initialize.run_id=killed", "initialize.resume=True"),
                             env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed run killed" in resumed.stdout + resumed.stderr
    a, b = _rows(root / "full"), _rows(root / "killed")
    assert sorted(a) == sorted(b) == list(range(1, 21))
    for step in range(1, 21):
        assert a[step]["batch_digest"] == b[step]["batch_digest"], step
        assert a[step]["loss"] == b[step]["loss"], (step, a[step]["loss"], b[step]["loss"])   # bit-identical
    assert len({a[s]["batch_digest"] for s in a}) == 20
    ckpts = sorted(p.name for p in (root / "killed" / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_10", "step_15", "step_20"]      # keep-last-3, no .tmp left
    assert (root / "full" / "curves.png").is_file() and (root / "full" / "config.yaml").is_file()


@pytest.mark.slow
def test_stop_and_go_one_process(sharded_project_copy):
    _stop_and_go(sharded_project_copy, nproc=1, workers=2)


@pytest.mark.slow
def test_stop_and_go_two_torchrun_processes(sharded_project_copy):
    _stop_and_go(sharded_project_copy, nproc=2, workers=0)
