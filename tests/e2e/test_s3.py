"""Shards in object storage: `concept-shard build` uploads to s3://, the trainer streams from there
through a bounded cache, and a run killed after a checkpoint resumes exactly.

The object store is a real S3 protocol server on loopback (`moto_server`, from moto[server]),
started for this module and stopped at its end; nothing is mocked inside boto3 or streaming.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import boto3
import pytest
from helpers import ADVANCED, assert_same_batches, data_module, free_port, shard
from helpers import TINY_RESUME as TINY
from helpers import metric_rows as _rows

from concept_shard.errors import DataError, UserError

SMALL_SHARDS = "shard.shard_size_limit=65536"  # ~30 shards per file, so a small cache must evict
BATCHES = ["datamodule.dataloader.train.batch_size=32", "datamodule.dataset.train.max_tokens=200"]


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """moto_server on a free loopback port, with the S3_ENDPOINT_URL and AWS_* variables that the
    sharder, the trainer and its subprocesses read; stopped at the end of the module."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1).read()
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"moto_server did not start: {open(log.name).read()}") from None
                time.sleep(0.2)
        with pytest.MonkeyPatch.context() as mp:
            for key, value in dict(
                S3_ENDPOINT_URL=endpoint,
                AWS_ACCESS_KEY_ID="test",
                AWS_SECRET_ACCESS_KEY="test",
                AWS_DEFAULT_REGION="us-east-1",
                AWS_EC2_METADATA_DISABLED="true",
                AWS_CONFIG_FILE=os.devnull,
                AWS_SHARED_CREDENTIALS_FILE=os.devnull,
            ).items():
                mp.setenv(key, value)
            mp.delenv("AWS_PROFILE", raising=False)
            mp.delenv("AWS_ENDPOINT_URL", raising=False)
            yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def _client():
    return boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])


def _objects(bucket: str) -> dict[str, str]:
    pages = _client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"]: o["ETag"] for p in pages for o in p.get("Contents", [])}


@pytest.fixture(scope="module")
def s3_project(s3_server, example_source, tmp_path_factory):
    """The example project sharded into s3://shards-test/proj (nothing kept locally)."""
    project = tmp_path_factory.mktemp("s3") / "project"
    shutil.copytree(example_source, project, symlinks=True)
    _client().create_bucket(Bucket="shards-test")
    remote = "PATH.SHARDS_REMOTE=s3://shards-test/proj"
    assert shard("build", project, *ADVANCED, remote, SMALL_SHARDS, "--no-progress") == 0
    return project, remote


def test_build_uploads_complete_datasets_and_resumes(s3_project, capsys):
    project, remote = s3_project
    objects = _objects("shards-test")
    datasets = sorted(k[len("proj/") : -len("/dataset.json")] for k in objects if k.endswith("/dataset.json"))
    assert len(datasets) == 9 and "hsapiens/celltypist/celltypist_sample" in datasets
    for ds in datasets:
        shards = [k for k in objects if k.startswith(f"proj/{ds}/shard.")]
        assert f"proj/{ds}/index.json" in objects and len(shards) >= 2, ds
    assert "proj/hsapiens/index.json" in objects and "proj/mmusculus/datasets.json" in objects
    assert not list((project / "shards").glob("*/*/*/dataset.json"))  # staged copies removed
    capsys.readouterr()
    assert shard("status", project, *ADVANCED, remote) == 0
    assert "9 done" in capsys.readouterr().out

    # an upload cut short leaves no dataset.json: the re-run redoes that dataset and skips the rest
    _client().delete_object(Bucket="shards-test", Key="proj/mmusculus/synth_mmusculus/mm_kidney_b/dataset.json")
    assert shard("status", project, *ADVANCED, remote) == 1
    assert shard("build", project, *ADVANCED, remote, SMALL_SHARDS, "--no-progress") == 0
    assert "1 built, 8 up to date" in capsys.readouterr().out
    after = _objects("shards-test")
    assert after.keys() == objects.keys()
    assert all(after[k] == objects[k] for k in objects if "mm_kidney_b" not in k or k.endswith((".mds", ".zstd")))


def test_batches_from_the_bucket_equal_batches_from_local_shards(s3_project, sharded_example, tmp_path):
    project, remote = s3_project
    cache = tmp_path / "cache"
    dm = data_module(project, [remote, f"PATH.LOCAL_DIR={cache}", "datamodule.cache_limit=2mb", *BATCHES])
    local = data_module(sharded_example, BATCHES)
    assert all(s.remote and s.remote.startswith("s3://shards-test/proj/") for s in dm.store.sets)
    for loaders in (
        (dm.train_loader(), local.train_loader()),
        (dm.val_loaders()["within_P200_B256"], local.val_loaders()["within_P200_B256"]),
    ):
        assert_same_batches(*loaders)
    cached = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    assert 0 < cached <= 2 * 1024**2  # evicted to stay under the limit (9 MB were read)


def test_gene_vectors_from_the_bucket_equal_those_from_local_shards(s3_project, sharded_project_copy):
    project, remote = s3_project
    assert shard("gene-vectors", project, remote, "--dim", 8, "--no-progress") == 0
    assert shard("gene-vectors", sharded_project_copy, "--dim", 8, "--no-progress") == 0
    got, want = (p / "references/embeddings/coexpression/hsapiens.csv" for p in (project, sharded_project_copy))
    assert got.read_bytes() == want.read_bytes()
    assert not list((project / "shards").rglob("shard.*"))  # read in memory, nothing cached on disk


def test_a_shard_that_fails_its_hash_in_the_bucket_is_named_to_every_reader(s3_project, tmp_path):
    """A shard object whose bytes no longer match index.json: streaming's check of the download
    fails, and a DataError names the dataset. The shard is not left marked as being prepared: a
    worker that came for it during that download, or one that finds it gone from the cache (here:
    removed), downloads it anew and is told the same, where it waited for good (and the run)."""
    project, _ = s3_project
    client, bucket = _client(), "shards-test"
    for key in _objects(bucket):  # a copy of the datasets under another prefix, one shard damaged
        if key.startswith("proj/"):
            client.copy_object(Bucket=bucket, Key="damaged/" + key[5:], CopySource={"Bucket": bucket, "Key": key})
    name = "damaged/hsapiens/synth_hsapiens/hs_blood_a/shard.00000.mds"
    data = bytearray(client.get_object(Bucket=bucket, Key=name)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    client.put_object(Bucket=bucket, Key=name, Body=bytes(data))
    remote = f"PATH.SHARDS_REMOTE=s3://{bucket}/damaged"
    store = data_module(project, [remote, f"PATH.LOCAL_DIR={tmp_path / 'cache'}", *BATCHES]).store
    (at,) = [i for i, s in enumerate(store.sets) if s.remote.endswith("/hsapiens/synth_hsapiens/hs_blood_a")]

    def read(said: list) -> None:
        try:
            store.get(at, 0)  # row 0 lies in shard 0
        except DataError as err:
            said.append(str(err))

    first, second = [], []
    read(first)
    assert "s3://shards-test/damaged/hsapiens/synth_hsapiens/hs_blood_a" in first[0], first
    for left in (tmp_path / "cache").rglob("shard.00000.mds*"):
        left.unlink()
    reader = threading.Thread(target=read, args=(second,), daemon=True)  # the next reader
    reader.start()
    reader.join(timeout=60)
    assert not reader.is_alive(), "the next reader waits for good on the damaged shard"
    assert "synth_hsapiens/hs_blood_a" in second[0], second


def _train(project, *overrides, wait=True):
    cmd = [sys.executable, "-m", "concept_train.cli", str(project), *TINY, *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if wait:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


@pytest.mark.slow
def test_train_from_the_bucket_killed_and_resumed(s3_project, sharded_project_copy, tmp_path):
    """Killed and resumed from the bucket, the run equals the uninterrupted one from local shards
    (the same cells: the bucket's batches equal the local ones, test above), bit for bit."""
    project, remote = s3_project
    root = project / "model_checkpoints"
    run = ["model.training.max_steps=10", "datamodule.dataloader.train.num_workers=2"]
    common = [remote, f"PATH.LOCAL_DIR={tmp_path / 'cache'}", "datamodule.cache_limit=2mb", *run]
    full = _train(sharded_project_copy, *run, "initialize.run_id=full")
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]

    proc = _train(project, *common, "initialize.run_id=killed", wait=False)
    latest = root / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and latest.read_text().strip() == "step_5":
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:]

    resumed = _train(project, *common, "initialize.run_id=killed", "initialize.resume=True")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    a, b = _rows(sharded_project_copy / "model_checkpoints" / "full"), _rows(root / "killed")
    assert sorted(a) == sorted(b) == list(range(1, 11))
    for step in a:
        assert a[step]["batch_digest"] == b[step]["batch_digest"], step
        assert a[step]["loss"] == b[step]["loss"], (step, a[step]["loss"], b[step]["loss"])


def test_missing_bucket_and_unreachable_endpoint_are_named(s3_server, project, capsys, monkeypatch):
    missing = "PATH.SHARDS_REMOTE=s3://no-such-bucket/shards"
    assert shard("build", project, *ADVANCED, missing, "--no-progress") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "s3://no-such-bucket/shards" in err and "does not exist" in err and "aws s3 mb" in err
    with pytest.raises(UserError) as exc:
        data_module(project, [missing])
    assert "s3://no-such-bucket/shards" in str(exc.value) and "does not exist" in str(exc.value)

    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    assert shard("status", project, *ADVANCED, missing) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "s3://no-such-bucket/shards" in err and "could not connect" in err and "S3_ENDPOINT_URL" in err

    monkeypatch.setenv("S3_ENDPOINT_URL", s3_server)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert shard("status", project, *ADVANCED, missing) == 2
    assert "AWS_ACCESS_KEY_ID" in " ".join(capsys.readouterr().err.split())
