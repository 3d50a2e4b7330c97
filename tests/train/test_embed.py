"""Cell embeddings: the CLI, the Python function and the trainer's validation path agree."""

from __future__ import annotations

import shutil

import anndata as ad
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from concept_shard.config import typed_config
from concept_shard.errors import UserError
from concept_train import embed, load_model
from concept_train.cli import main as train_main
from concept_train.data import DataModule
from concept_train.embedding import embed_source
from concept_train.embedding import main as embed_main

TINY = [
    "model.dim_model=16",
    "model.nlayers=1",
    "model.num_head=2",
    "model.dim_hid=32",
    "model.dim_gene_embs=16",
    "model.training.max_steps=2",
    "model.training.warmup=1",
    "model.training.val_check_interval=0",
    "model.training.validate_before_training=False",
    "datamodule.dataloader.train.batch_size=16",
    "datamodule.dataloader.train.num_workers=0",
    "datamodule=DataModuleAdvanced",
]


@pytest.fixture(scope="module")
def trained_run(sharded_example, tmp_path_factory):
    """One small run for the module's tests, trained once: they only read it (and the project's
    sources) and write their outputs under their own tmp_path."""
    project = tmp_path_factory.mktemp("embed") / "project"
    shutil.copytree(sharded_example, project, symlinks=True)
    assert train_main([str(project), *TINY, "initialize.run_id=emb"]) == 0
    return project, project / "model_checkpoints" / "emb"


def test_cli_api_and_validation_path_give_the_same_embeddings(trained_run, tmp_path):
    project, run = trained_run
    source = project / "data/synth_hsapiens/h5ads/hs_val_e.h5ad"
    out = tmp_path / "embedded.h5ad"
    assert embed_main([str(run), str(source), "--out", str(out), "--batch-size", "64"]) == 0
    written = ad.read_h5ad(out)
    z_cli = written.obsm["X_concept"]
    assert z_cli.shape == (written.n_obs, 16) and np.isfinite(z_cli).all()
    made = written.uns["concept"]["X_concept"]
    assert made["run_id"] == "emb" and int(made["step"]) == 2 and int(made["max_tokens"]) == 1000
    np.testing.assert_allclose(np.linalg.norm(z_cli, axis=1), 1.0, rtol=1e-5)

    loaded = load_model(run, device="cpu")
    z_api, species = embed_source(loaded, source, batch_size=100)  # other batching, same result
    assert species == "hsapiens"
    np.testing.assert_allclose(z_api, z_cli, rtol=1e-5, atol=1e-6)

    # embed(adata): an in-memory AnnData object, in place, and from the run directory directly
    adata = ad.read_h5ad(source)
    z_obj = embed(adata, loaded, batch_size=50)
    np.testing.assert_allclose(z_obj, z_cli, rtol=1e-5, atol=1e-6)
    assert adata.obsm["X_concept"] is z_obj and adata.uns["concept"]["X_concept"]["species"] == "hsapiens"
    subset = ad.read_h5ad(source)[:40].copy()
    np.testing.assert_allclose(embed(subset, run, device="cpu"), z_cli[:40], rtol=1e-5, atol=1e-6)

    # the trainer's validation path: the whole-cell loader (view 1 = all the file's genes), same model
    cfg = typed_config(OmegaConf.load(run / "config.yaml"))
    loader = DataModule(cfg, log=lambda *a: None).val_loaders()["whole_cell_B256"]
    checked = 0
    for batch in loader:
        if not all(s.endswith("hs_val_e") for s in [loader.maker.sets[int(d)].dataset_id for d in batch.dataset]):
            continue
        with torch.no_grad():
            z, _, _ = loaded.model(
                batch.tokens, batch.values, batch.positions, batch.cu_seqlens, batch.max_seqlen, "hsapiens"
            )
        np.testing.assert_allclose(z[: batch.n_cells].numpy(), z_cli[batch.row.numpy()], rtol=1e-4, atol=1e-5)
        checked += batch.n_cells
    assert checked >= 256


def test_the_default_is_the_whole_cell_concept_eval_scores(trained_run, tmp_path):
    """embed() used the training max_tokens (48 in the demo), concept-eval whole cells of 1,000
    genes: the embedding a user got scored worse than the report. Now both are the same array."""
    from concept_train.eval.cells import from_files
    from concept_train.eval.views import Embedder

    project, run = trained_run
    loaded = load_model(run, device="cpu")
    loaded.cfg.datamodule.dataset.train.max_tokens = 48  # as the demo: training views of 48 genes
    source = tmp_path / "cells.h5ad"  # 96 of the validation file's cells (the embedding is per cell)
    ad.read_h5ad(project / "data/synth_hsapiens/h5ads/hs_val_e.h5ad")[:96].copy().write_h5ad(source)
    cells = from_files(loaded, [source], None, None, 10_000, 0, {})
    scored = Embedder(loaded, cells).whole_cells()
    adata = ad.read_h5ad(source)
    z = embed(adata, loaded)
    assert len(scored) == adata.n_obs  # every cell has counts: all kept, in file order
    np.testing.assert_allclose(z, scored, rtol=1e-5, atol=1e-6)
    assert int(adata.uns["concept"]["X_concept"]["max_tokens"]) == 1000
    assert not np.allclose(embed(adata.copy(), loaded, max_tokens=48), z, atol=1e-3)  # the old default differs


def test_key_added_layer_and_copy_as_scanpy_and_scvi_tools_have_them(trained_run, tmp_path):
    project, run = trained_run
    loaded = load_model(run, device="cpu")
    adata = ad.read_h5ad(project / "data/synth_hsapiens/h5ads/hs_val_e.h5ad")[:64].copy()
    counts = adata.X.copy()
    z = embed(adata, loaded)
    # scvi-tools' habit: raw counts in layers["counts"], log1p in X (which embed refuses, naming the fix)
    adata.layers["counts"] = counts
    adata.X = np.log1p(counts)
    with pytest.raises(UserError) as err:
        embed(adata, loaded)
    assert "non-integral" in str(err.value) and "layer=" in str(err.value)
    copied = embed(adata, loaded, layer="counts", key_added="X_concept_counts", max_tokens=64, copy=True)
    assert "X_concept_counts" not in adata.obsm  # copy=True leaves the object as it was
    np.testing.assert_allclose(copied.obsm["X_concept_counts"], z, atol=0.5)  # (other max_tokens)
    np.testing.assert_allclose(
        embed(adata, loaded, layer="counts", key_added="X_c"), z, rtol=1e-5, atol=1e-6
    )  # the layer's counts are the cells' counts
    # provenance per key: the second embedding does not overwrite the first one's record
    made = copied.uns["concept"]
    assert made["X_concept"]["max_tokens"] == 1000 and made["X_concept_counts"]["max_tokens"] == 64
    assert made["X_concept_counts"]["counts"] == "layers['counts']" and len(made["X_concept"]["weights_digest"]) > 8
    with pytest.raises(UserError, match=r"no layer 'spliced' \(its layers: \['counts'\]\)"):
        embed(adata, loaded, layer="spliced")
    # the command line: --layer and --key-added, into a file that already had an embedding
    adata.write_h5ad(tmp_path / "in.h5ad")
    out = tmp_path / "out.h5ad"
    assert (
        embed_main([str(run), str(tmp_path / "in.h5ad"), "--out", str(out), "--layer", "counts", "--key-added", "Z"])
        == 0
    )
    written = ad.read_h5ad(out)
    np.testing.assert_allclose(written.obsm["Z"], z, rtol=1e-5, atol=1e-6)
    assert set(written.uns["concept"]) == {"X_concept", "X_c", "Z"} and set(written.obsm) >= {"X_concept", "Z"}


def test_species_is_inferred_and_ambiguity_is_an_error(trained_run, tmp_path):
    project, run = trained_run
    loaded = load_model(run, device="cpu")
    _, species = embed_source(loaded, project / "data/synth_mmusculus/h5ads/mm_val_c.h5ad")
    assert species == "mmusculus"
    adata = ad.read_h5ad(project / "data/synth_hsapiens/h5ads/hs_val_e.h5ad")
    adata.var_names = [f"GENE{i}" for i in range(adata.n_vars)]
    adata.write_h5ad(tmp_path / "no_ids.h5ad")
    with pytest.raises(UserError, match="--species"):
        embed_source(loaded, tmp_path / "no_ids.h5ad")


def test_embed_adata_reads_raw_counts_and_names_bad_columns(trained_run):
    project, run = trained_run
    loaded = load_model(run, device="cpu")
    path = project / "data/synth_hsapiens/h5ads/hs_lung_b.h5ad"  # X log1p (CSC), counts in .raw (CSC)
    z_file, _ = embed_source(loaded, path)
    adata = ad.read_h5ad(path)
    np.testing.assert_allclose(embed(adata, loaded), z_file, rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="no column 'ensembl'"):
        embed(adata, loaded, gene_id_column="ensembl")


@pytest.mark.parametrize(
    "where,expected",
    [
        ("missing/out.h5ad", "does not exist"),
        ("adir", "is a directory"),
        ("INPUT", "is the input itself"),
        ("out.txt", "not a .h5ad"),
    ],
)
def test_bad_output_paths_are_named_before_any_work(trained_run, tmp_path, where, expected, capsys):
    """They gave raw tracebacks after the embedding was computed, and left *.tmp files behind."""
    project, run = trained_run
    src = project / "data/synth_hsapiens/h5ads/hs_gut_d.zarr"
    (tmp_path / "adir").mkdir()
    out = src if where == "INPUT" else tmp_path / where
    assert embed_main([str(run), str(src), "--out", str(out)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "--out" in err and expected in err
    assert not list(tmp_path.rglob("*.tmp")) and not list(src.parent.glob("*.tmp"))


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--batch-size", "-1"], "batch_size (--batch-size): is -1"),
        (["--batch-size", "0"], "batch_size (--batch-size): is 0"),
        (["--max-tokens", "0"], "max_tokens (--max-tokens): is 0"),
        # beyond the rank encoding (model.pe_max_len 5000): genes ranked beyond shared one position
        (["--max-tokens", "5001"], "(--max-tokens): is 5001, but the model's rank encoding tells apart 5000"),
    ],
)
def test_sizes_out_of_range_are_refused_before_any_work(trained_run, tmp_path, args, expected, capsys):
    """`--batch-size -1` wrote all-NaN embeddings with exit 0."""
    project, run = trained_run
    src = project / "data/synth_hsapiens/h5ads/hs_gut_d.zarr"
    out = tmp_path / "out.h5ad"
    assert embed_main([str(run), str(src), "--out", str(out), *args]) == 2
    assert expected in " ".join(capsys.readouterr().err.split())
    assert not out.exists()
    adata = ad.read_zarr(src)
    with pytest.raises(UserError, match="not a positive integer"):
        embed(adata, run, batch_size="256")  # the API names a wrong type too, before loading the model
    assert "X_concept" not in adata.obsm


def test_row_chunks_read_every_row_in_order_after_one_transpose(tmp_path):
    """concept_shard.source.row_chunks, the chunked read of the embedder and the evaluator: the
    source's own chunk size, the CSC transpose prepared once over all rows, the last chunk short."""
    from concept_shard.source import row_chunks

    class Source:
        n_cells, prepared = 10, []

        def rows_per_read(self, chunk_size):
            return chunk_size - 1  # as a wide dense matrix reads fewer rows

        def csc_prepare(self, start, end, step, scratch):
            self.prepared.append((start, end, step, scratch))

    src = Source()
    assert list(row_chunks(src, 5, tmp_path)) == [(0, 4), (4, 8), (8, 10)]
    assert src.prepared == [(0, 10, 4, tmp_path)]
    assert list(row_chunks(type("Empty", (Source,), {"n_cells": 0})(), 5, tmp_path)) == []


def test_export_to_scconcepts_layout_embeds_the_same(trained_run, tmp_path):
    # concept-export writes our run in scConcept's layout; read back by the loader that reproduces
    # scConcept's forward pass (tests/train/scconcept: held to sc-concept's own outputs), it gives
    # the run's embeddings: scConcept's model computes what ours does
    from concept_train.scconcept.export import main as export_main

    project, run = trained_run
    source = project / "data/synth_hsapiens/h5ads/hs_val_e.h5ad"
    out = tmp_path / "for_scconcept"
    assert export_main([str(run), str(out)]) == 0
    theirs = load_model(out, device="cpu")
    assert theirs.model.cfg.scconcept_layout and theirs.step == 2
    ours = load_model(run, device="cpu")
    z_ours, _ = embed_source(ours, source, max_tokens=1000)
    z_theirs, _ = embed_source(theirs, source, max_tokens=1000)
    np.testing.assert_allclose(z_theirs, z_ours, rtol=0, atol=2e-6)


def test_the_species_is_the_vocabulary_sharing_most_ids_and_none_or_a_tie_is_named():
    from concept_shard.vocabulary import Vocabulary
    from concept_train.embedding import infer_species

    vocabs = {
        "hsapiens": Vocabulary("hsapiens", "hs.csv", {"ENSG1": 2, "ENSG2": 3}, 4, "a"),
        "mmusculus": Vocabulary("mmusculus", "mm.csv", {"ENSMUSG1": 2}, 3, "b"),
    }
    ids = np.array(["ENSG1.4", "ENSG2", "ENSMUSG1.1", 7], dtype=object)  # versions stripped, any id type
    assert infer_species(ids, vocabs, "cells.h5ad") == "hsapiens"
    for ids in (["x", "y"], ["ENSG1", "ENSMUSG1"]):
        with pytest.raises(UserError, match="cells.h5ad.*ambiguously or not at all") as err:
            infer_species(np.array(ids, dtype=object), vocabs, "cells.h5ad")
        assert "--species" in str(err.value)
