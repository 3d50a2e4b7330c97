"""scConcept's own embeddings of a model directory, made by sc-concept in its side environment
(tools/scconcept_env.sh): the proof half of `concept-export` and of tools/bench/scconcept_embed.py.

    .venv-scconcept/bin/python tools/scconcept_side.py MODEL_DIR CELLS.h5ad OUT.npz [--max-tokens N]

Loads MODEL_DIR with `scConcept().load_config_and_model(config=, model_path=, gene_mappings_path=)`,
then embeds the cells twice: as `extract_embeddings` does (its bf16 autocast, on every device) and
through the same steps with the autocast left out (float32). OUT.npz: `bf16`, `fp32` and the
seconds each took (`bf16_s`, `fp32_s`; the fastest of `--repeats`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import anndata as ad
import numpy as np
import torch
from concept import scConcept
from concept.dataset import MultiSpeciesTokenizedDataset
from lamin_dataloader import BaseCollate, InMemoryCollection


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("cells", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--max-tokens", type=int)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    pretrained = args.model_dir / "pretrained_vocabulary"
    model = scConcept()
    model.load_config_and_model(
        config=str(args.model_dir / "config.yaml"),
        model_path=str(args.model_dir / "model.ckpt"),
        gene_mappings_path=str(args.model_dir / "gene_mappings"),
        pretrained_vocabulary_path=str(pretrained) if pretrained.is_dir() else None,
    )
    model.device = torch.device("cpu")
    model.model.to("cpu")
    adata = ad.read_h5ad(args.cells)
    max_tokens = args.max_tokens or model.cfg.datamodule.dataset.train.max_tokens
    species = model.cfg.datamodule.species[0] if len(model.cfg.datamodule.species) == 1 else None

    def bf16():
        return model.extract_embeddings(
            adata, species=species, batch_size=args.batch_size, max_tokens=max_tokens, num_workers=0
        )["cls_cell_emb"]

    def fp32():
        sp = species or model.cfg.datamodule.species[0]
        dataset = MultiSpeciesTokenizedDataset(
            metadata={"species": [sp]},
            collection=InMemoryCollection([adata]),
            tokenizer=model.tokenizer,
            normalization=model.cfg.datamodule.normalization,
        )
        collate = BaseCollate(model.tokenizer.PAD_TOKEN, max_tokens=max_tokens, gene_sampling_strategy="top-nonzero")
        out = []
        with torch.no_grad():
            loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate)
            for i, batch in enumerate(loader):
                out.append(model.model.predict_step(batch, i, use_learnable_embs=True)["cls_cell_emb"].numpy())
        return np.concatenate(out)

    results = {}
    for name, fn in (("fp32", fp32), ("bf16", bf16)):
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            results[name] = fn()
            best = min(best, time.perf_counter() - t)
        results[f"{name}_s"] = best
    np.savez(args.out, **results, max_tokens=max_tokens, n_cells=adata.n_obs)
    print({k: v for k, v in results.items() if k.endswith("_s")})


if __name__ == "__main__":
    main()
