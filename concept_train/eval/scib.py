"""scIB metrics of one embedding, computed with `scib-metrics` (Luecken et al. 2022's benchmark as
reimplemented in JAX by the scverse), and their aggregates as scib-metrics' `Benchmarker` defines
them (unscaled `get_results`: each class is the mean of its metrics, Total = 0.4 x batch correction
+ 0.6 x bio conservation).

The metrics are the issue's list, the scIB paper's set without PCR comparison (it needs the
uncorrected data, not an embedding) and without BRAS (scib-metrics >= 0.6's replacement of the
batch silhouette; the batch silhouette is kept so figures compare with published tables):
- bio conservation: isolated labels, KMeans NMI and ARI, silhouette of labels, cLISI;
- batch correction: silhouette of batches, iLISI, kBET (per label), graph connectivity.
Neighbours: one exact search of 90 (self included, Euclidean), subset to 15 / 50 / 90 as
Benchmarker does. Benchmarker's default is pynndescent, approximate and, here, 50 s of numba
compilation per process; exact search in chunks costs ~1 s at 20,000 cells.
"""

from __future__ import annotations

import numpy as np

BIO = "Bio conservation"
BATCH = "Batch correction"
TOTAL = "Total"
# column name -> class, in the order of scib-metrics' tables
METRICS = {
    "Isolated labels": BIO,
    "KMeans NMI": BIO,
    "KMeans ARI": BIO,
    "Silhouette label": BIO,
    "cLISI": BIO,
    "Silhouette batch": BATCH,
    "iLISI": BATCH,
    "KBET": BATCH,
    "Graph connectivity": BATCH,
}
MIN_CELLS = 100  # the 90-neighbour search needs more cells than that


def scib_scores(x: np.ndarray, labels: np.ndarray, batches: np.ndarray) -> dict[str, float]:
    """{metric or aggregate: score} for an embedding x [n, d] with a label and a batch per cell."""
    import scib_metrics as sm

    x = np.ascontiguousarray(x, np.float32)
    labels, batches = np.asarray(labels), np.asarray(batches)
    neighbours = exact_neighbours(x, 90)
    nn15, nn50, nn90 = (neighbours.subset_neighbors(n=n) for n in (15, 50, 90))
    nmi_ari = sm.nmi_ari_cluster_labels_kmeans(x, labels)
    scores = {
        "Isolated labels": sm.isolated_labels(x, labels, batches),
        "KMeans NMI": nmi_ari["nmi"],
        "KMeans ARI": nmi_ari["ari"],
        "Silhouette label": sm.silhouette_label(x, labels),
        "cLISI": sm.clisi_knn(nn90, labels),
        "Silhouette batch": sm.silhouette_batch(x, labels, batches),
        "iLISI": sm.ilisi_knn(nn90, batches),
        "KBET": sm.kbet_per_label(nn50, batches, labels),
        "Graph connectivity": sm.graph_connectivity(nn15, labels),
    }
    scores = {k: float(v) for k, v in scores.items()}
    for cls in (BIO, BATCH):
        scores[cls] = float(np.mean([v for k, v in scores.items() if METRICS.get(k) == cls]))
    scores[TOTAL] = 0.4 * scores[BATCH] + 0.6 * scores[BIO]
    return scores


def exact_neighbours(x: np.ndarray, k: int, chunk: int = 2048):
    """scib-metrics' NeighborsResults of the k nearest cells of each cell (itself first)."""
    import torch
    from scib_metrics.nearest_neighbors import NeighborsResults

    xt = torch.from_numpy(x)
    indices = np.empty((len(x), k), np.int64)
    distances = np.empty((len(x), k), np.float32)
    for a in range(0, len(x), chunk):
        d = torch.cdist(xt[a : a + chunk], xt)
        d[torch.arange(d.shape[0]), torch.arange(a, a + d.shape[0])] = -1.0  # itself first, at distance 0
        dist, idx = d.topk(k, dim=1, largest=False)
        indices[a : a + chunk], distances[a : a + chunk] = idx.numpy(), dist.clamp_min(0).numpy()
    return NeighborsResults(indices=indices, distances=distances)
