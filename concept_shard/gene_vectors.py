"""Co-expression gene vectors from a project's training shards (`concept-shard gene-vectors`).

The model can start its gene tables from pretrained vectors (`PATH.PRETRAINED_VOCABULARY`,
`model.dim_pretrained_vocab`). scConcept uses protein-language-model vectors; a project without
them can derive vectors from its own training data, as gene2vec-style methods do: genes that vary
together across cells get similar vectors. Here that is a truncated SVD of a sample of the
training cells' log1p(counts / library size x 10^4), each gene standardised, computed by a
randomized SVD on the sparse matrix (the centring and scaling stay implicit, so memory follows the
nonzeros, not cells x genes). A gene's vector is its row of V x S (its loadings on the top
components), scaled to unit length: its direction says which programs it belongs to.

Only the training loader's files are read (never a validation file), from complete shards made
with the current token mapping, under PATH.SHARDS_PATH or, when set, PATH.SHARDS_REMOTE (their
source files need not be on this machine). The sampled rows are read shard by shard into memory
(`mds.read_rows`): no streaming shared memory, no decompressed copies next to the shards. Memory
peaks near 24 bytes per sampled nonzero (50,000 cells of 2,500 genes: ~3 GB).

Which cells (`_pick_rows`): every training cell of a species is equally likely to be sampled
(max_cells / cells). When --spread x --max-cells covers every cell (the example project, any
corpus under 200,000 cells at the defaults) the sample is a uniform one of all cells, as it always
was, and reads every shard holding a sampled cell: nearly all of them. On a larger corpus a
uniform sample would still touch (and decompress) nearly every shard, so the sample is a cluster
sample instead: the shards of all files in a random order, a random window of spread x max_cells
cells over them, max_cells cells drawn uniformly from the window. Only the shards under the window
are read (about spread x max_cells / cells-per-shard of them, plus two at its ends; each file's
index.json is read once, as before). The trade-off: a shard is a contiguous block of one file's
rows, so the sample comes from fewer files and fewer parts of each file than a uniform one would
(10,000 cells at spread 4 from 32 MiB shards of ~4,000 cells: about a dozen shards, hence
at most that many files), and neighbouring cells of a file tend to be alike; each cell is still
as likely as any other, so means and co-expression are unbiased, only noisier. A larger --spread
reads more shards for a more diverse sample; --max-cells at least the cells reads everything.

Reading (`read_gene_vectors`) is here too: the trainer hands the model the table it returns,
for these vectors and for any others in the same format (scConcept's ESM2 vectors).

Output: `<PROJECT>/references/embeddings/<name>/` with `<species>.csv` (gene_id, then `dim`
floats; genes seen in fewer than `min_cells` sampled cells, or constant across them, get no row
and start at zero in the model) and `gene_vectors.json` (what they were computed from). The whole
directory is written under a temporary name and swapped in when every species is done, so a
failed run leaves the previous vectors as they were (and a run killed during the swap has them
put back by the next one: `_recover`).
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from concept_config.data import DataModuleKeys
from concept_config.project import PathKeys

from .cells import TARGET_SUM
from .datasets import Expectation, ShardStore
from .errors import ShardError, UserError
from .layout import write_json_atomic
from .mds import read_rows
from .splits import TRAIN_SPLIT, loader_sources
from .vocabulary import CLS, PAD, load_vocabulary

OVERSAMPLE = 16  # extra random directions of the randomized SVD (Halko et al. 2011)
POWER_ITERATIONS = 4


@dataclass
class GeneVectorSettings:
    name: str = "coexpression"
    dim: int = 64
    max_cells: int = 50_000
    min_cells: int = 10
    seed: int = 0
    spread: int = 4

    def check(self) -> None:
        for key, value, low in (
            ("--dim", self.dim, 1),
            ("--max-cells", self.max_cells, 2),
            ("--min-cells", self.min_cells, 1),
            ("--spread", self.spread, 1),
        ):
            if value < low:
                raise ShardError(key, f"is {value}.", f"Use at least {low}.")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ShardError("--name", f"is {self.name!r}.", "Use a plain directory name such as `coexpression`.")


@dataclass
class CellSample:
    """The sampled training cells of one species: log1p-normalised values over the kept genes."""

    x: sp.csr_matrix  # cells x kept genes (columns in token order)
    tokens: np.ndarray  # the kept genes' token ids
    mean: np.ndarray  # per kept gene, over the sampled cells (zeros included)
    sd: np.ndarray  # per kept gene, plus 1e-8
    per_dataset: dict[str, int]  # cells taken from each file
    shards_read: int = 0  # shards holding a sampled cell (the only ones read)
    shards: int = 0  # shards of the species' training files


def write_gene_vectors(
    paths: PathKeys, dm: DataModuleKeys, settings: GeneVectorSettings, progress: bool = True, log=print
) -> Path:
    """Compute and write the vectors of every species the training loader reads; returns the directory."""
    settings.check()
    if settings.dim >= settings.max_cells:
        raise ShardError(
            "--dim",
            f"is {settings.dim}, not below --max-cells {settings.max_cells}.",
            "Use a smaller --dim or a larger --max-cells.",
        )
    out_dir = Path(paths.PROJECT_PATH) / "references" / "embeddings" / settings.name
    _recover(out_dir, log)
    vocabs: dict = {}
    datasets = _training_datasets(paths, dm, vocabs)
    summary = {
        "dim": settings.dim,
        "seed": settings.seed,
        "max_cells": settings.max_cells,
        "spread": settings.spread,
        "min_cells": settings.min_cells,
        "normalisation": f"log1p(counts / n_counts x {TARGET_SUM:g}), each gene standardised",
        "species": {},
    }
    tables = {}
    for species in sorted(datasets):
        t0 = time.time()
        vocab = vocabs[species]
        rng = np.random.default_rng(settings.seed)
        sample = _sample_cells(datasets[species], vocab.size, settings, rng, progress)
        n_cells, n_genes = sample.x.shape
        if n_genes <= settings.dim or n_cells <= settings.dim:
            raise ShardError(
                "--dim",
                f"is {settings.dim}, but {species} has only {n_cells} sampled cells "
                f"and {n_genes} genes seen in at least {settings.min_cells} of them.",
                "Use a smaller --dim (or a lower --min-cells, or more training cells).",
            )
        t1 = time.time()
        vectors, explained = _svd_vectors(sample, settings.dim, rng)
        tables[species] = ([vocab.gene_id_of_token[int(t)] for t in sample.tokens], vectors)
        summary["species"][species] = {
            "file": f"{species}.csv",
            "cells": int(n_cells),
            "genes": int(n_genes),
            "variance_explained": round(float(explained), 4),
            "datasets": sample.per_dataset,
            "shards_read": sample.shards_read,
            "shards": sample.shards,
            "vocabulary_fingerprint": vocab.fingerprint,
        }
        used = sum(1 for n in sample.per_dataset.values() if n)
        files = f"{used:,} of {len(datasets[species]):,}" if used < len(datasets[species]) else f"{used:,}"
        log(
            f"[gene-vectors] {species}: {n_genes:,} genes x {settings.dim} from {n_cells:,} cells of "
            f"{files} training file(s), {explained:.1%} of the variance (read {sample.shards_read:,} "
            f"of {sample.shards:,} shards in {t1 - t0:.1f} s, "
            f"SVD {time.time() - t1:.1f} s)"
        )
    summary["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    _publish(out_dir, tables, summary)
    return out_dir


def _publish(out_dir: Path, tables: dict, summary: dict) -> None:
    """Write everything into a sibling temporary directory, then swap it in for out_dir.

    The swap is two renames (out_dir -> .<name>.<pid>.old, .tmp -> out_dir). If the second fails,
    the old directory goes back; if the process dies between them, `_recover` puts it back on the
    next run. The old directory is deleted only once the new one is in place.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    old = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for species, (gene_ids, vectors) in tables.items():
            _write_csv(tmp / f"{species}.csv", gene_ids, vectors)
        write_json_atomic(tmp / "gene_vectors.json", summary)
        if out_dir.exists():
            os.replace(out_dir, old)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if old.exists() and not out_dir.exists():
                os.replace(old, out_dir)
            raise
    except OSError as exc:
        raise ShardError(
            out_dir,
            f"could not be written ({type(exc).__name__}: {exc}); the previous vectors, if any, are kept.",
            "Check free space and permissions there, then re-run.",
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def _recover(out_dir: Path, log=print) -> None:
    """Undo what a killed run left: its temporary directory, or the previous vectors moved aside."""
    if not out_dir.parent.is_dir():
        return
    for leftover in sorted(out_dir.parent.glob(f".{out_dir.name}.*.old")):
        if not out_dir.exists():
            os.replace(leftover, out_dir)
            log(f"[gene-vectors] restored {out_dir} from {leftover.name}, left by an interrupted run")
        else:
            shutil.rmtree(leftover, ignore_errors=True)
    for leftover in out_dir.parent.glob(f".{out_dir.name}.*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)


def _training_datasets(paths: PathKeys, dm: DataModuleKeys, vocabs: dict) -> dict[str, list[dict]]:
    """{species: [{dataset_id, cells, read}]} of the training loader's files, each sharded with the
    current token mapping (filled into `vocabs`); `read(basename) -> bytes` reads its files."""
    sources, errors = loader_sources(paths, dm, TRAIN_SPLIT, "train")
    if errors:
        raise errors[0]
    if not sources:
        raise ShardError(TRAIN_SPLIT, "lists no files.", "Add files to the split YAMLs' train lists.")
    store = ShardStore.from_paths(paths)
    out: dict[str, list[dict]] = {}
    problems = []
    for sf, _ in sources:
        if sf.species not in vocabs:
            vocabs[sf.species] = load_vocabulary(Path(paths.GENE_MAPPINGS_PATH), sf.species)
        # the sources need not be here (shards copied or in object storage): the vocabulary decides
        record, shards, problem = store.check_with_index(sf, Expectation(vocabs[sf.species]))
        if problem is not None:
            problems.append(f"{sf.dataset_id} ({sf.name}): {problem.reason}")
        elif record["cells_written"] > 0:
            out.setdefault(sf.species, []).append(
                {
                    "dataset_id": sf.dataset_id,
                    "read": store.reader(sf),
                    "cells": record["cells_written"],
                    "index": shards,
                }
            )
    if problems:
        raise ShardError(
            TRAIN_SPLIT,
            f"names {len(problems)} file(s) without usable shards: "
            + "; ".join(problems[:10])
            + ("; ..." if len(problems) > 10 else "")
            + ".",
            f"Run `concept-shard build {paths.PROJECT_PATH}` (same --config-dir and overrides) first.",
        )
    if not out:
        raise ShardError(TRAIN_SPLIT, "names files whose shards hold no cells.", "Add training files with cells.")
    return out


def _sample_cells(
    datasets: list[dict], vocab_size: int, settings: GeneVectorSettings, rng, progress: bool
) -> CellSample:
    """A sample of the species' training cells (every cell equally likely; `_pick_rows`), kept to
    the genes seen in >= min_cells of them and not constant, with each kept gene's mean and
    standard deviation."""
    from tqdm import tqdm

    indexes = [d["index"] for d in datasets]  # checked against dataset.json (integrity.py)
    rows_of = _pick_rows(
        [[int(shard["samples"]) for shard in index] for index in indexes], settings.max_cells, settings.spread, rng
    )
    picked = sum(len(rows) for rows in rows_of)
    nnz = np.zeros(picked + 1, np.int64)
    genes, values, per_dataset = [], [], {}
    i = shards_read = 0
    with tqdm(
        total=picked,
        unit="cells",
        unit_scale=True,
        desc="gene-vectors",
        disable=not progress,
        mininterval=1 if os.isatty(2) else 30,
        dynamic_ncols=True,
    ) as bar:
        for d, rows, index in zip(datasets, rows_of, indexes):
            per_dataset[d["dataset_id"]] = int(len(rows))
            ends = np.cumsum([int(shard["samples"]) for shard in index])
            shards_read += len(np.unique(np.searchsorted(ends, rows, side="right")))
            with _named_if_damaged(d):
                for _, s in read_rows(d["read"], rows, ["genes", "counts", "n_counts"], index):
                    library = float(s["n_counts"])
                    if library > 0:  # (a cell without counts adds an empty row)
                        genes.append(s["genes"].astype(np.int32))
                        values.append(np.log1p(s["counts"].astype(np.float32) * np.float32(TARGET_SUM / library)))
                    i += 1
                    nnz[i] = nnz[i - 1] + (len(genes[-1]) if library > 0 else 0)
                    if i % 1024 == 0:
                        bar.update(1024)
            bar.update(i - bar.n)
    shards = sum(len(index) for index in indexes)
    indices, data = np.concatenate(genes), np.concatenate(values)
    del genes, values
    x = sp.csr_matrix((data, indices, nnz), shape=(picked, vocab_size))
    del indices, data
    n = x.shape[0]
    seen = np.bincount(x.indices, minlength=vocab_size)
    mean = np.bincount(x.indices, weights=x.data, minlength=vocab_size) / n
    square = np.bincount(x.indices, weights=np.square(x.data, dtype=np.float64), minlength=vocab_size) / n
    varies = square - mean**2 > 1e-10 * np.maximum(square, 1e-30)
    used = np.flatnonzero((seen >= settings.min_cells) & varies)
    sd = np.sqrt(np.maximum(square[used] - mean[used] ** 2, 0)) + 1e-8
    return CellSample(x[:, used].tocsr(), used, mean[used], sd, per_dataset, shards_read, shards)


@contextmanager
def _named_if_damaged(d: dict):
    """A failure to read dataset `d` (missing or corrupt shard files, a malformed index.json or one
    that disagrees with dataset.json) raised as a ShardError that names it."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        raise ShardError(
            d["dataset_id"],
            f"cannot be read ({type(exc).__name__}: {exc}).",
            "Rebuild it: `concept-shard build --verify` rebuilds every damaged dataset.",
        ) from None


def _pick_rows(shard_sizes: list[list[int]], max_cells: int, spread: int, rng) -> list[np.ndarray]:
    """Ascending rows to read of each file: min(max_cells, cells) of them in all, every cell as likely
    as any other (max_cells / cells) to be among them, from the shards of about spread x max_cells
    cells (`shard_sizes`: each file's shards' cells, in order).

    When spread x max_cells covers every cell: a uniform sample of all cells, drawn as it always was
    (the same rows, and `rng` moved on exactly as before, so the SVD's random directions and the
    vectors do not change). Otherwise cluster sampling: the shards of all files are laid end to end
    in a random order, the cells of each in a random order, and the window of spread x max_cells
    consecutive cells from a uniformly random start (wrapping round the end) is taken: a cell lies
    in it for window-many of the cells-many starts, whatever the order. max_cells of the window's
    cells are then drawn uniformly, so each cell is taken with probability max_cells / cells, and
    only shards under the window are read (those inside it and at most two it covers in part).
    """
    sizes = [np.asarray(s, np.int64) for s in shard_sizes]
    starts = np.concatenate([[0], np.cumsum([int(s.sum()) for s in sizes])])
    total = int(starts[-1])
    window = spread * max_cells
    if window >= total:
        picked = np.sort(rng.choice(total, min(max_cells, total), replace=False))
        return [picked[(picked >= starts[k]) & (picked < starts[k + 1])] - starts[k] for k in range(len(sizes))]
    unit_file = np.concatenate([np.full(len(s), k) for k, s in enumerate(sizes)])
    unit_first = np.concatenate([np.cumsum(s) - s for s in sizes])  # its first row in the file
    unit_size = np.concatenate(sizes)
    order = rng.permutation(len(unit_size))
    end = np.cumsum(unit_size[order])
    begin = end - unit_size[order]
    a = int(rng.integers(total))
    b = a + window  # the window [a, b), and [0, b - total) when it wraps
    covered = np.clip(np.minimum(end, b) - np.maximum(begin, a), 0, None)
    covered += np.clip(np.minimum(end, b - total) - begin, 0, None)
    units = order[covered > 0]
    rows = np.concatenate(
        [
            unit_first[u] + (rng.choice(unit_size[u], c, replace=False) if c < unit_size[u] else np.arange(c))
            for u, c in zip(units, covered[covered > 0])
        ]
    )
    files = np.repeat(unit_file[units], covered[covered > 0])
    take = rng.choice(window, max_cells, replace=False)
    rows, files = rows[take], files[take]
    return [np.sort(rows[files == k]) for k in range(len(sizes))]


def _svd_vectors(sample: CellSample, dim: int, rng) -> tuple[np.ndarray, float]:
    """Unit-length rows of V_k S_k of the standardised sample (cells x genes), and the share of the
    total variance the k components hold. Z = (x - 1 mu^T) / sd is never formed."""
    x, mu, sd = sample.x, sample.mean, sample.sd
    n = x.shape[0]

    def z_times(b):  # Z @ b, b: genes x l
        return x @ (b / sd[:, None]) - (mu / sd) @ b

    def zt_times(q):  # Z^T @ q, q: cells x l
        return (x.T @ q - np.outer(mu, q.sum(axis=0))) / sd[:, None]

    q = np.linalg.qr(z_times(rng.standard_normal((x.shape[1], dim + OVERSAMPLE))))[0]
    for _ in range(POWER_ITERATIONS):
        q = np.linalg.qr(z_times(np.linalg.qr(zt_times(q))[0]))[0]
    _, s, vt = np.linalg.svd(zt_times(q).T, full_matrices=False)
    loadings = vt[:dim].T * s[:dim]
    norms = np.linalg.norm(loadings, axis=1, keepdims=True)
    vectors = loadings / np.where(norms > 0, norms, 1)
    total_variance = float(n * np.count_nonzero(sd > 1e-8))  # every standardised gene holds n
    return vectors.astype(np.float32), float((s[:dim] ** 2).sum() / max(total_variance, 1e-12))


def _write_csv(path: Path, gene_ids: list[str], vectors: np.ndarray) -> None:
    with open(path, "w") as fh:
        fh.write("gene_id," + ",".join(f"v{i}" for i in range(vectors.shape[1])) + "\n")
        for gid, row in zip(gene_ids, vectors):
            fh.write(gid + "," + ",".join(f"{v:.6g}" for v in row) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


# ---- reading ---------------------------------------------------------------------------------
class GeneVectorWidthError(ValueError):
    """A gene-vector table whose width is not the model's `dim_pretrained_vocab`."""


def read_gene_vectors(path: Path, gene_id_of_token: list[str], dim: int, warn=print) -> np.ndarray:
    """The table [len(gene_id_of_token), dim] float32 from a `<species>.csv` (header, then rows of a
    gene id and `dim` floats; version suffixes of the ids are ignored). Genes without a row get
    zeros, reported once. Raises FileNotFoundError, GeneVectorWidthError, or ValueError for a file
    that is not such a table (an empty field would load as NaN and turn every loss into NaN)."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "no gene vectors", str(path))
    table = pd.read_csv(path, index_col=0)
    if table.shape[1] != dim:
        raise GeneVectorWidthError(f"{path}: {table.shape[1]} columns of floats, model.dim_pretrained_vocab is {dim}")
    values = table.to_numpy(np.float32)
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        raise ValueError(
            f"{path}: {int(bad.sum())} row(s) with empty or non-finite values "
            f"(first: {table.index[int(np.flatnonzero(bad)[0])]})"
        )
    row_of = {str(g).split(".")[0]: i for i, g in enumerate(table.index)}
    weight = np.zeros((len(gene_id_of_token), dim), np.float32)
    missing = 0
    for token, gene_id in enumerate(gene_id_of_token):
        row = row_of.get(gene_id)
        if row is None:
            missing += gene_id not in (CLS, PAD, "")
        else:
            weight[token] = values[row]
    if missing:
        warn(
            f"[model] {path}: no vector for {missing} of {len(gene_id_of_token) - 2} "
            f"{path.stem} genes; they start at zero."
        )
    return weight
