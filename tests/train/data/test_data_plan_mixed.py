"""`mixed` batches from an on-demand keyed permutation: every cell once per epoch, a new order each
epoch, the same batch g in any process, and memory that does not grow with the cells."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from concept_train.data.order.permutation import key_of, permute
from concept_train.data.order.plan import BatchPlan
from concept_train.data.read.catalog import ShardSet


def sets_of(sizes, species=None, weights=None) -> list[ShardSet]:
    species = species or ["hsapiens"] * len(sizes)
    return [
        ShardSet(
            dataset_id=f"{sp}/src/f{i}",
            species=sp,
            directory=Path("/nonexistent"),
            n_samples=n,
            genes=np.arange(3),
            source_file=f"f{i}.h5ad",
            weights=dict((weights or {}).get(i, {})),
        )
        for i, (n, sp) in enumerate(zip(sizes, species))
    ]


def cells_of_epoch(plan: BatchPlan, e: int) -> list[tuple[int, int]]:
    K = plan.batches_per_epoch
    out = []
    for g in range(e * K, (e + 1) * K):
        b = plan.batch(g)
        assert len(set(b.datasets.tolist())) >= 1 and len(b.rows) == len(b.datasets)
        out += list(zip(b.datasets.tolist(), b.rows.tolist()))
    return out


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 17, 64, 1000, 4097])
def test_permutation_is_a_bijection_and_depends_on_the_key(n):
    a = permute(np.arange(n), n, key_of(7, 0))
    assert sorted(a.tolist()) == list(range(n))
    if n >= 17:
        assert not np.array_equal(a, permute(np.arange(n), n, key_of(7, 1)))
        assert not np.array_equal(a, np.arange(n))


def test_permutation_keys_and_sizes_per_element():
    n = np.array([5] * 5 + [9] * 9)
    pos = np.concatenate([np.arange(5), np.arange(9)])
    keys = key_of(3, np.where(n == 5, 0, 1))
    out = permute(pos, n, keys)
    assert np.array_equal(out[:5], permute(np.arange(5), 5, key_of(3, 0)))
    assert np.array_equal(out[5:], permute(np.arange(9), 9, key_of(3, 1)))
    with pytest.raises(ValueError):
        permute([5], 5, key_of(0))


def test_mixed_epoch_holds_every_cell_once_in_a_new_order():
    sizes = [37, 100, 5, 64]
    plan = BatchPlan(sets_of(sizes), 16, seed=4, batching="mixed", drop_last=False)
    e0, e1 = cells_of_epoch(plan, 0), cells_of_epoch(plan, 1)
    every = sorted((f, r) for f, n in enumerate(sizes) for r in range(n))
    assert sorted(e0) == every and sorted(e1) == every
    assert e0 != e1
    # batches mix files, and the same g is the same batch in a fresh plan (a resumed process)
    assert len({f for f, _ in e0[:16]}) > 1
    fresh = BatchPlan(sets_of(sizes), 16, seed=4, batching="mixed", drop_last=False)
    for g in (7, 0, 13, 25):
        a, b = plan.batch(g), fresh.batch(g)
        assert np.array_equal(a.datasets, b.datasets) and np.array_equal(a.rows, b.rows)
    other_seed = BatchPlan(sets_of(sizes), 16, seed=5, batching="mixed", drop_last=False)
    assert cells_of_epoch(other_seed, 0) != e0


def test_mixed_keeps_species_apart_and_repeats_and_subsamples_per_file():
    sizes, species = [10, 20, 30], ["hsapiens", "mmusculus", "hsapiens"]
    weights = {0: {"repeat": 2.5}, 1: {"repeat": 1}, 2: {"repeat": 0.5}}
    plan = BatchPlan(sets_of(sizes, species, weights), 8, seed=0, batching="mixed", drop_last=False)
    K = plan.batches_per_epoch
    cells = []
    for g in range(K):
        b = plan.batch(g)
        assert {species[f] for f in b.datasets.tolist()} == {b.species}
        cells += list(zip(b.datasets.tolist(), b.rows.tolist()))
    count = {f: sum(1 for c in cells if c[0] == f) for f in range(3)}
    assert count == {0: 25, 1: 20, 2: 15}
    rows0 = [r for f, r in cells if f == 0]
    assert all(rows0.count(r) in (2, 3) for r in range(10))  # two whole passes and half of a third
    rows2 = [r for f, r in cells if f == 2]
    assert len(set(rows2)) == 15 and set(rows2) != set(range(15))  # a random half, not the first rows


def test_mixed_without_shuffle_is_file_order():
    plan = BatchPlan(sets_of([3, 4]), 2, seed=0, batching="mixed", shuffle=False, drop_last=False)
    assert cells_of_epoch(plan, 0) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (1, 3)]


def test_mixed_plan_memory_does_not_grow_with_the_cells():
    """30M cells in 2,000 files: a batch far into an epoch costs kilobytes, not the 360 MB pool."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(1_000, 29_000, 2_000)
    sizes = (sizes * (30_000_000 / sizes.sum())).astype(int)
    tracemalloc.start()
    plan = BatchPlan(sets_of(sizes.tolist()), 128, seed=0, batching="mixed")
    for g in (0, plan.batches_per_epoch - 1, plan.batches_per_epoch + 5):
        b = plan.batch(g)
        assert len(b.rows) == 128 and np.all(b.rows < sizes[b.datasets])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 * 2**20, f"{peak / 2**20:.1f} MiB"


def test_per_dataset_start_up_says_which_share_of_cells_an_epoch_leaves_unused(sharded_example):
    from dm_config import make_dm

    lines = []
    dm = make_dm(
        sharded_example,
        {"datamodule.dataloader.train.batch_size": 64, "datamodule.dataloader.train.num_workers": 0},
        log=lines.append,
    )
    plan = dm.train_loader().plan
    left, total, _ = plan.unused()
    sizes = [s.n_samples for s in dm.train_sets]
    assert total == sum(sizes) and left == sum(n % 64 for n in sizes) > 0
    said = [line for line in lines if "unused" in line]
    assert len(said) == 1 and f"{left:,} of {total:,} cells" in said[0] and "drop_last=false" in said[0]
    # the documented way to use them: every cell once per epoch, in smaller last batches
    lines.clear()
    dm = make_dm(
        sharded_example,
        {
            "datamodule.dataloader.train.batch_size": 64,
            "datamodule.dataloader.train.drop_last": False,
            "datamodule.dataloader.train.num_workers": 0,
        },
        log=lines.append,
    )
    plan = dm.train_loader().plan
    assert plan.unused() == (0, total, 0) and not [line for line in lines if "unused" in line]
    cells = set()
    for g in range(plan.batches_per_epoch):
        b = plan.batch(g)
        cells |= set(zip(b.datasets.tolist(), b.rows.tolist()))
    assert len(cells) == total


def test_permutation_mixes_positions():
    """No visible structure: where neighbours go is uncorrelated with where they were."""
    n = 20_000
    out = permute(np.arange(n), n, key_of(0, 0, 2, 0))
    assert abs(np.corrcoef(np.arange(n), out)[0, 1]) < 0.03
    assert abs(np.corrcoef(out[:-1], out[1:])[0, 1]) < 0.03
    # the first 16 of a 50/50 pool of two files: a binomial share, not runs of one file
    shares = [(permute(np.arange(16), 2000, key_of(s)) < 1000).mean() for s in range(200)]
    assert 0.45 < np.mean(shares) < 0.55 and 0.08 < np.std(shares) < 0.16


def test_keys_and_permutations_are_the_ones_they_always_were():
    """Pinned: a change to the mixing (shared with the view filters) would reshuffle every run."""
    assert int(key_of(3, 1, 2)) == 13407425583053952350
    assert permute(np.arange(10), 10, key_of(7, 0)).tolist() == [9, 6, 8, 7, 3, 0, 2, 5, 1, 4]
