"""Cell embeddings from a trained run: `concept-embed RUN_OR_CHECKPOINT INPUT --out OUT` and `embed()`.

A cell is tokenized exactly as in training: its nonzero in-vocabulary genes (the panel is the
whole vocabulary), normalised as the run's `datamodule.normalization`, the top `max_tokens` by
value with ties by token id, after `<cls>`. The input is read in row chunks with the sharder's
reader (CSR, CSC, dense, `raw/X` first, `.zarr`), so a file larger than memory works; the
embeddings (L2-normalised, float32) go to `obsm["X_concept"]` of a copy of the input, with the
run id and checkpoint step in `uns["concept"]`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from concept_shard.cells import build_gene_map, map_chunk
from concept_shard.errors import ShardError
from concept_shard.source import AnnDataSource
from concept_shard.splits import SourceFile
from concept_shard.vocabulary import Vocabulary, load_vocabulary, strip_version

from .data.tokenize import Cells, TokenSpec, normalized, pack, select_view
from .model import ContrastiveModel, ModelConfig
from .trainer.checkpoint import latest_checkpoint


@dataclass
class LoadedModel:
    model: ContrastiveModel
    cfg: object
    run_id: str
    step: int
    checkpoint: Path
    vocabs: dict[str, Vocabulary]      # the run's species -> token mapping, loaded once


def load_model(run_or_checkpoint, device: str | torch.device | None = None) -> LoadedModel:
    """A run directory (its latest checkpoint) or a `checkpoints/step_<N>` directory -> model in eval mode."""
    import torch.distributed.checkpoint as dcp

    path = Path(run_or_checkpoint)
    ckpt = latest_checkpoint(path) or (path if (path / "trainer_state.json").is_file() else None)
    if ckpt is None:
        raise ShardError(path, "is neither a run directory with a complete checkpoint nor a checkpoint directory.",
                         "Pass PATH.CHECKPOINT_ROOT/<run_id> or .../checkpoints/step_<N>.")
    run_dir = ckpt.parent.parent
    cfg = OmegaConf.load(run_dir / "config.yaml")
    vocabs = {sp: load_vocabulary(Path(cfg.PATH.GENE_MAPPINGS_PATH), sp) for sp in cfg.datamodule.species}
    model = ContrastiveModel(ModelConfig.from_config(cfg.model, {sp: v.size for sp, v in vocabs.items()}, pretrained=bool(cfg.PATH.get("PRETRAINED_VOCABULARY"))))
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():      # "torch.distributed is disabled ... single process": intended here
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(ckpt))
    model.load_state_dict(state["model"])
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    state_json = json.loads((ckpt / "trainer_state.json").read_text())
    return LoadedModel(model.to(device).eval(), cfg, str(state_json.get("run_id", run_dir.name)), int(state_json["step"]),
                       ckpt, vocabs)


def infer_species(gene_ids: np.ndarray, vocabs: dict[str, Vocabulary], path) -> str:
    ids = {strip_version(str(g)) for g in gene_ids}
    overlap = {sp: len(ids & v.token_of.keys()) for sp, v in vocabs.items()}
    best = max(overlap.values()) if overlap else 0
    winners = [sp for sp, n in overlap.items() if n == best]
    if best == 0 or len(winners) > 1:
        raise ShardError(path, f"matches the species vocabularies ambiguously or not at all (shared gene ids: {overlap}).",
                         "Pass --species (and --gene-id-column if the Ensembl ids are in a var column).")
    return winners[0]


class AnnDataObjectSource:
    """An in-memory (or backed) AnnData object behind the reader interface of `AnnDataSource`:
    counts from `.raw` when it is set, else `X` (the sharder's rule), read in row chunks."""

    def __init__(self, adata, gene_id_column: str | None = None, label: str = "AnnData object"):
        import scipy.sparse as sp

        has_raw = adata.raw is not None
        self.X = adata.raw.X if has_raw else adata.X
        if sp.issparse(self.X) and self.X.format == "csc":
            self.X = self.X.tocsr()          # row slices of CSC are O(nnz) each
        var = adata.raw.var if has_raw else adata.var
        where = "adata.raw.var" if has_raw else "adata.var"
        if gene_id_column is None:
            self._ids = np.asarray(var.index.astype(str))
        elif gene_id_column not in var.columns:
            raise ShardError(label, f"has no column '{gene_id_column}' in {where} (columns: {list(var.columns)}).",
                             "Pass gene_id_column=None to use var_names, or the column that holds the Ensembl ids.")
        else:
            self._ids = np.asarray(var[gene_id_column].astype(str))
        self.n_cells = int(self.X.shape[0])

    def gene_ids(self) -> np.ndarray:
        return self._ids

    def rows_per_read(self, chunk_size: int) -> int:
        return chunk_size

    def csc_prepare(self, *args) -> None:
        pass

    def read_rows(self, start: int, end: int):
        import scipy.sparse as sp

        return sp.csr_matrix(self.X[start:end])


@torch.no_grad()
def embed_rows(loaded: LoadedModel, src, label, species: str | None = None, gene_id_column: str | None = None,
               batch_size: int = 256, max_tokens: int | None = None, chunk_size: int = 4096,
               progress=None) -> tuple[np.ndarray, str]:
    """(embeddings [n_cells, d] float32, species) of every row of an open source (`AnnDataSource`
    or `AnnDataObjectSource`); `label` names it in errors. Rows without any in-vocabulary nonzero
    gene get NaN embeddings."""
    cfg = loaded.cfg
    if species is not None and species not in loaded.vocabs:
        raise ShardError(label, f"was given species '{species}', which run {loaded.run_id} was not trained on.",
                         f"Use one of {sorted(loaded.vocabs)}.")
    spec = TokenSpec(max_tokens=int(max_tokens or cfg.datamodule.dataset.train.max_tokens),
                     normalization=str(cfg.datamodule.get("normalization", "raw")),
                     strategy="top-nonzero")
    model = loaded.model
    device = next(model.parameters()).device
    allow_non_integral = bool(OmegaConf.select(cfg, "shard.allow_non_integral", default=False))
    label = Path(str(label))
    with tempfile.TemporaryDirectory(prefix="concept-embed-") as scratch:
        ids = src.gene_ids()
        species = species or infer_species(ids, loaded.vocabs, label)
        vocab = loaded.vocabs[species]
        gene_map = build_gene_map(label, ids, vocab, gene_id_column)
        all_tokens = np.arange(vocab.size)
        out = np.full((src.n_cells, model.cfg.projection_dim or model.cfg.dim_model), np.nan, np.float32)
        step = src.rows_per_read(chunk_size)
        src.csc_prepare(0, src.n_cells, step, Path(scratch))     # CSC: out-of-core transpose
        for a in range(0, src.n_cells, step):
            b = min(a + step, src.n_cells)
            cells = map_chunk(label, src.read_rows(a, b), a, gene_map, vocab, allow_non_integral)
            for s in range(0, len(cells.local), batch_size):
                e = min(s + batch_size, len(cells.local))
                lo, hi = cells.indptr[s], cells.indptr[e]
                lengths = np.diff(cells.indptr[s:e + 1])
                batch = Cells(genes=cells.genes[lo:hi].astype(np.int64), counts=cells.counts[lo:hi].astype(np.float64),
                              cell=np.repeat(np.arange(e - s), lengths), n_counts=cells.n_counts[s:e].astype(np.float64),
                              n_cells=e - s)
                values, keys = normalized(spec, batch)
                packed = pack(batch.n_cells, [select_view(spec, batch, values, keys, all_tokens, vocab.size)])
                z, _, _ = model(torch.from_numpy(packed.tokens).to(device), torch.from_numpy(packed.values).to(device),
                                torch.from_numpy(packed.positions).to(device), torch.from_numpy(packed.cu_seqlens).to(device),
                                packed.max_seqlen, species)
                out[a + cells.local[s:e]] = z.float().cpu().numpy()
            if progress is not None:
                progress(b)
    return out, species


def embed_source(loaded: LoadedModel, path: Path, species: str | None = None, gene_id_column: str | None = None,
                 batch_size: int = 256, max_tokens: int | None = None, chunk_size: int = 4096, progress=None) -> tuple[np.ndarray, str]:
    """(embeddings [n_cells, d] float32, species) of every row of an .h5ad/.zarr, read in chunks."""
    sf = SourceFile(species=species or "", source_name="embed", name=Path(path).name, path=Path(path),
                    split_key="concept-embed", var_gene_id_column=gene_id_column)
    with AnnDataSource(sf) as src:
        return embed_rows(loaded, src, path, species, gene_id_column, batch_size, max_tokens, chunk_size, progress)


def embed(adata, model, species: str | None = None, gene_id_column: str | None = None, batch_size: int = 256,
          max_tokens: int | None = None, key: str = "X_concept", device=None) -> np.ndarray:
    """Embed the cells of an AnnData object with a trained model, in place.

    `model` is what `load_model()` returns, or a run / checkpoint directory. Counts are read from
    `adata.raw` when it is set, else `adata.X` (raw counts, as for sharding). Writes
    `adata.obsm[key]` (L2-normalised float32) and `adata.uns["concept"]`; returns the embeddings.
    """
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device)
    src = AnnDataObjectSource(adata, gene_id_column)
    z, species = embed_rows(loaded, src, "AnnData object", species, gene_id_column, batch_size, max_tokens)
    adata.obsm[key] = z
    adata.uns["concept"] = {"run_id": loaded.run_id, "step": loaded.step, "species": species,
                            "checkpoint": str(loaded.checkpoint)}
    return z


def embed_file(run_or_checkpoint, input_path, out_path, species=None, gene_id_column=None, batch_size=256,
               device=None, max_tokens=None) -> Path:
    """Write a copy of `input_path` with obsm["X_concept"] and uns["concept"] to `out_path` (.h5ad)."""
    import h5py
    from anndata.io import write_elem

    input_path, out_path = Path(input_path), Path(out_path)
    loaded = load_model(run_or_checkpoint, device)
    z, species = embed_source(loaded, input_path, species, gene_id_column, batch_size, max_tokens)
    if input_path.is_dir() or input_path.suffix == ".zarr":
        import anndata as ad
        adata = ad.read_zarr(input_path)        # .zarr -> .h5ad goes through memory
        adata.obsm["X_concept"] = z
        adata.uns["concept"] = {"run_id": loaded.run_id, "step": loaded.step, "species": species}
        adata.write_h5ad(out_path)
        return out_path
    tmp = out_path.with_name(out_path.name + ".tmp")
    shutil.copyfile(input_path, tmp)             # the matrix is copied, not loaded
    with h5py.File(tmp, "r+") as f:
        write_elem(f, "obsm/X_concept", z)
        write_elem(f, "uns/concept", {"run_id": loaded.run_id, "step": loaded.step, "species": species,
                                      "checkpoint": str(loaded.checkpoint)})
    tmp.replace(out_path)
    return out_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="concept-embed", description=__doc__.split("\n")[0])
    p.add_argument("run_or_checkpoint")
    p.add_argument("input", help=".h5ad file or AnnData .zarr store")
    p.add_argument("--out", required=True, help="output .h5ad (a copy of the input with obsm['X_concept'])")
    p.add_argument("--species")
    p.add_argument("--gene-id-column")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-tokens", type=int, help="genes per cell (default: the run's training max_tokens)")
    args = p.parse_args(argv)
    try:
        out = embed_file(args.run_or_checkpoint, args.input, args.out, args.species, args.gene_id_column, args.batch_size,
                         max_tokens=args.max_tokens)
    except ShardError as err:
        print(f"concept-embed: {err.paragraph()}", file=sys.stderr)
        return 2
    print(f"concept-embed: wrote {out} (obsm['X_concept'])")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
