"""Shared fixtures: an isolated environment, one example project per session, shard helpers."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ADVANCED = ["datamodule=DataModuleAdvanced"]


@pytest.fixture(scope="session", autouse=True)
def isolated_env(tmp_path_factory):
    """Private TMPDIR, offline wandb, private lamindb settings; no stale streaming shared memory."""
    base = tmp_path_factory.mktemp("env")
    (base / "tmp").mkdir()
    os.environ.update(TMPDIR=str(base / "tmp"), WANDB_MODE="offline", LAMIN_SETTINGS_DIR=str(base / "lamin"))
    _clean_shm()
    yield
    _clean_shm()


def _clean_shm():
    """Streaming leaves /dev/shm segments behind when a process is killed; remove those no live process maps."""
    from concept_train.data.shm import clean_stale_streaming_shm
    clean_stale_streaming_shm()


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def example_source(tmp_path_factory) -> Path:
    """The example project at 300 cells per synthetic file, made once (never modified)."""
    out = tmp_path_factory.mktemp("example") / "project"
    load_tool("make_example_project").main([str(out), "--cells", "300"])
    return out


def _private_copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "project"
    shutil.copytree(src, dst, symlinks=True)
    return dst


@pytest.fixture
def project(example_source, tmp_path) -> Path:
    """A private copy of the example project that a test may change."""
    return _private_copy(example_source, tmp_path)


def shard(*args) -> int:
    """Run `concept-shard` in-process (no 10 s interpreter start per call)."""
    from concept_shard.cli import main
    return main([str(a) for a in args])


def read_dataset(path: Path) -> list[dict]:
    """Every sample of an MDS dataset, in order, through plain streaming.StreamingDataset."""
    from streaming import StreamingDataset
    ds = StreamingDataset(local=str(path), shuffle=False, batch_size=1)
    return [ds[i] for i in range(len(ds))]


def dataset_dirs(project: Path) -> list[Path]:
    return sorted(p.parent for p in (project / "shards").glob("*/*/*/dataset.json"))


def assert_same_samples(a: Path, b: Path, n_datasets: int = 9) -> None:
    """Both projects hold the same datasets with equal samples, column by column."""
    import numpy as np
    da = {d.relative_to(a): d for d in dataset_dirs(a)}
    db = {d.relative_to(b): d for d in dataset_dirs(b)}
    assert da.keys() == db.keys() and len(da) == n_datasets
    for rel in da:
        x, y = read_dataset(da[rel]), read_dataset(db[rel])
        assert len(x) == len(y), rel
        for s, t in zip(x, y):
            assert s.keys() == t.keys()
            for col in s:
                np.testing.assert_array_equal(s[col], t[col])


@pytest.fixture(scope="session")
def sharded_example(example_source, tmp_path_factory) -> Path:
    """The example project sharded with DataModuleAdvanced, shared read-only by the data tests."""
    dst = tmp_path_factory.mktemp("sharded") / "project"
    shutil.copytree(example_source, dst, symlinks=True)
    assert shard("build", dst, *ADVANCED, "--no-progress") == 0
    return dst


@pytest.fixture
def sharded_project_copy(sharded_example, tmp_path) -> Path:
    """A private copy of the sharded example project (its model_checkpoints/ start empty)."""
    return _private_copy(sharded_example, tmp_path)
