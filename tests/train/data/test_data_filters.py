"""The training loader's view filters (`feature_max_drop_rate`, `qc_threshold`,
`max_total_seq_length`), and exact resumption of grouped, filtered batches. Expected masks are
computed here from the unfiltered loader's batches (same seed: same cells, panels and views)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from dm_config import make_dm
from helpers import sequences

HERE = Path(__file__).parent
BASE = {
    "datamodule.dataloader.train.batch_size": 32,
    "datamodule.dataloader.train.num_workers": 0,
    "datamodule.dataset.train.max_tokens": 100,
}
TRAIN = "datamodule.dataset.train"


def _batches(project, settings, n, **kw):
    loader = make_dm(project, settings, **kw).train_loader()
    return [b for b, _ in zip(loader, range(n))]


def _lengths(batch):
    n = batch.n_cells
    seq = np.diff(batch.cu_seqlens.numpy()) - 1
    return np.stack([seq[:n], seq[n:]])


def test_qc_threshold_and_token_budget_mask_what_the_reference_masks(sharded_example):
    wide = BASE | {"datamodule.dataset.train.max_tokens": 5000}  # view lengths vary from cell to cell
    base = _batches(sharded_example, wide, 6)

    def sizes(b):
        return np.array([[len(b.panels[0])], [len(b.panels[1])]])

    # a threshold that splits the first batch, a budget that ends it half way
    qc = float(np.median((_lengths(base[0]) / sizes(base[0])).min(axis=0)))
    first = _lengths(base[0])
    budget = int(0.5 * first.sum(axis=0)[~(first <= sizes(base[0]) * qc).any(axis=0)].sum())
    filtered = _batches(
        sharded_example, wide | {f"{TRAIN}.qc_threshold": qc, f"{TRAIN}.max_total_seq_length": budget}, 6
    )
    by_qc = by_budget = interplay = 0
    for b, f in zip(base, filtered):
        assert b.index == f.index and torch.equal(b.row, f.row)
        assert all(torch.equal(p, q) for p, q in zip(b.panels, f.panels))
        lengths = _lengths(b)
        qc_mask = (lengths <= sizes(b) * qc).any(axis=0)
        over = np.cumsum(np.where(qc_mask, 0, lengths.sum(axis=0))) > budget  # QC-masked cells use no budget
        masked = qc_mask | over
        by_qc, by_budget = by_qc + qc_mask.sum(), by_budget + (over & ~qc_mask).sum()
        interplay += not np.array_equal(masked, qc_mask | (np.cumsum(lengths.sum(axis=0)) > budget))
        np.testing.assert_array_equal(f.items_mask.numpy(), b.items_mask.numpy() & ~masked)
        assert (_lengths(f)[:, ~masked] == lengths[:, ~masked]).all()
        kept = _lengths(f).sum(axis=0)
        assert kept.sum() <= budget and (kept[masked] == 0).all()  # masked cells are <cls> alone
        for (t, v, p), (t2, v2, p2) in zip(sequences(b), sequences(f)):
            if len(t2) > 1:
                assert np.array_equal(t, t2) and np.array_equal(v, v2) and np.array_equal(p, p2)
    assert 0 < by_qc < sum(x.n_cells for x in base) and by_budget > 0 and interplay > 0


def test_feature_drop_removes_candidate_genes_before_the_cut(sharded_example):
    wide = BASE | {"datamodule.dataset.train.max_tokens": 5000}  # every candidate gene is in the view
    base = _batches(sharded_example, wide, 6)
    dropped = _batches(sharded_example, wide | {f"{TRAIN}.feature_max_drop_rate": 0.8}, 6)
    fractions = []
    for b, d in zip(base, dropped):
        assert all(torch.equal(p, q) for p, q in zip(b.panels, d.panels))
        total = kept = 0
        for (t, v, _), (t2, v2, p2) in zip(sequences(b), sequences(d)):
            keep = np.isin(t[1:], t2[1:])
            assert np.array_equal(t2[1:], t[1:][keep]) and np.array_equal(v2[1:], v[1:][keep])  # same order, values
            assert np.array_equal(p2, np.arange(len(t2)))
            total, kept = total + len(t) - 1, kept + len(t2) - 1
        fractions.append(1 - kept / total)
    fractions = np.array(fractions)
    assert (
        (fractions <= 0.85).all() and fractions.std() > 0.02 and 0.15 < fractions.mean() < 0.65
    )  # r ~ U(0, 0.8) per batch
    # the drop with the cut: a view is the top max_tokens of the kept candidates
    cut = _batches(sharded_example, BASE | {f"{TRAIN}.feature_max_drop_rate": 0.8}, 3)
    for d, c in zip(dropped, cut):
        for (t, v, _), (t2, v2, _) in zip(sequences(d), sequences(c)):
            assert np.array_equal(t2, t[:101]) and np.array_equal(v2, v[:101])
    # every rank draws the same drops for its cells as one rank for the whole batch
    settings = BASE | {f"{TRAIN}.feature_max_drop_rate": 0.8, f"{TRAIN}.qc_threshold": 0.001}
    whole = _batches(sharded_example, settings, 2)
    halves = [_batches(sharded_example, settings, 2, rank=r, world_size=2) for r in (0, 1)]
    for w, h0, h1 in zip(whole, *halves):
        n = w.n_cells // 2
        ws = sequences(w)
        for r, h in enumerate((h0, h1)):
            hs = sequences(h)
            for i in range(n):
                for v in range(2):
                    assert np.array_equal(hs[v * n + i][0], ws[v * w.n_cells + r * n + i][0])
            assert torch.equal(h.items_mask, w.items_mask[r * n : (r + 1) * n])


def test_feature_drop_with_zero_filled_views(sharded_example):
    """`top`: a dropped expressed gene never comes back as a zero-valued filler."""
    settings = BASE | {"datamodule.gene_sampling_strategy": "top", f"{TRAIN}.feature_max_drop_rate": 0.9}
    dm = make_dm(sharded_example, settings)
    batch = next(iter(dm.train_loader()))
    n = batch.n_cells
    for i, (t, v, _) in enumerate(sequences(batch)):
        cell = i % n
        sample = dm.store.get(
            dm.store.index_of[dm.train_sets[int(batch.dataset[cell])].dataset_id], int(batch.row[cell])
        )
        expressed = set(np.asarray(sample["genes"]).tolist())
        assert not (set(t[1:][v[1:] == 0].tolist()) & expressed)
        assert np.isin(t[1:], batch.panels[i // n].numpy()).all()


def _run(project, out, take, *extra, workers=0):
    overrides = [
        f"{k}={json.dumps(v) if not isinstance(v, list) else '[' + ','.join(v) + ']'}"
        for k, v in (BASE | GROUPED).items()
    ]
    cmd = [
        sys.executable,
        str(HERE / "data_run.py"),
        str(project),
        str(out),
        "--take",
        str(take),
        *map(str, extra),
        *overrides,
        f"datamodule.dataloader.train.num_workers={workers}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


GROUPED = {
    "datamodule.dataloader.train.within_group_sampling": ["dataset", "donor_id"],
    "datamodule.dataloader.train.batch_size": 16,
    "datamodule.dataloader.train.num_samples": 1500,
    f"{TRAIN}.feature_max_drop_rate": 0.5,
    f"{TRAIN}.qc_threshold": 0.002,
    f"{TRAIN}.max_total_seq_length": 2500,
    "model.training.limit_train_batches": 0.5,
}


def test_resume_of_grouped_filtered_batches_is_bit_identical(sharded_example, tmp_path):
    dm = make_dm(sharded_example, BASE | GROUPED)
    K = dm.train_loader().plan.batches_per_epoch
    take, stop = K + 4, K // 2 + 1  # crosses an epoch; resumes mid-epoch
    # the state after `stop` batches, taken while the run goes on (its 2 workers hold later batches)
    _run(
        sharded_example,
        tmp_path / "full.pt",
        take,
        "--state-out",
        tmp_path / "state.json",
        "--state-at",
        stop,
        workers=2,
    )
    assert json.loads((tmp_path / "state.json").read_text())["position"] == stop
    _run(sharded_example, tmp_path / "tail.pt", take - stop, "--state-in", tmp_path / "state.json", workers=0)
    full, tail = (torch.load(tmp_path / f"{n}.pt") for n in ("full", "tail"))
    assert [b["index"] for b in full] == list(range(take))
    masked = 0
    for x, y in zip(full[:stop] + tail, full):
        assert x.keys() == y.keys() and x["index"] == y["index"]
        for k in x:
            if k != "index":
                assert torch.equal(x[k], y[k]), (x["index"], k)
        assert len(set(y["labels.donor_id"].tolist())) == 1
        masked += int((~y["items_mask"]).sum())
    assert masked > 0


def test_the_feature_drop_hash_is_splitmix64_and_gives_what_it_always_gave():
    """filters.py hashes with permutation.py's splitmix64 (one implementation): it matches a
    plain-Python splitmix64, and the draws are those the filter's own copy gave before."""
    from concept_train.data.make.filters import hashed_uniform
    from concept_train.data.order.permutation import splitmix64

    def reference(x: int) -> int:  # Vigna's splitmix64 step, in Python integers
        x = (x + 0x9E3779B97F4A7C15) % 2**64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
        return x ^ (x >> 31)

    states = [0, 1, 1234567, 2**63, 2**64 - 1]
    assert splitmix64(np.array(states, np.uint64)).tolist() == [reference(x) for x in states]
    assert hashed_uniform(7, 3, 1, np.array([0, 5, 1000]), np.array([2, 17, 59999])).tolist() == [
        0.6425684247772901,
        0.4946759733594118,
        0.8567511273804461,
    ]
    assert hashed_uniform(2**64 - 1, 0, 2, np.array([1]), np.array([1])).tolist() == [0.934249399215731]
