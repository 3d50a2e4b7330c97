"""tools/chaos.py with a few kills: builds and training runs killed at random moments lose and
double nothing, and its checks do see a lost cell or a changed loss."""

from __future__ import annotations

import json

import pytest

from tools import chaos


@pytest.mark.slow
def test_random_kills_lose_nothing_and_the_checks_can_fail(example_source, tmp_path):
    work = tmp_path / "chaos"
    # the session's example project (300 cells a file, chaos.py's default size), made once
    assert chaos.main([str(work), "--kills", "2", "--seed", "1", "--example", str(example_source)]) == 0
    report = json.loads((work / "chaos.json").read_text())
    assert report["build_kills"] == 2 and report["train_kills"] == 2 and report["steps_compared"] == 12
    project, reference = work / "project", work / "reference"
    # the checks are not vacuous: one sample fewer, one loss changed
    ds = project / "shards/hsapiens/synth_hsapiens/hs_blood_a"
    record = json.loads((ds / "dataset.json").read_text())
    index = json.loads((ds / "index.json").read_text())
    index["shards"][-1]["samples"] -= 1
    (ds / "index.json").write_text(json.dumps(index))
    assert any("hs_blood_a" in p for p in chaos.check_build(project, reference)), record["cells_written"]
    run = project / "model_checkpoints" / "run"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    row = json.loads(lines[-1])
    row["loss"] += 1e-12
    (run / "metrics.jsonl").write_text("\n".join(lines[:-1] + [json.dumps(row)]) + "\n")
    assert chaos.check_training(run, reference / "model_checkpoints" / "run")
