"""Cell embeddings from a trained run: `concept-embed RUN_OR_CHECKPOINT INPUT --out OUT` and `embed()`.

A whole cell is tokenized as `concept-eval` scores it and as the trainer's whole-cell validation
views are: its nonzero in-vocabulary genes (the panel is the whole vocabulary), normalised as the
run's `datamodule.normalization`, the top `max_tokens` by value with ties by token id, after
`<cls>`; `max_tokens` by default the larger of 1,000 and the run's training `max_tokens`. (It was
the training `max_tokens` alone: the demo model, trained on views of 48 genes, embedded its cells
with kNN(cell_type) 0.938, under PCA's 0.964, where concept-eval reported 0.986.) The input is read
in row chunks with the sharder's reader (CSR, CSC, dense, `raw/X` first, or a named layer,
`.zarr`), so a file larger than memory works; the embeddings (L2-normalised, float32) go to
`obsm[key_added]` (default `X_concept`) of a copy of the input, and how they were made to
`uns["concept"][key_added]` (`provenance`), so a second embedding under another key keeps its own.

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

from concept_shard import console

with console.few_collections():  # a program's imports: console.PROGRAM_GEN0 says why
    import numpy as np
    import torch

    from concept_config.fields import whole
    from concept_shard.cells import build_gene_map, map_chunk
    from concept_shard.errors import TrainError, UserError
    from concept_shard.source import AnnDataObjectSource, AnnDataSource, RowSource, row_chunks
    from concept_shard.vocabulary import Vocabulary, strip_versions

    from .data.make.tokenize import Cells, TokenSpec, normalized, pack, select_view
    from .model.model import learnable_embs_freq, pe_max_len_for
    from .trainer.checkpoint import LoadedModel, load_model

WHOLE_CELL_TOKENS = 1000  # the reference's whole-cell validation views


def whole_cell_tokens(loaded: LoadedModel, max_tokens: int | None = None) -> int:
    """Genes per whole cell: `max_tokens` when given, else the larger of WHOLE_CELL_TOKENS and the
    run's training `max_tokens` (module docstring); for one of scConcept's models its training
    `max_tokens`, as its extract_embeddings takes. Refused, naming both, when the model's rank
    encoding cannot tell that many positions apart (genes ranked beyond would share a vector)."""
    train = loaded.cfg.datamodule.dataset.train.max_tokens
    n = int(max_tokens or (train if loaded.model.cfg.scconcept_layout else max(train, WHOLE_CELL_TOKENS)))
    held = loaded.model.max_positions
    if held is not None and n > held:
        raise TrainError(
            "max_tokens (--max-tokens)",
            f"is {n}, but the model's rank encoding tells apart {held} gene positions (model.pe_max_len "
            f"{loaded.model.cfg.pe_max_len} of run {loaded.run_id}): genes ranked beyond would share one.",
            f"Embed at most {held} genes per cell, or train with model.pe_max_len >= "
            f"{pe_max_len_for(n, loaded.model.cfg.scconcept_layout)}.",
        )
    return n


def adds_learnable_embs(loaded: LoadedModel, use_learnable_embs: bool = True) -> bool:
    """Whether embeddings of this model add the learnable residual tables: only a model with
    pretrained vectors has them, only a run that used them (a fraction > 0) trained them, and
    `use_learnable_embs=False` switches them off. scConcept's models add them whenever asked (its
    predict step does)."""
    if not (use_learnable_embs and loaded.model.cfg.pretrained):
        return False
    return loaded.model.cfg.scconcept_layout or learnable_embs_freq(loaded.cfg.model) is not None


def infer_species(gene_ids: np.ndarray, vocabs: dict[str, Vocabulary], path) -> str:
    ids = set(strip_versions([str(g) for g in gene_ids]).tolist())
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
    allow_non_integral: bool | None = None,
    counts_fix: str | None = None,
) -> tuple[np.ndarray, str]:
    """(embeddings [n_cells, d] float32, species) of every row of an open source (`AnnDataSource`
    or `AnnDataObjectSource`); `label` names it in errors. Rows without any in-vocabulary nonzero
    gene get NaN embeddings. `use_learnable_embs=False`: without the learnable gene residual
    (module docstring). `allow_non_integral`: keep non-integral counts (default: as the run's
    shards did); `counts_fix`: what the error about such counts tells the caller to do."""
    cfg = loaded.cfg
    if species is not None and species not in loaded.vocabs:
        raise TrainError(
            label,
            f"was given species '{species}', which run {loaded.run_id} was not trained on.",
            f"Use one of {sorted(loaded.vocabs)}.",
        )
    spec = TokenSpec(
        max_tokens=whole_cell_tokens(loaded, max_tokens),
        normalization=cfg.datamodule.normalization,
        strategy="top-nonzero",
    )
    model = loaded.model
    add_learnable = adds_learnable_embs(loaded, use_learnable_embs)
    if allow_non_integral is None:
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
            cells = map_chunk(label, src.read_rows(a, b), a, gene_map, vocab, allow_non_integral, counts_fix)
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
        fix = "Give a whole number of at least 1, or leave it out for whole cells (1,000 genes or more)."
        checks.append(("max_tokens (--max-tokens)", max_tokens, fix))
    for where, value, fix in checks:
        if not whole(value, 1):
            raise TrainError(where, f"is {value!r}, not a positive integer.", fix)


def _check_key(key_added, where: str) -> None:
    if not isinstance(key_added, str) or not key_added or "/" in key_added:
        raise TrainError(where, f"is {key_added!r}.", "Give a non-empty name without '/', such as X_concept.")


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
    layer: str | None = None,
) -> tuple[np.ndarray, str]:
    """(embeddings [n_cells, d] float32, species) of every row of an .h5ad/.zarr, read in chunks
    (counts from `layers[layer]` when named, else `raw/X` or `X`)."""
    _check_sizes(batch_size, max_tokens)
    with AnnDataSource(Path(path), gene_id_column, layer=layer) as src:
        return embed_rows(
            loaded,
            src,
            path,
            species,
            gene_id_column,
            batch_size,
            max_tokens,
            chunk_size,
            progress,
            use_learnable_embs,
            counts_fix=_COUNTS_FIX_CLI,
        )


_COUNTS_FIX_CLI = "Name the layer that holds the raw counts (--layer counts)."
_COUNTS_FIX_API = (
    "Pass layer= naming the layer that holds the raw counts (scvi-tools keeps them in "
    "layers['counts']), or allow_non_integral=True to embed these values as they are."
)


def provenance(loaded: LoadedModel, species: str, use_learnable_embs: bool, max_tokens, layer) -> dict:
    """How one embedding was made: the model (run, step, checkpoint and its weights' digest),
    the cells' species, the genes per cell (`max_tokens`, drawn from the whole vocabulary) and where
    the counts came from."""
    out = loaded.provenance(species)
    out |= {
        "max_tokens": whole_cell_tokens(loaded, max_tokens),
        "panel": "whole vocabulary",
        "normalization": str(loaded.cfg.datamodule.normalization),
        "counts": f"layers['{layer}']" if layer else "raw.X if present, else X",
    }
    if loaded.model.cfg.pretrained:  # recorded where there is a choice
        out["learnable_embs"] = adds_learnable_embs(loaded, use_learnable_embs)
    return out


def record(uns, key_added: str, made: dict) -> None:
    """uns["concept"][key_added] = made; an older single record (keys run_id, step, ...) is kept
    under "X_concept", the key it described."""
    current = uns.get("concept")
    if not isinstance(current, dict) or "run_id" in current:
        uns["concept"] = {"X_concept": dict(current)} if isinstance(current, dict) else {}
    uns["concept"][key_added] = made


def embed(
    adata,
    model,
    species: str | None = None,
    gene_id_column: str | None = None,
    batch_size: int = 256,
    max_tokens: int | None = None,
    key_added: str = "X_concept",
    layer: str | None = None,
    copy: bool = False,
    device=None,
    trust_pickle: bool = False,
    use_learnable_embs: bool = True,
    allow_non_integral: bool | None = None,
    key: str | None = None,
):
    """Embed the cells of an AnnData object with a trained model (scanpy's conventions).

    `model` is what `load_model()` returns, or a run / checkpoint directory. Counts are read from
    `adata.layers[layer]` when `layer` is named (scvi-tools keeps raw counts in
    `layers["counts"]`), else `adata.raw` when it is set, else `adata.X`: raw counts, as for
    sharding (`allow_non_integral=True` embeds non-integral values as they are). Whole cells by
    default (`max_tokens`: 1,000 genes or the run's training `max_tokens`, if larger), as
    `concept-eval` scores them. Writes `obsm[key_added]` (L2-normalised float32) and how it was made
    to `uns["concept"][key_added]`; returns the embeddings, or with `copy=True` leaves `adata` as it
    is and returns a copy that holds them. `use_learnable_embs=False` leaves out the learnable gene
    residual of a model trained with pretrained gene vectors: better aligned embeddings across
    species (module docstring). `key` is the former name of `key_added`.
    """
    if key is not None:
        import warnings

        warnings.warn("embed(key=...) is now key_added=...", FutureWarning, stacklevel=2)
        key_added = key
    _check_sizes(batch_size, max_tokens)
    _check_key(key_added, "key_added")
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device, trust_pickle=trust_pickle)
    src = AnnDataObjectSource(adata, gene_id_column, layer=layer)
    z, species = embed_rows(
        loaded,
        src,
        "AnnData object",
        species,
        gene_id_column,
        batch_size,
        max_tokens,
        use_learnable_embs=use_learnable_embs,
        allow_non_integral=allow_non_integral,
        counts_fix=_COUNTS_FIX_API,
    )
    target = adata.copy() if copy else adata
    target.obsm[key_added] = z
    record(target.uns, key_added, provenance(loaded, species, use_learnable_embs, max_tokens, layer))
    return target if copy else z


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
    key_added: str = "X_concept",
    layer: str | None = None,
    progress: bool | None = None,
) -> Path:
    """Write a copy of `input_path` with obsm[key_added] and uns["concept"][key_added] to
    `out_path` (.h5ad). `progress`: a progress bar on stderr (None: when it is a terminal)."""
    import h5py
    from anndata.io import read_elem, write_elem
    from tqdm.auto import tqdm

    input_path, out_path = Path(input_path), Path(out_path)
    _check_sizes(batch_size, max_tokens)
    _check_key(key_added, "--key-added")
    _check_output(input_path, out_path)  # before minutes of embedding, not after
    loaded = load_model(run_or_checkpoint, device, trust_pickle=trust_pickle)
    with AnnDataSource(input_path, gene_id_column, layer=layer) as src:
        n_cells = src.n_cells
    bar = tqdm(total=n_cells, unit="cells", desc="concept-embed", disable=None if progress is None else not progress)
    done = [0]

    def advance(upto: int) -> None:
        bar.update(upto - done[0])
        done[0] = upto

    with bar:
        z, species = embed_source(
            loaded,
            input_path,
            species,
            gene_id_column,
            batch_size,
            max_tokens,
            progress=advance,
            use_learnable_embs=use_learnable_embs,
            layer=layer,
        )
    made = provenance(loaded, species, use_learnable_embs, max_tokens, layer)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    try:
        if input_path.is_dir() or input_path.suffix == ".zarr":
            import anndata as ad

            adata = ad.read_zarr(input_path)  # .zarr -> .h5ad goes through memory
            adata.obsm[key_added] = z
            record(adata.uns, key_added, made)
            adata.write_h5ad(tmp)
        else:
            shutil.copyfile(input_path, tmp)  # the matrix is copied, not loaded
            with h5py.File(tmp, "r+") as f:
                # anndata >= 0.13 refuses a key with "/": write into the group
                obsm, uns = f.require_group("obsm"), f.require_group("uns")
                kept = {"concept": read_elem(uns["concept"])} if "concept" in uns else {}
                record(kept, key_added, made)
                for group, name, value in ((obsm, key_added, z), (uns, "concept", kept["concept"])):
                    if name in group:
                        del group[name]
                    write_elem(group, name, value)
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


@console.program
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="concept-embed", description=__doc__.split("\n")[0])
    p.add_argument("run_or_checkpoint")
    p.add_argument("input", help=".h5ad file or AnnData .zarr store")
    p.add_argument("--out", required=True, help="output .h5ad (a copy of the input with obsm['X_concept'])")
    p.add_argument("--species")
    p.add_argument("--gene-id-column")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--max-tokens",
        type=int,
        help="genes per cell (default: whole cells as concept-eval scores them: 1,000 or the run's "
        "training max_tokens, if larger)",
    )
    p.add_argument("--key-added", default="X_concept", help="obsm key of the embeddings (default: X_concept)")
    p.add_argument("--layer", help="read the raw counts from layers[LAYER] (default: raw/X if present, else X)")
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
            key_added=args.key_added,
            layer=args.layer,
        )
    except UserError as err:
        print(f"concept-embed: {err.paragraph()}", file=sys.stderr)
        return 2
    print(f"concept-embed: wrote {out} (obsm['{args.key_added}'], uns['concept']['{args.key_added}'])")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
