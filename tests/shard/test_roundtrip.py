"""Every cell read back with plain StreamingDataset equals its source row mapped through the vocabulary."""

from __future__ import annotations

import json
import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from helpers import ADVANCED, dataset_dirs, read_dataset, shard, streaming_dataset

OBS_KEYS = ["dataset", "donor_id", "tissue", "cell_type"]


def expected_cells(project: Path, info: dict) -> list[dict]:
    """Reference mapping, written independently of concept_shard: one row at a time."""
    vocab = pd.read_csv(project / info["vocabulary_file"], keep_default_na=False)
    token_of = dict(zip(vocab.gene_id, vocab.token))
    path = project / info["source_file"]
    adata = ad.read_zarr(path) if path.suffix == ".zarr" else ad.read_h5ad(path)
    matrix, var = (adata.raw.X, adata.raw.var) if adata.raw is not None else (adata.X, adata.var)
    ids = var[info["gene_id_column"]] if info["gene_id_column"] else var.index
    tokens = np.array([token_of.get(re.sub(r"\.\d+$", "", g), -1) for g in ids])
    matrix = sp.csr_matrix(matrix)
    cells = []
    for row in range(adata.n_obs):
        values = matrix[row].toarray().ravel()
        keep = np.flatnonzero((values != 0) & (tokens >= 0))
        if len(keep) == 0:
            continue
        order = np.argsort(tokens[keep])
        obs = {}
        for key in OBS_KEYS:
            v = adata.obs[key].iloc[row] if key in adata.obs else None
            obs[f"obs.{key}"] = "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)
        cells.append(
            dict(
                genes=tokens[keep][order],
                counts=values[keep][order],
                n_counts=values.sum(),
                cell_id=adata.obs_names[row],
                row=row,
                **obs,
            )
        )
    return cells


@pytest.fixture(scope="module")
def built(sharded_example, tmp_path_factory):
    """The example project built with DataModuleAdvanced: a copy of conftest's sharded_example (its
    fixture asserts the build's exit status 0); test_sharding_is_deterministic builds it afresh."""
    import shutil

    project = tmp_path_factory.mktemp("rt") / "project"
    shutil.copytree(sharded_example, project, symlinks=True)
    return project


def test_every_cell_round_trips(built):
    dirs = dataset_dirs(built)
    assert len(dirs) == 9  # 6 human files (celltypist + 5 synthetic), 3 mouse
    for ds_dir in dirs:
        info = json.loads((ds_dir / "dataset.json").read_text())
        got, want = read_dataset(ds_dir), expected_cells(built, info)
        assert len(got) == len(want) == info["cells_written"], ds_dir
        assert info["cells_written"] + info["cells_dropped"]["no_nonzero_in_vocabulary"] == info["n_cells_source"]
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g["genes"], w["genes"])
            np.testing.assert_array_equal(g["counts"], w["counts"])
            assert g["counts"].dtype.kind == "u" and g["n_counts"] == w["n_counts"]
            assert (g["cell_id"], g["row"]) == (w["cell_id"], w["row"])
            for key in OBS_KEYS:
                assert g[f"obs.{key}"] == w[f"obs.{key}"]


def test_dataset_json_contract(built):
    info = json.loads((built / "shards/hsapiens/synth_hsapiens/hs_gut_d/dataset.json").read_text())
    assert info["source_file"] == "data/synth_hsapiens/h5ads/hs_gut_d.zarr"
    assert info["matrix"] == "X" and info["matrix_format"] == "csr"
    assert info["genes"] == sorted(info["genes"]) and len(info["genes"]) > 10_000
    lung = json.loads((built / "shards/hsapiens/synth_hsapiens/hs_lung_b/dataset.json").read_text())
    assert lung["matrix"] == "raw/X" and lung["matrix_format"] == "csc"
    targeted = json.loads((built / "shards/hsapiens/synth_hsapiens/hs_targeted_c/dataset.json").read_text())
    assert targeted["matrix_format"] == "dense" and len(targeted["genes"]) < 10_000
    real = json.loads((built / "shards/hsapiens/celltypist/celltypist_sample/dataset.json").read_text())
    assert real["cells_written"] == 559 and real["genes_dropped"] > 0
    for key in (
        "format_version",
        "species",
        "source_name",
        "source_size",
        "source_fingerprint",
        "vocabulary_fingerprint",
        "cells_dropped",
        "genes_dropped",
        "shard_bytes",
    ):
        assert key in info
    assert info["shard_bytes"] / info["nonzeros"] <= 4.0


def test_species_index_streams_all_files(built):
    for species, n_files in (("hsapiens", 6), ("mmusculus", 3)):
        listing = json.loads((built / "shards" / species / "datasets.json").read_text())
        assert len(listing["datasets"]) == n_files
        ds = streaming_dataset(local=str(built / "shards" / species), shuffle=False, batch_size=1)
        assert len(ds) == sum(d["cells"] for d in listing["datasets"])


def test_sharding_is_deterministic(built, example_source, tmp_path):
    import shutil

    again = tmp_path / "again"
    shutil.copytree(example_source, again)
    assert shard("build", again, *ADVANCED, "--no-progress") == 0
    for ds_dir in dataset_dirs(built):
        rel = ds_dir.relative_to(built)
        for f in sorted(ds_dir.glob("shard.*.mds*")) + [ds_dir / "index.json"]:
            assert f.read_bytes() == (again / rel / f.name).read_bytes(), f


def test_rerun_skips_complete_datasets(built, capsys):
    before = {p: p.stat().st_mtime_ns for p in built.glob("shards/*/*/*/dataset.json")}
    assert shard("build", built, *ADVANCED, "--no-progress") == 0
    assert "0 built, 9 up to date" in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime_ns for p in built.glob("shards/*/*/*/dataset.json")}
