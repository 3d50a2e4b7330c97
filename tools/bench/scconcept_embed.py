"""A scConcept model through our pipeline against scConcept's own extract_embeddings, on the same
cells and CPU (issue 24): the largest difference of the embeddings and cells/s of each.

    bash tools/scconcept_env.sh     # the side environment with sc-concept (once)
    .venv/bin/python tools/bench/scconcept_embed.py MODEL CELLS.h5ad [--export-from RUN]

MODEL: a scConcept model directory; with `--export-from RUN` it is first written from our run by
`concept-export` (the proof that scConcept's own loader takes our exports). Ours: `embed()` in
float32 (its default); scConcept's: `extract_embeddings` as users call it (bf16 autocast, always)
and its float32 steps (tools/scconcept_side.py, run in the side environment). Best of --repeats.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from concept_train import embed, load_model  # noqa: E402
from concept_train.scconcept.export import export  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("cells", type=Path)
    ap.add_argument("--export-from", type=Path)
    ap.add_argument("--max-tokens", type=int)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--side-venv", default=os.environ.get("SCCONCEPT_VENV", str(ROOT / ".venv-scconcept")))
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.export_from is not None:
        export(args.export_from, args.model)
    loaded = load_model(args.model, device="cpu")
    max_tokens = args.max_tokens or loaded.cfg.datamodule.dataset.train.max_tokens
    adata = ad.read_h5ad(args.cells)
    best, z = float("inf"), None
    for _ in range(args.repeats):
        t = time.perf_counter()
        z = embed(adata.copy(), loaded, batch_size=args.batch_size, max_tokens=max_tokens)
        best = min(best, time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "theirs.npz"
        subprocess.run(
            [
                f"{args.side_venv}/bin/python",
                str(ROOT / "tools" / "scconcept_side.py"),
                str(args.model),
                str(args.cells),
                str(out),
                f"--max-tokens={max_tokens}",
                f"--batch-size={args.batch_size}",
                f"--repeats={args.repeats}",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        theirs = dict(np.load(out))
    n = adata.n_obs
    print(
        f"model {args.model} ({loaded.model.cfg.dim_model} wide, {loaded.model.cfg.nlayers} layers), {n} cells, "
        f"max_tokens {max_tokens}, batch {args.batch_size}, {torch.get_num_threads()} threads"
    )
    print("| pipeline | cells/s | ratio to scConcept's extract_embeddings | max abs diff to ours |")
    print("|---|---|---|---|")
    base = n / theirs["bf16_s"]
    print(
        f"| scConcept extract_embeddings (bf16 autocast) | {base:.0f} | 1.00 | {np.abs(theirs['bf16'] - z).max():.1e} |"
    )
    rate = n / theirs["fp32_s"]
    print(f"| scConcept's steps in float32 | {rate:.0f} | {rate / base:.2f} | {np.abs(theirs['fp32'] - z).max():.1e} |")
    print(f"| ours: embed() float32 | {n / best:.0f} | {n / best / base:.2f} | 0 |")


if __name__ == "__main__":
    main()
