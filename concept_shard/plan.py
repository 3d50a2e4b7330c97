"""Split the work into row-range units and deal them to array tasks, deterministically.

Every task computes the same plan from the same inputs, whatever has already been done, so
the assignment does not depend on when a task starts. A file larger than `part_size` cells
becomes several units; units go to the least-loaded task, largest first (LPT), ties to the
lowest task index.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass


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
