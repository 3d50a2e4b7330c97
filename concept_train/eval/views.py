"""The model's embeddings of the evaluated cells: whole cells, and two gene panels per cell.

Whole cells are tokenized as `concept-embed` does (every in-vocabulary gene, top `max_tokens` by
value), with `max_tokens` by default the larger of the run's training `max_tokens` and 1,000, as
the trainer's whole-cell validation views: the demo model, trained on views of 48 genes, embeds its
validation cells markedly better from 1,000 (scIB total 0.821 against 0.747; BENCHMARKS.md). Cross-view recall@1
follows the validation loaders `within_P{N}_B256`: the cells of one
input are shuffled (seeded) into blocks of `block` cells; each block draws two disjoint random
panels of N genes from the input's genes; a cell counts as recalled when its view-2 embedding is
the nearest (cosine) of the block's to its view-1 embedding. Chance is 1 / block. A view keeps at
most min(N, 1000) genes, as those loaders do (the reference's `max_tokens` 200 / 800 / 1000), and
at most `max_cells` cells (default 2,048, eight blocks) are used per panel size: a 1,000-token view
costs ~50 ms per cell on a CPU.
"""

from __future__ import annotations

import numpy as np

from ..data.make.tokenize import TokenSpec
from ..embedding import WHOLE_CELL_TOKENS, adds_learnable_embs, cells_of, embed_cells, whole_cell_tokens
from .cells import EvalCells

VIEW_MAX_TOKENS = WHOLE_CELL_TOKENS  # a panel view keeps at most this many genes, as the validation loaders


class Embedder:
    """Embeds blocks of the evaluated cells through a panel, with the run's tokenization."""

    def __init__(
        self,
        loaded,
        cells: EvalCells,
        batch_size: int = 256,
        max_tokens: int | None = None,
        use_learnable_embs: bool = True,
    ):
        self.loaded, self.cells, self.batch_size = loaded, cells, batch_size
        # default: as the validation's whole-cell views (1,000, the reference's), or more if trained
        # with more; concept-embed's default too
        self.max_tokens = whole_cell_tokens(loaded, max_tokens)
        self.normalization = loaded.cfg.datamodule.normalization
        self.vocab_size = loaded.vocabs[cells.species].size
        self.add_learnable = adds_learnable_embs(loaded, use_learnable_embs)

    def embed(self, rows: np.ndarray, panel: np.ndarray, max_tokens: int) -> np.ndarray:
        """[len(rows), d] embeddings of the cells `rows` seen through `panel`."""
        c = self.cells
        spec = TokenSpec(max_tokens=max_tokens, normalization=self.normalization, strategy="top-nonzero")
        lengths = np.diff(c.indptr)[rows]
        take = (
            np.concatenate([np.arange(c.indptr[r], c.indptr[r + 1]) for r in rows]) if len(rows) else np.zeros(0, int)
        )
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        out = []
        for a in range(0, len(rows), self.batch_size):
            b = min(a + self.batch_size, len(rows))
            batch = cells_of(indptr, c.genes[take], c.counts[take], c.n_counts[rows], a, b)
            out.append(
                embed_cells(self.loaded.model, spec, batch, panel, self.vocab_size, c.species, self.add_learnable)
            )
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def whole_cells(self, progress=None) -> np.ndarray:
        everything = np.arange(self.vocab_size)
        chunks = []
        for a in range(0, self.cells.n_cells, 4 * self.batch_size):
            rows = np.arange(a, min(a + 4 * self.batch_size, self.cells.n_cells))
            chunks.append(self.embed(rows, everything, self.max_tokens))
            if progress is not None:
                progress(len(rows))
        return np.concatenate(chunks)


def cross_view_recall(
    embedder: Embedder, panel_size: int, block: int = 256, seed: int = 0, max_cells: int = 2048
) -> dict:
    """{recall@1, chance, cells, blocks} over every input with at least 2 x panel_size genes, or
    {recall@1: None, reason} when none has."""
    c = embedder.cells
    rng = np.random.default_rng([seed, panel_size])
    hits = cells = blocks = 0
    too_small = []
    # the cells used: a seeded sample of at most max_cells, blocks formed within each input
    used = np.zeros(c.n_cells, bool)
    used[rng.permutation(c.n_cells)[:max_cells]] = True
    for k, genes in enumerate(c.input_genes):
        if len(genes) < 2 * panel_size:
            too_small.append(f"{c.inputs[k]} ({len(genes)} genes)")
            continue
        rows = rng.permutation(np.flatnonzero((c.input_of == k) & used))
        for a in range(0, len(rows) - 1, block):
            mine = rows[a : a + block]
            if len(mine) < 2:
                continue
            chosen = rng.choice(genes, 2 * panel_size, replace=False)
            max_tokens = min(panel_size, VIEW_MAX_TOKENS)
            z1 = embedder.embed(mine, np.sort(chosen[:panel_size]), max_tokens)
            z2 = embedder.embed(mine, np.sort(chosen[panel_size:]), max_tokens)
            hits += int((np.argmax(z1 @ z2.T, axis=1) == np.arange(len(mine))).sum())
            cells += len(mine)
            blocks += 1
    if cells == 0:
        return {
            "recall@1": None,
            "reason": f"no input has {2 * panel_size} genes for two disjoint panels: " + ", ".join(too_small[:5]),
        }
    # chance: 1 / block size per cell, averaged over cells = blocks / cells
    out = {"recall@1": hits / cells, "chance": blocks / cells, "cells": cells, "blocks": blocks}
    if too_small:
        out["inputs_left_out"] = too_small
    return out
