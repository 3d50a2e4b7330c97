"""Exact resumption in a fresh process, with any number of workers; kill -9 does not block a restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import data_module

from concept_train.data import DataError
from concept_train.data.read.shm import HANDOFF_PREFIX

HERE = Path(__file__).parent
SMALL = ["datamodule.dataloader.train.batch_size=32", "datamodule.dataset.train.max_tokens=200"]


def _run(project, out, take, *extra, workers=0, check=True):
    cmd = [
        sys.executable,
        str(HERE / "data_run.py"),
        str(project),
        str(out),
        "--take",
        str(take),
        *map(str, extra),
        *SMALL,
        f"datamodule.dataloader.train.num_workers={workers}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _assert_same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys() and x["index"] == y["index"]
        for k in x:
            if k != "index":
                assert torch.equal(x[k], y[k]), (x["index"], k)


@pytest.fixture(scope="module")
def uninterrupted(sharded_example, tmp_path_factory):
    """uninterrupted(workers): a directory with full.pt (12 batches) and state.json (the loader's
    state after the first 5, taken while the run went on), from one process with that many
    workers; made once per number of workers, shared by the cases below that start with it."""
    made = {}

    def get(workers: int) -> Path:
        if workers not in made:
            out = tmp_path_factory.mktemp(f"uninterrupted_w{workers}")
            _run(
                sharded_example,
                out / "full.pt",
                12,
                "--state-out",
                out / "state.json",
                "--state-at",
                5,
                workers=workers,
            )
            made[workers] = out
        return made[workers]

    return get


@pytest.mark.parametrize("workers,resume_workers", [(0, 0), (2, 2), (2, 0)])
def test_resume_in_a_new_process_gives_the_uninterrupted_batches(
    sharded_example, uninterrupted, tmp_path, workers, resume_workers
):
    # 12 batches cross the epoch boundary (8 per epoch at batch 32 after drop_last... or fewer)
    runs = uninterrupted(workers)  # full.pt, state.json of `workers` workers
    state = json.loads((runs / "state.json").read_text())
    assert state["position"] == 5
    _run(sharded_example, tmp_path / "tail.pt", 7, "--state-in", runs / "state.json", workers=resume_workers)
    full, tail = torch.load(runs / "full.pt"), torch.load(tmp_path / "tail.pt")
    _assert_same(full[:5] + tail, full)
    assert [b["index"] for b in full] == list(range(12))


def test_plan_crosses_epochs_with_a_new_order(sharded_example):
    loader = data_module(sharded_example, SMALL + ["datamodule.dataloader.train.num_workers=0"]).train_loader()
    K = loader.plan.batches_per_epoch
    first = [loader.plan.batch(g) for g in range(K)]
    second = [loader.plan.batch(g) for g in range(K, 2 * K)]
    assert {b.epoch for b in second} == {1}
    key = lambda bs: sorted((int(b.datasets[0]), tuple(b.rows.tolist())) for b in bs)  # noqa: E731
    assert key(first) != key(second)  # reshuffled
    assert sorted(int(b.datasets[0]) for b in first) == sorted(int(b.datasets[0]) for b in second)


def test_state_of_another_plan_is_refused(sharded_example):
    loader = data_module(sharded_example, SMALL + ["datamodule.dataloader.train.num_workers=0"]).train_loader()
    state = loader.state_dict()
    other = data_module(sharded_example, ["datamodule.dataloader.train.batch_size=16", "seed=1"]).train_loader()
    with pytest.raises(DataError, match="another batch sequence"):
        other.load_state_dict(state)


def test_kill_9_leaves_nothing_that_stops_the_next_run(sharded_example, tmp_path):
    # through a bounded cache, the path that still registers streaming datasets in /dev/shm (local
    # shards read in place do not); the next run uses the same cache directory, which stale
    # segments would refuse ("Reused local directory")
    cached = [f"PATH.LOCAL_DIR={tmp_path / 'cache'}", "datamodule.cache_limit=1gb"]
    cmd = [
        sys.executable,
        str(HERE / "data_run.py"),
        str(sharded_example),
        str(tmp_path / "x.pt"),
        "--take",
        "99",
        "--sleep-after",
        "2",
        *SMALL,
        *cached,
        "datamodule.dataloader.train.num_workers=2",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "READY", proc.stderr.read()
        # the run's segments: those its main process maps, by name and inode (another test
        # session on the node may make segments of the same names meanwhile: the first free
        # prefix is taken, 000000 once the killed run's are swept)
        left = _mapped_by(proc.pid)
        assert any(name.endswith("_locals") for name in left)  # streaming registered itself
        assert any(name.startswith(HANDOFF_PREFIX) for name in left)  # and the hand-off slots
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    _run(sharded_example, tmp_path / "after.pt", 3, *cached, workers=2)  # and the next run starts anyway
    assert not (left.items() & _inodes(left).items())  # having removed them (or a session beside it did)


def _mapped_by(pid: int) -> dict[str, int]:
    """The /dev/shm segments the process maps, name -> inode (tmpfs numbers new files afresh)."""
    with open(f"/proc/{pid}/maps") as fh:
        names = {line.split("/dev/shm/", 1)[1].split()[0] for line in fh if "/dev/shm/" in line}
    return _inodes(names)


def _inodes(names) -> dict[str, int]:
    found = {}
    for name in names:
        try:
            found[name] = os.stat(f"/dev/shm/{name}").st_ino
        except FileNotFoundError:
            pass
    return found
