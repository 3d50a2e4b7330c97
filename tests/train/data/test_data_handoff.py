"""Worker hand-off through shared slots (handoff.py): the same batches as torch's own hand-off and
as the main process alone; a batch that cannot go through a slot crosses the torch way; the slots
are gone after the pass."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import data_module
from torch.utils.data import DataLoader, IterableDataset

from concept_train.data.deliver.handoff import SlotRing
from concept_train.data.read.shm import FRESH_S, HANDOFF_PREFIX, SHM_DIR, clean_stale_streaming_shm, owner_tag

TESTS = Path(__file__).resolve().parents[2]  # tests/, for helpers.py
SMALL = ["datamodule.dataloader.train.batch_size=32", "datamodule.dataset.train.max_tokens=200"]
TAKE = 10


def _batches(project, workers: int, slots: bool) -> list:
    loader = data_module(project, SMALL + [f"datamodule.dataloader.train.num_workers={workers}"]).train_loader()
    loader.handoff_slots = slots
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == TAKE:
            break
    return out


def _ours() -> set[str]:
    return {n for n in os.listdir(SHM_DIR) if n.startswith(f"{HANDOFF_PREFIX}{owner_tag(os.getpid())}-")}


def test_slots_deliver_the_batches_of_the_main_process_and_of_torchs_handoff(sharded_example):
    alone = _batches(sharded_example, 0, True)
    slots = _batches(sharded_example, 2, True)
    torch_way = _batches(sharded_example, 2, False)
    assert not _ours()  # the pass removed its slots
    for a, s, t in zip(alone, slots, torch_way, strict=True):
        assert a.index == s.index == t.index
        assert a.rest() == s.rest() == t.rest()  # cell ids, max_seqlen, panel kinds, epoch
        ta, ts, tt = a.tensors(), s.tensors(), t.tensors()
        assert ta.keys() == ts.keys() == tt.keys()
        for k in ta:
            assert ta[k].dtype == ts[k].dtype and torch.equal(ta[k], ts[k]) and torch.equal(ta[k], tt[k]), (a.index, k)
        # through a slot the tensors are the consumer's own memory; torch's way, shared segments
        assert not any(v.is_shared() for v in ts.values())
        assert all(v.is_shared() for v in tt.values())


class _Parcels(IterableDataset):
    """Packs what it is given in a real worker; yields (what pack returned, the arrays)."""

    def __init__(self, ring: SlotRing, arrays: list[dict]):
        self.ring, self.arrays = ring, arrays

    def __iter__(self):
        for arrays in self.arrays:
            yield self.ring.pack(arrays), arrays


def _through(ring, arrays, context=None):
    out = []
    for parcel, sent in DataLoader(
        _Parcels(ring, arrays), batch_size=None, num_workers=1, multiprocessing_context=context
    ):
        out.append((None if parcel is None else ring.unpack(parcel), sent))
    return out


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_arrays_of_every_dtype_and_shared_storages_round_trip(method):
    """Under fork the worker inherits the ring's maps; under spawn (forkserver alike) it gets the
    names and semaphores and maps the slots itself."""
    import multiprocessing

    context = multiprocessing.get_context(method)
    rng = np.random.default_rng(0)
    joined = torch.from_numpy(rng.integers(0, 255, 4096).astype(np.uint8))
    base = np.arange(50, dtype=np.int64)
    sent = [
        {
            "a": rng.integers(-5, 5, 100).astype(np.int64),
            "b": rng.random(33).astype(np.float32),
            "c": rng.random(7) > 0.5,
            "d": np.zeros(0, np.int32),
            "e": np.arange(12, dtype=np.int16).reshape(3, 4),
            # two views of one storage (the loader's layout): copied once, viewed at their offsets
            "f": joined[8:808].view(torch.int64),
            "g": joined[1024:2048].view(torch.float32),
            # NumPy views of one buffer: storages at one address, of two sizes
            "h": base[:10],
            "i": base,
        }
        for _ in range(5)
    ]
    ring = SlotRing(1, 3, context=context)
    try:
        got = _through(ring, sent, context)
    finally:
        ring.close()
    assert len(got) == 5
    for received, original in got:
        assert received is not None
        for k, v in original.items():
            want = torch.from_numpy(v) if isinstance(v, np.ndarray) else v
            assert (
                received[k].dtype == want.dtype and received[k].shape == want.shape and torch.equal(received[k], want)
            ), k


def test_a_batch_larger_than_a_slot_or_without_a_free_slot_goes_the_torch_way():
    big = {"x": np.ones(5000, np.int64)}  # 40 kB in 16 kB slots
    small = {"x": np.arange(10, dtype=np.int64)}
    ring = SlotRing(1, 2, slot_bytes=16 << 10)
    try:
        got = _through(ring, [big, small])
        assert got[0][0] is None and got[1][0] is not None and torch.equal(got[1][0]["x"], torch.arange(10))

        class Unread(IterableDataset):  # packs three without the consumer reading any
            def __iter__(self):
                yield [ring.pack(small) is not None for _ in range(3)]

        (packed,) = list(DataLoader(Unread(), batch_size=None, num_workers=1))
        assert packed == [True, True, False]  # two slots, then the torch way: no deadlock
    finally:
        ring.close()
    assert not _ours()


def test_outside_a_worker_nothing_is_packed():
    ring = SlotRing(1, 1)
    try:
        assert ring.pack({"x": np.zeros(3)}) is None
    finally:
        ring.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_stopping_early_leaves_no_slots(sharded_example, workers):
    loader = data_module(sharded_example, SMALL + [f"datamodule.dataloader.train.num_workers={workers}"]).train_loader()
    it = iter(loader)
    next(it)
    assert len(_ours()) == workers * (loader.prefetch_factor + 2)
    it.close()
    assert not _ours()


def test_a_process_that_exits_without_closing_its_loader_leaves_no_slots(sharded_example):
    code = (
        "import sys, os; sys.path.insert(0, sys.argv[2]); from helpers import data_module; "
        "it = iter(data_module(sys.argv[1], sys.argv[3:]).train_loader()); next(it); print(os.getpid())"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(sharded_example),
            str(TESTS),
            *SMALL,
            "datamodule.dataloader.train.num_workers=2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    pid = proc.stdout.split()[-1]
    assert not [n for n in os.listdir(SHM_DIR) if n.startswith(f"{HANDOFF_PREFIX}{pid}.")]


def test_the_sweep_removes_slots_of_a_dead_owner_or_of_a_reused_pid_and_keeps_live_ones():
    live = SlotRing(1, 1)
    reused = SHM_DIR / f"{HANDOFF_PREFIX}{os.getpid()}.1-feedbeef-0-0"  # our pid, another start time
    dead = SHM_DIR / f"{HANDOFF_PREFIX}999999999.5-feedbeef-0-0"
    # a streaming registry no process maps: stale once old, but one just made may be a segment a
    # process beside ours has created and not yet mapped
    unmapped = SHM_DIR / "999998_locals"
    try:
        for path in (reused, dead, unmapped):
            path.write_bytes(b"x")
        assert unmapped.name not in clean_stale_streaming_shm() and unmapped.exists()
        for path in (reused, dead, unmapped):
            old = time.time() - 2 * FRESH_S
            os.utime(path, (old, old))
        removed = set(clean_stale_streaming_shm())
        assert {reused.name, dead.name, unmapped.name} <= removed and not (set(_ours()) & removed)
        assert not reused.exists() and not dead.exists() and len(_ours()) == 1
    finally:
        live.close()
        for path in (reused, dead, unmapped):
            path.unlink(missing_ok=True)
