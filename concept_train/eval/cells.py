"""The cells `concept-eval` scores: read from .h5ad/.zarr files or from the validation shards of the
run's project, as raw counts over the run's vocabulary plus their obs columns.

All inputs must be of one species, given or inferred from the gene ids as `concept-embed` does; an
input of another species is refused by name (embeddings of two species' cells are not comparable in
one scIB table). At most `max_cells` cells are kept, a uniform sample over all inputs (seeded). The
counts of the kept cells are held in memory as CSR (the PCA baseline and the panel views need
them: ~12 bytes per nonzero, 10,000 cells of 2,000 genes ~0.25 GB); files are read in row chunks,
shards shard by shard (`concept_shard.mds.read_rows`: no streaming, no decompressed copies).
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from concept_shard.cells import build_gene_map, map_chunk
from concept_shard.datasets import Expectation, ShardStore
from concept_shard.errors import TrainError
from concept_shard.integrity import Damaged
from concept_shard.mds import read_rows
from concept_shard.source import AnnDataSource, _attr, row_chunks
from concept_shard.splits import loader_sources

from ..embedding import infer_species


@dataclass
class EvalCells:
    """Kept cells as CSR over the vocabulary (token ids ascending within each cell)."""

    species: str
    indptr: np.ndarray  # int64 [n + 1]
    genes: np.ndarray  # int64 token ids
    counts: np.ndarray  # float64 raw values
    n_counts: np.ndarray  # float64 library size per cell
    obs: pd.DataFrame  # str columns, "" for missing; `dataset` = the input's name
    input_of: np.ndarray  # int64: index into `inputs` per cell
    inputs: list[str] = field(default_factory=list)
    input_genes: list[np.ndarray] = field(default_factory=list)  # per input: its in-vocabulary tokens
    input_cells: list[int] = field(default_factory=list)  # per input: cells it holds (before sampling)

    @property
    def n_cells(self) -> int:
        return len(self.n_counts)


class _Collector:
    """Accumulates the kept cells of each input, in input order."""

    def __init__(self):
        self.genes, self.counts, self.lengths, self.n_counts, self.obs, self.input_of = [], [], [], [], [], []

    def add(self, index: int, genes, counts, n_counts: float, obs: dict) -> None:
        self.genes.append(np.asarray(genes, np.int64))
        self.counts.append(np.asarray(counts, np.float64))
        self.lengths.append(len(self.genes[-1]))
        self.n_counts.append(float(n_counts))
        self.obs.append(obs)
        self.input_of.append(index)

    def cells(self, species: str, inputs, input_genes, input_cells) -> EvalCells:
        indptr = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])
        obs = pd.DataFrame(self.obs).fillna("").astype(str)
        return EvalCells(
            species,
            indptr,
            np.concatenate(self.genes) if self.genes else np.zeros(0, np.int64),
            np.concatenate(self.counts) if self.counts else np.zeros(0),
            np.asarray(self.n_counts, np.float64),
            obs,
            np.asarray(self.input_of, np.int64),
            inputs,
            input_genes,
            input_cells,
        )


def _sample(sizes: list[int], max_cells: int, seed: int) -> list[np.ndarray]:
    """Per input, the ascending rows kept: all, or a uniform sample of max_cells over all inputs."""
    total = int(sum(sizes))
    picked = (
        np.arange(total)
        if total <= max_cells
        else np.sort(np.random.default_rng(seed).choice(total, max_cells, replace=False))
    )
    starts = np.concatenate([[0], np.cumsum(sizes)])
    return [picked[(picked >= starts[k]) & (picked < starts[k + 1])] - starts[k] for k in range(len(sizes))]


def _obs_keys(src: AnnDataSource) -> list[str]:
    obs = src.root["obs"]
    index = _attr(obs, "_index")
    return sorted(k for k in obs.keys() if k != index and not k.startswith("__"))


def _require(required: dict[str, str], columns: list[str], where) -> None:
    """Every required obs key ({flag: key}) is a column (`dataset` always is: the input's name)."""
    for flag, key in required.items():
        if key not in columns and key != "dataset":
            raise TrainError(
                where,
                f"has no obs column '{key}' ({flag}); its obs columns are {sorted(columns)}.",
                f"Pass one of them with {flag}.",
            )


def from_files(
    loaded,
    paths: list[Path],
    species: str | None,
    gene_id_column: str | None,
    max_cells: int,
    seed: int,
    required: dict[str, str],
    chunk_size: int = 4096,
    progress=None,
) -> EvalCells:
    """The kept cells of .h5ad/.zarr files, read in row chunks."""
    allow_non_integral = loaded.cfg.shard.allow_non_integral
    with contextlib.ExitStack() as stack:
        sources = [stack.enter_context(AnnDataSource(Path(p), gene_id_column)) for p in paths]
        for src in sources:  # before reading any counts
            _require(required, _obs_keys(src), src.path)
        species_of = [species or infer_species(src.gene_ids(), loaded.vocabs, src.path) for src in sources]
        species = _one_species(species, species_of, [str(p) for p in paths], loaded)
        vocab = loaded.vocabs[species]
        keep = _sample([src.n_cells for src in sources], max_cells, seed)
        out, input_genes = _Collector(), []
        scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="concept-eval-"))
        for k, src in enumerate(sources):
            gene_map = build_gene_map(src.path, src.gene_ids(), vocab, gene_id_column)
            input_genes.append(np.asarray(gene_map.tokens, np.int64))
            keys, name = _obs_keys(src), src.path.name
            rows = keep[k]
            for a, b in row_chunks(src, chunk_size, Path(scratch)):
                mine = rows[(rows >= a) & (rows < b)]
                if len(mine) == 0:
                    continue
                chunk = map_chunk(src.path, src.read_rows(a, b), a, gene_map, vocab, allow_non_integral)
                at = np.full(b - a, -1)
                at[chunk.local] = np.arange(len(chunk.local))
                _, values, _ = src.obs_strings(keys, a, b)
                for r in mine:
                    i = at[r - a]
                    obs = {key: values[key][r - a] for key in keys}
                    obs.setdefault("dataset", name)
                    if i < 0:  # a cell without any in-vocabulary count: no embedding, left out
                        continue
                    lo, hi = chunk.indptr[i], chunk.indptr[i + 1]
                    out.add(k, chunk.genes[lo:hi], chunk.counts[lo:hi], chunk.n_counts[i], obs)
                if progress is not None:
                    progress(len(mine))
        return out.cells(species, [str(p) for p in paths], input_genes, [src.n_cells for src in sources])


def from_validation_shards(
    loaded, species: str | None, max_cells: int, seed: int, required: dict[str, str], progress=None
) -> EvalCells:
    """The kept cells of the run's validation files (every validation loader's), from their shards."""
    cfg = loaded.cfg
    files, seen = [], set()
    for name in cfg.datamodule.dataset.val:
        found, errors = loader_sources(cfg.PATH, cfg.datamodule, f"datamodule.dataset.val.{name}.split", "val")
        if errors:
            raise errors[0]
        files += [sf for sf, _ in found if sf.dataset_id not in seen and not seen.add(sf.dataset_id)]
    if not files:
        raise TrainError(
            "datamodule.dataset.val",
            f"of run {loaded.run_id} names no validation files.",
            "Pass the files to evaluate: concept-eval RUN FILE.h5ad ...",
        )
    present = sorted({sf.species for sf in files})
    species = species or present[0]
    if species not in present:
        raise TrainError(
            "--species", f"is '{species}', but the validation files are of {present}.", f"Use one of {present}."
        )
    files = [sf for sf in files if sf.species == species]
    store = ShardStore.from_paths(cfg.PATH)
    records = []
    for sf in files:
        record, problem = store.check(sf, Expectation(loaded.vocabs[species]))
        if problem is not None:
            raise TrainError(
                sf.dataset_id,
                f"({sf.name}) has no usable shards: {problem.reason}",
                f"Run `concept-shard build {cfg.PATH.PROJECT_PATH}` first, or pass the files.",
            )
        present = [k for k in record.get("obs_keys", []) if k not in record.get("obs_keys_absent", [])]
        _require(required, present, f"{sf.path} (shards {sf.dataset_id})")
        records.append(record)
    keep = _sample([int(r["cells_written"]) for r in records], max_cells, seed)
    out = _Collector()
    for k, (sf, record) in enumerate(zip(files, records)):
        keys = list(record.get("obs_keys", []))
        columns = ["genes", "counts", "n_counts", *(f"obs.{k}" for k in keys)]
        try:
            for _, s in read_rows(store.reader(sf), keep[k], columns):
                obs = {key: str(s[f"obs.{key}"]) for key in keys}
                obs["dataset"] = obs.get("dataset") or sf.name  # as training: the file, without such a column
                out.add(k, s["genes"], s["counts"], s["n_counts"], obs)
        except Damaged as exc:
            raise TrainError(
                sf.dataset_id,
                f"({sf.name}) is damaged: {exc}.",
                f"Run `concept-shard build {cfg.PATH.PROJECT_PATH} --verify`: it rebuilds damaged datasets.",
            ) from None
        if progress is not None:
            progress(len(keep[k]))
    return out.cells(
        species,
        [f"{sf.name} (shards {sf.dataset_id})" for sf in files],
        [np.asarray(r["genes"], np.int64) for r in records],
        [int(r["cells_written"]) for r in records],
    )


def _one_species(given: str | None, species_of: list[str], labels: list[str], loaded) -> str:
    if given is not None and given not in loaded.vocabs:
        raise TrainError(
            "--species",
            f"is '{given}', which run {loaded.run_id} was not trained on.",
            f"Use one of {sorted(loaded.vocabs)}.",
        )
    first = given or species_of[0]
    for label, sp in zip(labels, species_of):
        if sp != first:
            raise TrainError(
                label,
                f"holds {sp} cells, but this evaluation is of {first} cells.",
                "Evaluate each species on its own (one concept-eval per species).",
            )
    return first
