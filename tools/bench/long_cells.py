#!/usr/bin/env python
"""Cells of 1,000 / 4,000 / 20,000 tokens through the embedding path on the CPU (issue 26); not a test.

Usage::

    python tools/bench/long_cells.py [--layers 2] [--cells 4] [--tokens 1000,4000,20000]

scConcept's largest published model (16 layers, 1024 wide, 16 heads) reads cells of up to 20,000
tokens. Each size runs in a fresh process: synthetic cells with 25,000 nonzero genes of a
30,000-gene vocabulary are tokenized as `concept-embed` does (top `max_tokens` by value,
`embedding.embed_cells`: normalise, select, pack) and embedded by a model of the 170M shape's
widths (dim_model 1024, 16 heads, dim_hid 2048) with `--layers` layers (the full model has 16: its
time is about 16 / layers times the encoder's share). Reported per size: tokenizing cells/s alone,
embedded cells/s, and the process's peak RSS over its state before the first cell (the attention
of one 20,001-token cell would hold 16 x 20,001^2 float32 scores, 25.6 GB, if it materialised them).
The LAST line is a JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
from concept_train.data.make.tokenize import Cells, TokenSpec, normalized, pack, select_view
from concept_train.embedding import embed_cells
from concept_train.model import ContrastiveModel, ModelConfig
max_tokens, layers, n_cells = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
vocab, nnz = 30_000, 25_000
rng = np.random.default_rng(0)
genes = np.concatenate([np.sort(rng.choice(np.arange(2, vocab), nnz, replace=False)) for _ in range(n_cells)])
counts = rng.integers(1, 50, len(genes)).astype(np.float64)
cells = Cells(genes=genes.astype(np.int64), counts=counts, cell=np.repeat(np.arange(n_cells), nnz),
              n_counts=np.full(n_cells, counts.sum() / n_cells), n_cells=n_cells)
spec = TokenSpec(max_tokens=max_tokens, normalization="log1p", strategy="top-nonzero")
panel = np.arange(vocab)
values, keys = normalized(spec, cells)  # a warm-up: the compiled kernels are built on first use
pack(n_cells, [select_view(spec, cells, values, keys, panel, vocab)])
t = time.perf_counter()
for _ in range(5):
    values, keys = normalized(spec, cells)
    packed = pack(n_cells, [select_view(spec, cells, values, keys, panel, vocab)])
tokenize = 5 * n_cells / (time.perf_counter() - t)
torch.manual_seed(0)
model = ContrastiveModel(ModelConfig(vocab_sizes={"hsapiens": vocab}, dim_model=1024, nlayers=layers, num_head=16,
                                     dim_hid=2048, dim_gene_embs=1024, pe_max_len=max_tokens + 1,
                                     attention_backend="grouped")).eval()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
for c in range(n_cells):  # one cell at a time, as a long-cell batch would be
    one = Cells(genes=genes[c * nnz:(c + 1) * nnz].astype(np.int64), counts=counts[c * nnz:(c + 1) * nnz],
                cell=np.zeros(nnz, np.int64), n_counts=cells.n_counts[c:c + 1], n_cells=1)
    z = embed_cells(model, spec, one, panel, vocab, "hsapiens", False)
    assert np.isfinite(z).all()
embedded = n_cells / (time.perf_counter() - t)
grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps({"max_tokens": max_tokens, "tokens": int(packed.cu_seqlens[1]), "tokenize_cells_per_s": tokenize,
                  "embed_cells_per_s": embedded, "peak_rss_growth_mb": grew}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--cells", type=int, default=4)
    p.add_argument("--tokens", default="1000,4000,20000")
    args = p.parse_args()
    rows = []
    for max_tokens in [int(t) for t in args.tokens.split(",")]:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(max_tokens), str(args.layers), str(args.cells)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{'max_tokens':>10} {'tokens/cell':>11} {'tokenize cells/s':>17} {'embed cells/s':>14} {'peak RSS +MB':>13}")
    for r in rows:
        print(
            f"{r['max_tokens']:>10,} {r['tokens']:>11,} {r['tokenize_cells_per_s']:>17,.0f} "
            f"{r['embed_cells_per_s']:>14.3f} {r['peak_rss_growth_mb']:>13,.0f}"
        )
    print(json.dumps({"layers": args.layers, "cells": args.cells, "rows": rows}))


if __name__ == "__main__":
    main()
