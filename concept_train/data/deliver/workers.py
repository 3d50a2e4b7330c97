"""A DataLoader worker's life: how many (below), which signals it takes, and that it dies with
its parent (`worker_init`, further down).

Workers are capped at the CPUs a process is given, as scConcept caps them: at
SLURM_CPUS_PER_TASK under SLURM, else at the machine's CPU count. A job asking
`--cpus-per-task=8` with `num_workers: 16` in its YAML would otherwise run 16 worker processes
on 8 cores (each tokenizing, all fighting the training process for them).

The worker count never changes the batches (each is a pure function of (seed, g)), so a capped
run and an uncapped one train on the same data. Test: tests/train/data/test_worker_cap.py.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Mapping

from concept_shard.workers import cpu_cap  # the CPUs granted: one home for the build and the loader


def capped_workers(requested, key: str, log=print, env: Mapping[str, str] | None = None) -> int:
    """`requested` (the config's num_workers) or the cap when it is lower, said in one log line."""
    requested = int(requested or 0)
    cap, source = cpu_cap(env)
    if requested <= cap:
        return requested
    log(f"[data] {key}={requested} capped at {cap} worker(s): {source} is {cap}.")
    return cap


# The signals that stop a run (a SLURM time limit or preemption, Ctrl-C, `sbatch --signal`): the
# main process turns them into a checkpoint and a clean exit (trainer/preempt.py). SLURM and a
# terminal send them to every process, workers included; a worker that died of one would end the
# run before that checkpoint, so workers ignore them (they stop when the main process closes them,
# or dies). Except one SIGTERM: a main process that exits without closing its loader has
# multiprocessing terminate its workers (SIGTERM) and wait for them; `exiting`, set by an atexit
# hook that runs before multiprocessing's, tells a worker that this SIGTERM is that one.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def worker_init(exiting, parent: int, worker_id: int) -> None:
    """In each worker, first: die with the parent, then ignore the stop signals (above)."""
    _die_with(parent)
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)

    def on_sigterm(signum, frame):
        if exiting.is_set():
            os._exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)


# A worker whose main process is killed (the out-of-memory killer, `kill -9` of the main pid) is
# ended by the kernel at once: torch's watchdog looks for the parent only between batches, every
# 5 s, and never while a worker is blocked, e.g. its queue's feeder thread writing into a pipe that
# a sibling worker still holds open; such orphans stayed alive in a futex wait. PR_SET_PDEATHSIG
# follows the thread that starts the workers (the one that iterates the loader).
_PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> None:
    if sys.platform != "linux":
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took hold
        os._exit(1)
