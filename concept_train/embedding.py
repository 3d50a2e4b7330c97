"""Cell embeddings from a trained run: `concept-embed RUN_OR_CHECKPOINT INPUT --out OUT` and `embed()`.

A cell is tokenized exactly as in training: its nonzero in-vocabulary genes (the panel is the
whole vocabulary), normalised as the run's `datamodule.normalization`, the top `max_tokens` by
value with ties by token id, after `<cls>`. The input is read in row chunks with the sharder's
reader (CSR, CSC, dense, `raw/X` first, `.zarr`), so a file larger than memory works; the
embeddings (L2-normalised, float32) go to `obsm["X_concept"]` of a copy of the input, with the
run id and checkpoint step in `uns["concept"]`.

A model trained with pretrained gene vectors has learnable per-species residual tables on top of
them (`model.training.use_learnable_embs_freq`). They are added, as in training, when the run added
them at all (a fraction > 0); `use_learnable_embs=False` (`--no-learnable-embs`) leaves them out:
then a gene is embedded only through its pretrained vector and the shared adapter, the same map for
every species, which aligns the embeddings of cells of different species better (scConcept's
`use_learnable_embs` of `extract_embeddings`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from concept_config.fields import whole
from concept_shard.cells import build_gene_map, map_chunk
from concept_shard.errors import TrainError, UserError
from concept_shard.source import AnnDataObjectSource, AnnDataSource, RowSource, row_chunks
from concept_shard.vocabulary import Vocabulary, strip_version

from .data.make.tokenize import Cells, TokenSpec, normalized, pack, select_view
from .model.model import learnable_embs_freq
from .trainer.checkpoint import LoadedModel, load_model


def adds_learnable_embs(loaded: LoadedModel, use_learnable_embs: bool = True) -> bool:
    """Whether embeddings of this model add the learnable residual tables: only a model with
    pretrained vectors has them, only a run that used them (a fraction > 0) trained them, and
    `use_learnable_embs=False` switches them off."""
    freq = learnable_embs_freq(loaded.cfg.model)
    return bool(use_learnable_embs and loaded.model.cfg.pretrained and freq is not None)  # as validation does


def infer_species(gene_ids: np.ndarray, vocabs: dict[str, Vocabulary], path) -> str:
    ids = {strip_version(str(g)) for g in gene_ids}
    overlap = {sp: len(ids & v.token_of.keys()) for sp, v in vocabs.items()}
    best = max(overlap.values()) if overlap else 0
    winners = [sp for sp, n in overlap.items() if n == best]
    if best == 0 or len(winners) > 1:
        raise TrainError(
            path,
            f"matches the species vocabularies ambiguously or not at all (shared gene ids: {overlap}).",
            "Pass --species (and --gene-id-column if the Ensembl ids are in a var column).",
        )
    return winners[0]


def cells_of(
    indptr: np.ndarray, genes: np.ndarray, counts: np.ndarray, n_counts: np.ndarray, start: int, stop: int
) -> Cells:
    """Cells [start, stop) of a CSR block (token ids, raw values, library sizes) as `Cells`."""
    lo, hi = indptr[start], indptr[stop]
    return Cells(
        genes=genes[lo:hi].astype(np.int64),
        counts=counts[lo:hi].astype(np.float64),
        cell=np.repeat(np.arange(stop - start), np.diff(indptr[start : stop + 1])),
        n_counts=n_counts[start:stop].astype(np.float64),
        n_cells=stop - start,
    )


@torch.no_grad()
def embed_cells(
    model, spec: TokenSpec, cells: Cells, panel: np.ndarray, vocab_size: int, species: str, add_learnable: bool
) -> np.ndarray:
    """Embeddings [n_cells, d] float32 of one batch of cells seen through `panel` (ascending token
    ids; all of the vocabulary for the whole cell): tokenized as training's view 1 is."""
    values, keys = normalized(spec, cells)
    packed = pack(cells.n_cells, [select_view(spec, cells, values, keys, panel, vocab_size)])
    device = next(model.parameters()).device
    z, _, _ = model(
        torch.from_numpy(packed.tokens).to(device),
        torch.from_numpy(packed.values).to(device),
        torch.from_numpy(packed.positions).to(device),
        torch.from_numpy(packed.cu_seqlens).to(device),
        packed.max_seqlen,
        species,
        add_learnable=add_learnable,
    )
    return z.float().cpu().numpy()


@torch.no_grad()
def embed_rows(
    loaded: LoadedModel,
    src: RowSource,
    label,
    species: str | None = None,
    gene_id_column: str | None = None,
    batch_size: int = 256,
    max_tokens: int | None = None,
    chunk_size: int = 4096,
    progress=None,
    use_learnable_embs: bool = True,
) -> tuple[np.ndarray, str]:
    """(embeddings [n_cells, d] float32, species) of every row of an open source (`AnnDataSource`
    or `AnnDataObjectSource`); `label` names it in errors. Rows without any in-vocabulary nonzero
    gene get NaN embeddings. `use_learnable_embs=False`: without the learnable gene residual
    (module docstring)."""
    cfg = loaded.cfg
    if species is not None and species not in loaded.vocabs:
        raise TrainError(
            label,
            f"was given species '{species}', which run {loaded.run_id} was not trained on.",
            f"Use one of {sorted(loaded.vocabs)}.",
        )
    spec = TokenSpec(
        max_tokens=int(max_tokens or cfg.datamodule.dataset.train.max_tokens),
        normalization=cfg.datamodule.normalization,
        strategy="top-nonzero",
    )
    model = loaded.model
    add_learnable = adds_learnable_embs(loaded, use_learnable_embs)
    allow_non_integral = cfg.shard.allow_non_integral
    label = Path(str(label))
    with tempfile.TemporaryDirectory(prefix="concept-embed-") as scratch:
        ids = src.gene_ids()
        species = species or infer_species(ids, loaded.vocabs, label)
        vocab = loaded.vocabs[species]
        gene_map = build_gene_map(label, ids, vocab, gene_id_column)
        all_tokens = np.arange(vocab.size)
        out = np.full((src.n_cells, model.cfg.projection_dim or model.cfg.dim_model), np.nan, np.float32)
        for a, b in row_chunks(src, chunk_size, Path(scratch)):
            cells = map_chunk(label, src.read_rows(a, b), a, gene_map, vocab, allow_non_integral)
            for s in range(0, len(cells.local), batch_size):
                e = min(s + batch_size, len(cells.local))
                batch = cells_of(cells.indptr, cells.genes, cells.counts, cells.n_counts, s, e)
                out[a + cells.local[s:e]] = embed_cells(
                    model, spec, batch, all_tokens, vocab.size, species, add_learnable
                )
            if progress is not None:
                progress(b)
    return out, species


def _check_sizes(batch_size, max_tokens) -> None:
    """Before any work: `batch_size` and `max_tokens` are positive integers (a batch size of -1
    wrote all-NaN embeddings)."""
    checks = [("batch_size (--batch-size)", batch_size, "Give a whole number of at least 1.")]
    if max_tokens is not None:
        fix = "Give a whole number of at least 1, or leave it out for the run's training max_tokens."
        checks.append(("max_tokens (--max-tokens)", max_tokens, fix))
    for where, value, fix in checks:
        if not whole(value, 1):
            raise TrainError(where, f"is {value!r}, not a positive integer.", fix)


def embed_source(
    loaded: LoadedModel,
    path: Path,
    species: str | None = None,
    gene_id_column: str | None = None,
    batch_size: int = 256,
    max_tokens: int | None = None,
    chunk_size: int = 4096,
    progress=None,
    use_learnable_embs: bool = True,
) -> tuple[np.ndarray, str]:
    """(embeddings [n_cells, d] float32, species) of every row of an .h5ad/.zarr, read in chunks."""
    _check_sizes(batch_size, max_tokens)
    with AnnDataSource(Path(path), gene_id_column) as src:
        return embed_rows(
            loaded, src, path, species, gene_id_column, batch_size, max_tokens, chunk_size, progress, use_learnable_embs
        )


def _provenance(loaded: LoadedModel, species: str, use_learnable_embs: bool) -> dict:
    out = loaded.provenance(species)
    if loaded.model.cfg.pretrained:  # recorded where there is a choice
        out["learnable_embs"] = adds_learnable_embs(loaded, use_learnable_embs)
    return out


def embed(
    adata,
    model,
    species: str | None = None,
    gene_id_column: str | None = None,
    batch_size: int = 256,
    max_tokens: int | None = None,
    key: str = "X_concept",
    device=None,
    trust_pickle: bool = False,
    use_learnable_embs: bool = True,
) -> np.ndarray:
    """Embed the cells of an AnnData object with a trained model, in place.

    `model` is what `load_model()` returns, or a run / checkpoint directory. Counts are read from
    `adata.raw` when it is set, else `adata.X` (raw counts, as for sharding). Writes
    `adata.obsm[key]` (L2-normalised float32) and `adata.uns["concept"]`; returns the embeddings.
    `use_learnable_embs=False` leaves out the learnable gene residual of a model trained with
    pretrained gene vectors: better aligned embeddings across species (module docstring).
    """
    _check_sizes(batch_size, max_tokens)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device, trust_pickle=trust_pickle)
    src = AnnDataObjectSource(adata, gene_id_column)
    z, species = embed_rows(
        loaded,
        src,
        "AnnData object",
        species,
        gene_id_column,
        batch_size,
        max_tokens,
        use_learnable_embs=use_learnable_embs,
    )
    adata.obsm[key] = z
    adata.uns["concept"] = _provenance(loaded, species, use_learnable_embs)
    return z


def embed_file(
    run_or_checkpoint,
    input_path,
    out_path,
    species=None,
    gene_id_column=None,
    batch_size=256,
    device=None,
    max_tokens=None,
    trust_pickle: bool = False,
    use_learnable_embs: bool = True,
) -> Path:
    """Write a copy of `input_path` with obsm["X_concept"] and uns["concept"] to `out_path` (.h5ad)."""
    import h5py
    from anndata.io import write_elem

    input_path, out_path = Path(input_path), Path(out_path)
    _check_sizes(batch_size, max_tokens)
    _check_output(input_path, out_path)  # before minutes of embedding, not after
    loaded = load_model(run_or_checkpoint, device, trust_pickle=trust_pickle)
    z, species = embed_source(
        loaded, input_path, species, gene_id_column, batch_size, max_tokens, use_learnable_embs=use_learnable_embs
    )
    provenance = _provenance(loaded, species, use_learnable_embs)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    try:
        if input_path.is_dir() or input_path.suffix == ".zarr":
            import anndata as ad

            adata = ad.read_zarr(input_path)  # .zarr -> .h5ad goes through memory
            adata.obsm["X_concept"] = z
            adata.uns["concept"] = provenance
            adata.write_h5ad(tmp)
        else:
            shutil.copyfile(input_path, tmp)  # the matrix is copied, not loaded
            with h5py.File(tmp, "r+") as f:
                # anndata >= 0.13 refuses a key with "/": write into the group
                write_elem(f.require_group("obsm"), "X_concept", z)
                write_elem(f.require_group("uns"), "concept", provenance)
        tmp.replace(out_path)
    except OSError as exc:
        raise TrainError(
            f"--out {out_path}",
            f"could not be written ({type(exc).__name__}: {exc}).",
            "Check free space and permissions there.",
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def _check_output(input_path: Path, out_path: Path) -> None:
    """The output is a new or replaceable .h5ad file in an existing directory, and not the input."""
    resolved, source = out_path.resolve(), input_path.resolve()
    if resolved == source or source in resolved.parents:
        raise TrainError(
            f"--out {out_path}",
            "is the input itself (or inside it).",
            "Write the embedded copy to another file; the input is never changed.",
        )
    if out_path.is_dir():
        raise TrainError(f"--out {out_path}", "is a directory.", "Name a file inside it: --out DIR/<name>.h5ad.")
    if not out_path.parent.is_dir():
        raise TrainError(
            f"--out {out_path}",
            f"is in {out_path.parent}, which does not exist.",
            f"Create it first (mkdir -p {out_path.parent}).",
        )
    if out_path.suffix != ".h5ad":
        raise TrainError(f"--out {out_path}", "is not a .h5ad file name.", "Name the output <something>.h5ad.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="concept-embed", description=__doc__.split("\n")[0])
    p.add_argument("run_or_checkpoint")
    p.add_argument("input", help=".h5ad file or AnnData .zarr store")
    p.add_argument("--out", required=True, help="output .h5ad (a copy of the input with obsm['X_concept'])")
    p.add_argument("--species")
    p.add_argument("--gene-id-column")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-tokens", type=int, help="genes per cell (default: the run's training max_tokens)")
    p.add_argument(
        "--no-learnable-embs",
        dest="use_learnable_embs",
        action="store_false",
        help="leave out the learnable gene residual of a model trained with pretrained gene vectors "
        "(better aligned embeddings across species)",
    )
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="load a checkpoint that predates model.safetensors through its pickled metadata "
        "(only for checkpoints you made or trust)",
    )
    args = p.parse_args(argv)
    try:
        out = embed_file(
            args.run_or_checkpoint,
            args.input,
            args.out,
            args.species,
            args.gene_id_column,
            args.batch_size,
            max_tokens=args.max_tokens,
            trust_pickle=args.trust_checkpoint,
            use_learnable_embs=args.use_learnable_embs,
        )
    except UserError as err:
        print(f"concept-embed: {err.paragraph()}", file=sys.stderr)
        return 2
    print(f"concept-embed: wrote {out} (obsm['X_concept'])")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
