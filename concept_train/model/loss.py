"""Symmetric InfoNCE over the GLOBAL batch, and cross-view retrieval metrics.

Embeddings of all ranks are all-gathered with gradient (`gather_with_grad`, our own autograd
function), so every rank computes the same loss over the global batch and each rank's embeddings
receive the gradient summed over ranks. Cells whose view was empty (`items_mask` False) are left out of the logits.
Before `loss_switch_step` the loss is CLIP's (z1 against z2 and back); from it on, SimCLR's
2N x 2N loss (each view against all other 2N - 1 embeddings): `ContrastiveObjective` owns that
switch for training and validation alike.

`model.contrastive_loss: binary` (scConcept's other loss): the sigmoid of the same logits, the
positive pairs against as many sampled negative pairs, binary cross-entropy. The negatives are a
pure function of (seed, step, batch index), the same on every rank, so a resumed run draws the
same ones.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from concept_config import ModelSection

MAX_LOGIT_SCALE = math.log(100.0)  # as CLIP: the temperature never goes below 0.01
# Random streams are keyed [seed, STREAM, ...]: numpy zero-pads a short key, so a tag in the
# second place keeps this stream apart from the data plan's [seed, epoch, ...] and the panels'.
NEGATIVES_STREAM = 0x6E656761  # binary loss: the sampled negative pairs


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather_rows(x: torch.Tensor) -> torch.Tensor:
    """All ranks' x (all the same shape), concatenated in rank order."""
    out = x.new_empty((dist.get_world_size() * x.shape[0], *x.shape[1:]))
    dist.all_gather_single(out, x.contiguous())
    return out


class _GatherWithGrad(torch.autograd.Function):
    """All ranks' rows in rank order; backward hands each rank the sum over ranks of the gradient
    of its own rows (a reduce-scatter, written as all_reduce + slice because gloo has no
    reduce-scatter). torch.distributed.nn's all_gather does the same and is deprecated."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        return _gather_rows(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce works in place
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's x (all the same shape) with gradient. Every rank computes the same loss over the
    global batch, so each rank's rows get the gradient summed over ranks, which FSDP's gradient
    averaging brings back to the single-process gradient."""
    return _GatherWithGrad.apply(x) if _distributed() else x


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    return _gather_rows(x) if _distributed() else x


def sample_negative_pairs(
    n: int, k: int, rng: np.random.Generator, simclr: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """k distinct (row, column) pairs, drawn uniformly without replacement, of an n x n logit matrix
    off its diagonal (CLIP form), or of the 2n x 2n SimCLR matrix off its diagonal and off each
    view's partner (column (row + n) mod 2n). Floyd's sampling inside numpy's `choice`: no list of
    all pairs (n^2) is made."""
    size = 2 * n if simclr else n
    per_row = size - 2 if simclr else size - 1
    picks = rng.choice(size * per_row, size=min(k, size * per_row), replace=False)
    rows, r = np.divmod(picks, per_row)
    if simclr:  # skip the row itself and its partner, in column order
        partner = (rows + n) % size
        lo, hi = np.minimum(rows, partner), np.maximum(rows, partner)
        cols = r + (r >= lo)
        cols = cols + (cols >= hi)
    else:
        cols = r + (r >= rows)
    return rows, cols


def _binary_loss(z1, z2, scale, simclr: bool, rng: np.random.Generator) -> torch.Tensor:
    """BCE of sigmoid(logit) against 1 for every positive pair and 0 for as many sampled negative
    pairs (the reference's balanced sampling; it draws from the upper triangle only)."""
    n = z1.shape[0]
    if simclr:
        z = torch.cat([z1, z2])
        logits = scale * z @ z.T
        rows = torch.arange(2 * n, device=logits.device)
        pos = logits[rows, (rows + n) % (2 * n)]
    else:
        logits = scale * z1 @ z2.T
        pos = logits.diagonal()
    rows, cols = sample_negative_pairs(n, pos.shape[0], rng, simclr)
    neg = logits[torch.from_numpy(rows).to(logits.device), torch.from_numpy(cols).to(logits.device)]
    pred = torch.cat([pos, neg])
    target = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)])
    return F.binary_cross_entropy_with_logits(pred, target)  # = BCE(sigmoid(pred)), stable


def contrastive_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    logit_scale: torch.Tensor,
    mask: torch.Tensor,
    simclr: bool = False,
    kind: str = "multiclass",
    rng: np.random.Generator | None = None,
) -> tuple[torch.Tensor, dict]:
    """(loss, metrics) for local embeddings z1, z2 [n, d] and the local items_mask [n]. `kind`
    binary draws its negative pairs from `rng` (the same generator on every rank)."""
    z1, z2 = gather_with_grad(z1), gather_with_grad(z2)
    mask = gather_no_grad(mask.to(torch.int64)).bool()
    z1, z2 = z1[mask], z2[mask]
    n = z1.shape[0]
    if n < 2:
        zero = (z1.sum() + z2.sum() + logit_scale) * 0.0
        return zero, {"recall@1": float("nan"), "recall@5": float("nan"), "n_items": n}
    scale = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
    target = torch.arange(n, device=z1.device)
    logits = scale * z1 @ z2.T
    if kind == "binary":
        loss = _binary_loss(z1, z2, scale, simclr, rng if rng is not None else np.random.default_rng(0))
    elif simclr:
        z = torch.cat([z1, z2])
        sim = scale * z @ z.T
        sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
        loss = F.cross_entropy(sim, torch.cat([target + n, target]))
    else:
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    with torch.no_grad():
        metrics = retrieval_metrics(logits.detach())
    metrics["n_items"] = n
    return loss, metrics


class ContrastiveObjective:
    """The configured contrastive loss at a given optimizer step (`model.contrastive_loss`,
    `model.loss_switch_step`); `seed` keys the binary loss's negative pairs. `kind` is one of
    concept_config.model.CONTRASTIVE_LOSSES."""

    def __init__(self, switch_step: int | None = None, kind: str = "multiclass", seed: int = 0):
        self.switch_step, self.kind, self.seed = switch_step, kind, int(seed)

    @classmethod
    def from_config(cls, model: ModelSection, seed: int = 0) -> ContrastiveObjective:
        return cls(model.loss_switch_step, model.contrastive_loss, seed)

    def simclr(self, step: int) -> bool:
        return self.switch_step is not None and step >= self.switch_step

    def __call__(self, z1, z2, logit_scale, mask, step: int, key: int = 0) -> tuple[torch.Tensor, dict]:
        """`key`: the batch's index, so that the micro-batches of one step draw different negatives."""
        rng = (
            np.random.default_rng([self.seed, NEGATIVES_STREAM, int(step), int(key)]) if self.kind == "binary" else None
        )
        return contrastive_loss(z1, z2, logit_scale, mask, simclr=self.simclr(step), kind=self.kind, rng=rng)


def retrieval_metrics(logits: torch.Tensor) -> dict:
    """Cross-view recall@1/@5: how often cell i's view 2 ranks first / in the top 5 for its view 1
    (and vice versa), averaged over both directions."""
    n = logits.shape[0]
    out = {}
    for k in (1, 5):
        kk = min(k, n)
        target = torch.arange(n, device=logits.device)[:, None]
        hits = (logits.topk(kk, dim=1).indices == target).any(1).float().mean()
        hits_t = (logits.T.topk(kk, dim=1).indices == target).any(1).float().mean()
        out[f"recall@{k}"] = float((hits + hits_t) / 2)
    return out


@torch.no_grad()
def estimate_mutual_information(z1: torch.Tensor, z2: torch.Tensor, logit_scale: float = 3.0) -> float:
    """The InfoNCE lower bound on I(view 1; view 2) in nats, as the reference defines it:
    log n - the symmetric contrastive loss of the n paired embeddings (at log-scale `logit_scale`,
    e.g. a trained model's `logit_scale`). At most log n; about 0 for unrelated views."""
    z1, z2 = F.normalize(torch.as_tensor(z1).float(), dim=-1), F.normalize(torch.as_tensor(z2).float(), dim=-1)
    n = z1.shape[0]
    loss, _ = contrastive_loss(z1, z2, torch.tensor(float(logit_scale)), torch.ones(n, dtype=torch.bool))
    return math.log(n) - float(loss)
