"""One writer per run: a lock on `<run_dir>/.lock`, held by the main process for the run's life.

Two `concept-train` with one run id (a requeued job that overlaps its old self, a command started
twice) would write one `metrics.jsonl` and rotate each other's checkpoints. The second is refused
before it writes anything. The lock is an flock: the kernel drops it when its holder exits, however
it exits, so a dead holder never blocks (on a shared filesystem it needs locks across nodes:
Lustre's `flock` mount option, NFSv4).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".lock"


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fh = None

    def acquire(self) -> str | None:
        """Take the lock: None, or who holds it (host, pid, since when) when another process does."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "a process that has not said which yet"
            fh.close()
            return holder
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        self._fh = fh
        return None

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing the file drops the flock
            self._fh = None
