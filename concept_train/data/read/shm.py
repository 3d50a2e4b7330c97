"""/dev/shm for the data pipeline: remove the segments mosaicml-streaming leaves behind when a
process is killed, and check there is room before a run depends on it.

Streaming registers every StreamingDataset in named shared memory (`/dev/shm/NNNNNN_locals`, ...)
and refuses to start a dataset over local directories that a registered one already uses. After
a `kill -9` those segments stay, and the next run would stop with "Reused local directory".
`streaming.base.util.clean_stale_shared_memory()` unlinks ALL such segments on the node, including
those of a live run next to ours; here only segments that no live process maps are removed.
The loader's own hand-off slots (handoff.py), left by a killed run, are swept the same way.
"""

from __future__ import annotations

import os
import random
import re
import time
from pathlib import Path

from concept_shard.errors import DataError

SHM_DIR = Path("/dev/shm")
_STREAMING_NAME = re.compile(
    r"^\d{6}_(locals|barrier|next_epoch|cache_usage|shard_states|shard_access_times|"
    r"resume|epoch_shape|epoch_data)$"
)
HANDOFF_PREFIX = "concept-handoff-"  # + owner_tag, a random token, worker and slot (handoff.py)


def _mapped_shm_names() -> set[str] | None:
    """Names of /dev/shm files mapped by any process we can inspect; None if /proc is unusable."""
    names: set[str] = set()
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            with open(pid_dir / "maps") as fh:
                for line in fh:
                    i = line.find("/dev/shm/")
                    if i >= 0:
                        names.add(line[i + 9 :].split()[0])
        except OSError:  # exited meanwhile, or another user's process
            continue
    return names


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), "0" where
    /proc does not say: with the pid it names one process, even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "0"


def owner_tag(pid: int) -> str:
    """PID.STARTTIME: what a hand-off segment's name holds of the process that made it."""
    return f"{pid}.{_start_time(pid)}"


def _owner_alive(name: str) -> bool:
    """Whether the process that created a hand-off segment still runs (its pid and start time are
    in the name; a pid alone may have been reused by another process since)."""
    tag = name[len(HANDOFF_PREFIX) :].split("-", 1)[0]
    pid, _, started = tag.partition(".")
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return started == "0" or _start_time(int(pid)) in (started, "0")  # "0": /proc did not say


# Streaming looks for the first free shared-memory prefix, then creates it; another process on the
# node that starts a dataset in between takes the same one, and the creation fails. Looking again
# finds the next free one.
REGISTER_TRIES = 20


def registered(make):
    """`make()` (a new StreamingDataset), made again when another process took the shared-memory
    prefix it had found (FileExistsError). `make` must build new Stream objects each time:
    StreamingDataset sets weights on those it is given."""
    for attempt in range(REGISTER_TRIES):
        try:
            return make()
        except FileExistsError:
            if attempt + 1 == REGISTER_TRIES:
                raise
            time.sleep(random.uniform(0.01, 0.1))


# A live process creates a segment (shm_open) a moment before it maps it: one younger than this is
# left alone, so that a run starting beside ours on the node never loses a segment it is creating.
FRESH_S = 2.0


def _just_made(path: Path) -> bool:
    try:
        st = path.stat()
    except OSError:
        return True  # gone already
    return time.time() - st.st_mtime < FRESH_S


def clean_stale_streaming_shm() -> list[str]:
    """Unlink streaming's segments (and hand-off slots of dead runs) that no live process maps; returns
    the names removed."""
    if not SHM_DIR.is_dir():
        return []
    candidates = [
        p
        for p in SHM_DIR.iterdir()
        if (_STREAMING_NAME.match(p.name) or (p.name.startswith(HANDOFF_PREFIX) and not _owner_alive(p.name)))
        and not _just_made(p)
    ]
    if not candidates:
        return []
    mapped = _mapped_shm_names()
    if mapped is None:
        return []
    removed = []
    for path in candidates:
        if path.name in mapped:
            continue
        try:
            if path.stat().st_uid != os.getuid():
                continue
            path.unlink()
            removed.append(path.name)
        except OSError:
            continue
    return removed


# streaming's registries, its per-shard arrays and semaphores, and DataLoader workers handing
# batches over (handoff.py's slots, prefetch_factor + 2 per worker, hold the bytes each batch
# wrote: ~1.5 MB a batch at the default batch size, up to ~5 MB at max_tokens 1000; a slot that
# cannot be reserved sends its batch the torch way, also through /dev/shm): a few MB, and ~8 MB
# per worker. Measured: with 400 KB free a run hung before its first batch; with 64 KB it
# stopped in a SemLock with ENOSPC; a full one ends in "Bus error".
MIN_FREE_SHM = 16 << 20
PER_WORKER_SHM = 8 << 20


def check_free_shm(num_workers: int) -> None:
    """Raise a DataError when /dev/shm has too little room for streaming and the loader workers."""
    if not SHM_DIR.is_dir():
        return
    stat = os.statvfs(SHM_DIR)
    free, need = stat.f_bavail * stat.f_frsize, MIN_FREE_SHM + PER_WORKER_SHM * max(0, int(num_workers))
    if free < need:
        raise DataError(
            SHM_DIR,
            f"has {free / 2**20:.1f} MiB free; the shard streams and {num_workers} loader "
            f"worker(s) need about {need / 2**20:.0f} MiB (a full /dev/shm ends a run in 'Bus error').",
            "Free it (stale segments of killed runs: `ls -la /dev/shm`), give the container more "
            "(docker --shm-size, a larger tmpfs), or lower datamodule.dataloader.*.num_workers.",
        )
