"""Group batches (`within_group_sampling`, `num_groups`, `sample_groups_equally`, `num_samples`),
the `dataset` obs key, validation loaders inheriting the training loader's keys, and
`limit_train_batches`. Group membership is checked against the store's own per-sample decode, not
the bulk column reader the plan uses."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import pytest
from dm_config import make_dm, obs_of
from helpers import ADVANCED, shard

from concept_shard.errors import ConfigError, DataError
from concept_train.data.make.batch import label_code
from concept_train.data.order.groups import file_groups
from concept_train.data.order.plan import BatchPlan
from concept_train.data.read.obs import column_codes

B16 = {
    "datamodule.dataloader.train.batch_size": 16,
    "datamodule.dataloader.train.num_workers": 0,
    "datamodule.dataset.train.max_tokens": 50,
}


def epoch(plan, e: int = 0):
    K = plan.batches_per_epoch
    return [plan.batch(g) for g in range(e * K, (e + 1) * K)]


# ---- the bulk column reader ---------------------------------------------------------------------
def test_bulk_obs_column_equals_per_sample_decode(sharded_example):
    dm = make_dm(sharded_example)
    for key in ("dataset", "donor_id", "tissue", "cell_type"):
        want = obs_of(dm, dm.train_sets, key)
        for s, values in zip(dm.train_sets, want):
            categories, codes = column_codes(dm.catalog.reader(s), key, key)
            got = ["" if c < 0 else categories[c].decode() for c in codes]
            assert got == values, (s.dataset_id, key)


def test_obs_codes_are_kept_next_to_the_shards_for_the_next_start(sharded_example, tmp_path):
    dm = make_dm(sharded_example)
    s = dm.train_sets[0]
    read = dm.catalog.reader(s)
    categories, codes = column_codes(read, "donor_id", "x", cache_dir=tmp_path)
    held = list((tmp_path / ".obs_codes").glob("donor_id-*.npz"))
    assert len(held) == 1
    np.savez(held[0], categories=categories[::-1], codes=codes)  # the next start reads the file
    again_c, again = column_codes(read, "donor_id", "x", cache_dir=tmp_path)
    assert np.array_equal(again_c, categories[::-1]) and np.array_equal(again, codes)
    rebuilt = lambda name: read(name) + (b" " if name == "index.json" else b"")  # noqa: E731  another index.json
    fresh_c, _ = column_codes(rebuilt, "donor_id", "x", cache_dir=tmp_path)
    assert np.array_equal(fresh_c, categories) and len(list((tmp_path / ".obs_codes").glob("*.npz"))) == 2
    (tmp_path / "not_a_dir").write_text("")  # a place it cannot write: no error
    assert np.array_equal(column_codes(read, "donor_id", "x", cache_dir=tmp_path / "not_a_dir")[1], codes)


def test_unknown_group_key_names_it_and_the_columns_there_are(sharded_example):
    with pytest.raises(DataError) as err:
        make_dm(
            sharded_example, {"datamodule.dataloader.train.within_group_sampling": ["donor_id", "sex"]}
        ).train_loader()
    text = " ".join(str(err.value).split())
    assert "datamodule.dataloader.train.within_group_sampling" in text and "'sex'" in text
    assert all(k in text for k in ("cell_type", "donor_id", "tissue", "dataset (the input file)"))


# ---- one group per batch ------------------------------------------------------------------------
def test_every_batch_holds_one_file_and_donor(sharded_example):
    dm = make_dm(sharded_example, B16 | {"datamodule.dataloader.train.within_group_sampling": ["dataset", "donor_id"]})
    loader = dm.train_loader()
    plan, sets = loader.plan, dm.train_sets
    donors = obs_of(dm, sets, "donor_id")
    sizes = Counter((f, d) for f, ds in enumerate(donors) for d in ds)
    for e in range(2):
        seen = Counter()
        for pb in epoch(plan, e):
            pairs = {(int(f), donors[int(f)][int(r)]) for f, r in zip(pb.datasets, pb.rows)}
            assert len(pairs) == 1 and len(pb.rows) == 16
            seen[pairs.pop()] += 1
        # every (file, donor) group gives its full batches, the remainder is dropped
        assert seen == Counter({k: n // 16 for k, n in sizes.items() if n >= 16})
    for batch, _ in zip(loader, range(6)):  # what the model sees: one donor label per batch
        assert len(set(batch.labels["donor_id"].tolist())) == 1 and len(set(batch.dataset.tolist())) == 1


def test_donor_groups_span_files_of_one_species(sharded_example):
    dm = make_dm(sharded_example, B16 | {"datamodule.dataloader.train.within_group_sampling": "donor_id"})
    loader = dm.train_loader()
    sets, donors = dm.train_sets, obs_of(dm, dm.train_sets, "donor_id")
    multi = 0
    for pb in epoch(loader.plan):
        assert len({donors[int(f)][int(r)] for f, r in zip(pb.datasets, pb.rows)}) == 1
        assert len({sets[int(f)].species for f in pb.datasets}) == 1
        multi += len(set(pb.datasets.tolist())) > 1
    assert multi > 0  # hs_donor_2 is in three human files: its batches mix them
    # a batch's panels are drawn over the genes of its group's files
    for batch, _ in zip(loader, range(8)):
        pb = loader.plan.batch(batch.index)
        genes = np.unique(np.concatenate([sets[f].genes for f in pb.files]))
        assert set(batch.dataset.tolist()) <= set(pb.files)
        assert np.isin(batch.panels[0].numpy(), genes).all() and np.isin(batch.panels[1].numpy(), genes).all()
    # batching: mixed (files may mix) agrees with obs keys without `dataset`, and contradicts them with it
    make_dm(
        sharded_example,
        B16
        | {
            "datamodule.dataset.train.batching": "mixed",
            "datamodule.dataloader.train.within_group_sampling": "donor_id",
        },
    ).train_loader()
    with pytest.raises(DataError) as err:
        make_dm(
            sharded_example,
            B16
            | {
                "datamodule.dataset.train.batching": "mixed",
                "datamodule.dataloader.train.within_group_sampling": ["dataset", "donor_id"],
            },
        ).train_loader()
    text = " ".join(str(err.value).split())
    assert "datamodule.dataset.train.batching" in text and "contradict" in text


def test_two_ranks_share_a_group_batch_and_its_panels(sharded_example):
    settings = B16 | {"datamodule.dataloader.train.within_group_sampling": "donor_id"}
    whole = make_dm(sharded_example, settings).train_loader()
    r0, r1 = (make_dm(sharded_example, settings, rank=r, world_size=2).train_loader() for r in (0, 1))
    assert whole.plan.digest == r0.plan.digest == r1.plan.digest
    for a, b, w, _ in zip(r0, r1, whole, range(6)):
        assert a.index == b.index == w.index and a.n_cells == b.n_cells == 8
        assert all(x.tolist() == y.tolist() == z.tolist() for x, y, z in zip(a.panels, b.panels, w.panels))
        assert a.row.tolist() + b.row.tolist() == w.row.tolist()
        assert a.dataset.tolist() + b.dataset.tolist() == w.dataset.tolist()


def test_missing_values_leave_the_loader(sharded_example):
    """The celltypist file has no cell_type: grouping by it leaves that file's cells out."""
    lines = []
    dm = make_dm(
        sharded_example, B16 | {"datamodule.dataloader.train.within_group_sampling": "cell_type"}, log=lines.append
    )
    plan = dm.train_loader().plan
    celltypist = next(f for f, s in enumerate(dm.train_sets) if "celltypist" in s.dataset_id)
    assert all(celltypist not in pb.datasets for pb in epoch(plan))
    assert any("celltypist_sample" in line and "left out" in line for line in lines)


# ---- the fixed pool: num_groups, sample_groups_equally, num_samples ------------------------------
def _group_cells(dm, plan, e):
    donors = obs_of(dm, dm.train_sets, "donor_id")
    cells = {}
    for pb in epoch(plan, e):
        key = (int(pb.datasets[0]), donors[int(pb.datasets[0])][int(pb.rows[0])])
        cells.setdefault(key, []).extend(zip(pb.datasets.tolist(), pb.rows.tolist()))
    return cells, donors


def test_sample_groups_equally_gives_every_group_the_same_cells(sharded_example):
    keys = {
        "datamodule.dataloader.train.within_group_sampling": ["dataset", "donor_id"],
        "datamodule.dataloader.train.batch_size": 8,
        "datamodule.dataloader.train.num_workers": 0,
    }
    plain = make_dm(sharded_example, keys)
    donors = obs_of(plain, plain.train_sets, "donor_id")
    sizes = Counter((f, d) for f, ds in enumerate(donors) for d in ds)
    per_group = 24
    assert min(sizes.values()) >= per_group  # every group can give its share
    dm = make_dm(
        sharded_example,
        keys
        | {
            "datamodule.dataloader.train.sample_groups_equally": True,
            "datamodule.dataloader.train.num_samples": per_group * len(sizes),
        },
    )
    plan = dm.train_loader().plan
    first, _ = _group_cells(dm, plan, 0)
    second, _ = _group_cells(dm, plan, 1)
    assert set(first) == set(sizes)
    assert {len(v) for v in first.values()} == {per_group}  # 3 batches of 8 from every group
    for k in first:  # the pool is fixed: same cells every epoch
        assert sorted(first[k]) == sorted(second[k]) and len(set(first[k])) == per_group
    assert first != second  # in another order
    # num_groups keeps that many random groups, the same in every epoch
    dm = make_dm(sharded_example, keys | {"datamodule.dataloader.train.num_groups": 5})
    plan = dm.train_loader().plan
    kept = set(_group_cells(dm, plan, 0)[0])
    assert len(kept) == 5 and kept == set(_group_cells(dm, plan, 3)[0])
    # num_samples alone: groups cut in proportion, each keeping at least one batch
    total = sum(sizes.values())
    dm = make_dm(sharded_example, keys | {"datamodule.dataloader.train.num_samples": 400})
    got = {k: len(v) for k, v in _group_cells(dm, dm.train_loader().plan, 0)[0].items()}
    want = {k: max(int(n / total * 400), 8) // 8 * 8 for k, n in sizes.items()}
    assert got == want


def test_dataset_grouping_is_the_per_dataset_plan(sharded_example):
    """`within_group_sampling: dataset` (the default) is the per-file plan of before: the same
    batches and the same digest, so runs saved before resume."""
    dm = make_dm(sharded_example, B16)
    plan = dm.train_loader().plan
    sets = dm.train_sets
    as_groups = BatchPlan(sets, 16, 0, batching="groups", groups=file_groups(sets), group_spec={})
    assert plan.batching == "per_dataset" and plan.batches_per_epoch == as_groups.batches_per_epoch
    for g in range(2 * plan.batches_per_epoch):
        a, b = plan.batch(g), as_groups.batch(g)
        assert np.array_equal(a.datasets, b.datasets) and np.array_equal(a.rows, b.rows)
    old = {
        "sets": [[s.dataset_id, s.n_samples] for s in sets],
        "per_epoch": [s.n_samples for s in sets],
        "batch_size": 16,
        "seed": 0,
        "batching": "per_dataset",
        "shuffle": True,
        "drop_last": True,
    }
    assert plan.digest == hashlib.sha256(json.dumps(old).encode()).hexdigest()[:16]
    # a num_samples that cuts nothing changes nothing
    same = make_dm(sharded_example, B16 | {"datamodule.dataloader.train.num_samples": 10**6}).train_loader().plan
    assert same.digest == plan.digest
    # mixed (within_group_sampling null) cannot be cut
    with pytest.raises(DataError, match="num_groups"):
        make_dm(
            sharded_example,
            B16
            | {"datamodule.dataloader.train.within_group_sampling": None, "datamodule.dataloader.train.num_groups": 2},
        ).train_loader()


def test_group_digest_changes_with_the_grouping(sharded_example):
    digests = set()
    for wgs in ("dataset", ["dataset", "donor_id"], "donor_id", "tissue", None):
        dm = make_dm(sharded_example, B16 | {"datamodule.dataloader.train.within_group_sampling": wgs})
        digests.add(dm.train_loader().plan.digest)
    assert len(digests) == 5


# ---- the `dataset` key -------------------------------------------------------------------------
def test_dataset_key_is_the_file_when_obs_has_no_dataset_column(project):
    import anndata as ad

    path = project / "data/synth_hsapiens/h5ads/hs_blood_a.h5ad"
    adata = ad.read_h5ad(path)
    del adata.obs["dataset"]
    adata.write_h5ad(path)
    split = [
        "datamodule.split_synth_hsapiens.train=[hs_blood_a.h5ad,hs_lung_b.h5ad]",
        "datamodule.split_synth_mmusculus.train=[]",
        "datamodule.split_celltypist_hsapiens.train=[]",
    ]
    assert shard("build", project, *ADVANCED, *split, "--no-progress") == 0
    dm = make_dm(
        project, B16 | {"datamodule.dataloader.train.within_group_sampling": ["dataset", "donor_id"]}, overrides=split
    )
    ids = [s.dataset_id for s in dm.train_sets]
    assert ids == ["hsapiens/synth_hsapiens/hs_blood_a", "hsapiens/synth_hsapiens/hs_lung_b"]
    assert "dataset" in dm.train_sets[0].obs_keys_absent and "dataset" not in dm.train_sets[1].obs_keys_absent
    want = {0: label_code(ids[0]), 1: label_code("hs_lung_b")}  # the file, or the file's own column
    loader = dm.train_loader()
    for batch, _ in zip(loader, range(loader.plan.batches_per_epoch)):
        f = int(batch.dataset[0])
        assert set(batch.dataset.tolist()) == {f} and set(batch.labels["dataset"].tolist()) == {want[f]}
        assert len(set(batch.labels["donor_id"].tolist())) == 1


# ---- validation loaders inherit ----------------------------------------------------------------
def test_validation_loaders_inherit_the_training_loaders_keys(sharded_example):
    val = "datamodule.dataloader.val.within_P200_B256"
    dm = make_dm(
        sharded_example,
        {
            "datamodule.dataloader.train.batch_size": 32,
            "datamodule.dataloader.train.drop_last": False,
            "datamodule.dataloader.train.within_group_sampling": ["dataset", "donor_id"],
            "datamodule.dataset.train.max_tokens": 40,
            f"{val}.batch_size": None,
            f"{val}.drop_last": None,
            f"{val}.within_group_sampling": "train",
            "datamodule.dataset.val.within_P200_B256.max_tokens": None,
            "datamodule.dataloader.val.within_P800_B256.within_group_sampling": None,
        },
    )
    loaders = dm.val_loaders()
    p200 = loaders["within_P200_B256"]
    assert p200.plan.batch_size == 32 and not p200.plan.drop_last and p200.plan.batching == "groups"
    assert p200.plan.group_spec["keys"] == ["dataset", "donor_id"]
    assert p200.maker.token_spec.max_tokens == 40
    donors = obs_of(dm, dm.val_sets["within_P200_B256"], "donor_id")
    for batch in p200:
        assert len({donors[int(f)][int(r)] for f, r in zip(batch.dataset, batch.row)}) == 1
        assert (np.diff(batch.cu_seqlens.numpy()) <= 41).all()
    p800 = loaders["within_P800_B256"]  # its own keys win: batch 256, null = no grouping
    assert p800.plan.batch_size == 256 and p800.plan.batching == "mixed" and p800.maker.token_spec.max_tokens == 800
    # the view filters are the training loader's only: the schema knows them there alone
    with pytest.raises(ConfigError) as err:
        make_dm(sharded_example, {"datamodule.dataset.val.within_P200_B256.qc_threshold": 0.1}).val_loaders()
    message = " ".join(str(err.value).split())
    assert "datamodule.dataset.val.within_P200_B256.qc_threshold" in message
    assert "datamodule.dataset.train.qc_threshold" in message  # where it belongs


# ---- limit_train_batches -----------------------------------------------------------------------
def test_limit_train_batches_shortens_the_epoch(sharded_example):
    full = make_dm(sharded_example, B16).train_loader().plan
    K = full.batches_per_epoch
    for limit, n in ((0.5, int(K * 0.5)), (3, 3), (1.0, K), (10**6, K)):
        plan = make_dm(sharded_example, B16 | {"model.training.limit_train_batches": limit}).train_loader().plan
        assert plan.batches_per_epoch == n
        for g in range(3 * n):  # epoch e is the first n batches of the full plan's epoch e
            e, k = divmod(g, n)
            a, b = plan.batch(g), full.batch(e * K + k)
            assert (
                (a.epoch, a.in_epoch) == (e, k)
                and np.array_equal(a.rows, b.rows)
                and np.array_equal(a.datasets, b.datasets)
            )
        assert (plan.digest == full.digest) == (n == K)
    with pytest.raises(DataError, match="limit_train_batches"):
        plan = BatchPlan(full.sets, 16, 0, limit=0.001)
