"""tools/chaos.py with a few kills and signals: builds and training runs killed at random moments,
and runs sent SIGTERM at random steps, lose and double nothing, and its checks do see a lost cell
or a changed loss; a damaged shard file is found and rebuilt alone, a diverging run stops by name
keeping a good checkpoint, and a twin of a run is refused."""

from __future__ import annotations

import json

import pytest

from tools import chaos


@pytest.mark.slow
def test_random_kills_lose_nothing_and_the_checks_can_fail(example_source, tmp_path):
    work = tmp_path / "chaos"
    # the session's example project (300 cells a file, chaos.py's default size), made once
    args = ["--kills", "2", "--signals", "1", "--damage", "1", "--nan", "--twin", "--seed", "1"]
    args += ["--example", str(example_source)]
    assert chaos.main([str(work), *args]) == 0
    report = json.loads((work / "chaos.json").read_text())
    assert report["build_kills"] == 2 and report["train_kills"] == 2 and report["steps_compared"] == 12
    # SIGTERM at a random step: a checkpoint of the last step logged, exit 75, resumed bit-identically
    assert report["signals"] == 1 and report["signal_steps_compared"] == 12
    assert set(report["exit_codes"]) <= {"75", "0"}  # 0: it came after the last step (nothing to stop)
    assert len(report["damaged"]) == 1 and not report["damage_problems"]
    assert report["diverged_skipped_steps"] and report["diverged_latest_checkpoint"] >= 1
    assert not report["nan_problems"] and not report["twin_problems"]
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
