"""Split the work into row-range units and deal them to array tasks, deterministically.

Every task computes the same plan from the same inputs, whatever has already been done, so
the assignment does not depend on when a task starts. A file larger than `part_size` cells
becomes several units; units go to the least-loaded task, largest first (LPT), ties to the
lowest task index.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class WorkUnit:
    dataset_id: str
    start: int
    end: int

    @property
    def cells(self) -> int:
        return self.end - self.start


def file_ranges(n_cells: int, part_size: int) -> list[tuple[int, int]]:
    """Equal row ranges of at most `part_size` cells covering [0, n_cells); one range for an empty file."""
    n_parts = max(1, -(-n_cells // part_size))
    bounds = [n_cells * i // n_parts for i in range(n_parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def assign(units: list[WorkUnit], num_tasks: int) -> list[list[WorkUnit]]:
    """Balance units over tasks by cell count (a unit of 0 cells still costs one)."""
    tasks: list[list[WorkUnit]] = [[] for _ in range(num_tasks)]
    heap = [(0, i) for i in range(num_tasks)]
    for unit in sorted(units, key=lambda u: (-u.cells, u.dataset_id, u.start)):
        load, i = heapq.heappop(heap)
        tasks[i].append(unit)
        heapq.heappush(heap, (load + max(unit.cells, 1), i))
    for t in tasks:
        t.sort(key=lambda u: (u.dataset_id, u.start))
    return tasks


def array_task(env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """(this task's index, number of tasks) of a SLURM array job, from SLURM's variables; None
    outside an array.

    A stepped range (`sbatch --array=0-8:2`: ids 0, 2, 4, 6, 8) maps id -> (id - MIN) / STEP, so
    its 5 tasks take shares 0..4 of 5. An array whose ids are not one evenly spaced range
    (`--array=0,1,5`) gives no task a way to know the others' ids, so shares would be skipped:
    every task refuses it, before any work (tests/shard/test_array_tasks.py)."""
    env = os.environ if env is None else env
    if "SLURM_ARRAY_TASK_ID" not in env:
        return None
    try:
        task_id = int(env["SLURM_ARRAY_TASK_ID"])
        first = int(env.get("SLURM_ARRAY_TASK_MIN") or 0)
        step = int(env.get("SLURM_ARRAY_TASK_STEP") or 1)
        count = int(env["SLURM_ARRAY_TASK_COUNT"]) if env.get("SLURM_ARRAY_TASK_COUNT") else None
        last = int(env["SLURM_ARRAY_TASK_MAX"]) if env.get("SLURM_ARRAY_TASK_MAX") else None
    except ValueError:
        raise ConfigError(
            "SLURM_ARRAY_TASK_*",
            "hold a value that is not a whole number.",
            "Run the array under sbatch, or pass --task-index and --num-tasks.",
        ) from None
    if count is None and last is None:
        raise ConfigError(
            "SLURM_ARRAY_TASK_COUNT",
            "is not set (nor SLURM_ARRAY_TASK_MAX), so this task "
            f"(id {task_id}) cannot tell how many tasks share the work.",
            "Pass --task-index and --num-tasks.",
        )
    if count is None:
        count = (last - first) // step + 1 if step > 0 else 0
    last = first + step * (count - 1) if last is None else last
    if (
        step < 1
        or count < 1
        or last != first + step * (count - 1)
        or (task_id - first) % step
        or not first <= task_id <= last
    ):
        raise ConfigError(
            "sbatch --array",
            f"gives task ids that are not one evenly spaced range (this task "
            f"{task_id}; min {first}, max {last}, step {step}, {count} tasks), so the tasks cannot "
            "share the work without skipping some.",
            "Submit one range, e.g. --array=0-63 or --array=0-126:2 (a % limit is fine), or start "
            "each task as `concept-shard build ... --task-index I --num-tasks N`.",
        )
    return (task_id - first) // step, count


if __name__ == "__main__":  # `python -m concept_shard.plan`: shard_array.sbatch checks the array first
    import sys

    try:
        print("concept-shard: array task {} of {}".format(*(array_task() or (0, 1))))
    except ConfigError as err:
        print(f"concept-shard: error\n{err.paragraph()}", file=sys.stderr)
        sys.exit(2)
