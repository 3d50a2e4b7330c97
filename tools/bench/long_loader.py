#!/usr/bin/env python
"""The training loader end to end on shards of long cells, at 1,000 / 4,000 / 20,000 tokens (issue 26); not a test.

Usage::

    python tools/bench/long_loader.py [--cells 1500] [--nnz 22000] [--genes 30000]
                                      [--tokens 1000,4000,20000] [--seconds 10] [--workers 0,2]
                                      [--workdir DIR]

scConcept's largest published model reads cells of up to 20,000 tokens; tools/bench/long_cells.py
measures the tokenizer and the model at that length on cells made in memory. This one measures what
feeds them: a project of one .h5ad whose cells have ~`--nnz` nonzero genes (uniformly drawn genes of
a `--genes`-gene file, real Ensembl ids, integer counts 1-50), sharded by `concept-shard build`,
then the training loader of `tools/bench/loader.py` (two views per cell, each over every gene of
the cell: panels of all genes, view 2 allowed to overlap view 1; top-nonzero selection, tokenized
and packed) at each `--tokens`, each size in a fresh process whose
peak RSS (of the largest single process: the loader's or one of its workers') is reported beside
its cells/s and tokens/s. The input and
its shards are cached in the workdir (default /tmp/concept_long_bench). The LAST line is one JSON
object with every figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools" / "bench"))
import shard as shard_bench  # noqa: E402  (the vocabulary, the config and the measured-command wrapper)


def make_h5ad(path: Path, n_cells: int, nnz: int, n_genes: int, gene_ids: np.ndarray, seed: int) -> None:
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    genes = gene_ids[rng.choice(len(gene_ids), n_genes, replace=False)]
    per_cell = np.clip(rng.normal(nnz, nnz * 0.05, n_cells).astype(np.int64), 1, n_genes)
    # each cell's genes: the per_cell smallest of n_genes random keys, sorted
    indices = [np.sort(np.argpartition(rng.random(n_genes), k - 1)[:k]) for k in per_cell]
    indptr = np.concatenate([[0], np.cumsum(per_cell)])
    data = rng.integers(1, 51, int(indptr[-1])).astype(np.float32)
    X = sp.csr_matrix((data, np.concatenate(indices).astype(np.int32), indptr), shape=(n_cells, n_genes))
    obs = pd.DataFrame(
        {key: pd.Categorical([f"{key}_{i % 4}" for i in range(n_cells)]) for key in shard_bench.OBS_KEYS},
        index=[f"cell{i}" for i in range(n_cells)],
    )
    tmp = path.with_name(path.name + ".tmp.h5ad")
    ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(genes, name="gene_id"))).write_h5ad(tmp)
    tmp.replace(path)


def ensure_project(args) -> tuple[Path, dict]:
    workdir = Path(args.workdir)
    project = workdir / f"project_{args.cells}_{args.nnz}_{args.genes}_s{args.seed}"
    h5ad = project / "data" / shard_bench.SOURCE_NAME / "h5ads" / "long.h5ad"
    vocab = shard_bench.vocabulary_csv(workdir)
    dst = project / "references" / "vocabulary" / "token_mappings_per_specie" / f"{shard_bench.SPECIES}.csv"
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(vocab.read_bytes())
    for sub in ("model_checkpoints", "panels/hsapiens", "references/embeddings"):
        (project / sub).mkdir(parents=True, exist_ok=True)
    if not h5ad.is_file():
        h5ad.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        make_h5ad(h5ad, args.cells, args.nnz, args.genes, shard_bench.vocabulary_gene_ids(vocab), args.seed)
        shard_bench.log(f"made {h5ad} in {time.perf_counter() - t0:.0f} s")
    shard_bench.write_conf(project / "conf", h5ad.name)
    build, out = shard_bench.measured(shard_bench.shard_command(project), workdir, "build")
    if build["rc"] != 0:
        raise SystemExit(f"concept-shard build failed:\n{out}")
    shard_bench.log(out.strip().splitlines()[0] if out.strip() else "built")
    return project, build


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells", type=int, default=1500)
    p.add_argument("--nnz", type=int, default=22000, help="nonzero genes per cell (mean; default 22,000)")
    p.add_argument("--genes", type=int, default=30000, help="genes in the file (default 30,000)")
    p.add_argument("--tokens", default="1000,4000,20000")
    p.add_argument("--seconds", type=float, default=10.0, help="timed seconds per worker count (default 10)")
    p.add_argument("--workers", default="0,2")
    p.add_argument("--workdir", default="/tmp/concept_long_bench")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    project, build = ensure_project(args)
    rows = []
    for tokens in [int(t) for t in args.tokens.split(",")]:
        cmd = [
            sys.executable,
            str(REPO / "tools" / "bench" / "loader.py"),
            str(project),
            "--config-dir",
            str(project / "conf"),
            "--seconds",
            str(args.seconds),
            "--workers",
            args.workers,
            "--backed-seconds",
            "1",
            "datamodule=Bench",
            f"datamodule.dataset.train.max_tokens={tokens}",
            # every gene of the file in both views' panels (view 2 may overlap view 1), so that each
            # view keeps the top max_tokens of the whole cell
            "datamodule.dataset.train.panel_selection=random",
            "datamodule.dataset.train.panel_size_min=1000000",
            "datamodule.dataset.train.panel_size_max=1000000",
            "datamodule.dataset.train.panel_overlap=true",
        ]
        rec, out = shard_bench.measured(cmd, Path(args.workdir), f"loader{tokens}")
        if rec["rc"] != 0:
            raise SystemExit(f"loader at {tokens} tokens failed:\n{out}")
        result = json.loads(out.strip().splitlines()[-1])
        row = {
            "max_tokens": tokens,
            "per_workers": result["per_workers"],
            "peak_rss_mb": round(rec["maxrss_kib"] / 1024),
        }
        rows.append(row)
        for w, r in result["per_workers"].items():
            shard_bench.log(
                f"max_tokens {tokens:>6,}: {w} worker(s) {r['cells_per_s']:>8,} cells/s "
                f"{r['tokens_per_s']:>12,} tokens/s ({r['tokens_per_cell']:,.0f} tokens a cell, both views)"
            )
        shard_bench.log(
            f"                  peak RSS {row['peak_rss_mb']:,} MB (the largest process: the loader or a worker)"
        )
    summary = {
        "cells": args.cells,
        "nnz_per_cell": args.nnz,
        "genes": args.genes,
        "build": {"wall_s": round(build["wall_s"], 1), "peak_rss_mb": round(build["maxrss_kib"] / 1024)},
        "rows": rows,
        "machine": f"{platform.processor() or platform.machine()}, Python {platform.python_version()}",
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
