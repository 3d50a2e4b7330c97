"""model.training.keep_best: the checkpoint with the best value of a validation metric stays as
`checkpoints/best` beside the last ones, whatever keep_last_checkpoints rotates away, loads by name,
and a resumed run goes on comparing with it. (The demo's kNN peaked at 0.986 at step 500 and ended
at 0.975; nothing kept the best.)"""

from __future__ import annotations

import json

from helpers import TINY

from concept_train import load_model
from concept_train.cli import main

METRIC = "val/whole_cell_B256/knn/cell_type"


def _val_rows(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "val" and METRIC in r]


def test_the_best_checkpoint_is_kept_loads_by_name_and_survives_a_resume(sharded_project_copy, capsys):
    project = sharded_project_copy
    run = project / "model_checkpoints" / "b"
    args = [
        str(project),
        *TINY,
        "initialize.run_id=b",
        "model.training.lr=3e-3",
        "model.training.val_check_interval=2",
        "model.training.keep_last_checkpoints=1",
        f"model.training.keep_best={METRIC}",
    ]
    assert main([*args, "model.training.max_steps=6"]) == 0
    rows = _val_rows(run)
    # kNN only on obs keys with two or more values among a loader's cells: its one file's dataset
    # scored knn/dataset = 1.0
    assert "val/whole_cell_B256/knn/donor_id" in rows[0] and "val/whole_cell_B256/knn/dataset" not in rows[0]
    best = max(rows, key=lambda r: (r[METRIC], -r["step"]))  # the first of the highest
    pointer = (run / "checkpoints" / "best").read_text().strip()
    assert pointer == f"step_{best['step']}" and (run / "checkpoints" / pointer / "trainer_state.json").is_file()
    kept = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert pointer != "step_6" and kept == [pointer, "step_6"]  # keep_last_checkpoints=1, and the best spared
    assert load_model(run / "checkpoints" / "best", "cpu").step == best["step"]
    assert f"checkpoints/best -> {pointer}" in capsys.readouterr().out
    # a resume compares with the best recorded in its checkpoint, not with nothing
    assert main([*args, "model.training.max_steps=10", "initialize.resume=True"]) == 0
    rows = _val_rows(run)
    best = max(rows, key=lambda r: (r[METRIC], -r["step"]))
    assert (run / "checkpoints" / "best").read_text().strip() == f"step_{best['step']}"
    # a metric the validation rows do not have is named, once, and nothing else changes
    assert main([*args, "initialize.run_id=c", "model.training.keep_best=val/nope"]) == 0
    out = capsys.readouterr().out
    assert out.count("keep_best=val/nope is not a finite value") == 1 and METRIC in out
    assert not (project / "model_checkpoints" / "c" / "checkpoints" / "best").exists()
