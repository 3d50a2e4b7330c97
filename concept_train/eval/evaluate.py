"""`evaluate()`: does a trained model's embedding beat the baselines on the same cells?

Steps, in order: read the cells (cells.py) -> the model's whole-cell embeddings (views.py) -> the
baselines (baselines.py) -> per embedding, the scIB metrics (scib.py) and kNN accuracy for every
categorical obs key -> the model's cross-view recall@1 for random panels of 200 / 800 / 6400 genes
-> UMAP coordinates -> the files of report.py. Embedding memory is bounded by the batch size; the
metrics work on the [cells x d] embeddings only.
"""

from __future__ import annotations

import time
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pandas as pd

from concept_shard.errors import TrainError, UserError

from ..trainer.checkpoint import LoadedModel, load_model
from . import baselines, report
from .cells import EvalCells, from_files, from_validation_shards
from .scib import BATCH, BIO, MIN_CELLS, scib_scores
from .views import Embedder, cross_view_recall

PANEL_SIZES = (200, 800, 6400)
MODEL = "concept"
MAX_CLASSES = 1000  # an obs column with more distinct values is an id, not a label


def _codes(values: pd.Series) -> np.ndarray:
    """int64 class per cell, -1 where the value is missing ("")."""
    codes = pd.Categorical(values.where(values != "")).codes.astype(np.int64)
    return codes


def label_columns(obs: pd.DataFrame) -> list[str]:
    """The obs columns kNN accuracy is reported for: 2 to MAX_CLASSES distinct values, fewer than
    half the cells (ids and constants are left out)."""
    keep = []
    for key in obs.columns:
        values = obs[key][obs[key] != ""]
        distinct = values.nunique()
        if 2 <= distinct <= MAX_CLASSES and distinct < max(2, len(values) // 2):
            keep.append(key)
    return keep


def knn_accuracies(z: np.ndarray, obs: pd.DataFrame, keys: list[str], metrics=("dot",)) -> dict[str, float]:
    """Leave-one-out 5-NN accuracy per key (the trainer's validation kNN); several metrics: the best."""
    import torch

    from ..trainer.validate import knn_accuracy

    zt = torch.from_numpy(np.ascontiguousarray(z, np.float32))
    unit = torch.nn.functional.normalize(zt, dim=1)
    out = {}
    for key in keys:
        labels = torch.from_numpy(_codes(obs[key]))
        out[key] = max(knn_accuracy(unit if m == "dot" else zt, labels, metric=m) for m in metrics)
    return out


def _varying(obs: pd.DataFrame, flag: str, key: str, label_keys: list[str]) -> np.ndarray:
    """The column `key` as an array; refused unless it has at least two values among the cells."""
    values = obs[key].to_numpy()
    distinct = sorted(set(values) - {""})
    if len(distinct) < 2:
        raise TrainError(
            f"{flag} {key}",
            f"has {len(distinct)} distinct value(s) {distinct[:3]} in the evaluated "
            "cells; the scIB metrics compare at least two.",
            f"Use a column with several values (here: {label_keys}), or evaluate more inputs.",
        )
    return values


def _umap_titles(scib: dict, knn: dict, label_key: str, batch_key: str | None) -> dict[str, dict[str, str]]:
    """Per embedding, the scores each UMAP panel's title shows: kNN and bio conservation by the
    label, batch correction by the batch."""
    out = {}
    for name, scores in scib.items():
        accuracy = knn[name].get(label_key, float("nan"))
        titles = {label_key: f"kNN {accuracy:.3f}, bio conservation {scores[BIO]:.3f}"}
        if batch_key is not None and scores[BATCH] is not None:
            titles[batch_key] = f"batch correction {scores[BATCH]:.3f}, iLISI {scores['iLISI']:.3f}"
        out[name] = titles
    return out


# the batch key concept-eval takes when none is given: the first of these with two or more values
BATCH_KEYS = ("donor_id", "batch", "sample", "dataset")


def pick_batch_key(obs: pd.DataFrame, label_key: str, log) -> str | None:
    """The first of BATCH_KEYS, then of the other obs columns, that is not the label and has two or
    more values among the evaluated cells; None (batch metrics not applicable) when none has. Says
    which, and how to choose another."""
    candidates = [k for k in [*BATCH_KEYS, *(c for c in obs.columns if c not in BATCH_KEYS)] if k != label_key]
    for key in candidates:
        if key in obs.columns and len(set(obs[key].to_numpy()) - {""}) >= 2:
            log(f"[eval] batch key: {key} (the first of {candidates} with two or more values; --batch-key)")
            return key
    log(
        "[eval] no obs column besides the label has two or more values among these cells: the batch-correction "
        "metrics (and the scIB total) are not applicable; bio conservation and kNN are reported"
    )
    return None


def _cells(loaded: LoadedModel, inputs, species, gene_id_column, max_cells, seed, required, log) -> EvalCells:
    from tqdm import tqdm

    with tqdm(unit="cells", unit_scale=True, desc="concept-eval: reading", dynamic_ncols=True) as bar:
        if inputs:
            cells = from_files(
                loaded,
                [Path(p) for p in inputs],
                species,
                gene_id_column,
                max_cells,
                seed,
                required,
                progress=bar.update,
            )
        else:
            log(f"[eval] no inputs given: the validation files of run {loaded.run_id}, from their shards")
            cells = from_validation_shards(loaded, species, max_cells, seed, required, progress=bar.update)
    if cells.n_cells < MIN_CELLS:
        raise TrainError(
            "the inputs",
            f"hold {cells.n_cells} cells with counts in the vocabulary; the scIB metrics need at least {MIN_CELLS}.",
            "Evaluate more cells (more inputs, or a larger --max-cells).",
        )
    total = sum(cells.input_cells)
    log(
        f"[eval] {cells.n_cells:,} {cells.species} cells"
        + (f" sampled from {total:,}" if total > cells.n_cells else "")
        + f" in {len(cells.inputs)} input(s)"
    )
    return cells


# what the `eval` extra installs: (module, distribution), the UMAP only for the picture
_EVAL_PACKAGES = (("scib_metrics", "scib-metrics"), ("umap", "umap-learn"))


def _require_packages(umap: bool) -> None:
    """The packages of the `eval` extra, named before any work when they cannot be imported."""
    missing = [dist for module, dist in _EVAL_PACKAGES if (umap or module != "umap") and find_spec(module) is None]
    if missing:
        only_umap = missing == ["umap-learn"]
        raise UserError(
            "concept-eval",
            f"needs {' and '.join(missing)}, which cannot be imported (the `eval` extra: `pip install .` "
            "leaves it out).",
            "Install it: pip install 'concept-pretrain[eval]' (make install does)"
            + (", or leave the picture out: --no-umap (umap=False)." if only_umap else "."),
        )


def evaluate(
    run_or_checkpoint,
    inputs=(),
    out_dir=None,
    *,
    label_key: str = "cell_type",
    batch_key: str | None = None,
    species: str | None = None,
    gene_id_column: str | None = None,
    max_cells: int = 10_000,
    max_tokens: int | None = None,
    panel_sizes=PANEL_SIZES,
    seed: int = 0,
    batch_size: int = 256,
    device=None,
    use_learnable_embs: bool = True,
    umap: bool = True,
    trust_pickle: bool = False,
    log=print,
) -> dict:
    """Evaluate a run (or checkpoint) on `inputs` (.h5ad/.zarr files; none: the run's validation
    shards). `max_tokens`: genes per whole cell (default: the larger of the run's training
    max_tokens and 1,000, as the trainer's whole-cell validation). Returns the metrics (what `metrics.json`
    holds); with `out_dir`, writes the files of
    `concept_train.eval.report` there."""
    from tqdm import tqdm

    _require_packages(umap)
    out_dir = Path(out_dir) if out_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    loaded = (
        run_or_checkpoint
        if isinstance(run_or_checkpoint, LoadedModel)
        else load_model(run_or_checkpoint, device, trust_pickle=trust_pickle)
    )
    required = {"--label-key": label_key} | ({"--batch-key": batch_key} if batch_key is not None else {})
    cells = _cells(loaded, inputs, species, gene_id_column, max_cells, seed, required, log)
    keys = label_columns(cells.obs)
    labels = _varying(cells.obs, "--label-key", label_key, keys)
    if batch_key is None:
        batch_key = pick_batch_key(cells.obs, label_key, log)
    batches = None if batch_key is None else _varying(cells.obs, "--batch-key", batch_key, keys)
    t0 = time.time()
    embedder = Embedder(loaded, cells, batch_size, max_tokens, use_learnable_embs=use_learnable_embs)
    with tqdm(
        total=cells.n_cells, unit="cells", unit_scale=True, desc="concept-eval: embedding", dynamic_ncols=True
    ) as bar:
        embeddings = {MODEL: embedder.whole_cells(bar.update)}
    embeddings["pca"] = baselines.pca(cells, seed=seed)
    log(f"[eval] embeddings in {time.time() - t0:.1f} s; scIB metrics")
    scib, knn = {}, {}
    for name, z in embeddings.items():
        t0 = time.time()
        scib[name] = scib_scores(z, labels, batches)
        total = scib[name]["Total"]
        shown = f"total {total:.3f}" if total is not None else f"bio conservation {scib[name]['Bio conservation']:.3f}"
        log(f"[eval] {name}: scIB {shown} ({time.time() - t0:.0f} s)")
        # the model's space is cosine (its training objective); PCA gets the better of cosine and Euclidean
        knn[name] = knn_accuracies(z, cells.obs, keys, ("dot",) if name == MODEL else ("dot", "euclidean"))
    recall = {}
    for n in tqdm(panel_sizes, desc="concept-eval: cross-view recall", unit="panel size", dynamic_ncols=True):
        recall[str(n)] = cross_view_recall(embedder, n, seed=seed)
    result = {
        "model": {"run_id": loaded.run_id, "step": int(loaded.step), "checkpoint": str(loaded.checkpoint)},
        "cells": {
            "species": cells.species,
            "evaluated": cells.n_cells,
            "held": int(sum(cells.input_cells)),
            "inputs": cells.inputs,
        },
        "settings": {
            "label_key": label_key,
            "batch_key": batch_key,
            "max_cells": max_cells,
            "seed": seed,
            "max_tokens": embedder.max_tokens,
            "knn_k": 5,
        },
        "scib": scib,
        "knn": knn,
        "recall": recall,
    }
    if out_dir is not None:
        with report.staged(out_dir) as stage:  # published as one set, or not at all
            report.write_metrics(stage, result)
            report.write_scib_csv(stage, scib)
            if umap:
                coordinates = {name: report.umap_coordinates(z, seed) for name, z in embeddings.items()}
                colour_by = {label_key: labels} | ({batch_key: batches} if batch_key is not None else {})
                report.write_umap_png(stage, coordinates, colour_by, _umap_titles(scib, knn, label_key, batch_key))
            report.write_report(stage, result)
    return result
