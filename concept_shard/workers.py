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
import tempfile
from collections.abc import Mapping
from pathlib import Path

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


def default_workers(pending_cells: int, granted: int, units: int) -> int:
    """The cores granted, but one worker per MIN_CELLS_PER_WORKER cells to write, and per unit
    (a file, or a row range of one larger than shard.part_size), at most."""
    return max(1, min(granted, pending_cells // MIN_CELLS_PER_WORKER, units))


def run_workers(argv: list[str], n: int) -> int:
    """Run `concept-shard ARGV` as tasks 0..n-1 of n, side by side; 0 when every one exited 0,
    else 2 when one found the command itself wrong, else 1 (a failed input, or a worker killed).
    Each worker's notices ("[concept-shard] ...: rebuilding.") are passed on; a failing worker's
    whole output too (its named errors). Output goes to files: a pipe that fills would stall it."""
    cmd = [sys.executable, "-m", "concept_shard.cli", *argv, "--workers", "1", "--no-progress"]
    with tempfile.TemporaryDirectory(prefix="concept-shard-workers-") as tmp:
        logs = [open(Path(tmp) / f"worker{i}.log", "w+") for i in range(n)]
        try:
            procs = [
                subprocess.Popen(
                    [*cmd, "--task-index", str(i), "--num-tasks", str(n)], stdout=log, stderr=subprocess.STDOUT
                )
                for i, log in enumerate(logs)
            ]
            codes = [p.wait() for p in procs]
            for i, (log, code) in enumerate(zip(logs, codes)):
                log.seek(0)
                out = log.read()
                for line in out.splitlines():
                    if line.startswith("[concept-shard]"):
                        print(line)
                if code != 0:
                    how = f"killed by signal {-code}" if code < 0 else f"exit {code}"
                    print(f"\n[concept-shard] worker {i} of {n} ({how}):\n{out.rstrip()}", file=sys.stderr)
        finally:
            for log in logs:
                log.close()
    if all(code == 0 for code in codes):
        return 0
    return 2 if 2 in codes else 1
