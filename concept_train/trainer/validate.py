"""Validation: per loader, the contrastive loss and cross-view recall@1/@5 (mean over its fixed
batches) and kNN accuracy (k = 5, leave-one-out over all its cells, cosine similarity of view-1
embeddings) for every obs key with two or more values among the loader's cells."""

from __future__ import annotations

import torch

from ..model.loss import ContrastiveObjective, gather_no_grad

KNN_K = 5


def knn_accuracy(
    z: torch.Tensor, labels: torch.Tensor, k: int = KNN_K, chunk: int = 2048, metric: str = "dot"
) -> float:
    """Leave-one-out majority vote of the k nearest neighbours (ties: the nearest label wins);
    cells with a missing label (-1) are neither queried nor used as neighbours. `dot` ranks by
    z.z' (cosine for L2-normalised embeddings), `euclidean` by distance."""
    keep = labels >= 0
    z, labels = z[keep], labels[keep]
    n = len(labels)
    if n <= k:
        return float("nan")
    correct = 0
    for a in range(0, n, chunk):
        sim = z[a : a + chunk] @ z.T if metric == "dot" else -torch.cdist(z[a : a + chunk], z)
        sim[torch.arange(sim.shape[0]), torch.arange(a, a + sim.shape[0])] = float("-inf")
        nn_labels = labels[sim.topk(k, dim=1).indices]  # [q, k], nearest first
        votes = (nn_labels[:, :, None] == nn_labels[:, None, :]).sum(-1)  # how often each neighbour's label occurs
        weight = votes * (k + 1) - torch.arange(k)[None, :]  # most votes, then nearest
        pred = nn_labels.gather(1, weight.argmax(1, keepdim=True)).squeeze(1)
        correct += int((pred == labels[a : a + chunk]).sum())
    return correct / n


@torch.no_grad()
def validate(
    model, loaders: dict, forward_views, obs_keys: list[str], objective: ContrastiveObjective, step: int
) -> dict:
    model.eval()
    out = {}
    for name, loader in loaders.items():
        losses, r1, r5, zs, labels = [], [], [], [], {k: [] for k in obs_keys}
        for batch in loader:
            z1, z2, (*_, scale) = forward_views(batch)
            loss, m = objective(z1, z2, scale, batch.items_mask.to(z1.device), step, key=batch.index)
            if m["n_items"] >= 2:  # a loader whose view 2 is empty has no loss, only kNN
                losses.append(float(loss))
                r1.append(m["recall@1"])
                r5.append(m["recall@5"])
            zs.append(gather_no_grad(z1.float().contiguous()).cpu())
            for key in obs_keys:
                labels[key].append(gather_no_grad(batch.labels[key].to(z1.device)).cpu())
        if not zs:
            continue
        if losses:
            out[f"val/{name}/loss"] = sum(losses) / len(losses)
            out[f"val/{name}/recall@1"] = sum(r1) / len(r1)
            out[f"val/{name}/recall@5"] = sum(r5) / len(r5)
        z = torch.cat(zs)
        for key in obs_keys:
            known = torch.cat(labels[key])
            if len(torch.unique(known[known >= 0])) >= 2:  # one value (knn/dataset of one file): no test
                out[f"val/{name}/knn/{key}"] = knn_accuracy(z, known)
        out[f"val/{name}/cells"] = int(z.shape[0])
    model.train()
    return out
