"""N array tasks + merge give the same samples as one process; the plan is balanced and stable."""

from __future__ import annotations

import json

import numpy as np

from concept_shard.plan import WorkUnit, assign, file_ranges
from helpers import ADVANCED, assert_same_samples, dataset_dirs, shard


def test_file_ranges_cover_rows_in_bounded_parts():
    assert file_ranges(0, 10) == [(0, 0)]
    assert file_ranges(10, 10) == [(0, 10)]
    ranges = file_ranges(2_500_001, 1_000_000)
    assert len(ranges) == 3 and ranges[0][0] == 0 and ranges[-1][1] == 2_500_001
    assert all(b == c for (_, b), (c, _) in zip(ranges, ranges[1:]))
    assert max(b - a for a, b in ranges) <= 1_000_000


def test_assignment_is_balanced_and_covers_every_unit_once():
    rng = np.random.default_rng(0)
    units = [WorkUnit(f"hs/src/f{i}", 0, int(n)) for i, n in enumerate(rng.lognormal(9, 1.2, 300))]
    tasks = assign(units, 16)
    key = lambda u: (u.dataset_id, u.start)
    assert sorted((u for t in tasks for u in t), key=key) == sorted(units, key=key)
    loads = [sum(u.cells for u in t) for t in tasks]
    # LPT bound: no task exceeds the mean load by more than the largest unit
    assert max(loads) - sum(loads) / 16 <= max(u.cells for u in units)
    assert max(loads) / min(loads) < 1.2
    assert assign(list(reversed(units)), 16) == tasks    # order of discovery does not matter


def test_array_tasks_then_merge_equal_single_process(example_source, tmp_path, capsys):
    import shutil
    single, array = tmp_path / "single", tmp_path / "array"
    shutil.copytree(example_source, single)
    shutil.copytree(example_source, array)
    assert shard("build", single, *ADVANCED, "--no-progress") == 0
    opts = [*ADVANCED, "shard.part_size=100", "--no-progress"]
    for task in range(3):
        assert shard("build", array, *opts, "--task-index", task, "--num-tasks", 3) == 0
    # files split across tasks are not visible before the merge
    assert not (array / "shards/hsapiens/synth_hsapiens/hs_blood_a/dataset.json").exists()
    assert "waiting" in capsys.readouterr().out
    assert shard("merge", array, *ADVANCED) == 0
    assert shard("merge", array, *ADVANCED) == 0          # idempotent
    info = json.loads((array / "shards/hsapiens/synth_hsapiens/hs_blood_a/dataset.json").read_text())
    assert info["parts"] == [[0, 100], [100, 200], [200, 300]]
    assert_same_samples(single, array)
    assert not list(array.glob("shards/*/*/.parts/*"))     # parts removed after the merge


def test_slurm_array_variables_pick_the_task(example_source, tmp_path, monkeypatch):
    import shutil
    project = tmp_path / "p"
    shutil.copytree(example_source, project)
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")
    for task in ("0", "1"):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", task)
        assert shard("build", project, *ADVANCED, "--no-progress") == 0
    assert shard("merge", project, *ADVANCED) == 0
    assert len(dataset_dirs(project)) == 9
