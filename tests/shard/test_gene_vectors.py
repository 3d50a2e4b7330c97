"""`concept-shard gene-vectors`: co-expression vectors from the training shards, and training from them."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from helpers import ADVANCED, TINY, read_dataset, shard

from concept_shard.gene_vectors import _pick_rows
from concept_train.cli import main as train

TRAIN_FILES = [
    "hsapiens/synth_hsapiens/hs_blood_a",
    "hsapiens/synth_hsapiens/hs_lung_b",
    "hsapiens/synth_hsapiens/hs_targeted_c",
    "hsapiens/synth_hsapiens/hs_gut_d",
    "hsapiens/celltypist/celltypist_sample",
]  # DataModuleBasic's training loader


def _standardised_training_matrix(project, min_cells: int):
    """Every training cell as log1p(counts / n_counts x 10^4), genes seen in >= min_cells cells, each
    gene standardised: computed here from plain streaming reads, independently of the command."""
    rows = [s for d in TRAIN_FILES for s in read_dataset(project / "shards" / d)]
    size = 1 + max(int(s["genes"].max()) for s in rows)
    x = np.zeros((len(rows), size))
    for i, s in enumerate(rows):
        x[i, s["genes"].astype(np.int64)] = np.log1p(s["counts"] * 1e4 / s["n_counts"])
    used = np.flatnonzero((x != 0).sum(0) >= min_cells)
    z = x[:, used]
    z = (z - z.mean(0)) / z.std(0)
    return z, used


def test_vectors_are_the_top_components_of_the_training_cells_only(sharded_project_copy, capsys):
    project = sharded_project_copy
    assert shard("gene-vectors", project, "--dim", 16, "--no-progress") == 0
    out_dir = project / "references/embeddings/coexpression"
    assert f"PATH.PRETRAINED_VOCABULARY={out_dir} model.dim_pretrained_vocab=16" in capsys.readouterr().out
    meta = json.loads((out_dir / "gene_vectors.json").read_text())["species"]
    assert list(meta) == ["hsapiens"] and sorted(meta["hsapiens"]["datasets"]) == sorted(TRAIN_FILES)  # no val file
    table = pd.read_csv(out_dir / "hsapiens.csv", index_col=0)
    assert table.shape[1] == 16 and np.allclose(np.linalg.norm(table.to_numpy(), axis=1), 1, atol=1e-4)

    z, used = _standardised_training_matrix(project, min_cells=10)
    vocab = pd.read_csv(project / "references/vocabulary/token_mappings_per_specie/hsapiens.csv")
    ids = vocab.set_index("token").loc[used, "gene_id"].to_numpy()
    assert list(table.index) == list(ids) and meta["hsapiens"]["cells"] == z.shape[0]

    # the exact top-16 loadings (eigenvectors of the cells' Gram matrix), unit length per gene
    w, u = np.linalg.eigh(z @ z.T)
    u, s = u[:, ::-1][:, :16], np.sqrt(w[::-1][:16])
    exact = z.T @ u
    exact /= np.linalg.norm(exact, axis=1, keepdims=True)
    got = table.to_numpy(np.float64)
    pick = np.random.default_rng(0).choice(len(ids), 400, replace=False)
    cos_got, cos_exact = got[pick] @ got[pick].T, exact[pick] @ exact[pick].T
    # (randomized SVD: components near the 16th, close to the noise floor, mix a little; 0.014 here)
    assert np.abs(cos_got - cos_exact).mean() < 0.03, np.abs(cos_got - cos_exact).mean()
    assert abs(meta["hsapiens"]["variance_explained"] - (s**2).sum() / z.size) < 0.005

    # genes that vary together across cells get similar vectors (0.93 here); unrelated pairs much
    # less so (0.09: unit length lifts genes with little structure towards the first component)
    corr = np.corrcoef(z[:, pick].T)
    iu = np.triu_indices(len(pick), 1)
    order = np.argsort(corr[iu])
    top = (iu[0][order[-30:]], iu[1][order[-30:]])
    near_zero = (iu[0][np.abs(corr[iu]) < 0.01], iu[1][np.abs(corr[iu]) < 0.01])
    assert cos_got[top].mean() > 0.8 and abs(cos_got[near_zero].mean()) < 0.25, (
        cos_got[top].mean(),
        cos_got[near_zero].mean(),
    )

    # bad requests fail before anything is replaced: the vectors already there are kept byte for byte
    before = (out_dir / "hsapiens.csv").read_bytes()
    assert shard("gene-vectors", project, "--dim", 100000, "--no-progress") == 2
    assert "--dim: is 100000, not below --max-cells" in " ".join(capsys.readouterr().err.split())
    assert shard("gene-vectors", project, "--dim", 2000, "--no-progress") == 2  # more than the cells
    assert "smaller --dim" in " ".join(capsys.readouterr().err.split())
    assert (out_dir / "hsapiens.csv").read_bytes() == before
    assert sorted(p.name for p in out_dir.parent.iterdir()) == ["coexpression"]  # no temporary left

    # killed between its two renames: the next run puts the previous vectors back first
    out_dir.rename(out_dir.with_name(".coexpression.4242.old"))
    (out_dir.parent / ".coexpression.4242.tmp").mkdir()
    assert shard("gene-vectors", project, "--dim", 2000, "--no-progress") == 2
    assert (out_dir / "hsapiens.csv").read_bytes() == before
    assert sorted(p.name for p in out_dir.parent.iterdir()) == ["coexpression"]
    # a good run replaces them whole
    assert shard("gene-vectors", project, "--dim", 4, "--no-progress") == 0
    assert pd.read_csv(out_dir / "hsapiens.csv", index_col=0).shape[1] == 4
    assert json.loads((out_dir / "gene_vectors.json").read_text())["dim"] == 4
    assert sorted(p.name for p in out_dir.parent.iterdir()) == ["coexpression"]


def test_max_cells_samples_every_training_file_of_each_species_in_proportion(sharded_project_copy):
    project = sharded_project_copy
    assert shard("gene-vectors", project, *ADVANCED, "--dim", 8, "--max-cells", 600, "--no-progress") == 0
    out_dir = project / "references/embeddings/coexpression"
    meta = json.loads((out_dir / "gene_vectors.json").read_text())["species"]
    assert sorted(meta) == ["hsapiens", "mmusculus"]
    for species, m in meta.items():
        assert len(pd.read_csv(out_dir / f"{species}.csv", index_col=0)) == m["genes"] > 1000
        sizes = {
            d: json.loads((project / "shards" / d / "dataset.json").read_text())["cells_written"] for d in m["datasets"]
        }
        assert all(d.startswith(species + "/") and "_val_" not in d for d in sizes)
        taken, total = m["datasets"], sum(sizes.values())
        assert m["cells"] == sum(taken.values()) == min(600, total)
        for d, n in sizes.items():  # hypergeometric: standard deviation under 10 cells here
            assert abs(taken[d] - m["cells"] * n / total) < 40, (d, taken[d], n)


def test_a_small_sample_reads_only_the_shards_under_its_window(project, monkeypatch, capsys):
    from concept_shard.datasets import ShardStore

    assert shard("build", project, "shard.shard_size_limit=65536", "--no-progress") == 0  # 4-62 shards a file
    reads: list[tuple[str, str]] = []
    reader = ShardStore.reader

    def counting_reader(self, sf):
        read = reader(self, sf)
        return lambda name: reads.append((sf.dataset_id, name)) or read(name)

    monkeypatch.setattr(ShardStore, "reader", counting_reader)
    out_dir = project / "references/embeddings/coexpression"
    samples = {
        d: [int(s["samples"]) for s in json.loads((project / "shards" / d / "index.json").read_text())["shards"]]
        for d in TRAIN_FILES
    }

    def run(*args):
        reads.clear()
        assert shard("gene-vectors", project, "--dim", 4, "--min-cells", 2, "--no-progress", *args) == 0
        meta = json.loads((out_dir / "gene_vectors.json").read_text())["species"]["hsapiens"]
        shards = [(d, name) for d, name in reads if name.startswith("shard.")]
        assert len(set(shards)) == len(shards) == meta["shards_read"]  # each read once, and counted
        assert sorted(set(reads) - set(shards)) == sorted((d, "index.json") for d in TRAIN_FILES)
        assert len(reads) == len(shards) + len(TRAIN_FILES)  # index.json once a file
        assert meta["shards"] == sum(map(len, samples.values()))
        assert sorted(meta["datasets"]) == sorted(TRAIN_FILES) and sum(meta["datasets"].values()) == meta["cells"]
        held = sorted(samples[d][int(name.split(".")[1])] for d, name in shards)
        return meta, set(shards), held, (out_dir / "hsapiens.csv").read_bytes()

    meta, read, held, csv = run("--max-cells", 60)  # the shards of a 240-cell window, of 1,459 cells
    assert meta["cells"] == 60
    assert sum(held[:-2]) <= 4 * 60 and len(read) < meta["shards"] / 3, (len(read), held)
    assert f"(read {len(read)} of {meta['shards']} shards in" in capsys.readouterr().out
    assert run("--max-cells", 60)[1:] == (read, held, csv)  # the same seed: the same sample
    assert run("--max-cells", 60, "--seed", 1)[1] != read
    meta, read, held, _ = run("--max-cells", 60, "--spread", 1)
    assert meta["cells"] == 60 and sum(held[:-2]) <= 60 and len(read) <= 12, held
    # a sample of every cell reads every shard once and takes every cell, as it always did
    meta, read, _, _ = run("--max-cells", 100000)
    assert len(read) == meta["shards"] and meta["datasets"] == {d: sum(n) for d, n in samples.items()}


def test_every_cell_is_equally_likely_and_a_window_of_all_cells_draws_as_before():
    sizes = [[5, 3, 7], [2], [10, 1]]  # three files' shards
    hits = np.zeros(28)
    for seed in range(3000):
        rows = _pick_rows(sizes, 3, 2, np.random.default_rng(seed))
        assert sum(map(len, rows)) == 3 and all(len(np.unique(r)) == len(r) for r in rows)
        for r, first in zip(rows, (0, 15, 17)):
            hits[first + r] += 1
    assert np.abs(hits / 3000 - 3 / 28).max() < 0.025, hits / 3000  # 0.107 each; sd 0.006
    for max_cells, spread in ((28, 1), (1000, 1), (10, 3)):  # the window holds every cell
        rng, before = np.random.default_rng(7), np.random.default_rng(7)
        picked = np.sort(before.choice(28, min(max_cells, 28), replace=False))
        got = _pick_rows(sizes, max_cells, spread, rng)
        assert np.array_equal(np.concatenate([r + first for r, first in zip(got, (0, 15, 17))]), picked)
        assert rng.random() == before.random()  # the SVD's random directions do not change either


def test_a_damaged_dataset_is_named(sharded_project_copy, capsys):
    dataset = sharded_project_copy / "shards" / TRAIN_FILES[1]
    for f in dataset.glob("shard.*"):
        f.unlink()
    assert shard("gene-vectors", sharded_project_copy, "--no-progress") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{TRAIN_FILES[1]}: cannot be read (FileNotFoundError" in err and "concept-shard build" in err
    assert not (sharded_project_copy / "references/embeddings/coexpression").exists()


def test_unsharded_training_files_are_named(project, capsys):
    assert shard("gene-vectors", project, "--no-progress") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "datamodule.dataset.train.split" in err and "hs_blood_a" in err and "not sharded" in err
    assert f"concept-shard build {project}" in err
    assert not (project / "references/embeddings/coexpression").exists()


def test_training_starts_from_the_vectors_and_bad_settings_are_named(sharded_project_copy, capsys):
    project = sharded_project_copy
    assert shard("gene-vectors", project, "--dim", 8, "--name", "cx8", "--no-progress") == 0
    vectors = project / "references/embeddings/cx8"
    n_rows = len(pd.read_csv(vectors / "hsapiens.csv", index_col=0))
    n_genes = len(pd.read_csv(project / "references/vocabulary/token_mappings_per_specie/hsapiens.csv")) - 2
    capsys.readouterr()
    assert (
        train(
            [
                str(project),
                *TINY,
                f"PATH.PRETRAINED_VOCABULARY={vectors}",
                "model.dim_pretrained_vocab=8",
                "initialize.run_id=cx",
            ]
        )
        == 0
    )
    out = " ".join(capsys.readouterr().out.split())
    assert f"no vector for {n_genes - n_rows} of {n_genes} hsapiens genes" in out
    assert (project / "model_checkpoints/cx/checkpoints/latest").is_file()
    # resuming takes the tables from the checkpoint: the vectors may be gone by then
    vectors.rename(project / "vectors_moved")
    assert (
        train(
            [
                str(project),
                *TINY,
                f"PATH.PRETRAINED_VOCABULARY={vectors}",
                "model.dim_pretrained_vocab=8",
                "initialize.run_id=cx",
                "initialize.resume=True",
                "model.training.max_steps=5",
            ]
        )
        == 0
    )
    assert (project / "model_checkpoints/cx/checkpoints/latest").read_text().strip() == "step_5"
    (project / "vectors_moved").rename(vectors)

    assert train([str(project), *TINY, f"PATH.PRETRAINED_VOCABULARY={vectors}", "model.dim_pretrained_vocab=16"]) == 2
    assert "model.dim_pretrained_vocab: does not fit" in " ".join(capsys.readouterr().err.split())
    assert train([str(project), *TINY, f"PATH.PRETRAINED_VOCABULARY={project / 'nowhere'}"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "PATH.PRETRAINED_VOCABULARY" in err and "hsapiens.csv" in err and "concept-shard gene-vectors" in err
    bad = project / "bad_vectors"
    bad.mkdir()
    (bad / "hsapiens.csv").write_text("gene_id,v0\nENSG00000000003,not-a-number\n")
    assert train([str(project), *TINY, f"PATH.PRETRAINED_VOCABULARY={bad}", "model.dim_pretrained_vocab=1"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "PATH.PRETRAINED_VOCABULARY: holds a file that cannot be read as gene vectors" in err
    (bad / "hsapiens.csv").write_text("gene_id,v0\nENSG00000000003,0.5\nENSG00000000005,\n")  # an empty field
    assert train([str(project), *TINY, f"PATH.PRETRAINED_VOCABULARY={bad}", "model.dim_pretrained_vocab=1"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "1 row(s) with empty or non-finite values (first: ENSG00000000005)" in err


def test_an_index_that_does_not_hold_the_datasets_cells_is_refused():
    """datasets.index_problem, the training store's check of the index streaming read against its
    dataset.json: the message is the one it always gave. (Gene-vectors reads the index checked by
    integrity.check_index, which says the same: tests/shard/test_integrity.py.)"""
    from concept_shard.datasets import index_problem

    assert index_problem(7, 7) is None
    assert index_problem(7, 8).reason == "index.json lists 7 samples, dataset.json 8 cells"
