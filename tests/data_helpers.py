"""Helpers for the data-pipeline tests: a data module over a sharded example project, and an
independent per-cell reference of what a view must hold, computed from the SOURCE files."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

ADVANCED = ["datamodule=DataModuleAdvanced"]


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
    import json
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
