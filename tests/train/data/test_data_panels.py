"""Panel semantics, batch composition, ranks and per-source weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import data_module

from concept_config.data import PanelKeys
from concept_train.data import DataError
from concept_train.data.make.panels import TARGETED_ASSAY_GENES, DesignedPanel, PanelSampler, PanelSpec

GENES = np.arange(100, 100 + 20_000)  # a file's in-vocabulary genes (token ids)


def spec_of(
    selection="mixed", mixed_prob=0.25, size_min=0.02, size_max=60000, max_drop_rate=0.5, overlap=False, view2="random"
) -> PanelSpec:
    """A loader's PanelSpec from its panel keys (the schema's defaults for the others)."""
    keys = PanelKeys(
        panel_selection=selection,
        panel_selection_mixed_prob=mixed_prob,
        panel_size_min=size_min,
        panel_size_max=size_max,
        panel_max_drop_rate=max_drop_rate,
        panel_overlap=overlap,
        panel_view2=view2,
    )
    return PanelSpec.from_keys(keys, "datamodule.dataset.train")


def _draws(spec, designed=None, genes=GENES, n=300, species="hsapiens"):
    sampler = PanelSampler(spec, {species: designed or []})
    return [sampler.draw(np.random.default_rng([0, g, 1]), genes, species) for g in range(n)]


def test_random_panel_sizes_are_log_uniform_within_bounds_and_views_disjoint():
    spec = spec_of(selection="random", size_min=0.02, size_max=60000)
    sizes = []
    for p in _draws(spec):
        for view in (p.view1, p.view2):
            assert np.all(np.diff(view) > 0) and np.isin(view, GENES).all()
        assert len(np.intersect1d(p.view1, p.view2)) == 0
        assert 400 <= len(p.view1) <= 20_000 - 400  # 0.02 x 20,000 .. all but room for view 2
        assert len(p.view2) >= 1
        assert len(p.view2) <= 20_000 - len(p.view1)
        sizes.append(len(p.view1))
    # log-uniform over [400, 20000]: the median is near the geometric mean (~2,828), not the middle
    assert 1_800 < np.median(sizes) < 4_500


def test_fixed_size_panels():
    for p in _draws(spec_of(selection="random", size_min=200, size_max=200), n=20):
        assert len(p.view1) == 200 and len(p.view2) == 200


def test_overlap_true_draws_view2_from_all_genes_and_probability_mixes():
    overlapping = [
        len(np.intersect1d(p.view1, p.view2)) > 0
        for p in _draws(spec_of(selection="random", size_min=5000, size_max=5000, overlap=1.0), n=50)
    ]
    assert all(overlapping)
    kinds = [p.kind2 for p in _draws(spec_of(selection="random", overlap=0.5), n=200)]
    assert 60 < kinds.count("random-overlap") < 140


def test_designed_panels_mixed_probability_and_drop_rate():
    panel = DesignedPanel("immune", np.arange(100, 2100))  # 2,000 genes, all in the file
    draws = _draws(spec_of(selection="mixed", mixed_prob=0.25, max_drop_rate=0.5), [panel], n=400)
    designed = [p for p in draws if p.kind1 == "designed:immune"]
    assert 0.65 < len(designed) / len(draws) < 0.85  # random with probability 0.25
    kept = np.array([len(p.view1) / 2000 for p in designed])
    assert kept.min() >= 0.45 and kept.max() <= 1.0  # r ~ U(0, 0.5) dropped
    assert 0.70 < kept.mean() < 0.80  # E[1 - r] = 0.75
    for p in designed:
        assert np.isin(p.view1, panel.tokens).all() and len(np.intersect1d(p.view1, p.view2)) == 0
    assert all(p.kind1 == "designed:immune" for p in _draws(spec_of(selection="preselected"), [panel], n=30))


def test_targeted_assay_always_gets_random_panels():
    genes = np.arange(100, 100 + TARGETED_ASSAY_GENES - 1)
    panel = DesignedPanel("immune", np.arange(100, 600))
    assert {p.kind1 for p in _draws(spec_of(selection="preselected"), [panel], genes=genes, n=50)} == {"random"}


def test_loader_regex_filters_designed_panels_and_targeted_file_is_random(sharded_example):
    dm = data_module(
        sharded_example,
        [
            "datamodule.dataset.train.panel_filter_regex='immune|brain'",
            "datamodule.dataset.train.panel_selection=preselected",
            "datamodule.dataloader.train.batch_size=16",
            "datamodule.dataloader.train.num_workers=0",
        ],
    )
    loader = dm.train_loader()
    seen = set()
    for batch, _ in zip(loader, range(loader.plan.batches_per_epoch)):
        shard_set = dm.train_sets[int(batch.dataset[0])]
        seen.add((shard_set.dataset_id.split("/")[-1], batch.panel_kinds[0]))
        # every cell of the batch comes from one file and uses the batch's panels
        assert len(set(batch.dataset.tolist())) == 1
        assert np.isin(batch.panels[0].numpy(), shard_set.genes).all()
    kinds = {k for _, k in seen}
    assert kinds <= {"designed:immune_panel", "designed:brain_panel", "random"} and "designed:immune_panel" in kinds
    assert ("hs_targeted_c", "random") in seen and all(k == "random" for f, k in seen if f == "hs_targeted_c")
    assert all(k != "random" for f, k in seen if f != "hs_targeted_c")
    # no mouse panel matches `immune`: `preselected` refuses to start and names the species
    with pytest.raises(DataError, match=r"preselected.*mmusculus"):
        data_module(
            sharded_example,
            [
                "datamodule.dataset.train.panel_filter_regex=immune",
                "datamodule.dataset.train.panel_selection=preselected",
            ],
        ).train_loader()


def test_per_dataset_batches_come_from_one_file_in_proportion_to_size(sharded_example):
    dm = data_module(
        sharded_example, ["datamodule.dataloader.train.batch_size=10", "datamodule.dataloader.train.num_workers=0"]
    )
    loader = dm.train_loader()
    counts = np.zeros(len(dm.train_sets), int)
    for batch, _ in zip(loader, range(loader.plan.batches_per_epoch)):
        assert len(set(batch.dataset.tolist())) == 1
        counts[int(batch.dataset[0])] += 1
    np.testing.assert_array_equal(counts, [s.n_samples // 10 for s in dm.train_sets])


def test_mixed_batches_hold_one_species_from_many_files(sharded_example):
    dm = data_module(
        sharded_example,
        [
            "datamodule.dataset.train.batching=mixed",
            "datamodule.dataloader.train.batch_size=64",
            "datamodule.dataloader.train.num_workers=0",
        ],
    )
    loader = dm.train_loader()
    multi = 0
    for batch, _ in zip(loader, range(loader.plan.batches_per_epoch)):
        assert len(set(batch.species.tolist())) == 1
        species = {dm.train_sets[int(d)].species for d in batch.dataset}
        assert len(species) == 1
        multi += len(set(batch.dataset.tolist())) > 1
    assert multi == loader.plan.batches_per_epoch


def test_repeat_and_proportion_weights(sharded_example):
    base = ["datamodule.dataloader.train.batch_size=10", "datamodule.dataloader.train.num_workers=0"]
    plain = data_module(sharded_example, base).train_loader().plan
    repeated = data_module(sharded_example, base + ["+datamodule.split_synth_mmusculus.repeat=2"]).train_loader().plan
    mm = [i for i, s in enumerate(plain.sets) if s.species == "mmusculus"]
    assert [repeated.per_epoch[i] for i in mm] == [2 * plain.per_epoch[i] for i in mm]
    assert [repeated.per_epoch[i] for i in range(len(plain.sets)) if i not in mm] == [
        plain.per_epoch[i] for i in range(len(plain.sets)) if i not in mm
    ]
    # proportions must be given to every source
    with pytest.raises(DataError, match="proportion"):
        data_module(sharded_example, base + ["+datamodule.split_synth_mmusculus.proportion=0.5"]).train_loader()


def test_two_ranks_share_panels_and_split_the_global_batch(sharded_example):
    base = ["datamodule.dataloader.train.batch_size=16", "datamodule.dataloader.train.num_workers=0"]
    whole = data_module(sharded_example, base).train_loader()
    r0 = data_module(sharded_example, base, rank=0, world_size=2).train_loader()
    r1 = data_module(sharded_example, base, rank=1, world_size=2).train_loader()
    for a, b, w, _ in zip(r0, r1, whole, range(5)):
        assert a.index == b.index == w.index
        for v in range(2):
            assert a.panels[v].tolist() == b.panels[v].tolist() == w.panels[v].tolist()
        assert a.row.tolist() + b.row.tolist() == w.row.tolist() and a.n_cells == b.n_cells == 8
        assert a.dataset.tolist() + b.dataset.tolist() == w.dataset.tolist()
    with pytest.raises(DataError, match="cannot be shared evenly|cannot share evenly"):
        data_module(sharded_example, ["datamodule.dataloader.train.batch_size=15"], rank=0, world_size=2).train_loader()


def test_validation_loaders_are_fixed_and_budgeted(sharded_example):
    dm = data_module(sharded_example, ["datamodule.dataloader.val.within_P200_B256.num_samples=256"])
    loaders = dm.val_loaders()
    assert set(loaders) == {
        "within_P200_B256",
        "within_P800_B256",
        "within_P6400_B256",
        "designed_vs_rest_B256",
        "whole_cell_B256",
    }
    p200 = list(loaders["within_P200_B256"])
    assert len(p200) == 1 and p200[0].n_cells == 256  # the cell budget
    assert all(len(p) == 200 for p in p200[0].panels)
    again = list(loaders["within_P200_B256"])  # every pass is the same
    assert all(torch.equal(a, b) for a, b in zip(p200[0].tensors().values(), again[0].tensors().values()))
    other_run = data_module(sharded_example, ["datamodule.dataloader.val.within_P200_B256.num_samples=256", "seed=7"])
    third = list(other_run.val_loaders()["within_P200_B256"])  # the training seed does not matter
    assert all(torch.equal(a, b) for a, b in zip(p200[0].tensors().values(), third[0].tensors().values()))
    for batch in loaders["designed_vs_rest_B256"]:
        genes = dm.val_sets["designed_vs_rest_B256"][int(batch.dataset[0])].genes
        v1, v2 = (p.numpy() for p in batch.panels)
        assert batch.panel_kinds[0].startswith("designed:") and batch.panel_kinds[1] == "complement"
        np.testing.assert_array_equal(np.union1d(v1, v2), genes)
        assert len(np.intersect1d(v1, v2)) == 0
    for batch in loaders["whole_cell_B256"]:
        genes = dm.val_sets["whole_cell_B256"][int(batch.dataset[0])].genes
        np.testing.assert_array_equal(batch.panels[0].numpy(), genes)  # view 1 = every gene of the file
        assert len(batch.panels[1]) == 0 and not batch.items_mask.any()


def test_panel_curriculum_changes_the_panels_from_its_batch_on(sharded_example):
    base = ["datamodule.dataloader.train.batch_size=16", "datamodule.dataloader.train.num_workers=0"]
    phase = "+datamodule.dataset.train.panel_curriculum=[{from_batch:4,panel_size_max:0.1,panel_selection:random}]"
    plain = [b for b, _ in zip(data_module(sharded_example, base).train_loader(), range(12))]
    dm = data_module(sharded_example, base + [phase])
    staged = [b for b, _ in zip(dm.train_loader(), range(12))]
    for g, (a, b) in enumerate(zip(plain, staged)):
        assert torch.equal(a.dataset, b.dataset) and torch.equal(a.row, b.row)  # the same cells, in order
        if g < 4:  # before the phase: the very same batches
            assert all(torch.equal(x, y) for x, y in zip(a.tensors().values(), b.tensors().values()))
        else:  # from it on: small random panels (a targeted file's 10% is still >= 1 gene)
            n_genes = len(dm.train_sets[int(b.dataset[0])].genes)
            assert b.panel_kinds[0] == "random" and len(b.panels[0]) <= max(1, round(0.1 * n_genes))
    assert any(len(a.panels[0]) > 0.1 * len(dm.train_sets[int(a.dataset[0])].genes) for a in plain[4:])


@pytest.mark.parametrize(
    "phases,problem",
    [
        ("[{panel_size_max:0.1}]", "from_batch"),
        ("[{from_batch:5,panel_size:0.1}]", "unknown keys ['panel_size']"),
        ("[{from_batch:5,panel_size_max:0.1},{from_batch:5,panel_size_max:0.05}]", "greater than the previous"),
        ("[{from_batch:5,panel_selection:everything}]", "panel_selection"),
    ],
)
def test_malformed_panel_curriculum_names_the_phase(sharded_example, phases, problem):
    with pytest.raises(DataError) as err:
        data_module(sharded_example, [f"+datamodule.dataset.train.panel_curriculum={phases}"]).train_loader()
    text = " ".join(str(err.value).split())
    assert "panel_curriculum[" in text and problem in text
