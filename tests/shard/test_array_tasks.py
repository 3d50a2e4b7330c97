"""N array tasks + merge give the same samples as one process; the plan is balanced and stable."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import ADVANCED, assert_same_as_reference, dataset_dirs, shard

from concept_shard.plan import WorkUnit, assign, file_ranges


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

    def key(u):
        return u.dataset_id, u.start

    assert sorted((u for t in tasks for u in t), key=key) == sorted(units, key=key)
    loads = [sum(u.cells for u in t) for t in tasks]
    # LPT bound: no task exceeds the mean load by more than the largest unit
    assert max(loads) - sum(loads) / 16 <= max(u.cells for u in units)
    assert max(loads) / min(loads) < 1.2
    assert assign(list(reversed(units)), 16) == tasks  # order of discovery does not matter


def test_array_tasks_then_merge_equal_single_process(example_source, sharded_example, tmp_path, capsys):
    import shutil

    # single: one process's build of the example project, `concept-shard build PROJECT
    # datamodule=DataModuleAdvanced --no-progress` (exit status 0): conftest's sharded_example
    single, array = sharded_example, tmp_path / "array"
    shutil.copytree(example_source, array)
    opts = [*ADVANCED, "shard.part_size=100", "--no-progress"]
    for task in range(3):
        assert shard("build", array, *opts, "--task-index", task, "--num-tasks", 3) == 0
    # files split across tasks are not visible before the merge
    assert not (array / "shards/hsapiens/synth_hsapiens/hs_blood_a/dataset.json").exists()
    assert "waiting" in capsys.readouterr().out
    assert shard("merge", array, *ADVANCED) == 0
    assert shard("merge", array, *ADVANCED) == 0  # idempotent
    info = json.loads((array / "shards/hsapiens/synth_hsapiens/hs_blood_a/dataset.json").read_text())
    assert info["parts"] == [[0, 100], [100, 200], [200, 300]]
    assert_same_as_reference(single, array)
    assert not list(array.glob("shards/*/*/.parts/*"))  # parts removed after the merge


def test_workers_build_the_same_shards_as_one_process(example_source, tmp_path, capsys):
    """`build --workers 2`: two child builds (tasks 0 and 1 of the array plan) side by side, then
    the merge; the same files as `--workers 1`, byte for byte (dataset.json and the species'
    datasets.json aside: they record when); every file reported as built; a re-run finds them up
    to date and starts no worker."""
    import shutil

    opts = [*ADVANCED, "shard.part_size=100", "--no-progress"]
    one, two = tmp_path / "one", tmp_path / "two"
    for project in (one, two):
        shutil.copytree(example_source, project)
    capsys.readouterr()
    assert shard("build", one, *opts, "--workers", "1") == 0
    assert "workers" not in capsys.readouterr().out
    assert shard("build", two, *opts, "--workers", "2") == 0
    out = capsys.readouterr().out
    assert "2 workers over" in out and "9 built, 0 up to date" in out, out

    def files(root):
        return {
            p.relative_to(root): p.read_bytes()
            for p in (root / "shards").rglob("*")
            if p.is_file() and p.name not in ("dataset.json", "datasets.json") and ".locks" not in p.parts
        }

    a, b = files(one), files(two)
    assert a.keys() == b.keys() and len(a) > 9
    assert not [k for k in a if a[k] != b[k]]
    assert not list(two.glob("shards/*/*/.parts/*"))
    assert shard("build", two, *opts) == 0  # the default: no cells to write, one process
    out = capsys.readouterr().out
    assert "workers" not in out and "0 built, 9 up to date" in out, out
    assert shard("build", two, *opts, "--workers", "0") == 2
    assert "--workers: is 0" in " ".join(capsys.readouterr().err.split())


def test_a_failing_worker_is_named_and_the_build_fails_keeping_the_rest(small_example_source, tmp_path, capsys):
    """A worker whose file cannot be read exits 1: its output is passed on, the build exits 1
    naming the file, and the other files are complete."""
    import shutil

    project = tmp_path / "project"
    shutil.copytree(small_example_source, project)
    (project / "data/synth_mmusculus/h5ads/mm_val_c.h5ad").write_text("hello")
    capsys.readouterr()
    assert shard("build", project, *ADVANCED, "--no-progress", "--workers", "2") == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "[concept-shard] worker" in err and "mm_val_c.h5ad" in err and "cannot be read" in err
    assert len(dataset_dirs(project)) == 8


def test_default_workers_are_the_cpus_granted_but_not_for_a_few_cells():
    from concept_shard.workers import MIN_CELLS_PER_WORKER, cpu_cap, default_workers

    assert default_workers(10 * MIN_CELLS_PER_WORKER, 4, units=10) == 4
    assert default_workers(2 * MIN_CELLS_PER_WORKER + 5, 16, units=10) == 2
    assert default_workers(10 * MIN_CELLS_PER_WORKER, 16, units=3) == 3  # no more workers than units
    assert default_workers(3_000, 16, units=9) == default_workers(0, 16, units=0) == 1
    assert cpu_cap({"SLURM_CPUS_PER_TASK": "6"}) == (6, "SLURM_CPUS_PER_TASK")


def test_slurm_array_variables_pick_the_task(small_example_source, tmp_path, monkeypatch):
    import shutil

    project = tmp_path / "p"
    shutil.copytree(small_example_source, project)  # 40 cells a file: the 9 files are what counts
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")
    for task in ("0", "1"):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", task)
        assert shard("build", project, *ADVANCED, "--no-progress") == 0
    assert shard("merge", project, *ADVANCED) == 0
    assert len(dataset_dirs(project)) == 9


def _array_env(task_id: int, first: int, last: int, step: int, count: int) -> dict:
    """What SLURM sets in each task of `sbatch --array=FIRST-LAST:STEP`."""
    return {
        "SLURM_ARRAY_JOB_ID": "42",
        "SLURM_ARRAY_TASK_ID": str(task_id),
        "SLURM_ARRAY_TASK_MIN": str(first),
        "SLURM_ARRAY_TASK_MAX": str(last),
        "SLURM_ARRAY_TASK_STEP": str(step),
        "SLURM_ARRAY_TASK_COUNT": str(count),
    }


@pytest.mark.parametrize(
    "first,last,step", [(0, 4, 2), (1, 7, 2), (0, 126, 2), (5, 50, 5), (3, 3, 1), (0, 63, 1), (2, 9, 3)]
)
def test_a_stepped_array_gives_every_unit_to_exactly_one_task(first, last, step):
    """`--array=0-4:2` runs tasks 0, 2, 4 (SLURM_ARRAY_TASK_COUNT=3): task ids minus MIN were used
    as indices, so task 4 was refused and share 1 was never built."""
    from concept_shard.plan import array_task

    ids = list(range(first, last + 1, step))  # SLURM_ARRAY_TASK_MAX is the last id (8 for 2-9:3)
    shares = [array_task(_array_env(i, first, ids[-1], step, len(ids))) for i in ids]
    assert sorted(shares) == [(k, len(ids)) for k in range(len(ids))]
    # SLURM versions that leave out COUNT or MAX: the other one is enough
    for i, share in zip(ids, shares):
        env = _array_env(i, first, ids[-1], step, len(ids))
        assert array_task({k: v for k, v in env.items() if k != "SLURM_ARRAY_TASK_COUNT"}) == share
        assert array_task({k: v for k, v in env.items() if k != "SLURM_ARRAY_TASK_MAX"}) == share
    units = [WorkUnit(f"hs/src/f{i}", 0, 10 * i + 1) for i in range(37)]
    plan = assign(units, len(ids))
    done = [u for k, _ in shares for u in plan[k]]
    assert sorted(done, key=lambda u: u.dataset_id) == sorted(units, key=lambda u: u.dataset_id)
    assert array_task({}) is None


@pytest.mark.parametrize(
    "ids,step",
    [([0, 1, 5], 1), ([0, 1, 5], None), ([1, 3, 4, 9], 1), ([0, 2, 4, 7], 2), ([0, 2, 4, 5], 2), ([3, 8], 0)],
)
def test_an_array_that_is_not_one_even_range_is_refused_by_every_task(ids, step):
    """`--array=0,1,5`: no task can know the other ids, so each refuses, before any work."""
    from concept_shard.errors import ConfigError
    from concept_shard.plan import array_task

    for i in ids:
        env = _array_env(i, min(ids), max(ids), step or 0, len(ids))
        if step is None:
            del env["SLURM_ARRAY_TASK_STEP"]
        with pytest.raises(ConfigError) as err:
            array_task(env)
        assert "evenly spaced" in err.value.problem and "--array=0-63" in err.value.fix


def test_stepped_array_tasks_then_merge_equal_single_process(sharded_example, project, monkeypatch):
    """`sbatch --array=1-5:2` (tasks 1, 3, 5) with files split into row ranges across the tasks."""
    for i in (1, 3, 5):
        for k, v in _array_env(i, 1, 5, 2, 3).items():
            monkeypatch.setenv(k, v)
        assert shard("build", project, *ADVANCED, "shard.part_size=100", "--no-progress") == 0
    assert shard("merge", project, *ADVANCED) == 0
    assert_same_as_reference(sharded_example, project)


def test_a_listed_array_is_refused_before_the_build_touches_anything(small_project, monkeypatch, capsys):
    project = small_project  # 40 cells a file: the build at the end only has to succeed
    for k, v in _array_env(5, 0, 5, 1, 3).items():  # --array=0,1,5
        monkeypatch.setenv(k, v)
    assert shard("build", project, *ADVANCED, "--no-progress") == 2
    assert "evenly spaced" in " ".join(capsys.readouterr().err.split())
    assert not (project / "shards").exists()
    # explicit indices need no SLURM variables
    assert shard("build", project, *ADVANCED, "--no-progress", "--task-index", 0, "--num-tasks", 1) == 0
