"""The compiled view kernel (kernels.py) gives exactly the batches of the NumPy reference (tokenize.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import data_module

from concept_train.data import kernels
from concept_train.data.make.tokenize import Cells, TokenSpec, normalized, pack, select_view

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba is not installed")


def random_cells(rng, n_cells: int, vocab: int, integral: bool) -> Cells:
    samples = []
    for i in range(n_cells):
        k = int(rng.integers(0, 300)) if i % 7 else 0  # some cells without entries
        genes = np.sort(rng.choice(vocab, k, replace=False))
        counts = rng.integers(0, 6, k).astype(np.float64)  # zeros (to skip) and many ties
        if not integral:
            counts = counts * rng.choice([0.5, 1.25, 3.1], k)
        samples.append({"genes": genes, "counts": counts, "n_counts": float(counts.sum())})
    return Cells.from_samples(samples)


@pytest.mark.parametrize("normalization", ["raw", "log1p", "totalcount/log1p", "binning/5"])
@pytest.mark.parametrize("integral", [True, False])
def test_view_and_pack_equal_the_numpy_reference(normalization, integral):
    rng = np.random.default_rng(hash((normalization, integral)) % 2**32)
    vocab = 2000
    for trial in range(6):
        cells = random_cells(rng, int(rng.integers(1, 40)), vocab, integral)
        for max_tokens in (1, 7, 50, 1000):
            spec = TokenSpec(max_tokens=max_tokens, normalization=normalization)
            values, keys = normalized(spec, cells)
            views = {}
            for compiled in (False, True):
                v = [
                    select_view(
                        spec,
                        cells,
                        values,
                        keys,
                        np.sort(rng.choice(vocab, size, replace=False)),
                        vocab,
                        compiled=compiled,
                    )
                    for size in (5, 400, 2000)
                    for rng in [np.random.default_rng([trial, max_tokens, size])]
                ]
                views[compiled] = v
                for a, b in zip(v, views[False]):
                    for x, y in zip(a, b):
                        assert x.dtype == y.dtype and np.array_equal(x, y)
            for pair in ((0, 1), (1, 2), (2, 0)):
                two = [views[True][pair[0]], views[True][pair[1]]]
                ref, fast = pack(cells.n_cells, two, compiled=False), pack(cells.n_cells, two, compiled=True)
                for field in ("tokens", "values", "positions", "cu_seqlens", "view_lengths"):
                    x, y = getattr(ref, field), getattr(fast, field)
                    assert x.dtype == y.dtype and np.array_equal(x, y), field
                assert ref.max_seqlen == fast.max_seqlen


def test_training_batches_are_identical_with_and_without_the_kernel(sharded_example, monkeypatch):
    maker = data_module(sharded_example, ["datamodule.dataloader.train.num_workers=0"]).train_loader().maker
    fast = [maker.make(g) for g in range(6)]
    monkeypatch.setenv("CONCEPT_KERNEL", "numpy")
    for g, a in enumerate(fast):
        b = maker.make(g)
        for field in ("tokens", "values", "positions", "cu_seqlens"):
            assert torch.equal(getattr(a, field), getattr(b, field)), (g, field)
