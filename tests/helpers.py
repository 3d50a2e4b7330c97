"""Helpers shared by the tests (fixtures are in conftest.py): running `concept-shard` in-process,
reading shards back with plain streaming, small model configs, metrics rows, a data module over a
sharded example project, and an independent per-cell reference of what a view must hold,
computed from the SOURCE files."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
ADVANCED = ["datamodule=DataModuleAdvanced"]

# A model small enough for a few CPU steps in a test (concept-train overrides).
TINY = ["model.dim_model=16", "model.nlayers=1", "model.num_head=2", "model.dim_hid=32", "model.dim_gene_embs=16",
        "model.training.max_steps=3", "model.training.log_every_n_steps=1", "model.training.warmup=1",
        "model.training.val_check_interval=0", "model.training.validate_before_training=False",
        "datamodule.dataloader.train.batch_size=16", "datamodule.dataloader.train.num_workers=0",
        "datamodule.dataset.train.max_tokens=50"]

# 20 steps with a checkpoint every 5: the stop-and-go runs (learns enough that losses differ per step).
TINY_RESUME = ["model.dim_model=32", "model.nlayers=2", "model.num_head=2", "model.dim_hid=64",
               "model.dim_gene_embs=32", "model.training.lr=1e-3", "model.training.warmup=4",
               "model.training.max_steps=20", "model.training.log_every_n_steps=1",
               "model.training.checkpoint_every_n_steps=5", "model.training.val_check_interval=0",
               "model.training.validate_before_training=False", "datamodule.dataloader.train.batch_size=32",
               "datamodule.dataset.train.max_tokens=100", "datamodule=DataModuleAdvanced"]


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
    return [(batch.tokens[a:b].numpy(), batch.values[a:b].numpy(), batch.positions[a:b].numpy())
            for a, b in zip(cu[:-1], cu[1:])]


@lru_cache(maxsize=None)
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
        value = {t: float(min(max(int(np.searchsorted(edges[1:-1], c, side="left")) + 1, 1), n_bins - 1))
                 for t, c in items}
    else:
        f = {"raw": lambda c: c, "log1p": np.log1p,
             "totalcount": lambda c: c / n_counts * 1e4,
             "totalcount/log1p": lambda c: np.log1p(c / n_counts * 1e4)}[normalization]
        value = {t: float(f(c)) for t, c in items}
    ordered = sorted(items, key=lambda tc: (-value[tc[0]], tc[0]))[:max_tokens]
    return np.array([t for t, _ in ordered], np.int64), np.array([value[t] for t, _ in ordered], np.float32)
