"""A run that diverges stops with a named error and keeps its last good checkpoint; a checkpoint of
non-finite weights is never written; a restarted run's metrics.jsonl holds only its own rows; one
writer per run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import TINY, metric_rows

from concept_shard.config import compose_config
from concept_shard.errors import TrainError
from concept_train.cli import main as train

# an lr that makes the weights ~1e30 in one Adam step: the next step's activations overflow
DIVERGING = [
    *TINY,
    "model.training.lr=1e30",
    "model.training.max_steps=12",
    "model.training.checkpoint_every_n_steps=1",
]


def test_a_diverging_run_stops_naming_the_key_and_keeps_its_last_good_checkpoint(sharded_project_copy, capsys):
    assert train([str(sharded_project_copy), *DIVERGING, "initialize.run_id=nan"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "model.training.max_nonfinite_steps" in err and "diverged" in err and "3 in a row" in err
    run = sharded_project_copy / "model_checkpoints" / "nan"
    rows = metric_rows(run)
    skipped = sorted(s for s, r in rows.items() if r.get("skipped"))
    assert len(skipped) == 3 and skipped == list(range(skipped[0], skipped[0] + 3))
    assert all(not r.get("skipped") for s, r in rows.items() if s < skipped[0])
    # the checkpoints stop before the first skipped step, and the weights there are finite
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{skipped[0] - 1}" and f"steps {skipped[0]}-{skipped[-1]}" in err
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(f"step_{skipped[0]}")]
    from concept_train import load_model

    model = load_model(run / "checkpoints" / latest)
    assert all(torch.isfinite(p).all() for p in model.model.parameters())


def test_a_checkpoint_of_non_finite_weights_is_refused_naming_a_tensor(sharded_project_copy):
    from concept_train.trainer.distributed import shutdown
    from concept_train.trainer.loop import Trainer

    cfg = compose_config(sharded_project_copy, [*TINY, "initialize.run_id=bad"])
    try:
        trainer = Trainer(cfg, log=lambda *a: None)
        name, param = next(iter(trainer.model.named_parameters()))
        with torch.no_grad():
            param.view(-1)[0] = float("nan")
        with pytest.raises(TrainError, match=f"non-finite weights .*{name}"):
            trainer.checkpoint()
        assert not list((sharded_project_copy / "model_checkpoints" / "bad" / "checkpoints").iterdir())
    finally:
        del trainer
        shutdown()


def test_a_restarted_run_keeps_only_its_own_rows(sharded_project_copy):
    run = sharded_project_copy / "model_checkpoints" / "again"
    run.mkdir(parents=True)
    # an attempt killed before its first checkpoint left rows (steps 1-7) and no checkpoint
    dead = [{"kind": "train", "step": s, "loss": 99.0} for s in range(1, 8)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dead))
    assert train([str(sharded_project_copy), *TINY, "initialize.run_id=again"]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]
    assert all(r["loss"] != 99.0 for r in rows)


def test_a_second_writer_of_a_run_is_refused_before_writing_and_a_dead_holder_never_blocks(
    sharded_project_copy, capsys
):
    from concept_train.trainer.runlock import RunLock

    run = sharded_project_copy / "model_checkpoints" / "twin"
    held = RunLock(run)  # as another concept-train on this run holds it
    assert held.acquire() is None
    assert train([str(sharded_project_copy), *TINY, "initialize.run_id=twin"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{run}: is in use by another concept-train (pid {os.getpid()} on" in err and "initialize.run_id" in err
    assert [p.name for p in run.iterdir()] == [".lock"]  # nothing written
    held.release()
    # a holder killed with SIGKILL: the kernel drops its lock with it
    code = "import sys, time; from concept_train.trainer.runlock import RunLock; "
    code += "lock = RunLock(sys.argv[1]); print(lock.acquire(), flush=True); time.sleep(600)"
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "None"
        assert RunLock(run).acquire() is not None
    finally:
        holder.kill()
        holder.wait()
    assert train([str(sharded_project_copy), *TINY, "initialize.run_id=twin"]) == 0
