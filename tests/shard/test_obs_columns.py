"""Obs columns read in row chunks as strings, whatever encoding anndata wrote them in: the values
anndata itself reads, missing ones as "" (categoricals with unused codes, plain strings, nullable
strings, numbers, nullable integers, and an index of pandas' string dtype), from .h5ad and .zarr;
and the gene ids of a var index of that dtype."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from concept_shard.source import AnnDataSource

N = 23  # rows, read in chunks of 5


def _nullable():
    return pd.array([None if i == 0 else f"n{i}" for i in range(N)], dtype="string")


def _adata() -> ad.AnnData:
    ids = pd.Index([f"cell{i}" for i in range(N)], dtype="string")
    obs = pd.DataFrame(
        {
            "cat": pd.Categorical(["a", "b", None] * 7 + ["a", "b"]),
            "plain": np.array([f"p{i}" for i in range(N)], dtype=object),
            "nullable": _nullable(),
            "number": np.arange(N, dtype=np.float64),
            "nullable_int": pd.array([None if i == 3 else i for i in range(N)], dtype="Int64"),
        },
        index=ids,
    )
    X = sp.random(N, 7, density=0.5, format="csr", dtype=np.float32, random_state=0)
    var = pd.DataFrame(index=pd.Index([f"ENSG{i}.{i}" for i in range(7)], dtype="string"))
    return ad.AnnData(X=X, obs=obs, var=var)


def _expected(adata: ad.AnnData, key: str) -> list[str]:
    values = adata.obs.index if key == "index" else adata.obs[key]
    return ["" if pd.isna(v) else str(v) for v in values]


def _write(adata: ad.AnnData, path) -> None:
    """As anndata writes it, except `nullable`, which anndata would turn into a categorical (its
    strings repeat nothing but the missing value): written again as the nullable array it is."""
    with ad.settings.override(allow_write_nullable_strings=True):  # an opt-in before anndata 0.13
        if path.suffix == ".h5ad":
            adata.write_h5ad(path)
            import h5py

            root = h5py.File(path, "r+")
        else:
            adata.write_zarr(path)
            import zarr

            root = zarr.open_group(str(path), mode="r+", use_consolidated=False)
        del root["obs"]["nullable"]
        ad.io.write_elem(root["obs"], "nullable", _nullable())  # (writing made adata's a categorical)
        if hasattr(root, "close"):
            root.close()
        else:
            zarr.consolidate_metadata(str(path))


@pytest.mark.parametrize("suffix", [".h5ad", ".zarr"])
def test_obs_chunks_read_as_anndata_reads_them(tmp_path, suffix):
    path = tmp_path / f"cells{suffix}"
    written = _adata()
    _write(written, path)
    back = ad.read_h5ad(path) if suffix == ".h5ad" else ad.read_zarr(path)
    source = AnnDataSource(path)
    # the encodings this test is about
    obs = source.root["obs"]
    kinds = {k: dict(obs[k].attrs).get("encoding-type") for k in ("cat", "nullable", dict(obs.attrs)["_index"])}
    assert kinds == {"cat": "categorical", "nullable": "nullable-string-array", "_index": "nullable-string-array"}
    var = source.root["var"]
    assert dict(var[dict(var.attrs)["_index"]].attrs)["encoding-type"] == "nullable-string-array"
    assert source.gene_ids().tolist() == back.var_names.tolist()
    keys = ["cat", "plain", "nullable", "number", "nullable_int"]
    ids, values = [], {k: [] for k in keys}
    for a in range(0, N, 5):
        cell_ids, chunk, absent = source.obs_strings([*keys, "absent"], a, min(a + 5, N))
        assert absent == ["absent"] and chunk["absent"] == [""] * (min(a + 5, N) - a)
        ids += cell_ids
        for k in keys:
            values[k] += chunk[k]
    assert ids == _expected(back, "index")
    for k in keys:
        assert values[k] == _expected(back, k), k
    assert values["nullable"][0] == values["cat"][2] == values["nullable_int"][3] == ""
