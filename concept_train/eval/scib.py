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
compilation per process; exact search in chunks costs ~1 s at 20,000 cells. kBET per label
(`kbet_per_label` below) runs scib-metrics' steps (a diffusion map of each label's connectivity
graph, k0 neighbours in it, scib-metrics' `kbet`), but with the same exact search where
scib-metrics calls pynndescent again: that call alone cost 40-50 s of numba compilation in every
`concept-eval` (tests/train/eval/test_scib.py holds it to scib-metrics' own figure).
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


def scib_scores(x: np.ndarray, labels: np.ndarray, batches: np.ndarray | None) -> dict[str, float | None]:
    """{metric or aggregate: score} for an embedding x [n, d] with a label and a batch per cell.
    Without batches (`None`: no obs column varies) the batch-correction metrics (graph connectivity
    among them), isolated labels (labels found in the fewest batches) and the total are None: not
    applicable."""
    import scib_metrics as sm

    x = np.ascontiguousarray(x, np.float32)
    labels = np.asarray(labels)
    neighbours = exact_neighbours(x, 90)
    nn15, nn50, nn90 = (neighbours.subset_neighbors(n=n) for n in (15, 50, 90))
    nmi_ari = sm.nmi_ari_cluster_labels_kmeans(x, labels)
    scores = {
        "Isolated labels": None,
        "KMeans NMI": nmi_ari["nmi"],
        "KMeans ARI": nmi_ari["ari"],
        "Silhouette label": sm.silhouette_label(x, labels),
        "cLISI": sm.clisi_knn(nn90, labels),
        "Silhouette batch": None,
        "iLISI": None,
        "KBET": None,
        "Graph connectivity": None,
    }
    if batches is not None:
        batches = np.asarray(batches)
        scores |= {
            "Graph connectivity": sm.graph_connectivity(nn15, labels),
            "Isolated labels": sm.isolated_labels(x, labels, batches),
            "Silhouette batch": sm.silhouette_batch(x, labels, batches),
            "iLISI": sm.ilisi_knn(nn90, batches),
            "KBET": kbet_per_label(nn50, batches, labels),
        }
    scores = {k: None if v is None else float(v) for k, v in scores.items()}
    for cls in (BIO, BATCH):
        known = [v for k, v in scores.items() if METRICS.get(k) == cls and v is not None]
        scores[cls] = float(np.mean(known)) if known else None
    scores[TOTAL] = None if scores[BATCH] is None else 0.4 * scores[BATCH] + 0.6 * scores[BIO]
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


def kbet_per_label(
    neighbours, batches: np.ndarray, labels: np.ndarray, alpha: float = 0.05, n_comps: int = 100
) -> float:
    """scib-metrics' `kbet_per_label` (the mean over labels of kBET's acceptance rate within the
    label's cells), its neighbours in each diffusion map found by exact search. A label of fewer
    than 10 cells or of one batch is left out (NaN); one whose graph falls apart into components
    of which those of at least 3 k0 cells hold under 75% of its cells scores 0, as does one whose
    diffusion map fails."""
    import pandas as pd
    from scipy.sparse.csgraph import connected_components

    batches = np.asarray(pd.Categorical(batches).codes)
    labels = np.asarray(labels)
    graph = neighbours.knn_graph_connectivities
    scores = []
    for label in np.unique(labels):
        mask = labels == label
        sub, sub_batches = graph[mask][:, mask], batches[mask]
        if mask.sum() < 10 or len(np.unique(sub_batches)) == 1:
            scores.append(np.nan)
            continue
        k0 = int(min(70, max(10, np.floor(np.mean(np.unique(sub_batches, return_counts=True)[1]) / 4))))
        n_parts, part = connected_components(sub, connection="strong")
        if n_parts > 1:
            sizes = np.bincount(part)
            keep = np.flatnonzero(sizes[part] >= 3 * k0)
            if len(keep) < 0.75 * len(part):
                scores.append(0.0)
                continue
            sub, sub_batches = sub[keep][:, keep], sub_batches[keep]
        scores.append(_kbet_in_diffusion_map(sub, sub_batches, k0, n_comps, alpha))
    return float(np.nanmean(scores))


def _kbet_in_diffusion_map(graph, batches: np.ndarray, k0: int, n_comps: int, alpha: float) -> float:
    """kBET's acceptance rate with each cell's k0 nearest cells in the multiscale diffusion map of
    `graph` (scanpy's: density-normalised, symmetric transitions, eigenvalues e scaled e / (1 - e));
    0 when the eigen-decomposition fails or the cells are of one batch."""
    from scipy.sparse import diags
    from scipy.sparse.linalg import eigsh

    graph = graph.tocsr()
    graph.sort_indices()
    q = np.asarray(graph.sum(axis=0)).ravel()
    kernel = diags(1.0 / q) @ graph @ diags(1.0 / q)
    z = np.sqrt(np.asarray(kernel.sum(axis=0)).ravel())
    transitions = (diags(1.0 / z) @ kernel @ diags(1.0 / z)).astype(np.float64)
    codes = np.unique(batches, return_inverse=True)[1]
    if codes.max() < 1:
        return 0.0
    try:
        # a fixed start vector: ARPACK's own is drawn from a state that every call advances, so
        # scib-metrics' figure for a label depends on the calls before it
        start = np.random.default_rng(0).uniform(-1, 1, graph.shape[0])
        evals, evecs = eigsh(transitions, k=min(n_comps, graph.shape[0] - 1), which="LM", v0=start)
    except ValueError:
        return 0.0
    evals, evecs = evals.astype(np.float32)[::-1] + 1e-8, evecs.astype(np.float32)[:, ::-1]
    scale = np.array([e if e == 1 else e / (1 - e) for e in evals], np.float32)
    embedding = np.ascontiguousarray(evecs * scale)
    return kbet_acceptance(exact_neighbours(embedding, k0 + 1).indices, codes, alpha)


def kbet_acceptance(indices: np.ndarray, codes: np.ndarray, alpha: float) -> float:
    """scib-metrics' `kbet` (a chi-square test per cell of its neighbours' batches, itself
    included, against the batches' shares of all cells; the share of cells with p >= alpha) in
    NumPy: scib-metrics compiles it with JAX anew for every label's number of cells."""
    from scipy.special import gammainc

    n_batches = int(codes.max()) + 1
    expected = (np.bincount(codes, minlength=n_batches) / len(codes) * indices.shape[1]).astype(np.float32)
    observed = (codes[indices][:, :, None] == np.arange(n_batches)).sum(axis=1).astype(np.float32)
    statistic = (np.square(observed - expected) / expected).sum(axis=1)
    p_values = 1 - gammainc((n_batches - 1) / 2, statistic / 2).astype(np.float32)
    return float((p_values >= alpha).mean())
