"""Make the scConcept model fixtures of tests/train/scconcept/ with scConcept's own code (sc-concept).

Run it in a side environment that has sc-concept (it pins its own torch):

    bash tools/scconcept_env.sh            # builds .venv-scconcept (sc-concept 0.2.5), once
    .venv-scconcept/bin/python tools/make_scconcept_models.py

For each shape (SHAPES: the published human 30M model's layout and the multi-species 170M model's,
at toy sizes, plus an older config that lacks the later architecture keys) it writes a model
directory in scConcept's published layout (model.ckpt, config.yaml, gene_mappings/,
pretrained_vocabulary/), made by scConcept's code: its ContrastiveModel with seeded random weights,
one real Lightning training step on a fixed batch, Lightning's checkpoint; for one shape also a
Fabric checkpoint as its train_fabric.py writes one (fabric.ckpt). Beside it, cells.h5ad (counts)
and reference.npz: scConcept's embeddings of those cells loaded through its own
`scConcept.load_config_and_model`, in float32 (its extract_embeddings' steps with the bf16 autocast
left out) and as extract_embeddings returns them (bf16 autocast), the fixed training batch and
its contrastive loss in eval mode. Re-running it rewrites the same files from the same seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import anndata as ad
import concept
import lightning as L
import numpy as np
import pandas as pd
import scipy.sparse
import torch
from concept import scConcept
from concept.dataset import MultiSpeciesTokenizedDataset
from concept.model import ContrastiveModel
from hydra import compose, initialize_config_dir
from lamin_dataloader import BaseCollate, InMemoryCollection
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "train" / "scconcept" / "data"
PREFIX = {"hsapiens": "ENSG", "mmusculus": "ENSMUSG", "drerio": "ENSDARG"}

SHAPES = {
    # corpus40M-model30M's layout: one species, learnable gene table, rank encoding, pre-norm, GELU
    "human30m": dict(
        species={"hsapiens": 400},
        model=dict(dim_model=32, dim_gene_embs=32, num_head=4, dim_hid=64, nlayers=2, pe_max_len=320),
        max_tokens=300,
        genes_per_cell=(20, 360),
        normalization="raw",
        pretrained=False,
        drop=(),
        fabric=True,
    ),
    # corpus360M[multi-species]-model170M's layout: several species, pretrained gene vectors
    # through the shared adapter plus learnable residuals, a projection, long cells
    "multispecies170m": dict(
        species={"hsapiens": 1300, "mmusculus": 200, "drerio": 150},
        model=dict(
            dim_model=32,
            dim_gene_embs=16,
            dim_pretrained_vocab=24,
            num_head=4,
            dim_hid=64,
            nlayers=3,
            pe_max_len=1400,
            projection_dim=16,
        ),
        max_tokens=1300,
        genes_per_cell=(40, 1250),
        normalization="log1p",
        pretrained=True,
        drop=(),
        fabric=False,
    ),
    # a config written before norm_scheme, activation, pe_max_len and cls_value existed: scConcept
    # fills post-norm, ReLU, 5000, -2; value encoding
    "older_value": dict(
        species={"hsapiens": 300},
        model=dict(dim_model=32, dim_gene_embs=32, num_head=4, dim_hid=64, nlayers=2, input_encoding="value_encoding"),
        max_tokens=200,
        genes_per_cell=(10, 250),
        normalization="log1p",
        pretrained=False,
        drop=("norm_scheme", "activation", "pe_max_len", "cls_value"),
        fabric=False,
    ),
}


def gene_ids(species: str, n: int) -> list[str]:
    return [f"{PREFIX[species]}{i:011d}" for i in range(n)]


def write_mappings(folder: Path, species: dict[str, int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for sp, n in species.items():
        ids = gene_ids(sp, n - 2)
        rows = [("<cls>", "", 0), ("<pad>", "", 1)] + [(g, f"{sp[:2].upper()}G{i}", i + 2) for i, g in enumerate(ids)]
        pd.DataFrame(rows, columns=["gene_id", "gene_name", "token"]).to_csv(folder / f"{sp}.csv", index=False)


def write_pretrained(folder: Path, species: dict[str, int], dim: int, rng) -> dict[str, torch.Tensor]:
    """Pretrained gene vectors as scConcept reads them (<species>.csv: gene name, then dimensions);
    the tables in the model are what the checkpoint holds."""
    folder.mkdir(parents=True, exist_ok=True)
    tables = {}
    for sp, n in species.items():
        table = rng.normal(size=(n, dim)).astype(np.float32)
        tables[sp] = torch.from_numpy(table)
        names = ["<cls>", "<pad>"] + [f"{sp[:2].upper()}G{i}" for i in range(n - 2)]
        pd.DataFrame(table[:, :4], index=names).to_csv(folder / f"{sp}.csv")  # a sample: size matters not
    return tables


def config_for(shape: dict, model_dir: Path):
    conf = Path(concept.__file__).parent / "conf"
    overrides = [f"PATH.PROJECT_PATH={model_dir}", "model.flash_attention=False"]
    overrides += [f"model.{k}={v}" for k, v in shape["model"].items()]
    overrides += [
        f"datamodule.species=[{','.join(shape['species'])}]",
        f"datamodule.normalization={shape['normalization']}",
        f"datamodule.dataset.train.max_tokens={shape['max_tokens']}",
        "model.training.log_every_n_steps=1",
        "model.training.use_learnable_embs_freq=1.0",
    ]
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    OmegaConf.set_struct(cfg, False)
    for key in shape["drop"]:
        del cfg.model[key]
    return cfg


def cells(species: str, n_genes: int, lo: int, hi: int, n_cells: int, rng) -> ad.AnnData:
    """Counts of n_cells cells over the species' genes (in a shuffled var order, plus 3 genes outside
    the vocabulary), lo..hi nonzero genes each, with ties (small counts)."""
    ids = gene_ids(species, n_genes - 2) + [f"{PREFIX[species]}9999999999{i}" for i in range(3)]
    order = rng.permutation(len(ids))
    rows, cols, vals = [], [], []
    for c in range(n_cells):
        k = int(rng.integers(lo, hi))
        picked = rng.choice(len(ids), size=k, replace=False)
        rows += [c] * k
        cols += picked.tolist()
        vals += rng.negative_binomial(2, 0.3, size=k).clip(min=1).tolist()
    X = scipy.sparse.csr_matrix((np.asarray(vals, np.float32), (rows, cols)), shape=(n_cells, len(ids)))
    X = X[:, order]
    return ad.AnnData(
        X=X,
        obs=pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)]),
        var=pd.DataFrame(index=[ids[i] for i in order]),
    )


def training_batch(species: str, n_genes: int, n_cells: int, length: int, rng) -> dict:
    """A batch as scConcept's training collate makes one (two views, no <cls>, padded with <pad>)."""
    batch = {"species": [species] * n_cells}
    for v in (1, 2):
        lengths = rng.integers(length // 2, length + 1, size=n_cells)
        tokens = np.ones((n_cells, length), np.int64)
        values = np.zeros((n_cells, length), np.float32)
        for c, n in enumerate(lengths):
            tokens[c, :n] = rng.choice(np.arange(2, n_genes), size=n, replace=False)
            values[c, :n] = np.sort(rng.gamma(2.0, 2.0, size=n))[::-1]
        batch[f"tokens_{v}"] = torch.from_numpy(tokens)
        batch[f"values_{v}"] = torch.from_numpy(values)
        batch[f"seq_length_{v}"] = [int(n) for n in lengths]
        batch[f"panel_{v}"] = torch.arange(2, n_genes)
        batch[f"panel_name_{v}"] = "all"
    return batch


def make(name: str, shape: dict, seed: int) -> dict:
    out = OUT / name
    shutil.rmtree(out, ignore_errors=True)
    model_dir = out / "model"
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    write_mappings(model_dir / "gene_mappings", shape["species"])
    tables = None
    if shape["pretrained"]:
        tables = write_pretrained(
            model_dir / "pretrained_vocabulary", shape["species"], shape["model"]["dim_pretrained_vocab"], rng
        )
    cfg = config_for(shape, model_dir)
    # the model as scConcept builds it from this config: keys the config lacks filled its way
    filled = scConcept.apply_compatibility_changes(OmegaConf.create(OmegaConf.to_container(cfg)))
    model = ContrastiveModel(
        config=filled.model,
        pad_token_id=1,
        cls_token_id=0,
        vocab_sizes=dict(shape["species"]),
        pretrained_vocabularies=tables,
        world_size=1,
    )
    with torch.no_grad():  # no part of the model at a special value (zeros, ones): every weight counts
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    first = next(iter(shape["species"]))
    batch = training_batch(first, shape["species"][first], 6, min(48, shape["max_tokens"]), rng)
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out / "lightning"),
    )
    trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
    trainer.save_checkpoint(str(model_dir / "model.ckpt"))
    if shape["fabric"]:
        from lightning.fabric import Fabric

        Fabric(accelerator="cpu", devices=1).save(
            str(out / "fabric.ckpt"), {"model": model, "global_step": 1, "epoch": 0}
        )
    OmegaConf.save(cfg, model_dir / "config.yaml")  # unresolved, as its train.py saves it
    shutil.rmtree(out / "lightning", ignore_errors=True)

    # scConcept's own loader reads the directory back
    loaded = scConcept()
    loaded.load_config_and_model(
        config=str(model_dir / "config.yaml"),
        model_path=str(model_dir / "model.ckpt"),
        gene_mappings_path=str(model_dir / "gene_mappings"),
        pretrained_vocabulary_path=str(model_dir / "pretrained_vocabulary") if shape["pretrained"] else None,
    )
    loaded.model.to("cpu")
    loaded.device = torch.device("cpu")
    lo, hi = shape["genes_per_cell"]
    adata = cells(first, shape["species"][first], lo, hi, 24, rng)
    adata.write_h5ad(out / "cells.h5ad")

    # float32: extract_embeddings' own steps (dataset, collate, predict_step), without its autocast
    dataset = MultiSpeciesTokenizedDataset(
        metadata={"species": [first]},
        collection=InMemoryCollection([adata]),
        tokenizer=loaded.tokenizer,
        normalization=loaded.cfg.datamodule.normalization,
    )
    collate = BaseCollate(
        loaded.tokenizer.PAD_TOKEN, max_tokens=shape["max_tokens"], gene_sampling_strategy="top-nonzero"
    )
    fp32 = []
    with torch.no_grad():
        for i, b in enumerate(torch.utils.data.DataLoader(dataset, batch_size=8, collate_fn=collate)):
            fp32.append(loaded.model.predict_step(b, i, use_learnable_embs=True)["cls_cell_emb"].numpy())
    fp32 = np.concatenate(fp32)
    bf16 = loaded.extract_embeddings(adata, batch_size=8, max_tokens=shape["max_tokens"], num_workers=0)["cls_cell_emb"]

    # the contrastive loss of the fixed training batch, eval mode (no dropout), as its validation step
    loaded.model.stage = "val"
    with torch.no_grad():
        loss, metrics = loaded.model._step({k: (v.clone() if torch.is_tensor(v) else v) for k, v in batch.items()}, 0)
    np.savez_compressed(
        out / "reference.npz",
        fp32=fp32,
        bf16=bf16,
        loss=np.float64(loss),
        **{f"{k}": np.asarray(batch[k]) for k in ("tokens_1", "values_1", "tokens_2", "values_2")},
        seq_length_1=np.asarray(batch["seq_length_1"]),
        seq_length_2=np.asarray(batch["seq_length_2"]),
    )
    facts = {
        "species": first,
        "max_tokens": shape["max_tokens"],
        "sc_concept": concept.__version__,
        "torch": torch.__version__,
        "bf16_vs_fp32_max_abs": float(np.abs(bf16 - fp32).max()),
        "loss": float(loss),
    }
    (out / "facts.json").write_text(json.dumps(facts, indent=1) + "\n")
    return facts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    args = ap.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    torch.use_deterministic_algorithms(True)
    for i, name in enumerate(args.shapes):
        print(name, make(name, SHAPES[name], seed=100 + i))


if __name__ == "__main__":
    main()
