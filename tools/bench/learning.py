#!/usr/bin/env python
"""Did a run learn? Its validation figures against chance and against a PCA baseline (not a test).

Usage::

    python tools/bench/learning.py RUN_DIR [--loader whole_cell_B256] [--recall-loader within_P200_B256]
                                   [--key cell_type] [--pcs 50]

From RUN_DIR/metrics.jsonl: cross-view recall@1 of `--recall-loader` at the first and last
validation, beside chance (1 / its batch size); kNN accuracy (k = 5, leave-one-out) for `--key`
on `--loader`'s cells at the first and last validation. In the same run, over exactly the same
cells (the loader's fixed cells, read back from the shards), the same kNN on PCA(`--pcs`) of
log1p(counts / library size x 10,000): the baseline the embedding must beat. The best of cosine
and Euclidean kNN on the PCs is taken, and PCA is done per species. The LAST line is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--loader", default="whole_cell_B256")
    p.add_argument("--recall-loader", default="within_P200_B256")
    p.add_argument("--key", default="cell_type")
    p.add_argument("--pcs", type=int, default=50)
    args = p.parse_args(argv)
    from omegaconf import OmegaConf

    from concept_shard.config import typed_config
    from concept_train.data import DataModule
    from concept_train.trainer.validate import knn_accuracy

    rows = [json.loads(line) for line in (args.run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    val = [r for r in rows if r.get("kind") == "val"]
    if len(val) < 2:
        raise SystemExit(f"{args.run_dir}: fewer than two validations in metrics.jsonl")
    first, last = val[0], val[-1]
    rkey, kkey = f"val/{args.recall_loader}/recall@1", f"val/{args.loader}/knn/{args.key}"
    cfg = typed_config(OmegaConf.load(args.run_dir / "config.yaml"))
    batch_size = int(cfg.datamodule.dataloader.val[args.recall_loader].batch_size)

    # the loader's cells, exactly as validation saw them
    dm = DataModule(cfg, log=lambda *a: None)
    loader = dm.val_loaders()[args.loader]
    cells = []
    for batch in loader:
        for d, row, lab in zip(batch.dataset.tolist(), batch.row.tolist(), batch.labels[args.key].tolist()):
            cells.append((d, row, lab))
    sets = dm.val_sets[args.loader]
    store = dm.store
    accs, weights = {"cosine": [], "euclidean": []}, []
    for species in sorted({s.species for s in sets}):
        mine = [(d, r, lab) for d, r, lab in cells if sets[d].species == species]
        vocab = dm.catalog.vocab(species)
        indptr, indices, data = [0], [], []
        for d, r, _ in mine:
            s = store.get(store.index_of[sets[d].dataset_id], r)
            indices.append(np.asarray(s["genes"], np.int64))
            data.append(np.log1p(np.asarray(s["counts"], np.float64) / float(s["n_counts"]) * 1e4))
            indptr.append(indptr[-1] + len(indices[-1]))
        X = sp.csr_matrix((np.concatenate(data), np.concatenate(indices), indptr), shape=(len(mine), vocab.size))
        X = X[:, np.unique(X.indices)].toarray()
        Xt = torch.from_numpy(X).float()
        Xt = Xt - Xt.mean(0, keepdim=True)
        U, S, _ = torch.linalg.svd(Xt, full_matrices=False)
        pcs = U[:, : args.pcs] * S[: args.pcs]
        labels = torch.tensor([lab for _, _, lab in mine])
        accs["cosine"].append(knn_accuracy(torch.nn.functional.normalize(pcs, dim=1), labels))
        accs["euclidean"].append(knn_accuracy(pcs, labels, metric="euclidean"))
        weights.append(len(mine))
    pca = {k: float(np.average(v, weights=weights)) for k, v in accs.items()}
    baseline = max(pca.values())
    summary = {
        "run_dir": str(args.run_dir),
        "steps": last["step"],
        "recall_at_1": {
            "loader": args.recall_loader,
            "first": first.get(rkey),
            "last": last.get(rkey),
            "chance": 1 / batch_size,
            "last_over_chance": (last.get(rkey) or 0) * batch_size,
        },
        "knn": {
            "loader": args.loader,
            "key": args.key,
            "cells": len(cells),
            "first": first.get(kkey),
            "last": last.get(kkey),
            f"pca{args.pcs}_cosine": pca["cosine"],
            f"pca{args.pcs}_euclidean": pca["euclidean"],
            "baseline": baseline,
            "beats_baseline": (last.get(kkey) or 0) > baseline,
        },
    }
    log(
        f"recall@1 ({args.recall_loader}): {first.get(rkey):.4f} at step {first['step']} -> "
        f"{last.get(rkey):.4f} at step "
        f"{last['step']}; chance {1 / batch_size:.4f} ({summary['recall_at_1']['last_over_chance']:.1f}x chance)"
    )
    log(
        f"kNN {args.key} ({args.loader}, {len(cells)} cells): {first.get(kkey):.3f} -> {last.get(kkey):.3f}; "
        f"PCA({args.pcs}) of log1p counts: cosine {pca['cosine']:.3f}, euclidean {pca['euclidean']:.3f}"
    )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
