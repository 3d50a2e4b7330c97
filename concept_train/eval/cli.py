"""`concept-eval RUN_OR_CHECKPOINT [INPUT ...] [--label-key cell_type] [--batch-key KEY] [--out DIR]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from concept_shard import console

with console.few_collections():  # a program's imports: console.PROGRAM_GEN0 says why
    from concept_shard.errors import UserError

    from .evaluate import PANEL_SIZES, evaluate


@console.program
def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="concept-eval",
        description="Score a trained model's cell embeddings against "
        "PCA(50) on the same cells: scIB metrics, kNN accuracy per obs key, cross-view recall@1; "
        "writes metrics.json, scib.csv, umap.png and report.md.",
    )
    p.add_argument("run_or_checkpoint", help="a run directory (its latest checkpoint) or checkpoints/step_<N>")
    p.add_argument(
        "inputs",
        nargs="*",
        help=".h5ad files or AnnData .zarr stores of one species (none: the run's "
        "validation files, read from their shards)",
    )
    p.add_argument("--label-key", default="cell_type", help="obs column of the cell labels (default cell_type)")
    p.add_argument(
        "--batch-key",
        help="obs column of the batches (default: the first of donor_id, batch, sample, dataset, then the other obs "
        "columns, with two or more values; `dataset` is the input file when there is no such column; none: "
        "batch-correction metrics n/a)",
    )
    p.add_argument(
        "--out", type=Path, help="output directory (default: <run>/eval, or ./concept-eval for a checkpoint)"
    )
    p.add_argument(
        "--species",
        help="the inputs' species (default: inferred from the gene ids; for the validation "
        "shards, the first species of the run)",
    )
    p.add_argument("--gene-id-column", help="var column holding the Ensembl ids (default: var_names)")
    p.add_argument(
        "--max-cells",
        type=int,
        default=10_000,
        help="evaluate a uniform sample of at most this many "
        "cells (default 10,000; a CPU embeds ~20-300 cells/s, a GPU thousands)",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        help="genes per whole cell (default: the larger of the run's training "
        "max_tokens and 1,000, as the trainer's whole-cell validation)",
    )
    p.add_argument(
        "--panels",
        default=",".join(map(str, PANEL_SIZES)),
        help="panel sizes for cross-view recall@1 (default 200,800,6400)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-umap", dest="umap", action="store_false", help="skip umap.png")
    p.add_argument(
        "--no-learnable-embs",
        dest="use_learnable_embs",
        action="store_false",
        help="leave out the learnable gene residual (as concept-embed)",
    )
    p.add_argument("--trust-checkpoint", action="store_true", help="as concept-embed")
    args = p.parse_args(argv)
    try:
        panels = [int(v) for v in args.panels.split(",") if v.strip()]
    except ValueError:
        p.error(f"--panels {args.panels!r}: use comma-separated gene counts such as 200,800,6400")
    if args.max_cells < 100:
        p.error(f"--max-cells {args.max_cells}: the scIB metrics need at least 100 cells")
    out = args.out
    if out is None:
        run = Path(args.run_or_checkpoint)
        out = run / "eval" if (run / "checkpoints").is_dir() else Path("concept-eval")
    try:
        evaluate(
            args.run_or_checkpoint,
            args.inputs,
            out,
            label_key=args.label_key,
            batch_key=args.batch_key,
            species=args.species,
            gene_id_column=args.gene_id_column,
            max_cells=args.max_cells,
            max_tokens=args.max_tokens,
            panel_sizes=panels,
            seed=args.seed,
            batch_size=args.batch_size,
            umap=args.umap,
            use_learnable_embs=args.use_learnable_embs,
            trust_pickle=args.trust_checkpoint,
            log=lambda m: print(m, file=sys.stderr, flush=True),
        )
    except UserError as err:
        print(f"concept-eval: {err.paragraph()}", file=sys.stderr)
        return 2
    print((out / "report.md").read_text())
    written = ["report.md", "scib.csv", *(["umap.png"] if args.umap else []), "metrics.json"]
    print(f"concept-eval: wrote {out}/ ({', '.join(written)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
