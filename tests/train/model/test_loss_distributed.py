"""The InfoNCE loss over the global batch on two gloo processes: every rank computes the loss of
the whole batch, and each rank's embeddings get the gradient that, averaged over ranks as FSDP
averages gradients, is the single-process gradient of that loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from concept_train.model import contrastive_loss

WORLD, ROWS = 2, 5


def _batch():
    g = torch.Generator().manual_seed(3)
    z1, z2 = (F.normalize(torch.randn(WORLD * ROWS, 8, generator=g, dtype=torch.float64), dim=-1) for _ in range(2))
    mask = torch.ones(WORLD * ROWS, dtype=torch.bool)
    mask[3] = mask[7] = False  # one masked cell on each rank
    return z1, z2, mask


def _loss(z1, z2, scale, mask, kind):
    """The binary loss draws its negatives from a generator every rank seeds alike."""
    return contrastive_loss(z1, z2, scale, mask, kind=kind, rng=np.random.default_rng(11))


def _rank(rank: int, store: str, out: dict, kind: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        z1, z2, mask = _batch()
        rows = slice(rank * ROWS, (rank + 1) * ROWS)
        a, b = z1[rows].clone().requires_grad_(), z2[rows].clone().requires_grad_()
        scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
        loss, metrics = _loss(a, b, scale, mask[rows], kind)
        loss.backward()
        out[rank] = (float(loss), a.grad, b.grad, scale.grad, metrics["n_items"])
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["multiclass", "binary"])
def test_two_ranks_give_the_global_loss_and_its_gradient(tmp_path, kind):
    z1, z2, mask = _batch()
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    want, _ = _loss(a, b, scale, mask, kind)
    want.backward()

    out = mp.Manager().dict()
    mp.spawn(_rank, args=(str(tmp_path / "store"), out, kind), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        loss, ga, gb, gs, n_items = out[rank]
        rows = slice(rank * ROWS, (rank + 1) * ROWS)
        assert n_items == 8
        assert abs(loss - float(want.detach())) < 1e-12
        # the sum over ranks of this rank's rows' gradient; FSDP divides by the world size
        torch.testing.assert_close(ga / WORLD, a.grad[rows], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gb / WORLD, b.grad[rows], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gs, scale.grad, rtol=1e-10, atol=1e-12)  # a replicated parameter
    assert ga.abs().sum() > 0
