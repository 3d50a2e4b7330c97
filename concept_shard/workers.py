"""One `concept-shard build` over the cores it is granted: N child builds of the same command, each
task i of N of the array plan (plan.py: row-range units balanced by cell count, each written under
its own lock), then the merge that joins the files whose parts span several of them and writes the
species indexes. The shards are byte-identical to one process's (the array path's guarantee,
tests/shard/test_array_tasks.py); each child holds one task's memory.

Also the CPUs a process is granted, which the data loader's workers are capped at too."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping

# below this many cells to write per worker, starting another interpreter costs more than it saves
MIN_CELLS_PER_WORKER = 100_000


def cpu_cap(env: Mapping[str, str] | None = None) -> tuple[int, str]:
    """The CPUs this process is granted, and where that number comes from: SLURM_CPUS_PER_TASK
    under SLURM, else the CPUs this process may run on."""
    env = os.environ if env is None else env
    raw = env.get("SLURM_CPUS_PER_TASK", "").strip()
    if raw.isdigit() and int(raw) > 0:
        return int(raw), "SLURM_CPUS_PER_TASK"
    return len(os.sched_getaffinity(0)) or 1, "the number of CPUs this process may use"


def default_workers(pending_cells: int, granted: int) -> int:
    """The cores granted, but one worker per MIN_CELLS_PER_WORKER cells to write at most."""
    return max(1, min(granted, pending_cells // MIN_CELLS_PER_WORKER))


def run_workers(argv: list[str], n: int) -> int:
    """Run `concept-shard ARGV` as tasks 0..n-1 of n, side by side; the worst exit status. A
    failing task's output is passed on (its named errors); the merge that follows reports the rest."""
    cmd = [sys.executable, "-m", "concept_shard.cli", *argv, "--workers", "1", "--no-progress"]
    procs = [
        subprocess.Popen(
            [*cmd, "--task-index", str(i), "--num-tasks", str(n)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(n)
    ]
    outputs = [p.communicate()[0] for p in procs]
    for i, (p, out) in enumerate(zip(procs, outputs)):
        if p.returncode != 0:
            print(f"\n[concept-shard] worker {i} of {n} (exit {p.returncode}):\n{out.rstrip()}", file=sys.stderr)
    return max(p.returncode for p in procs)
