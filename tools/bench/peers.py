#!/usr/bin/env python
"""This project against the fast single-cell loaders on the same files, in one run, each peer run as
its own documentation says (issues 15 and 26; not a test).

Usage::

    .venv/bin/python tools/bench/peers.py [--quick] [--sizes 20000,200000] [--repeats 3]
                                          [--seconds 6] [--workdir DIR] [--no-install]

The default run takes ~20 min on 2 cores (--quick: ~8 min); it needs ~10 GB of free memory
(annbatch's conversion of the 200,000-cell file peaks at 9.6 GB) and ~8 GB of disk in the workdir
(inputs and every converted copy stay there).

Peers (pinned in tools/bench/peers-requirements.txt) live in a side venv, `.venv-peers`
(Python 3.12), created and filled on the first run; scConcept's own package (sc-concept, which
pins its own torch) in `.venv-scconcept` (tools/scconcept_env.sh, run on the first run); this
project runs from the main `.venv`. A peer that cannot be installed or imported is reported as
such and left out; the others go on.

Inputs: the synthetic projects of tools/bench/shard.py (CSR .h5ad of raw integer counts, 20,000
genes, ~1,500 nonzeros per cell, obs `cell_type`), one per size, cached in the workdir.

Measured, each figure in a fresh subprocess, alternating (ours, peer, ours, peer ...), medians
over --repeats rounds, with the machine's load over each run (cores busy in the run's processes
and in all others, from /proc/stat and the run's rusage):

- preprocessing the .h5ad: `concept-shard build` (as tools/bench/shard.py measures it: wall of
  the build minus the wall of its no-op re-run) against annbatch's `DatasetCollection.add_adatas`
  (shuffled zarr collection, written with zarrs) and bionemo-scdl's `SingleCellMemMapDataset(
  h5ad_path=...)` (time of the conversion call in the child): cells/s, peak RSS (ru_maxrss of the
  child's process tree: the largest process), bytes on disk per nonzero; ours also with
  `shard.entries=arrays` (uncompressed arrays, read in place like the default varints), into a
  sibling project `<project>_arrays`;
- raw shuffled minibatches of 128 cells (CSR rows), 0 and 2 DataLoader workers, on the largest
  size, every loader with workers through torch's DataLoader hand-off: our shards through the
  training loader's own plan and store reads (`get_batch` in the shards' dtypes; the same widened
  to int64 / float64 as the loader tokenizes them; `get_many`, one dict per sample), and as a
  separate row ours through its own shared slots (concept_train/data/deliver/handoff.py), and
  ours from the `shard.entries=arrays` shards;
  annbatch over its collection with zarrs (its README: "necessary for local filesystem
  performance") at its README's settings (chunk 32, preload 256) and at chunk 512 / preload 32,
  workers started with "spawn" as it asks; scdataset over anndata backed mode (block shuffling);
  scdl memmaps with a shuffling torch sampler and its collate, with one torch thread per process
  and as shipped; and a "no-work ceiling", a loader that hands over one pre-made batch shaped as
  ours (what torch's hand-off alone allows; not a peer);
- tokenized training batches, 0 and 2 workers (global batch 128, `max_tokens` 1000, random
  disjoint panels, top-nonzero): our `DataModule` training loader (with workers through torch's
  hand-off, and through its own slots as a separate row) against scConcept's own loader as its
  datamodule builds it (sc-concept: LaminDiskCollection with parallel=True, its tokenizer and
  dataset, its `Collate(split_input=True)`, StatefulDataLoader), and against a rewrite of that
  collate on lamin-dataloader (permute the file's genes, two disjoint log-uniform random panels,
  nonzero genes, top by value capped at max_tokens, padded);
- disk after an epoch with the defaults: our dataset's bytes as built and after one epoch of the
  training plan's batches read in place, for the random batches of the large file and for the
  file-by-file batches of 100 small files (tools/bench/scale.py's project); the peers' stores
  before and after their loading runs.

Every loader's batches are checked for shuffling: per batch, the std of the source rows relative
to a uniform draw (1.0 = uniform, ~0 = sequential) and the share of adjacent rows; a loader whose
batches look sequential is reported as FAILED and the script exits 1 after printing its figures.

The LAST line printed is one JSON object with every figure and the ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import IterableDataset  # every venv these tasks run in has torch

REPO = Path(__file__).resolve().parents[2]
PEERS_VENV = REPO / ".venv-peers"
# scConcept's own package pins its own torch: a venv of its own (tools/scconcept_env.sh builds it)
SCCONCEPT_VENV = REPO / ".venv-scconcept"
SCCONCEPT = "scConcept (as shipped)"
PEERS_PYTHON_BASE = "/root/.pyenv/versions/3.12.1/bin/python3.12"
REQUIREMENTS = REPO / "tools" / "bench" / "peers-requirements.txt"
BATCH = 128
MAX_TOKENS = 1000
PANEL_MIN_FRACTION = 0.02  # our default panel_size_min (a fraction of the file's genes)
PANEL_MAX = 60000  # our default panel_size_max
SEED = 0
CEILING = "no-work ceiling"  # the hand-off alone; not a peer
OWN_SLOTS = "ours (own slots)"  # our loader's own hand-off from workers: a row beside the common one
# what each peer needs to import for its measurements
PEER_IMPORTS = {
    "annbatch": "import annbatch, zarr",
    "scdataset": "import scdataset, anndata",
    "bionemo-scdl": "from bionemo.scdl.io.single_cell_memmap_dataset import SingleCellMemMapDataset",
    "lamin-dataloader": "from lamin_dataloader.lamin_disk_collection import LaminDiskCollection",
}
# annbatch at its README's settings and at the ones that read fastest here (contiguous rows of its
# pre-shuffled collection), both with zarrs, which its README calls necessary on a local filesystem
ANNBATCH_SETTINGS = {
    "defaults": {"chunk_size": 32, "preload_nchunks": 256},
    "chunk 512": {"chunk_size": 512, "preload_nchunks": 32},
}
ZARRS_PIPELINE = "zarrs.ZarrsCodecPipeline"
SCDATASET_LOADER = {"block_size": 8, "fetch_factor": 16}
PREFETCH = 4  # every loader's DataLoader prefetch_factor with workers
OURS_OVERRIDES = ["datamodule=Bench", "datamodule.dataset.train.panel_selection=random"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# =========================================================================== shuffle check
def spread(rows_per_batch: list[np.ndarray], n_rows: int) -> dict:
    """Median over batches of std(source rows) / std(uniform over n_rows), and of the share of
    sorted neighbours that are adjacent rows."""
    uniform = n_rows / np.sqrt(12)
    rows_per_batch = [np.asarray(r) for r in rows_per_batch]  # a worker may hand over tensors
    stds = [float(np.std(r)) / uniform for r in rows_per_batch if len(r) > 1]
    adjacent = [float(np.mean(np.diff(np.sort(r)) == 1)) for r in rows_per_batch if len(r) > 1]
    return {
        "std_vs_uniform": round(float(np.median(stds)), 3) if stds else None,
        "adjacent_share": round(float(np.median(adjacent)), 3) if adjacent else None,
        "batches_checked": len(stds),
    }


def shuffled(stats: dict) -> bool:
    return bool(
        stats.get("std_vs_uniform") is not None and stats["std_vs_uniform"] >= 0.5 and stats["adjacent_share"] < 0.9
    )


def timed_batches(batches, seconds: float, rows_of, cells_of) -> dict:
    """One warm-up batch, then batches for `seconds`; the rows of each batch for the check."""
    t0 = time.perf_counter()
    first = next(batches)
    warmup = time.perf_counter() - t0
    rows, cells, n = [rows_of(first)], 0, 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b = next(batches)
        cells += cells_of(b)
        n += 1
        if len(rows) < 400:
            rows.append(rows_of(b))
    dt = time.perf_counter() - t0
    return {"cells_per_s": cells / dt, "batches": n, "seconds": dt, "warmup_s": warmup, "rows": rows}


# =========================================================================== child tasks
# Each runs in its own process (`peers.py --task NAME JSON`): ours under .venv, peers under
# .venv-peers (which lacks this project). Each prints one JSON line.
def _use_zarrs() -> None:
    """annbatch's README: "Using zarrs is necessary for local filesystem performance". Set through
    the environment too, so that spawned DataLoader workers read with it as well."""
    import os

    os.environ["ZARR_CODEC_PIPELINE__PATH"] = ZARRS_PIPELINE
    import zarr

    zarr.config.set({"codec_pipeline.path": ZARRS_PIPELINE})


def task_convert_annbatch(h5ad: str, out: str) -> dict:
    _use_zarrs()
    import annbatch

    t0 = time.perf_counter()
    annbatch.DatasetCollection(out).add_adatas([h5ad], shuffle=True, rng=np.random.default_rng(SEED))
    return {"convert_s": time.perf_counter() - t0}


def task_convert_scdl(h5ad: str, out: str) -> dict:
    from bionemo.scdl.io.single_cell_memmap_dataset import SingleCellMemMapDataset

    t0 = time.perf_counter()
    ds = SingleCellMemMapDataset(out, h5ad_path=h5ad, use_X_not_raw=True)
    n = ds.number_of_rows()
    return {"convert_s": time.perf_counter() - t0, "cells": int(n)}


def _loader(dataset, workers: int, **kw):
    """torch's DataLoader: the one hand-off every loader with workers goes through."""
    from torch.utils.data import DataLoader

    extra = {"prefetch_factor": PREFETCH, "persistent_workers": True} if workers else {}
    return DataLoader(dataset, num_workers=workers, **{**extra, **kw})


def _one_thread(_worker_id: int = 0) -> None:
    import torch

    torch.set_num_threads(1)


def endless(iterable):
    """Epoch after epoch (a peer's loader stops at the end of its epoch)."""
    while True:
        yield from iterable


def task_raw_ours(project: str, workers: int, seconds: float, path: str = "get_batch", slots: bool = False) -> dict:
    sys.path.insert(0, str(REPO))
    from torch.utils.data import get_worker_info

    from concept_shard.config import compose_config
    from concept_train.data import DataModule

    cfg = compose_config(project, OURS_OVERRIDES, str(Path(project) / "conf"))
    maker = DataModule(cfg, log=lambda *a: None).train_loader().maker

    from concept_train.data.deliver.handoff import ring_for

    # `slots`: our loader's own hand-off from workers (shared slots; a batch that misses one goes the
    # torch way); else torch's, as every peer's
    ring = ring_for(workers, PREFETCH) if slots else None

    class RawBatches(IterableDataset):
        """Global batch g of the training plan as CSR rows: g = w, w + W, ... in worker w of W."""

        def __iter__(self):
            info = get_worker_info()
            w, step = (info.id, info.num_workers) if info else (0, 1)
            g = w
            while True:
                batch = raw_batch(maker, maker.plan.batch(g), path)
                parcel = ring.pack(vars(batch)) if ring is not None else None
                yield batch if parcel is None else parcel
                g += step

    def received(it):
        for b in it:
            yield b if isinstance(b, RawCSR) else RawCSR(**ring.unpack(b))

    try:
        it = received(iter(_loader(RawBatches(), workers, batch_size=None)))
        return timed_batches(it, seconds, lambda b: np.asarray(b.rows), lambda b: len(b.indptr) - 1)
    finally:
        if ring is not None:
            ring.close()


@dataclass
class RawCSR:
    """A raw minibatch as CSR rows (indices = genes, data = counts) and their source rows. Not a
    mapping of arrays: torch's DataLoader hands it from a worker pickled through its queue, where a
    dict of arrays becomes one shared-memory tensor per array (4x slower here for a batch of 128)."""

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    rows: np.ndarray


def task_epoch_ours(project: str) -> dict:
    """Every raw batch of epoch 0 of the training plan, in one process (the disk figure)."""
    sys.path.insert(0, str(REPO))
    from concept_shard.config import compose_config
    from concept_train.data import DataModule

    cfg = compose_config(project, ["datamodule=Bench"], str(Path(project) / "conf"))
    maker = DataModule(cfg, log=lambda *a: None).train_loader().maker
    t0, cells = time.perf_counter(), 0
    for g in range(maker.plan.batches_per_epoch):
        cells += len(raw_batch(maker, maker.plan.batch(g), "get_batch").rows)
    return {"cells": cells, "cells_per_s": cells / (time.perf_counter() - t0)}


def raw_batch(maker, pb, path: str) -> dict:
    """A planned batch's cells as CSR (indptr, indices = genes, data = counts) plus source rows,
    through `SampleStore.get_batch` (a batch decoded at once) in the shard's own dtypes
    (`get_batch`: what a reader of raw counts asks for) or widened to int64 genes and float64
    counts (`get_batch_wide`: what the training loader tokenizes), else `get_many` (one dict per
    sample, the shard's own dtypes, joined here)."""
    idx = maker.store_index[pb.datasets]
    if path in ("get_batch", "get_batch_wide") and hasattr(maker.store, "get_batch"):
        own = {"shard_dtypes": True} if path == "get_batch" else {}
        b = maker.store.get_batch(idx, pb.rows, ["row"], **own)
        genes, counts, lengths, rows = b.genes, b.counts, b.lengths, b.scalars["row"]
    else:
        samples = maker.store.get_many(idx, pb.rows)
        lengths = np.fromiter((len(s["genes"]) for s in samples), np.int64, count=len(samples))
        genes, counts = np.concatenate([s["genes"] for s in samples]), np.concatenate([s["counts"] for s in samples])
        rows = [s["row"] for s in samples]
    indptr = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=indptr[1:])
    return RawCSR(indptr, genes, counts, np.asarray(rows, np.int64))


def source_rows(names) -> np.ndarray:
    """cell_00001234 -> 1234 (the generator's obs names are the source rows)."""
    return np.array([int(str(s).rsplit("_", 1)[1].split("-")[0]) for s in names], np.int64)


@dataclass
class Rows:
    """The source rows of a peer's batch, which this harness asks for (the shuffle check): kept out
    of torch's collation, so that they add no shared-memory tensor to the peer's own hand-off."""

    rows: np.ndarray


def _from_collection(batch: dict) -> tuple:
    """annbatch's batch as (X, Rows of its collection indices)."""
    return batch["X"], Rows(np.asarray(batch["index"]))


class _Split(IterableDataset):
    """An iterable dataset of another's batches, each through `split` (a module-level function,
    so that spawned workers can unpickle it)."""

    def __init__(self, inner, split):
        self.inner, self.split = inner, split

    def __iter__(self):
        return map(self.split, self.inner)


def task_raw_annbatch(store: str, workers: int, seconds: float, settings: str) -> dict:
    _use_zarrs()
    import annbatch

    coll = annbatch.DatasetCollection(store, mode="r")
    order = source_rows(coll.obs().index)  # collection row -> source row
    loader = annbatch.Loader(
        batch_size=BATCH,
        shuffle=True,
        drop_last=True,
        return_index=True,
        preload_to_gpu=False,
        rng=np.random.default_rng(SEED),
        **ANNBATCH_SETTINGS[settings],
    ).use_collection(coll)
    # annbatch's README discourages DataLoader workers (it reads on threads) and asks for "spawn"
    # where they are used anyway (fork deadlocks)
    tagged = _Split(loader, _from_collection)
    it = endless(_loader(tagged, workers, batch_size=None, multiprocessing_context="spawn") if workers else tagged)
    return timed_batches(it, seconds, lambda b: order[b[1].rows], lambda b: b[0].shape[0])


class _Backed:
    """An .h5ad in anndata backed mode, opened in the process that reads it (DataLoader workers
    must not share an h5py handle opened before the fork)."""

    def __init__(self, path: str):
        import h5py

        self.path, self._X = path, None
        with h5py.File(path, "r") as f:
            self.n = int(f["X"].attrs["shape"][0])

    def __len__(self):
        return self.n

    def rows(self, idx):
        if self._X is None:
            import anndata as ad

            self._X = ad.read_h5ad(self.path, backed="r").X
        return self._X[idx]


def task_raw_scdataset(h5ad: str, workers: int, seconds: float) -> dict:
    from scdataset import scDataset
    from scdataset.strategy import BlockShuffling

    data = _Backed(h5ad)
    ds = scDataset(
        data,
        BlockShuffling(block_size=SCDATASET_LOADER["block_size"]),
        batch_size=BATCH,
        fetch_factor=SCDATASET_LOADER["fetch_factor"],
        drop_last=True,
        seed=SEED,
        fetch_callback=lambda coll, idx: (coll.rows(idx), np.asarray(idx)),
        batch_callback=lambda fetched, b: (fetched[0][b], Rows(fetched[1][b])),
    )
    # its documentation: prefetch_factor = fetch_factor + 1 with workers
    extra = {"prefetch_factor": SCDATASET_LOADER["fetch_factor"] + 1} if workers else {}
    it = endless(_loader(ds, workers, batch_size=None, **extra) if workers else ds)
    return timed_batches(it, seconds, lambda b: b[1].rows, lambda b: b[0].shape[0])


def task_raw_scdl(out: str, workers: int, seconds: float, one_thread: bool = False) -> dict:
    """`one_thread`: torch's intra-op pool of one thread in every process (its collate runs torch
    ops whose pool fights the other processes for the cores); else as shipped."""
    import torch
    from bionemo.scdl.io.single_cell_memmap_dataset import SingleCellMemMapDataset
    from bionemo.scdl.util.torch_dataloader_utils import collate_sparse_matrix_batch
    from torch.utils.data import BatchSampler, RandomSampler

    ds = SingleCellMemMapDataset(out)
    drawn: list[np.ndarray] = []

    class Recorded(BatchSampler):
        """The shuffled index batches, recorded in the main process as the loader draws them."""

        def __iter__(self):
            for b in super().__iter__():
                drawn.append(np.asarray(b))
                yield b

    if one_thread:
        _one_thread()
    sampler = Recorded(RandomSampler(ds, generator=torch.Generator().manual_seed(SEED)), BATCH, drop_last=True)
    extra = {"worker_init_fn": _one_thread} if one_thread and workers else {}
    loader = _loader(ds, workers, batch_sampler=sampler, collate_fn=collate_sparse_matrix_batch, **extra)
    it = enumerate(endless(loader))
    return timed_batches(it, seconds, lambda kb: drawn[kb[0]], lambda kb: kb[1].shape[0])


def task_raw_ceiling(workers: int, seconds: float, n_rows: int, nnz: int = 1500) -> dict:
    """The DataLoader's hand-off alone: a loader that does no work and yields one pre-made batch
    shaped as ours (uint16 genes, uint8 counts, random rows), so the figure is what crossing from
    the workers costs."""
    rng = np.random.default_rng(SEED)
    n = BATCH * nnz
    indptr = np.arange(BATCH + 1, dtype=np.int64) * nnz
    genes, counts = rng.integers(0, 60000, n).astype(np.uint16), rng.integers(1, 9, n).astype(np.uint8)

    class Same(IterableDataset):
        def __iter__(self):
            while True:
                yield RawCSR(indptr, genes, counts, rng.integers(0, n_rows, BATCH))

    it = iter(_loader(Same(), workers, batch_size=None))
    return timed_batches(it, seconds, lambda b: np.asarray(b.rows), lambda b: len(b.indptr) - 1)


def task_tok_ours(project: str, seconds: float, workers: int = 0, slots: bool = False) -> dict:
    """Our training loader; with workers through torch's hand-off, or its own slots (`slots`)."""
    sys.path.insert(0, str(REPO))
    from concept_shard.config import compose_config
    from concept_train.data import DataModule

    cfg = compose_config(project, OURS_OVERRIDES, str(Path(project) / "conf"))
    loader = DataModule(cfg, log=lambda *a: None).train_loader()
    loader.num_workers, loader.prefetch_factor, loader.handoff_slots = workers, PREFETCH, slots
    res = timed_batches(iter(loader), seconds, lambda b: b.row.numpy(), lambda b: b.n_cells)
    res["max_tokens"] = loader.maker.token_spec.max_tokens
    return res


def task_tok_scconcept(h5ad: str, vocab_csv: str, seconds: float, workers: int = 0) -> dict:
    """scConcept's own training loader (sc-concept, in .venv-scconcept) as its datamodule builds it
    from DataModuleBasic: a LaminDiskCollection with parallel=True, its MultiSpeciesTokenizer and
    MultiSpeciesTokenizedDataset (raw counts), its Collate with split_input=True, a shuffling
    sampler and its StatefulDataLoader (panels random here, as ours in this benchmark)."""
    import torch
    from concept.data.collate import Collate
    from concept.dataset import MultiSpeciesTokenizedDataset, MultiSpeciesTokenizer
    from concept.utils import build_species_gene_mappings
    from lamin_dataloader.lamin_disk_collection import LaminDiskCollection
    from torch.utils.data import RandomSampler
    from torchdata.stateful_dataloader import StatefulDataLoader

    tokenizer = MultiSpeciesTokenizer(build_species_gene_mappings(str(Path(vocab_csv).parent), ["hsapiens"]))
    coll = LaminDiskCollection(
        [h5ad],
        layers_keys="X",
        obs_keys=["cell_type"],
        keys_to_cache=None,
        join="outer",
        encode_labels=True,
        parallel=True,
    )
    inner = MultiSpeciesTokenizedDataset(
        metadata={"species": ["hsapiens"]},
        collection=coll,
        tokenizer=tokenizer,
        obs_keys=["cell_type"],
        obsm_key=None,
        normalization="raw",
    )
    ds = RowTagged(inner)
    collate = Collate(
        tokenizer,
        MAX_TOKENS,
        stage="train",
        split_input=True,
        gene_sampling_strategy="top-nonzero",
        panel_selection="random",
        panel_size_min=PANEL_MIN_FRACTION,
        panel_size_max=PANEL_MAX,
        panel_overlap=False,
        panel_max_drop_rate=0.5,
        max_total_seq_length=None,
    )
    extra = {"prefetch_factor": PREFETCH, "persistent_workers": True} if workers else {}
    loader = StatefulDataLoader(
        ds,
        sampler=RandomSampler(ds, generator=torch.Generator().manual_seed(SEED)),
        batch_size=BATCH,
        drop_last=True,
        worker_init_fn=getattr(coll, "torch_worker_init_fn", None),
        collate_fn=collate,
        num_workers=workers,
        **extra,
    )
    return timed_batches(endless(loader), seconds, lambda b: b["row"].numpy(), lambda b: len(b["row"]))


def task_tok_reference(h5ad: str, vocab_csv: str, seconds: float, workers: int = 0) -> dict:
    import pandas as pd
    from lamin_dataloader import GeneIdTokenizer, TokenizedDataset
    from lamin_dataloader.lamin_disk_collection import LaminDiskCollection

    vocab = pd.read_csv(vocab_csv)
    tokenizer = GeneIdTokenizer(dict(zip(vocab["gene_id"], vocab["token"])))
    coll = LaminDiskCollection(path_list=[h5ad], obs_keys=["cell_type"], keys_to_cache=None)
    ds = RowTagged(TokenizedDataset(coll, tokenizer, obs_keys=["cell_type"], normalization="raw"))
    n_genes = len(ds.inner.tokenized_vars_masked[0])
    collate = reference_collate_class()(
        tokenizer, MAX_TOKENS, panel_size_min=round(PANEL_MIN_FRACTION * n_genes), panel_size_max=PANEL_MAX
    )
    import torch
    from torch.utils.data import BatchSampler, RandomSampler

    sampler = BatchSampler(RandomSampler(ds, generator=torch.Generator().manual_seed(SEED)), BATCH, drop_last=True)
    it = endless(_loader(ds, workers, batch_sampler=sampler, collate_fn=collate))
    res = timed_batches(it, seconds, lambda b: b["row"].numpy(), lambda b: len(b["row"]))
    res["panel_size_min"] = round(PANEL_MIN_FRACTION * n_genes)
    return res


class RowTagged:
    """A map-style dataset whose items also carry their index (for the shuffle check)."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):  # the inner dataset's fields (scConcept's worker init reads .collection)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        item = self.inner[i]
        item["row"] = i
        return item


def reference_collate_class():
    """scConcept's training collate (`concept.data.collate.Collate`, split_input=True, random
    panels, no drop, no QC threshold): the same steps, written for this benchmark on top of
    lamin-dataloader's BaseCollate (its `select_features` and `resize_and_pad` are the library's)."""
    from lamin_dataloader import BaseCollate
    from torch.utils.data import default_collate

    class ReferenceCollate(BaseCollate):
        def __init__(self, tokenizer, max_tokens, panel_size_min, panel_size_max):
            super().__init__(PAD_TOKEN=tokenizer.PAD_TOKEN, max_tokens=max_tokens, gene_sampling_strategy="top-nonzero")
            self.size_min, self.size_max = panel_size_min, panel_size_max

        def log_uniform(self, low, high):
            if low == high:
                return low
            return max(min(int(np.exp2(self.rng.uniform(np.log2(low), np.log2(high)))), high), low)

        def view(self, items, idx):
            picked = [self.select_features({"tokens": it["tokens"][idx], "values": it["values"][idx]}) for it in items]
            longest = min(max(len(p["tokens"]) for p in picked), self.max_tokens)
            padded = [self.resize_and_pad(p, longest) for p in picked]
            return (
                default_collate([p["tokens"].astype(np.int64) for p in padded]),
                default_collate([p["values"].astype(np.float32) for p in padded]),
            )

        def __call__(self, batch):
            n = len(batch[0]["tokens"])
            order = self.rng.permutation(n)
            items = [{"tokens": it["tokens"][order], "values": it["values"][order]} for it in batch]
            free = max(n - self.size_min, 0)  # view 1 leaves room for a disjoint view 2
            idx1 = self.rng.choice(
                n, self.log_uniform(min(self.size_min, free), min(self.size_max, free)), replace=False
            )
            rest = np.setdiff1d(np.arange(n), idx1, assume_unique=True)
            k2 = self.log_uniform(min(self.size_min, len(rest)), min(self.size_max, len(rest)))
            idx2 = self.rng.choice(rest, k2, replace=False)
            tokens_1, values_1 = self.view(items, idx1)
            tokens_2, values_2 = self.view(items, idx2)
            return {
                "tokens_1": tokens_1,
                "values_1": values_1,
                "tokens_2": tokens_2,
                "values_2": values_2,
                "panel_1": default_collate([it["tokens"][idx1] for it in items]),
                "panel_2": default_collate([it["tokens"][idx2] for it in items]),
                **{k: default_collate([it[k] for it in batch]) for k in batch[0] if k not in ("tokens", "values")},
            }

    return ReferenceCollate


TASKS = {name[5:]: fn for name, fn in globals().items() if name.startswith("task_")}


def run_task(argv: list[str]) -> int:
    """`--task NAME KWARGS_JSON N_ROWS`: run it, replace its batches' rows by their spread."""
    name, kwargs, n_rows = argv[0], json.loads(argv[1]), int(argv[2])
    out = TASKS[name](**kwargs)
    if "rows" in out:
        out["spread"] = spread(out.pop("rows"), n_rows)
    print(json.dumps(out, default=float), flush=True)
    return 0


# =========================================================================== the run (parent)
def bench_shard():
    """tools/bench/shard.py as a module: its inputs, its measured wrapper, its build measurement."""
    if "bench_shard" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_shard", REPO / "tools" / "bench" / "shard.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["bench_shard"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["bench_shard"]


def peers_python() -> Path:
    return PEERS_VENV / "bin" / "python"


def install_peers() -> str:
    """Create .venv-peers and install the pinned peers; '' or pip's last lines on failure."""
    if not peers_python().is_file():
        subprocess.run([PEERS_PYTHON_BASE, "-m", "venv", str(PEERS_VENV)], check=True)
    log(f"installing {REQUIREMENTS.name} into {PEERS_VENV} (pip) ...")
    proc = subprocess.run(
        [str(peers_python()), "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return "" if proc.returncode == 0 else "\n".join(proc.stdout.strip().splitlines()[-5:])


def scconcept_python() -> Path:
    return SCCONCEPT_VENV / "bin" / "python"


def probe_scconcept(install: bool) -> str:
    """'ok' when sc-concept's loader imports in .venv-scconcept (built by tools/scconcept_env.sh
    when `install`), else why not."""
    if install and not scconcept_python().is_file():
        subprocess.run(["bash", str(REPO / "tools" / "scconcept_env.sh")], check=False)
    if not scconcept_python().is_file():
        return "no side venv (.venv-scconcept; bash tools/scconcept_env.sh)"
    stmt = "import concept.data.collate, concept.dataset, torchdata.stateful_dataloader, lamin_dataloader"
    proc = subprocess.run(
        [str(scconcept_python()), "-c", stmt], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    return "ok" if proc.returncode == 0 else "import failed: " + proc.stdout.strip().splitlines()[-1]


def probe_peers() -> dict[str, str]:
    """'ok' for each peer that imports in the side venv, else why not."""
    status = {}
    for peer, stmt in PEER_IMPORTS.items():
        if not peers_python().is_file():
            status[peer] = "no side venv (.venv-peers)"
            continue
        proc = subprocess.run(
            [str(peers_python()), "-c", stmt], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        status[peer] = "ok" if proc.returncode == 0 else "import failed: " + proc.stdout.strip().splitlines()[-1]
    return status


def busy_jiffies() -> int:
    """Clock ticks every core of the machine spent busy (not idle, not waiting on I/O) so far."""
    with open("/proc/stat") as fh:
        ticks = [int(v) for v in fh.readline().split()[1:9]]
    return sum(ticks) - ticks[3] - ticks[4]


def child(python: Path | str, task: str, kwargs: dict, n_rows: int, workdir: Path, script: Path | None = None) -> dict:
    """One task in a fresh process under tools/bench/shard.py's wrapper (wall, peak RSS), with the
    machine's load over its run: cores busy in all, in the task's processes, and in others. The
    task is this file's, or `script`'s (another tree's peers.py: against_commit.py)."""
    script = script or Path(__file__).resolve()
    cmd = [str(python), str(script), "--task", task, json.dumps(kwargs), str(n_rows)]
    loadavg, busy0 = os.getloadavg()[0], busy_jiffies()
    rec, out = bench_shard().measured(cmd, workdir, task)
    machine = (busy_jiffies() - busy0) / os.sysconf("SC_CLK_TCK") / max(rec["wall_s"], 1e-9)
    own = (rec.get("user_s", 0.0) + rec.get("sys_s", 0.0)) / max(rec["wall_s"], 1e-9)
    load = {"load_own_cores": own, "load_other_cores": max(machine - own, 0.0), "loadavg_1m_before": loadavg}
    lines = [ln for ln in out.strip().splitlines() if ln.startswith("{")]
    if rec["rc"] != 0 or not lines:
        tail = " | ".join(out.strip().splitlines()[-3:])
        log(f"    {task}: FAILED (rc {rec['rc']}): {tail}")
        return {"error": f"rc {rec['rc']}: {tail}"}
    res = json.loads(lines[-1])
    res.update(wall_s=rec["wall_s"], peak_rss_mb=rec["maxrss_kib"] / 1024, **load)
    shown = {k: v for k, v in kwargs.items() if k not in ("project", "h5ad", "store", "out", "vocab_csv")}
    others = load["load_other_cores"]
    log(f"    {task} {json.dumps(shown)}: {fmt_rate(res)}; cores busy: {own:.2f} this run, {others:.2f} others")
    return res


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- preprocessing
def convert_peer(peer: str, h5ad: Path, n: int, nnz: int, workdir: Path) -> dict:
    out = workdir / (f"annbatch_{n}.zarr" if peer == "annbatch" else f"scdl_{n}")
    shutil.rmtree(out, ignore_errors=True)
    task = "convert_annbatch" if peer == "annbatch" else "convert_scdl"
    res = child(peers_python(), task, {"h5ad": str(h5ad), "out": str(out)}, 0, workdir)
    if "error" in res:
        return res
    return {
        "cells_per_s": n / res["convert_s"],
        "cells_per_s_incl_startup": n / res["wall_s"],
        "peak_rss_mb": res["peak_rss_mb"],
        "bytes_per_nnz": disk_bytes(out) / nnz,
        "path": str(out),
        **{k: v for k, v in res.items() if k.startswith("load")},
    }


# Ours in the other shard format that reads in place: the genes and counts as arrays, uncompressed
# (faster raw reads, ~3 bytes per nonzero), sharded from the same file into a sibling project.
ARRAYS = "ours (entries=arrays)"
ARRAYS_OVERRIDES = ("shard.entries=arrays",)


def sibling_project(project: Path, suffix: str) -> Path:
    """A project beside PROJECT with its configs and vocabulary, reading the same source file
    (its own shards)."""
    other = project.with_name(project.name + suffix)
    other.mkdir(exist_ok=True)
    for sub in ("conf", "references", "panels", "model_checkpoints"):
        shutil.rmtree(other / sub, ignore_errors=True)
        if (project / sub).is_dir():
            shutil.copytree(project / sub, other / sub)
    if not (other / "data").exists():
        (other / "data").symlink_to(project / "data")
    return other


def convert_ours(project: Path, n: int, workdir: Path, extra: tuple[str, ...] = ()) -> dict:
    t0, busy0 = time.perf_counter(), busy_jiffies()
    r = bench_shard().shard_run(project, n, workdir, extra)
    wall = time.perf_counter() - t0  # the build and its no-op re-run (whose CPU is not in r)
    machine = (busy_jiffies() - busy0) / os.sysconf("SC_CLK_TCK") / wall
    own = (r["user_s"] + r["sys_s"]) / r["build_wall_s"]
    log(f"    concept-shard build: {r['cells_per_s']:,.0f} cells/s; cores busy: this run {own:.2f}")
    return {
        "cells_per_s": r["cells_per_s"],
        "cells_per_s_incl_startup": r["cells_per_s_incl_startup"],
        "peak_rss_mb": r["peak_rss_mb"],
        "bytes_per_nnz": r["bytes_per_nnz"],
        "load_own_cores": own,
        # an upper bound: the no-op re-run's own CPU is counted as the others'
        "load_other_cores": max(machine - own * r["build_wall_s"] / wall, 0.0),
    }


def preprocessing(
    size: int, project: Path, h5ad: Path, nnz: int, peers: list[str], repeats: int, workdir: Path
) -> dict:
    """Rounds of ours, annbatch, scdl (alternating); the outputs of the last round stay."""
    runs: dict[str, list] = {"ours": [], ARRAYS: [], **{p: [] for p in peers}}
    for rnd in range(repeats):
        runs["ours"].append(convert_ours(project, size, workdir))
        runs[ARRAYS].append(convert_ours(sibling_project(project, "_arrays"), size, workdir, ARRAYS_OVERRIDES))
        for peer in peers:
            runs[peer].append(convert_peer(peer, h5ad, size, nnz, workdir))
        log(f"  [{size:,}] round {rnd + 1}: " + ", ".join(f"{k} {fmt_rate(v[-1])}" for k, v in runs.items()))
    return {k: medians(v) for k, v in runs.items()}


def fmt_rate(r: dict) -> str:
    if "error" in r:
        return r["error"][:60]
    return f"{r['cells_per_s']:,.0f} cells/s" if "cells_per_s" in r else f"{r.get('convert_s', 0):.1f} s"


def medians(runs: list[dict]) -> dict:
    """Median of every numeric figure over the runs that worked (the first error otherwise)."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0]["error"]}
    out = {k: float(np.median([r[k] for r in ok])) for k, v in ok[0].items() if isinstance(v, (int, float))}
    out["runs"] = [round(r["cells_per_s"]) for r in ok]
    for k in ("spread", "path", "max_tokens", "panel_size_min"):
        if k in ok[0]:
            out[k] = ok[-1][k]
    return out


# --------------------------------------------------------------------------- loading
def raw_jobs(size: int, project: Path, h5ad: Path, peers: list[str], workdir: Path, seconds: float) -> dict:
    """Per loader: (python, task, kwargs) of a raw-minibatch measurement (workers added later)."""
    jobs = {
        "ours": (sys.executable, "raw_ours", {"project": str(project)}),
        "ours widened": (sys.executable, "raw_ours", {"project": str(project), "path": "get_batch_wide"}),
        "ours get_many": (sys.executable, "raw_ours", {"project": str(project), "path": "get_many"}),
        OWN_SLOTS: (sys.executable, "raw_ours", {"project": str(project), "slots": True}),
    }
    arrays = project.with_name(project.name + "_arrays")
    if (arrays / "shards").is_dir():  # sharded by the preprocessing step
        jobs[ARRAYS] = (sys.executable, "raw_ours", {"project": str(arrays)})
    if "annbatch" in peers:
        store = str(workdir / f"annbatch_{size}.zarr")
        for settings in ANNBATCH_SETTINGS:
            jobs[f"annbatch (zarrs, {settings})"] = (
                peers_python(),
                "raw_annbatch",
                {"store": store, "settings": settings},
            )
    if "scdataset" in peers:
        jobs["scdataset"] = (peers_python(), "raw_scdataset", {"h5ad": str(h5ad)})
    if "bionemo-scdl" in peers:
        out = str(workdir / f"scdl_{size}")
        jobs["bionemo-scdl (1 torch thread)"] = (peers_python(), "raw_scdl", {"out": out, "one_thread": True})
        jobs["bionemo-scdl (as shipped)"] = (peers_python(), "raw_scdl", {"out": out})
    jobs[CEILING] = (sys.executable, "raw_ceiling", {"n_rows": size})
    for _, _, kw in jobs.values():
        kw["seconds"] = seconds
    return jobs


def loading(jobs: dict, size: int, workers: list[int], repeats: int, workdir: Path, title: str = "raw") -> dict:
    """Rounds over worker counts and loaders in turn; medians per (loader, workers)."""
    runs: dict[str, list] = {f"{name}/{w}": [] for name in jobs for w in workers if w or name != OWN_SLOTS}
    for rnd in range(repeats):
        for w in workers:
            for name, (python, task, kw) in jobs.items():
                if f"{name}/{w}" in runs:
                    runs[f"{name}/{w}"].append(child(python, task, dict(kw, workers=w), size, workdir))
            log(
                f"  {title}, {w} workers, round {rnd + 1}: "
                + ", ".join(f"{k.split('/')[0]} {fmt_rate(v[-1])}" for k, v in runs.items() if k.endswith(f"/{w}"))
            )
    return {k: medians(v) for k, v in runs.items()}


def tok_jobs(project: Path, h5ad: Path, vocab: Path, peers: list[str], scconcept_ok: bool, seconds: float) -> dict:
    """Per tokenized loader: (python, task, kwargs)."""
    data = {"h5ad": str(h5ad), "vocab_csv": str(vocab), "seconds": seconds}
    jobs = {
        "ours": (sys.executable, "tok_ours", {"project": str(project), "seconds": seconds}),
        OWN_SLOTS: (sys.executable, "tok_ours", {"project": str(project), "seconds": seconds, "slots": True}),
    }
    if scconcept_ok:
        jobs[SCCONCEPT] = (scconcept_python(), "tok_scconcept", data)
    if "lamin-dataloader" in peers:
        jobs["scConcept collate rewrite"] = (peers_python(), "tok_reference", data)
    return jobs


def disk_after_epoch(project: Path, size: int, workdir: Path) -> dict:
    """Our dataset's bytes on disk as built, and after one epoch of the training loader's batches
    with the defaults (read in place)."""
    directory = bench_shard().dataset_dir(project, size)
    for raw in directory.glob("*.mds"):  # copies a read left beside compressed shards
        if raw.with_name(raw.name + ".zstd").is_file():
            raw.unlink()
    built = disk_bytes(directory)
    res = child(sys.executable, "epoch_ours", {"project": str(project)}, size, workdir)
    after = disk_bytes(directory)
    return {"built_bytes": built, "after_epoch_bytes": after, "ratio": after / built, **res}


def disk_file_by_file(workdir: Path, n_files: int = 100) -> dict:
    """Our shards' bytes as built and after one epoch of the defaults' file-by-file batches
    (`per_dataset`) over N small files (tools/bench/scale.py's project: 300 cells each), read in
    place."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import scale

    project = scale.many_files_project(workdir, n_files, 300, 2000, 300)
    shutil.rmtree(project / "shards", ignore_errors=True)
    build = bench_shard().shard_command(project, datamodule="Many")
    rec, out = bench_shard().measured(build, workdir, "build_many")
    if rec["rc"] != 0:
        return {"error": "build failed: " + " | ".join(out.strip().splitlines()[-3:])}
    built = disk_bytes(project / "shards")
    epoch = scale.child_json([sys.executable, "-c", scale.EPOCH, str(project)])
    after = disk_bytes(project / "shards")
    return {"files": n_files, "built_bytes": built, "after_epoch_bytes": after, "ratio": after / built, **epoch}


# --------------------------------------------------------------------------- report
def ratio(a, b):
    return None if a is None or b is None or not b else round(a / b, 2)


def rate(res: dict):
    return None if "error" in res else res.get("cells_per_s")


def fastest_peer(results: dict, suffix: str = "") -> tuple[str | None, float | None]:
    peers = {
        k: rate(v) for k, v in results.items() if not k.startswith(("ours", CEILING)) and k.endswith(suffix) and rate(v)
    }
    if not peers:
        return None, None
    name = max(peers, key=peers.get)
    return name, peers[name]


def print_preprocessing(pre: dict) -> None:
    log(f"\n{'preprocessing':<28} {'cells/s':>10} {'incl. start':>12} {'peak RSS MB':>12} {'B/nnz':>7} {'others':>7}")
    for size, res in pre.items():
        for name, r in res.items():
            if "error" in r:
                log(f"{name + ' @ ' + str(size):<28} {r['error']}")
            else:
                log(
                    f"{name + ' @ ' + str(size):<28} {r['cells_per_s']:>10,.0f} "
                    f"{r['cells_per_s_incl_startup']:>12,.0f} "
                    f"{r['peak_rss_mb']:>12,.0f} {r['bytes_per_nnz']:>7.2f} "
                    f"{r.get('load_other_cores', float('nan')):>7.2f}"
                )


def print_loading(title: str, res: dict) -> None:
    log(f"\n{title:<38} {'cells/s':>10} {'runs':>26} {'std/unif':>9} {'adjacent':>9} {'own cores':>9} {'others':>7}")
    for name, r in res.items():
        if "error" in r:
            log(f"{name:<38} {r['error']}")
            continue
        sp = r.get("spread", {})
        log(
            f"{name:<38} {r['cells_per_s']:>10,.0f} {str(r['runs']):>26} {sp.get('std_vs_uniform')!s:>9} "
            f"{sp.get('adjacent_share')!s:>9} {r.get('load_own_cores', float('nan')):>9.2f} "
            f"{r.get('load_other_cores', float('nan')):>7.2f}"
        )


def shuffle_failures(*groups: dict) -> list[str]:
    bad = []
    for group in groups:
        for name, r in group.items():
            if "error" not in r and not shuffled(r.get("spread", {})):
                bad.append(name)
    return bad


def rounded(d):
    if isinstance(d, dict):
        return {k: rounded(v) for k, v in d.items()}
    if isinstance(d, float):
        return round(d, 3) if abs(d) < 100 else round(d)
    return d


def summarize(
    pre: dict, raw: dict, tok: dict, disk: dict, status: dict, args, workers: list[int], total_s: float
) -> dict:
    def over_fastest(results: dict, names: tuple) -> dict:
        out = {}
        for w in workers:
            peer, best = fastest_peer(results, f"/{w}")
            out[str(w)] = {
                "fastest_peer": peer,
                **{f"{o}_over_fastest_peer": ratio(rate(results.get(f"{o}/{w}", {})), best) for o in names},
            }
        return out

    _, best_any = fastest_peer(raw)
    ours_best = max((rate(v) or 0) for k, v in raw.items() if k.startswith("ours"))
    pre_ratios = {
        str(s): {p: ratio(rate(r["ours"]), rate(r[p])) for p in r if not p.startswith("ours")} for s, r in pre.items()
    }
    tok_ours = rate(tok.get("ours/0", {"error": "not run"}))
    ours_disk = {k: d for k, d in disk.items() if k.startswith("ours")}  # random and file-by-file batches
    return {
        "preprocessing": rounded(pre),
        "preprocessing_ratio_ours_over_peer": pre_ratios,
        "raw_minibatches": rounded(raw),
        "raw_ratio_ours_over_fastest_peer": over_fastest(
            raw, ("ours", "ours widened", "ours get_many", OWN_SLOTS, ARRAYS)
        ),
        "raw_best_ours_over_best_peer_any_workers": ratio(ours_best, best_any),
        "tokenized": rounded(tok),
        "tokenized_ratio_ours_over_fastest_peer": over_fastest(tok, ("ours", OWN_SLOTS)),
        "disk_after_epoch": rounded(disk),
        "targets_met": {
            "raw_ge_2x_fastest_peer": None if best_any is None else ours_best >= 2 * best_any,
            "tokenized_ge_25000_cells_per_s_one_process": None if tok_ours is None else tok_ours >= 25000,
            "disk_after_epoch_le_1_05x": all(d.get("ratio", 9) <= 1.05 for k, d in ours_disk.items()),
        },
        "shuffle_check_failed": shuffle_failures(raw, tok),
        "peers": status,
        "batch_size": BATCH,
        "max_tokens": MAX_TOKENS,
        "sizes": args.sizes,
        "repeats": args.repeats,
        "seconds": args.seconds,
        "benchmark_s": round(total_s, 1),
        "machine": bench_shard().machine(),
    }


# --------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--sizes", default="20000,200000", help="cells per file (default 20000,200000); loading uses the largest"
    )
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds per measurement (default 3)")
    p.add_argument("--seconds", type=float, default=6.0, help="timed seconds per loading run (default 6)")
    p.add_argument("--workers", default="0,2", help="DataLoader workers for raw minibatches (default 0,2)")
    p.add_argument("--nnz", type=int, default=1500)
    p.add_argument("--genes", type=int, default=20000)
    p.add_argument("--workdir", default="/tmp/concept_peers_bench")
    p.add_argument("--no-install", action="store_true", help="do not create or update .venv-peers")
    p.add_argument(
        "--loading-only",
        action="store_true",
        help="skip preprocessing; load from the shards and peer stores an earlier run left in --workdir",
    )
    p.add_argument("--quick", action="store_true", help="20,000 cells, 2 rounds, 3 s per loading run")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.seconds = "20000", 2, 3.0
    args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    return args


def peer_status(install: bool) -> dict[str, str]:
    failure = install_peers() if install else ""
    status = probe_peers()
    if failure:
        log(f"pip install reported a failure (peers that import are still measured): {failure}")
        status["pip"] = failure
    for peer, st in status.items():
        log(f"  peer {peer}: {st}")
    return status


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    workers = [int(w) for w in args.workers.split(",")]
    shard = bench_shard()
    log(
        f"peers benchmark: sizes {args.sizes}, {args.repeats} rounds, {args.seconds} s per loading run; "
        f"machine: {shard.machine()}"
    )
    status = peer_status(not args.no_install)
    status[SCCONCEPT] = probe_scconcept(not args.no_install)
    log(f"  peer {SCCONCEPT}: {status[SCCONCEPT]}")
    ok = [p for p, st in status.items() if st == "ok" and p in PEER_IMPORTS]
    vocab = shard.vocabulary_csv(workdir)
    cache: list = []
    inputs = {n: shard.ensure_project(workdir, n, args.genes, args.nnz, SEED, vocab, cache) for n in args.sizes}
    pre = {}
    for n, (project, h5ad, facts) in ({} if args.loading_only else inputs).items():
        log(f"preprocessing {n:,} cells ({facts['nonzeros']:,} nonzeros) ...")
        pre[n] = preprocessing(
            n,
            project,
            h5ad,
            facts["nonzeros"],
            [p for p in ("annbatch", "bionemo-scdl") if p in ok],
            args.repeats,
            workdir,
        )
    size = max(args.sizes)
    project, h5ad, _ = inputs[size]
    peer_stores = {p: workdir / f for p, f in (("annbatch", f"annbatch_{size}.zarr"), ("bionemo-scdl", f"scdl_{size}"))}
    peer_disk = {p: disk_bytes(d) for p, d in peer_stores.items() if p in ok and d.exists()}
    log(f"raw minibatches of {BATCH} at {size:,} cells ...")
    raw = loading(raw_jobs(size, project, h5ad, ok, workdir, args.seconds), size, workers, args.repeats, workdir)
    log(f"tokenized batches at {size:,} cells ...")
    vocab_csv = project / "references" / "vocabulary" / "token_mappings_per_specie" / "hsapiens.csv"
    jobs = tok_jobs(project, h5ad, vocab_csv, ok, status[SCCONCEPT] == "ok", args.seconds)
    tok = loading(jobs, size, workers, args.repeats, workdir, title="tokenized")
    log("disk after an epoch (defaults) ...")
    disk = {"ours": disk_after_epoch(project, size, workdir), "ours file by file": disk_file_by_file(workdir)}
    for p, before in peer_disk.items():  # the peers' stores after all their loading runs
        disk[p] = {"built_bytes": before, "after_epoch_bytes": disk_bytes(peer_stores[p])}
        disk[p]["ratio"] = disk[p]["after_epoch_bytes"] / before
    print_preprocessing(pre)
    print_loading(f"raw minibatches @ {size}", raw)
    print_loading(f"tokenized @ {size}", tok)
    log("\ndisk after an epoch: " + ", ".join(f"{k} {v['ratio']:.2f}x" for k, v in disk.items() if "ratio" in v))
    # the figures so far, in case the summary fails after a long run
    (workdir / "peers_figures.json").write_text(json.dumps({"pre": pre, "raw": raw, "tok": tok, "disk": disk}))
    summary = summarize(pre, raw, tok, disk, status, args, workers, time.perf_counter() - t0)
    for name in summary["shuffle_check_failed"]:
        log(f"SHUFFLE CHECK FAILED: {name} returns batches of neighbouring rows")
    log(f"targets: {summary['targets_met']}; raw ours / fastest peer: {summary['raw_ratio_ours_over_fastest_peer']}")
    print(json.dumps(summary), flush=True)
    return 1 if summary["shuffle_check_failed"] else 0


if __name__ == "__main__":
    sys.exit(run_task(sys.argv[2:]) if sys.argv[1:2] == ["--task"] else main())
