"""A killed build resumes with nothing lost or doubled; an interrupted join is finished by merge."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers import ADVANCED, REPO, assert_same_as_reference, read_dataset, shard


@pytest.mark.slow
def test_kill_9_mid_write_then_rerun(example_source, sharded_example, tmp_path):
    # the uninterrupted build (`build PROJECT datamodule=DataModuleAdvanced --no-progress`, exit
    # status 0) is conftest's sharded_example
    reference, project = sharded_example, tmp_path / "project"
    shutil.copytree(example_source, project)
    # tiny chunks and shards make the run slow enough to be caught with shard files half written
    cmd = [
        sys.executable,
        "-m",
        "concept_shard.cli",
        "build",
        str(project),
        *ADVANCED,
        "shard.chunk_size=2",
        "shard.shard_size_limit=65536",
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            complete = list(project.glob("shards/*/*/*/dataset.json"))
            writing = [p for p in project.glob("shards/*/*/.parts/*/part_*.tmp/mds/shard.*")]
            if complete and writing:
                break
            assert proc.poll() is None, "build finished before it could be killed"
            time.sleep(0.02)
        else:
            pytest.fail("never saw a part being written")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # a half-written dataset never has a dataset.json, and complete ones are readable
    for ds_json in project.glob("shards/*/*/*/dataset.json"):
        info = json.loads(ds_json.read_text())
        assert len(read_dataset(ds_json.parent)) == info["cells_written"]
    half = {p.parent.parent.name for p in project.glob("shards/*/*/.parts/*/part_*.tmp")}
    assert half and not any(
        (p.parent.parent.parent / n / "dataset.json").exists()
        for p in project.glob("shards/*/*/.parts/*/part_*.tmp")
        for n in half
    )
    assert shard("build", project, *ADVANCED, "--no-progress") == 0
    assert not list(project.glob("shards/**/*.tmp"))
    assert_same_as_reference(reference, project)


def test_interrupted_join_is_finished_by_merge(example_source, sharded_example, tmp_path):
    reference, project = sharded_example, tmp_path / "project"  # reference: as in the test above
    shutil.copytree(example_source, project)
    opts = [*ADVANCED, "shard.part_size=100", "--no-progress"]
    for task in range(2):
        assert shard("build", project, *opts, "--task-index", task, "--num-tasks", 2) == 0
    # Simulate kills at two points of a join: a half-filled staging dir, and a dataset dir swapped
    # into place whose dataset.json was never written.
    ds = project / "shards/hsapiens/synth_hsapiens/hs_blood_a"
    (ds.parent / "hs_blood_a.join.tmp").mkdir()
    (ds.parent / "hs_blood_a.join.tmp" / "shard.00000.mds.zstd").write_bytes(b"partial")
    ds2 = project / "shards/mmusculus/synth_mmusculus/mm_brain_a"
    ds2.mkdir(parents=True)
    (ds2 / "index.json").write_text("{}")
    assert not (ds2 / "dataset.json").exists()
    assert shard("merge", project, *ADVANCED) == 0
    assert not (ds.parent / "hs_blood_a.join.tmp").exists()
    assert_same_as_reference(reference, project)


def test_changed_source_is_rebuilt_and_said_so(sharded_project_copy, capsys):
    import anndata as ad

    project = sharded_project_copy  # built: the build below finds it up to date
    assert shard("build", project, *ADVANCED, "--no-progress") == 0
    path = project / "data/synth_mmusculus/h5ads/mm_brain_a.h5ad"
    adata = ad.read_h5ad(path)
    adata = adata[:200].copy()
    adata.write_h5ad(path)
    capsys.readouterr()
    assert shard("build", project, *ADVANCED, "--no-progress") == 0
    out = capsys.readouterr().out
    assert "mm_brain_a: the source file changed since it was sharded; rebuilding" in out
    assert "1 built, 8 up to date" in out
    info = json.loads((project / "shards/mmusculus/synth_mmusculus/mm_brain_a/dataset.json").read_text())
    assert (
        info["n_cells_source"] == 200
        and len(read_dataset(project / "shards/mmusculus/synth_mmusculus/mm_brain_a")) == 200
    )


def test_status_lists_done_pending_stale_failed(small_example_source, tmp_path, capsys):
    project = tmp_path / "project"
    shutil.copytree(small_example_source, project)  # 40 cells a file: the 9 files' states are what counts
    assert shard("status", project, *ADVANCED) == 1
    assert "9 pending" in capsys.readouterr().out
    assert shard("build", project, *ADVANCED, "--no-progress") == 0
    (project / "data/synth_hsapiens/h5ads/hs_val_e.h5ad").unlink()
    with open(project / "data/synth_mmusculus/h5ads/mm_val_c.h5ad", "ab") as fh:
        fh.write(b"\0" * 1000)  # same content plus trailing bytes: the fingerprint changes
    capsys.readouterr()
    assert shard("status", project, *ADVANCED) == 1
    out = capsys.readouterr().out
    assert "failed   hsapiens/synth_hsapiens/hs_val_e" in out
    assert "stale    mmusculus/synth_mmusculus/mm_val_c" in out
    assert "7 done" in out


def test_fingerprint_sees_content_and_size(tmp_path):
    from concept_shard.fingerprint import source_fingerprint

    f = tmp_path / "a.h5ad"
    f.write_bytes(b"x" * 3_000_000)
    fp, size = source_fingerprint(f)
    assert size == 3_000_000
    f.write_bytes(b"x" * 2_999_999 + b"y")  # last block differs
    assert source_fingerprint(f)[0] != fp
    f.write_bytes(b"x" * 3_000_001)  # size differs
    assert source_fingerprint(f)[0] != fp
    d = tmp_path / "b.zarr"
    (d / "X").mkdir(parents=True)
    (d / "X" / "0").write_bytes(b"abc")
    fp_dir = source_fingerprint(d)[0]
    (d / "X" / "0").write_bytes(b"abd")
    assert source_fingerprint(d)[0] != fp_dir


def test_an_in_place_edit_the_sampled_fingerprint_misses_is_found(sharded_project_copy, capsys):
    """One count changed in place (same size) between the fingerprint's sampled blocks: the sampled
    fingerprint cannot see it, the recorded mtime and full content hash do."""
    import h5py

    from concept_shard.fingerprint import BLOCK, N_BLOCKS, source_fingerprint

    project = sharded_project_copy  # built: the build below finds it up to date
    assert shard("build", project, *ADVANCED, "--no-progress") == 0
    capsys.readouterr()
    src = project / "data/synth_hsapiens/h5ads/hs_blood_a.h5ad"
    size, before = src.stat().st_size, source_fingerprint(src)[0]
    sampled = [
        ((size - BLOCK) * j // (N_BLOCKS - 1), (size - BLOCK) * j // (N_BLOCKS - 1) + BLOCK) for j in range(N_BLOCKS)
    ]
    with h5py.File(src, "r+") as f:
        data = f["X/data"]
        item, chunk = data.dtype.itemsize, data.chunks[0]
        for i in range(0, data.shape[0], 97):  # an element whose bytes no sampled block covers
            info = data.id.get_chunk_info_by_coord((i // chunk * chunk,))
            at = info.byte_offset + (i % chunk) * item
            if not any(a - item < at < b for a, b in sampled):
                break
        data[i] = data[i] + 1
    assert src.stat().st_size == size and source_fingerprint(src)[0] == before  # invisible to sampling
    assert shard("build", project, *ADVANCED, "--no-progress") == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "hs_blood_a: the source file changed since it was sharded (found by a full content check" in out
    assert "1 built, 8 up to date" in out


def test_a_touched_source_with_the_same_content_stays_current(sharded_project_copy, capsys):

    project = sharded_project_copy  # built: the build below finds it up to date
    assert shard("build", project, *ADVANCED, "--no-progress") == 0
    src = project / "data/synth_hsapiens/h5ads/hs_lung_b.h5ad"
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10**9))
    capsys.readouterr()
    assert shard("build", project, *ADVANCED, "--no-progress") == 0
    assert "0 built, 9 up to date" in capsys.readouterr().out
    record = json.loads((project / "shards/hsapiens/synth_hsapiens/hs_lung_b/dataset.json").read_text())
    assert record["source_mtime_ns"] == src.stat().st_mtime_ns  # the next check is cheap again
