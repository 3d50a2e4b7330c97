"""Co-expression gene vectors from a project's training shards (`concept-shard gene-vectors`).

The model can start its gene tables from pretrained vectors (`PATH.PRETRAINED_VOCABULARY`,
`model.dim_pretrained_vocab`). scConcept uses protein-language-model vectors; a project without
them can derive vectors from its own training data, as gene2vec-style methods do: genes that vary
together across cells get similar vectors. Here that is a truncated SVD of a sample of the
training cells' log1p(counts / library size x 10^4), each gene standardised, computed by a
randomized SVD on the sparse matrix (the centring and scaling stay implicit, so memory follows the
nonzeros, not cells x genes). A gene's vector is its row of V x S (its loadings on the top
components), scaled to unit length: its direction says which programs it belongs to.

Only the training loader's files are read (never a validation file), from complete local shards
made with the current token mapping (their source files need not be on this machine). Output: `<PROJECT>/references/embeddings/<name>/<species>.csv` (gene_id, then
`dim` floats; genes seen in fewer than `min_cells` sampled cells get no row and start at zero in
the model), and `gene_vectors.json` saying what they were computed from. Every file is written
under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .errors import ShardError
from .layout import DatasetLayout, read_json, write_json_atomic
from .splits import loader_sources
from .vocabulary import load_vocabulary

TRAIN_SPLIT = "datamodule.dataset.train.split"
TARGET_SUM = 1e4          # the library size cells are scaled to before log1p (scanpy's usual choice)
OVERSAMPLE = 16           # extra random directions of the randomized SVD (Halko et al. 2011)
POWER_ITERATIONS = 4


@dataclass
class GeneVectorSettings:
    name: str = "coexpression"
    dim: int = 64
    max_cells: int = 50_000
    min_cells: int = 10
    seed: int = 0

    def check(self) -> None:
        for key, value, low in (("--dim", self.dim, 1), ("--max-cells", self.max_cells, 2), ("--min-cells", self.min_cells, 1)):
            if value < low:
                raise ShardError(key, f"is {value}.", f"Use at least {low}.")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ShardError("--name", f"is {self.name!r}.", "Use a plain directory name such as `coexpression`.")


def write_gene_vectors(cfg, settings: GeneVectorSettings, progress: bool = True, log=print) -> Path:
    """Compute and write the vectors of every species the training loader reads; returns the directory."""
    settings.check()
    vocabs: dict = {}
    datasets = _training_datasets(cfg, vocabs)
    out_dir = Path(cfg.PATH.PROJECT_PATH) / "references" / "embeddings" / settings.name
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"dim": settings.dim, "seed": settings.seed, "max_cells": settings.max_cells,
               "min_cells": settings.min_cells, "normalisation": f"log1p(counts / n_counts x {TARGET_SUM:g}), "
               "each gene standardised", "species": {}}
    for species in sorted(datasets):
        t0 = time.time()
        vocab = vocabs[species]
        rng = np.random.default_rng(settings.seed)
        matrix, used = _sample_matrix(datasets[species], vocab.size, settings, rng, progress)
        if len(used) <= settings.dim or matrix.shape[0] <= settings.dim:
            raise ShardError("--dim", f"is {settings.dim}, but {species} has only {matrix.shape[0]} sampled cells "
                             f"and {len(used)} genes seen in at least {settings.min_cells} of them.",
                             "Use a smaller --dim (or a lower --min-cells, or more training cells).")
        vectors, explained = _svd_vectors(matrix, settings.dim, rng)
        gene_of = {token: gid for gid, token in vocab.token_of.items()}
        path = out_dir / f"{species}.csv"
        _write_csv_atomic(path, [gene_of[int(t)] for t in used], vectors)
        summary["species"][species] = {
            "file": path.name, "cells": int(matrix.shape[0]), "genes": int(len(used)),
            "variance_explained": round(float(explained), 4),
            "datasets": [d["dataset_id"] for d in datasets[species]],
            "vocabulary_fingerprint": vocab.fingerprint}
        log(f"[gene-vectors] {species}: {len(used):,} genes x {settings.dim} from {matrix.shape[0]:,} cells of "
            f"{len(datasets[species])} training file(s), {explained:.1%} of the variance ({time.time() - t0:.1f} s) "
            f"-> {path}")
    summary["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json_atomic(out_dir / "gene_vectors.json", summary)
    return out_dir


def _training_datasets(cfg, vocabs: dict) -> dict[str, list[dict]]:
    """{species: [{dataset_id, dir, cells}]} of the training loader's files, each sharded locally
    with the current token mapping (filled into `vocabs`)."""
    sources, errors = loader_sources(cfg, TRAIN_SPLIT, "train")
    if errors:
        raise errors[0]
    if not sources:
        raise ShardError(TRAIN_SPLIT, "lists no files.", "Add files to the split YAMLs' train lists.")
    out: dict[str, list[dict]] = {}
    problems = []
    for sf, _ in sources:
        if sf.species not in vocabs:
            vocabs[sf.species] = load_vocabulary(Path(cfg.PATH.GENE_MAPPINGS_PATH), sf.species)
        layout = DatasetLayout(Path(cfg.PATH.SHARDS_PATH), sf)
        record = read_json(layout.dataset_json)
        if record is None:
            problems.append(f"{sf.dataset_id} ({sf.name}): not sharded (no {layout.dataset_json})")
        elif record.get("vocabulary_fingerprint") != vocabs[sf.species].fingerprint:
            problems.append(f"{sf.dataset_id} ({sf.name}): sharded with another token mapping")
        elif int(record.get("cells_written", 0)) > 0:
            out.setdefault(sf.species, []).append({"dataset_id": sf.dataset_id, "dir": layout.dataset_dir,
                                                   "cells": int(record["cells_written"])})
    if problems:
        raise ShardError(TRAIN_SPLIT, f"names {len(problems)} file(s) without usable local shards: "
                         + "; ".join(problems[:10]) + ("; ..." if len(problems) > 10 else "") + ".",
                         f"Run `concept-shard build {cfg.PATH.PROJECT_PATH}` (same --config-dir and overrides) "
                         "first; gene-vectors reads the shards under PATH.SHARDS_PATH.")
    if not out:
        raise ShardError(TRAIN_SPLIT, "names files whose shards hold no cells.", "Add training files with cells.")
    return out


def _sample_matrix(datasets: list[dict], vocab_size: int, settings: GeneVectorSettings, rng,
                   progress: bool) -> tuple[sp.csr_matrix, np.ndarray]:
    """A uniform sample of the species' training cells as CSR log1p-normalised values over the
    genes seen in >= min_cells of them (columns in token order), and those tokens."""
    from streaming import StreamingDataset
    from tqdm import tqdm

    sizes = np.array([d["cells"] for d in datasets])
    total = int(sizes.sum())
    picked = np.sort(rng.choice(total, min(settings.max_cells, total), replace=False))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    indptr, genes, values = [0], [], []
    with tqdm(total=len(picked), unit="cells", unit_scale=True, desc="gene-vectors", disable=not progress,
              mininterval=1 if os.isatty(2) else 30, dynamic_ncols=True) as bar:
        for k, d in enumerate(datasets):
            rows = picked[(picked >= starts[k]) & (picked < starts[k + 1])] - starts[k]
            if len(rows) == 0:
                continue
            ds = StreamingDataset(local=str(d["dir"]), shuffle=False, batch_size=1)
            for r in rows:
                s = ds[int(r)]
                genes.append(np.asarray(s["genes"], np.int64))
                values.append(np.log1p(np.asarray(s["counts"], np.float64) * (TARGET_SUM / max(int(s["n_counts"]), 1))))
                indptr.append(indptr[-1] + len(genes[-1]))
            bar.update(len(rows))
    x = sp.csr_matrix((np.concatenate(values), np.concatenate(genes), np.array(indptr)), shape=(len(picked), vocab_size))
    used = np.flatnonzero(np.bincount(x.indices, minlength=vocab_size) >= settings.min_cells)
    return x[:, used].tocsr(), used


def _svd_vectors(x: sp.csr_matrix, dim: int, rng) -> tuple[np.ndarray, float]:
    """Unit-length rows of V_k S_k of the standardised x (cells x genes), and the share of the
    total variance the k components hold. Z = (x - 1 mu^T) / sd is never formed."""
    n = x.shape[0]
    mu = np.asarray(x.mean(axis=0)).ravel()
    sd = np.sqrt(np.maximum(np.asarray(x.multiply(x).mean(axis=0)).ravel() - mu ** 2, 0)) + 1e-8
    xt = x.T.tocsr()

    def z_times(b):       # Z @ b, b: genes x l
        return x @ (b / sd[:, None]) - (mu / sd) @ b

    def zt_times(q):      # Z^T @ q, q: cells x l
        return (xt @ q - np.outer(mu, q.sum(axis=0))) / sd[:, None]

    q = np.linalg.qr(z_times(rng.standard_normal((x.shape[1], dim + OVERSAMPLE))))[0]
    for _ in range(POWER_ITERATIONS):
        q = np.linalg.qr(z_times(np.linalg.qr(zt_times(q))[0]))[0]
    _, s, vt = np.linalg.svd(zt_times(q).T, full_matrices=False)
    loadings = vt[:dim].T * s[:dim]
    norms = np.linalg.norm(loadings, axis=1, keepdims=True)
    vectors = loadings / np.where(norms > 0, norms, 1)
    total_variance = float(n * np.count_nonzero(sd > 1e-8))     # every standardised gene holds n
    return vectors.astype(np.float32), float((s[:dim] ** 2).sum() / max(total_variance, 1e-12))


def _write_csv_atomic(path: Path, gene_ids: list[str], vectors: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        fh.write("gene_id," + ",".join(f"v{i}" for i in range(vectors.shape[1])) + "\n")
        for gid, row in zip(gene_ids, vectors):
            fh.write(gid + "," + ",".join(f"{v:.6g}" for v in row) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def describe(out_dir: Path) -> str:
    """The overrides that train from the vectors in out_dir."""
    meta = json.loads((out_dir / "gene_vectors.json").read_text())
    return f"PATH.PRETRAINED_VOCABULARY={out_dir} model.dim_pretrained_vocab={meta['dim']}"
