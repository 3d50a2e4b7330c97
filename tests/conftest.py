"""Shared fixtures: an isolated environment, one example project per session, a sharded copy
(both from an on-disk cache shared by pytest processes, helpers.cached_copy), a small project.
Helpers that are not fixtures live in helpers.py (tests import it by name: pyproject's pytest
`pythonpath` puts tests/ and the repository root on sys.path)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from helpers import ADVANCED, EARLIER_FORMAT, example_project, example_project_key, fixture_cache_dir, sharded_project

from concept_shard.console import collect_rarely

# The suite's processes run the programs in-process (main(argv)) and collect as the programs do
# when started on their own (console.program)
collect_rarely()

EXAMPLE_ARGS = ("--cells", "300")
SMALL_EXAMPLE_ARGS = ("--cells", "40")


@pytest.fixture(scope="session", autouse=True)
def isolated_env(tmp_path_factory):
    """Private TMPDIR, offline wandb, private lamindb settings; no stale streaming shared memory."""
    base = tmp_path_factory.mktemp("env")
    (base / "tmp").mkdir()
    os.environ.update(TMPDIR=str(base / "tmp"), WANDB_MODE="offline", LAMIN_SETTINGS_DIR=str(base / "lamin"))
    # scIB's metrics are jax programs that each process compiles anew (~4 s per evaluation): the
    # suite's processes share jax's own compilation cache, keyed by jax on program and versions
    cached = fixture_cache_dir()
    if cached is not None and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        os.environ.update(
            JAX_COMPILATION_CACHE_DIR=str(cached.parent / "jax-cache"),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        )
    _clean_shm()
    yield
    _clean_shm()


def _clean_shm():
    """Streaming leaves /dev/shm segments behind when a process is killed; remove those no live process maps."""
    from concept_train.data.read.shm import clean_stale_streaming_shm

    clean_stale_streaming_shm()


@pytest.fixture(scope="session")
def example_source(tmp_path_factory) -> Path:
    """The example project at 300 cells per synthetic file, made once (never modified): this
    process's copy of the tree in the fixture cache (helpers.cached_copy), built on a miss."""
    out = tmp_path_factory.mktemp("example") / "project"
    return example_project(out, *EXAMPLE_ARGS)


def _private_copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "project"
    shutil.copytree(src, dst, symlinks=True)
    return dst


@pytest.fixture
def project(example_source, tmp_path) -> Path:
    """A private copy of the example project that a test may change."""
    return _private_copy(example_source, tmp_path)


@pytest.fixture(scope="session")
def small_example_source(tmp_path_factory) -> Path:
    """The example project at 40 cells per synthetic file (the same 9 files, vocabularies and
    panels; 20 cells in the targeted and zarr files, the 559 real cells): for tests of a build's
    errors, whose whole builds need no more cells (never modified)."""
    out = tmp_path_factory.mktemp("small_example") / "project"
    return example_project(out, *SMALL_EXAMPLE_ARGS)


@pytest.fixture
def small_project(small_example_source, tmp_path) -> Path:
    """A private copy of the small example project that a test may change."""
    return _private_copy(small_example_source, tmp_path)


@pytest.fixture(scope="session")
def sharded_example(example_source, tmp_path_factory) -> Path:
    """The example project sharded with DataModuleAdvanced, shared read-only by the data tests."""
    dst = tmp_path_factory.mktemp("sharded") / "project"
    return sharded_project(example_source, example_project_key(*EXAMPLE_ARGS), dst, *ADVANCED, "--no-progress")


@pytest.fixture
def sharded_project_copy(sharded_example, tmp_path) -> Path:
    """A private copy of the sharded example project (its model_checkpoints/ start empty)."""
    return _private_copy(sharded_example, tmp_path)


@pytest.fixture(scope="session")
def sharded_earlier_example(example_source, tmp_path_factory) -> Path:
    """sharded_example in the earlier shard format (zstd-compressed arrays), which readers still read."""
    dst = tmp_path_factory.mktemp("sharded_earlier") / "project"
    args = (*ADVANCED, *EARLIER_FORMAT, "--no-progress")
    return sharded_project(example_source, example_project_key(*EXAMPLE_ARGS), dst, *args, kind="sharded-earlier")


@pytest.fixture
def earlier_project_copy(sharded_earlier_example, tmp_path) -> Path:
    """A private copy of sharded_earlier_example."""
    return _private_copy(sharded_earlier_example, tmp_path / "earlier")
