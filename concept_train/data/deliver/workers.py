"""DataLoader workers capped at the CPUs a process is given, as scConcept caps them: at
SLURM_CPUS_PER_TASK under SLURM, else at the machine's CPU count. A job asking
`--cpus-per-task=8` with `num_workers: 16` in its YAML would otherwise run 16 worker processes
on 8 cores (each tokenizing, all fighting the training process for them).

The worker count never changes the batches (each is a pure function of (seed, g)), so a capped
run and an uncapped one train on the same data. Test: tests/train/data/test_worker_cap.py.
"""

from __future__ import annotations

import os
from collections.abc import Mapping


def cpu_cap(env: Mapping[str, str] | None = None) -> tuple[int, str]:
    """The most workers a loader of this process may start, and where that number comes from."""
    env = os.environ if env is None else env
    raw = env.get("SLURM_CPUS_PER_TASK", "").strip()
    if raw.isdigit() and int(raw) > 0:
        return int(raw), "SLURM_CPUS_PER_TASK"
    return len(os.sched_getaffinity(0)) or 1, "the number of CPUs this process may use"


def capped_workers(requested, key: str, log=print, env: Mapping[str, str] | None = None) -> int:
    """`requested` (the config's num_workers) or the cap when it is lower, said in one log line."""
    requested = int(requested or 0)
    cap, source = cpu_cap(env)
    if requested <= cap:
        return requested
    log(f"[data] {key}={requested} capped at {cap} worker(s): {source} is {cap}.")
    return cap
