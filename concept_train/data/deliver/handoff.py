"""Batches out of DataLoader workers through shared-memory slots made once per pass.

torch hands a tensor from a worker to the main process by moving its storage into a new
shared-memory segment and passing the segment's descriptor through a socket round trip between
the two processes; the receiver maps it, and unmaps and unlinks it when the tensor dies. For our
batch (two storages, ~1.5 MB) that cost ~1.3 ms fixed + ~1.2 ms per 1.5 MB on 2 cores, as much
as making the batch (BENCHMARKS.md, issue 15): with workers the loader delivered less than in
the main process alone.

Here the main process creates, per pass, `slots` segments per worker (names under /dev/shm,
sized large but allocated only as written). A worker copies a batch's storages into its next
slot and sends only a small `Parcel` (slot, offsets, dtypes, shapes) through the queue; the main
process copies the bytes out into fresh tensors (before it yields the batch) and frees the slot.
A semaphore per worker counts its free slots: a worker never writes a slot the main process has
not read, and when it finds none free (other workers ran out of batches and it makes more than
its share) or a batch does not fit, it hands that batch over the torch way. Batches are
identical either way (tests/train/data/test_data_handoff.py).
"""

from __future__ import annotations

import math
import mmap
import multiprocessing
import os
import secrets
import warnings
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import get_worker_info

from ..read.shm import HANDOFF_PREFIX, SHM_DIR, owner_tag

SLOT_BYTES = 64 << 20  # virtual size (tmpfs allocates the pages a batch writes); a larger batch goes the torch way
_ALIGN = 64


@dataclass
class Parcel:
    """What crosses the queue: where a batch's bytes lie and how to view them as tensors."""

    worker: int
    slot: int
    storages: list[tuple[int, int]]  # (offset in the slot, nbytes)
    tensors: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]]  # name -> (storage, byte offset, dtype, shape)


def ring_for(num_workers: int, prefetch_factor: int) -> SlotRing | None:
    """The slots for one pass of a DataLoader with these settings, or None (the torch way) without
    workers, without /dev/shm, or when they cannot be made (said in a warning).

    Slots per worker: the DataLoader sends a worker its next index before it yields the batch
    that index replaces, so up to prefetch_factor + 1 of its batches are unread, and a worker with
    no work to do packs the next before the consumer has copied the last one out."""
    if num_workers <= 0 or not SlotRing.available():
        return None
    try:
        return SlotRing(num_workers, prefetch_factor + 2)
    except OSError as err:
        warnings.warn(f"loader hand-off slots unavailable ({err}); batches cross the torch way", stacklevel=2)
        return None


class SlotRing:
    """Shared slots for one DataLoader pass: created by the consumer, written by workers."""

    def __init__(self, workers: int, slots: int, slot_bytes: int = SLOT_BYTES, context=None):
        # context: the DataLoader's multiprocessing context (None: the default, as the DataLoader's)
        self.workers, self.slots, self.slot_bytes = int(workers), int(slots), int(slot_bytes)
        stem = f"{HANDOFF_PREFIX}{owner_tag(os.getpid())}-{secrets.token_hex(4)}"
        self.paths = [[str(SHM_DIR / f"{stem}-{w}-{s}") for s in range(self.slots)] for w in range(self.workers)]
        self.free = [(context or multiprocessing.get_context()).Semaphore(self.slots) for _ in range(self.workers)]
        self._maps: dict[tuple[int, int], mmap.mmap] = {}
        self._written: dict[tuple[int, int], int] = {}  # bytes reserved on tmpfs per slot (this worker)
        self._next = 0  # this worker's next slot
        self._owner = os.getpid()
        # removed at close(), or when the ring is collected, or at the consumer's exit (a loader
        # iterator never closed); a killed run's are swept at the next start (shm.py)
        self._unlink = weakref.finalize(self, _unlink, [p for row in self.paths for p in row], self._owner)
        try:
            for w, row in enumerate(self.paths):
                for s, path in enumerate(row):
                    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                    try:
                        os.ftruncate(fd, self.slot_bytes)
                        # mapped at once: a stale-segment sweep by another run spares mapped segments
                        self._maps[(w, s)] = mmap.mmap(fd, self.slot_bytes)
                    finally:
                        os.close(fd)
        except OSError:  # no room for the mappings (ulimit -v), /dev/shm refused: none made
            self.close()
            raise

    @staticmethod
    def available() -> bool:
        return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)

    def __getstate__(self):  # to a spawned worker: names and semaphores, not this process's maps
        state = dict(self.__dict__)
        state["_maps"], state["_written"], state["_next"] = {}, {}, 0
        del state["_unlink"]
        return state

    def _map(self, w: int, s: int) -> mmap.mmap:
        m = self._maps.get((w, s))
        if m is None:
            fd = os.open(self.paths[w][s], os.O_RDWR)
            try:
                m = self._maps[(w, s)] = mmap.mmap(fd, self.slot_bytes)
            finally:
                os.close(fd)
        return m

    # ------------------------------------------------------------------ in a worker
    def pack(self, tensors: dict[str, torch.Tensor | np.ndarray]) -> Parcel | None:
        """Copy the tensors' storages into this worker's next slot; None (hand them over the
        torch way) when no slot is free, the batch does not fit, or the slot cannot be written."""
        info = get_worker_info()
        if info is None or info.id >= self.workers:
            return None
        w = info.id
        as_torch = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in tensors.items()}
        if not all(t.is_contiguous() and t.device.type == "cpu" for t in as_torch.values()):
            return None
        storages, index, specs, offset = [], {}, {}, 0
        for name, t in as_torch.items():
            st = t.untyped_storage()
            key = (st.data_ptr(), st.nbytes())  # two arrays over one buffer may see storages of two sizes
            if key not in index:
                index[key] = len(storages)
                storages.append((st, offset))
                offset += -(-st.nbytes() // _ALIGN) * _ALIGN
            specs[name] = (index[key], t.storage_offset() * t.element_size(), t.dtype, tuple(t.shape))
        if offset > self.slot_bytes or not self.free[w].acquire(block=False):
            return None
        s = self._next
        try:
            m = self._map(w, s)
            if self._written.get((w, s), 0) < offset:  # reserve on tmpfs: ENOSPC here, not SIGBUS on write
                fd = os.open(self.paths[w][s], os.O_RDWR)
                try:
                    os.posix_fallocate(fd, 0, offset)
                finally:
                    os.close(fd)
                self._written[(w, s)] = offset
        except OSError:
            self.free[w].release()
            return None
        view = np.frombuffer(m, np.uint8)
        placed = []
        for st, at in storages:
            n = st.nbytes()
            if n:
                view[at : at + n] = torch.empty(0, dtype=torch.uint8).set_(st).numpy()
            placed.append((at, n))
        del view
        self._next = (s + 1) % self.slots
        return Parcel(w, s, placed, specs)

    # ------------------------------------------------------------------ in the consumer
    def unpack(self, parcel: Parcel) -> dict[str, torch.Tensor]:
        """The parcel's tensors, copied out of its slot (which is then free for its worker)."""
        try:
            view = np.frombuffer(self._map(parcel.worker, parcel.slot), np.uint8)
            own = []
            for at, n in parcel.storages:
                buf = torch.empty(n, dtype=torch.uint8)
                buf.numpy()[:] = view[at : at + n]
                own.append(buf)
            del view
        finally:
            self.free[parcel.worker].release()
        return {
            name: own[i][off : off + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
            for name, (i, off, dtype, shape) in parcel.tensors.items()
        }

    def close(self) -> None:
        """Unmap and remove the slots (the consumer, after the pass). Workers still alive keep
        their own mappings until they exit; a later `pack` finds no file and falls back."""
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:  # a view still exported (an interrupted copy): the GC unmaps it
                pass
        self._maps.clear()
        if os.getpid() == self._owner:
            self._unlink()


def _unlink(paths: list[str], owner: int) -> None:
    if os.getpid() != owner:  # a forked worker inherits the finalizer, not the slots
        return
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
