"""Helpers shared by the tests (fixtures are in conftest.py): running `concept-shard` in-process,
reading shards back with plain streaming, small model configs, metrics rows, a data module over a
sharded example project, and an independent per-cell reference of what a view must hold,
computed from the SOURCE files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
ADVANCED = ["datamodule=DataModuleAdvanced"]
# the shard format before varint entries (concept_shard/entries.py): zstd-compressed arrays
EARLIER_FORMAT = ["shard.entries=arrays", "shard.compression=zstd:1"]

# A model small enough for a few CPU steps in a test (concept-train overrides).
TINY = [
    "model.dim_model=16",
    "model.nlayers=1",
    "model.num_head=2",
    "model.dim_hid=32",
    "model.dim_gene_embs=16",
    "model.training.max_steps=3",
    "model.training.log_every_n_steps=1",
    "model.training.warmup=1",
    "model.training.val_check_interval=0",
    "model.training.validate_before_training=False",
    "datamodule.dataloader.train.batch_size=16",
    "datamodule.dataloader.train.num_workers=0",
    "datamodule.dataset.train.max_tokens=50",
]

# 20 steps with a checkpoint every 5: the stop-and-go runs (learns enough that losses differ per step).
TINY_RESUME = [
    "model.dim_model=32",
    "model.nlayers=2",
    "model.num_head=2",
    "model.dim_hid=64",
    "model.dim_gene_embs=32",
    "model.training.lr=1e-3",
    "model.training.warmup=4",
    "model.training.max_steps=20",
    "model.training.log_every_n_steps=1",
    "model.training.checkpoint_every_n_steps=5",
    "model.training.val_check_interval=0",
    "model.training.validate_before_training=False",
    "datamodule.dataloader.train.batch_size=32",
    "datamodule.dataset.train.max_tokens=100",
    "datamodule=DataModuleAdvanced",
]


def free_port() -> int:
    """A loopback port free now, in 20000-39999 (a SLURM job's rendezvous port is 20000 + its job id
    % 20000): two pytest processes side by side never pick one port, as a port made from a pid may."""
    import socket

    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if 20000 <= port < 40000:
            return port


def shard(*args) -> int:
    """Run `concept-shard` in-process (no 10 s interpreter start per call)."""
    from concept_shard.cli import main

    return main([str(a) for a in args])


def assert_same_batches(a, b, n: int = 12) -> None:
    """The first n batches of two loaders hold equal tensors."""
    import torch

    for i, (x, y) in enumerate(zip(a, b)):
        tx, ty = x.tensors(), y.tensors()
        assert tx.keys() == ty.keys()
        for k in tx:
            assert torch.equal(tx[k], ty[k]), (i, k)
        if i == n - 1:
            break


def read_dataset(path: Path) -> list[dict]:
    """Every sample of an MDS dataset, in order, through plain streaming.StreamingDataset (varint
    genes and counts as arrays, as the README shows a reader of the shards)."""
    return read_datasets([path])[0]


def read_datasets(paths: list[Path]) -> list[list[dict]]:
    """read_dataset of each path, through ONE StreamingDataset of one stream per path. Every
    StreamingDataset a process makes keeps its shared memory open to the end of the process, and
    each later one opens that of every earlier one that holds no cache lock (one that never
    decompressed a shard: every one over uncompressed shards). One per dataset made a process's
    descriptors grow with the square of the datasets read (2,052 after 18; EMFILE on Python 3.13
    in the whole-build comparisons)."""
    from streaming import Stream, StreamingDataset

    from concept_shard.entries import with_arrays
    from concept_train.data.read.shm import registered

    # new Streams on every try, as `registered` asks
    ds = registered(
        lambda: StreamingDataset(streams=[Stream(local=str(p)) for p in paths], shuffle=False, batch_size=1)
    )
    starts = np.concatenate([[0], np.cumsum(ds.samples_per_stream)]).tolist()
    return [[with_arrays(ds[i]) for i in range(a, b)] for a, b in zip(starts[:-1], starts[1:])]


def streaming_dataset(**kwargs):
    """streaming.StreamingDataset(**kwargs), made again when a pytest process beside this one took
    the shared-memory prefix it had found (shm.registered)."""
    from streaming import StreamingDataset

    from concept_train.data.read.shm import registered

    return registered(lambda: StreamingDataset(**kwargs))


def dataset_dirs(project: Path) -> list[Path]:
    return sorted(p.parent for p in (project / "shards").glob("*/*/*/dataset.json"))


def assert_same_samples(a: Path, b: Path, n_datasets: int = 9) -> None:
    """Both projects hold the same datasets with equal samples, column by column."""
    da = {d.relative_to(a): d for d in dataset_dirs(a)}
    db = {d.relative_to(b): d for d in dataset_dirs(b)}
    assert da.keys() == db.keys() and len(da) == n_datasets
    xs, ys = read_datasets(list(da.values())), read_datasets([db[rel] for rel in da])
    for rel, x, y in zip(da, xs, ys):
        assert len(x) == len(y), rel
        for s, t in zip(x, y):
            assert s.keys() == t.keys()
            for col in s:
                np.testing.assert_array_equal(s[col], t[col])


def metric_rows(run_dir: Path) -> dict[int, dict]:
    """The last train row written for each step of a run."""
    from concept_train.trainer.metrics import train_rows_by_step

    return train_rows_by_step(run_dir / "metrics.jsonl")


def data_module(project: Path, overrides=(), rank: int = 0, world_size: int = 1):
    from concept_shard.config import compose_config
    from concept_train.data import DataModule

    cfg = compose_config(project, list(ADVANCED) + list(overrides))
    return DataModule(cfg, rank=rank, world_size=world_size, log=lambda *a: None)


def sequences(batch):
    """[(tokens, values, positions)] per packed sequence (view 1 of all cells, then view 2)."""
    cu = batch.cu_seqlens.tolist()
    return [
        (batch.tokens[a:b].numpy(), batch.values[a:b].numpy(), batch.positions[a:b].numpy())
        for a, b in zip(cu[:-1], cu[1:])
    ]


@cache
def _source(project: str, source_file: str, species: str, id_column: str | None):
    import anndata as ad

    path = Path(project) / source_file
    adata = ad.read_zarr(path) if path.suffix == ".zarr" else ad.read_h5ad(path)
    src = adata.raw if adata.raw is not None else adata
    X = src.X
    var_names = src.var[id_column].astype(str) if id_column else src.var_names
    vocab = pd.read_csv(Path(project) / "references/vocabulary/token_mappings_per_specie" / f"{species}.csv")
    token_of = dict(zip(vocab.gene_id.str.replace(r"\.\d+$", "", regex=True), vocab.token))
    tokens = np.array([token_of.get(g.split(".")[0], -1) for g in var_names])
    return X, tokens


def source_cell(project: Path, shard_set, row: int) -> tuple[dict[int, float], float]:
    """({token: count} of the cell's nonzero in-vocabulary genes, library size over all genes), read
    from the source .h5ad with anndata: the reference the loader's output is checked against."""
    record = json.loads((shard_set.directory / "dataset.json").read_text())
    X, tokens = _source(str(project), shard_set.source_file, shard_set.species, record.get("gene_id_column"))
    x = X[row]
    x = np.asarray(x.todense()).ravel() if hasattr(x, "todense") else np.asarray(x).ravel()
    nz = np.flatnonzero((x != 0) & (tokens >= 0))
    return {int(tokens[j]): float(x[j]) for j in nz}, float(x.sum())


def expected_view(cell: dict[int, float], n_counts: float, panel: np.ndarray, max_tokens: int, normalization: str):
    """Reference tokenization of one view: nonzero genes in the panel, normalised, by value
    descending then token ascending, first max_tokens."""
    in_panel = set(panel.tolist())
    items = [(t, c) for t, c in cell.items() if t in in_panel]
    if normalization.startswith("binning/"):
        n_bins = int(normalization.split("/")[1])
        allv = np.array(sorted(cell.values()))
        edges = np.quantile(allv, np.linspace(0, 1, n_bins - 1)) if len(allv) else np.zeros(0)
        value = {
            t: float(min(max(int(np.searchsorted(edges[1:-1], c, side="left")) + 1, 1), n_bins - 1)) for t, c in items
        }
    else:
        f = {
            "raw": lambda c: c,
            "log1p": np.log1p,
            "totalcount": lambda c: c / n_counts * 1e4,
            "totalcount/log1p": lambda c: np.log1p(c / n_counts * 1e4),
        }[normalization]
        value = {t: float(f(c)) for t, c in items}
    ordered = sorted(items, key=lambda tc: (-value[tc[0]], tc[0]))[:max_tokens]
    return np.array([t for t, _ in ordered], np.int64), np.array([value[t] for t, _ in ordered], np.float32)


# --------------------------------------------------------------------------- fixture cache
# Making the example project and sharding it take several seconds each (tens on a busy machine),
# and every pytest process of `make test` needs them. They are built once into an on-disk cache
# shared by all pytest processes (and later runs), keyed by the content of everything that produces
# them; each process gets its own copy. CONCEPT_TEST_CACHE: the cache directory (default:
# .pytest_cache/d/concept-fixtures/ in the repository, which `pytest --cache-clear` empties);
# CONCEPT_TEST_CACHE=off builds every time, as before the cache.
FIXTURE_CACHE_VERSION = "1"  # bump to drop every cached tree
FIXTURE_CACHE_KEEP = 3  # entries kept per kind (each Python version's venv has its own)


def fixture_cache_dir() -> Path | None:
    value = os.environ.get("CONCEPT_TEST_CACHE", "")
    if value.lower() in ("0", "off", "no", "false"):
        return None
    return Path(value) if value else REPO / ".pytest_cache" / "d" / "concept-fixtures"


@cache
def environment_digest() -> str:
    """The interpreter and every installed distribution's version (anndata, numpy, streaming, ...)."""
    from importlib.metadata import distributions

    h = hashlib.sha256(sys.version.encode())
    for dist in sorted({f"{d.metadata['Name']}=={d.version}" for d in distributions()}):
        h.update(dist.encode() + b"\n")
    return h.hexdigest()


def inputs_digest(*parts) -> str:
    """sha256 of strings and of the files under paths (relative names and bytes; caches skipped)."""
    h = hashlib.sha256(FIXTURE_CACHE_VERSION.encode())
    for part in parts:
        h.update(b"\0part\0")
        if not isinstance(part, Path):
            h.update(str(part).encode())
            continue
        files = (
            [part]
            if part.is_file()
            else sorted(
                f for f in part.rglob("*") if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc"
            )
        )
        for f in files:
            h.update(str(f.relative_to(part.parent)).encode() + b"\0")
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:24]


def example_project_key(*args) -> str:
    """Cache key of tools/make_example_project.py ARGS: the tool, its data, the environment."""
    return inputs_digest(
        "example", *args, REPO / "tools/make_example_project.py", REPO / "tools/example_data", environment_digest()
    )


def sharded_project_key(example_key: str, *args) -> str:
    """Cache key of `concept-shard build ARGS` over a cached example project: the sharder's code and
    the config tree besides the example's own key."""
    sources = [REPO / name for name in ("concept_shard", "concept_config", "conf") if (REPO / name).is_dir()]
    return inputs_digest("sharded", example_key, *args, *sources)


def cached_copy(kind: str, key: str, build, dest: Path) -> Path:
    """A private copy at DEST (created) of the tree that build(path) makes, built once per key.

    Under an exclusive flock per key: a missing entry is built under a temporary name and renamed
    into place, so a process killed mid-build leaves nothing that looks complete, and two pytest
    processes that start together build it once. Copies keep mtimes (shards record their sources')."""
    import fcntl

    root = fixture_cache_dir()
    try:
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)
            lock = open(root / f"{kind}-{key}.lock", "a")
    except OSError:  # a read-only checkout: no cache
        root = None
    if root is None:
        build(dest)
        return dest
    entry = root / f"{kind}-{key}"
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not entry.is_dir():
            for stale in root.glob(f".{entry.name}.*.tmp"):  # a build killed half-way
                shutil.rmtree(stale, ignore_errors=True)
            tmp = root / f".{entry.name}.{os.getpid()}.tmp"
            try:
                build(tmp / "tree")
                os.rename(tmp, entry)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(entry / "tree", dest, symlinks=True)
        os.utime(entry)  # recently used: kept by the pruning
    _prune_fixture_cache(root, kind)
    return dest


def _prune_fixture_cache(root: Path, kind: str) -> None:
    """Drop all but the FIXTURE_CACHE_KEEP most recently used entries of KIND (those not in use)."""
    import fcntl

    entries = [p for p in root.glob(f"{kind}-*") if p.is_dir() and p.name[len(kind) + 1 :].isalnum()]
    entries.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[FIXTURE_CACHE_KEEP:]:
        with open(root / f"{old.name}.lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # being built or copied right now
            shutil.rmtree(old, ignore_errors=True)


def example_project(dest: Path, *args) -> Path:
    """tools/make_example_project.py DEST ARGS, from the fixture cache."""
    from tools.make_example_project import main as make_example_project

    kind = "example" + "".join(str(a).strip("-") for a in args)  # examplecells300: one kind per size
    return cached_copy(kind, example_project_key(*args), lambda out: make_example_project([str(out), *args]), dest)


def sharded_project(example: Path, example_key: str, dest: Path, *args, kind: str = "sharded") -> Path:
    """A copy of EXAMPLE (made with key EXAMPLE_KEY) at DEST after `concept-shard build ARGS`, from the
    cache (KIND: a name for the pruning, one per kind of project kept)."""

    def build(out: Path) -> None:
        shutil.copytree(example, out, symlinks=True)
        assert shard("build", out, *args) == 0

    return cached_copy(kind, sharded_project_key(example_key, *args), build, dest)


@cache
def _reference_samples(dataset: str, stamp: int) -> list[dict]:
    return read_dataset(Path(dataset))


def reference_samples(dataset: Path) -> list[dict]:
    """read_dataset(dataset) for a dataset no test changes, read once per process (and again only
    if its dataset.json changes)."""
    return _reference_samples(str(dataset), (Path(dataset) / "dataset.json").stat().st_mtime_ns)


def assert_same_as_reference(reference: Path, project: Path, n_datasets: int = 9) -> None:
    """assert_same_samples(reference, project) for a REFERENCE that no test changes (conftest's
    sharded_example): its datasets are read with streaming once per process (and again only if
    their dataset.json changes), not once per call. Every StreamingDataset a process builds keeps
    handles on the shared memory of every other one to the end of the process (see the Makefile)."""
    da = {d.relative_to(reference): d for d in dataset_dirs(reference)}
    db = {d.relative_to(project): d for d in dataset_dirs(project)}
    assert da.keys() == db.keys() and len(da) == n_datasets
    ys = read_datasets([db[rel] for rel in da])
    for rel, y in zip(da, ys):
        x = reference_samples(da[rel])
        assert len(x) == len(y), rel
        for s, t in zip(x, y):
            assert s.keys() == t.keys()
            for col in s:
                np.testing.assert_array_equal(s[col], t[col])
