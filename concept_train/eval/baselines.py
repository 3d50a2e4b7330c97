"""Embeddings to put beside the model's, computed from the same cells' counts.

PCA(50) of log1p(counts / library size x 10^4), the standard preprocessing of the scIB benchmark's
unintegrated baseline, over the genes seen in the evaluated cells; the centring stays implicit
(scanpy's sparse PCA), so memory follows the nonzeros. scVI is not run here: it trains a model of
its own per dataset, which is a separate job (put its latent space in an .h5ad's obsm and compare
there if needed).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from concept_shard.cells import TARGET_SUM

from .cells import EvalCells


def log_normalised(cells: EvalCells) -> sp.csr_matrix:
    """cells x seen genes, log1p(count / library size x 10^4), float32."""
    library = np.repeat(np.maximum(cells.n_counts, 1e-12), np.diff(cells.indptr))
    values = np.log1p(cells.counts / library * TARGET_SUM).astype(np.float32)
    seen, columns = np.unique(cells.genes, return_inverse=True)
    return sp.csr_matrix((values, columns.reshape(-1), cells.indptr), shape=(cells.n_cells, len(seen)))


def pca(cells: EvalCells, n_components: int = 50, seed: int = 0) -> np.ndarray:
    """[n_cells, <= n_components] principal components of the log-normalised counts."""
    import anndata as ad
    import scanpy as sc

    x = log_normalised(cells)
    n = max(1, min(n_components, x.shape[0] - 1, x.shape[1] - 1))
    adata = ad.AnnData(x)
    sc.pp.pca(adata, n_comps=n, zero_center=True, svd_solver="arpack", random_state=seed)
    return np.asarray(adata.obsm["X_pca"], np.float32)
