"""Shared fixtures: an isolated environment, one example project per session, a sharded copy.
Helpers that are not fixtures live in helpers.py (tests import it by name: pyproject's pytest
`pythonpath` puts tests/ and the repository root on sys.path)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from helpers import ADVANCED, shard
from tools.make_example_project import main as make_example_project


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


@pytest.fixture(scope="session")
def example_source(tmp_path_factory) -> Path:
    """The example project at 300 cells per synthetic file, made once (never modified)."""
    out = tmp_path_factory.mktemp("example") / "project"
    make_example_project([str(out), "--cells", "300"])
    return out


def _private_copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "project"
    shutil.copytree(src, dst, symlinks=True)
    return dst


@pytest.fixture
def project(example_source, tmp_path) -> Path:
    """A private copy of the example project that a test may change."""
    return _private_copy(example_source, tmp_path)


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
