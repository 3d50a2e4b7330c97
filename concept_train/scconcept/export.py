"""`concept-export RUN OUT`: a trained run (or a scConcept model) written in scConcept's published
layout, which its own `scConcept().load_config_and_model(config=, model_path=, gene_mappings_path=)`
loads and embeds with (docs/migrating.md).

OUT gets `model.ckpt` (a Lightning checkpoint: `state_dict` in scConcept's names, no optimizer
state), `config.yaml` (the run's config, resolved, with the model keys scConcept's model reads set
to what the weights are), `gene_mappings/<species>.csv`, `pretrained_vocabulary/<species>.csv`
(with pretrained gene vectors) and `panels/` (when the run has panels).

A model of our layout maps onto scConcept's exactly where its architecture allows: its position
table is written as scConcept's (one row longer: the row our positions stop at), and its <cls>
vector less that table's row 0 (scConcept adds row 0 to <cls>; ours adds nothing). Two parts of
ours have no scConcept equivalent and are refused by name: our value encoder (GELU, no LayerNorm)
and a projection with a bias.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from concept_shard import console

with console.few_collections():  # a program's imports: console.PROGRAM_GEN0 says why
    import pandas as pd
    import torch
    import yaml

    from concept_shard.config import as_dict
    from concept_shard.errors import TrainError, UserError
    from concept_shard.vocabulary import mapping_file

    from ..trainer.checkpoint import LoadedModel, load_model
    from . import model_dir
    from . import weights as W

LIGHTNING_VERSION = "2.5.0"  # what Lightning's loader reads to pick its checkpoint migrations: none apply


def scconcept_state(loaded: LoadedModel) -> tuple[dict, int]:
    """(scConcept's state dict of the model, its pe_max_len)."""
    model, mcfg = loaded.model, loaded.model.cfg
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    where = loaded.checkpoint
    if not mcfg.scconcept_layout:
        if mcfg.input_encoding == "value_encoding":
            raise TrainError(
                where,
                "encodes values with our value encoder (Linear, GELU, Linear), which scConcept's model "
                "(Linear, ReLU, Linear, LayerNorm) cannot reproduce.",
                "Export a rank_encoding model, or train with model.layout=scconcept.",
            )
        if model.projection is not None and bool(model.projection.bias.detach().abs().max() > 0):
            raise TrainError(
                where,
                "has a projection with a bias (model.projection_dim), which scConcept's projection lacks.",
                "Export a model without model.projection_dim, or train with model.layout=scconcept.",
            )
        state.pop("projection.bias", None)
        if mcfg.input_encoding == "rank_encoding":  # scConcept adds row 0 to <cls>; ours adds nothing
            state["cls"] = state["cls"] - model.rank_table[0].float().cpu()
    table = model.rank_table.float().cpu().contiguous() if mcfg.input_encoding == "rank_encoding" else None
    pe_max_len = int(table.shape[0]) if table is not None else mcfg.pe_max_len
    return W.to_theirs(state, table, mcfg.pretrained), pe_max_len


def _config(loaded: LoadedModel, pe_max_len: int) -> dict:
    """The run's config, resolved, with the keys scConcept's model reads set to the weights'."""
    tree = as_dict(loaded.cfg)
    mcfg = loaded.model.cfg
    model = tree["model"]
    for key in W.MODEL_KEYS:
        model[key] = getattr(mcfg, key)
    model.update(
        pe_max_len=pe_max_len,
        decoder_head=mcfg.decoder_head,
        # scConcept puts a value on <cls> whatever the encoding; it shapes nothing with rank_encoding
        cls_value=mcfg.cls_value if mcfg.cls_value is not None else -2.0,
        flash_attention=False,
    )
    model.pop("layout", None)
    tree["datamodule"]["species"] = sorted(loaded.vocabs)
    tree["datamodule"]["gene_sampling_strategy"] = "top-nonzero"
    return tree


def _pretrained_csvs(loaded: LoadedModel, folder: Path) -> None:
    """The pretrained gene tables as scConcept's <species>.csv (gene name, then the vector)."""
    folder.mkdir()
    for sp, vocab in loaded.vocabs.items():
        table = loaded.model.gene_embeddings[sp].weight.detach().float().cpu().numpy()
        names = pd.read_csv(
            mapping_file(Path(loaded.cfg.PATH.GENE_MAPPINGS_PATH), sp), dtype=str, keep_default_na=False
        )
        by_token = dict(
            zip(names["token"].astype(int), names["gene_name"].where(names["gene_name"] != "", names["gene_id"]))
        )
        index = [by_token.get(t, f"token_{t}") for t in range(vocab.size)]
        pd.DataFrame(table, index=pd.Index(index, name="gene_name")).to_csv(folder / f"{sp}.csv", float_format="%.9g")


def export(run, out, trust_pickle: bool = False, log=print) -> Path:
    """Write `run` (a run, checkpoint or scConcept model directory) to `out` in scConcept's layout."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(out, "exists and is not empty.", "Choose a new directory for the export.")
    loaded = run if isinstance(run, LoadedModel) else load_model(run, device="cpu", trust_pickle=trust_pickle)
    state, pe_max_len = scconcept_state(loaded)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / model_dir.MAPPINGS).mkdir(parents=True)
    ckpt = {
        "epoch": 0,
        "global_step": int(loaded.step),
        "pytorch-lightning_version": LIGHTNING_VERSION,
        "state_dict": state,
        "loops": {},
        "callbacks": {},
        "optimizer_states": [],
        "lr_schedulers": [],
    }
    torch.save(ckpt, tmp / model_dir.CKPT)
    (tmp / model_dir.CONFIG).write_text(yaml.safe_dump(_config(loaded, pe_max_len), sort_keys=False))
    for sp in loaded.vocabs:
        shutil.copyfile(
            mapping_file(Path(loaded.cfg.PATH.GENE_MAPPINGS_PATH), sp), tmp / model_dir.MAPPINGS / f"{sp}.csv"
        )
    if loaded.model.cfg.pretrained:
        _pretrained_csvs(loaded, tmp / model_dir.PRETRAINED)
    panels = Path(loaded.cfg.PATH.PANELS_PATH)
    if panels.is_dir() and any(panels.iterdir()):
        shutil.copytree(panels, tmp / model_dir.PANELS)
    if out.exists():
        out.rmdir()
    tmp.rename(out)  # whole or not at all
    log(
        f"[export] {loaded.checkpoint} (step {loaded.step}) -> {out} in scConcept's layout: "
        f"scConcept().load_config_and_model(config='{out / model_dir.CONFIG}', "
        f"model_path='{out / model_dir.CKPT}', gene_mappings_path='{out / model_dir.MAPPINGS}')"
    )
    return out


@console.program
def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="concept-export",
        description="Write a trained run (its latest checkpoint), a checkpoint or a scConcept model in "
        "scConcept's published layout (model.ckpt, config.yaml, gene_mappings/), for its own loader.",
    )
    p.add_argument("run_or_checkpoint")
    p.add_argument("out", help="a new directory")
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="load a checkpoint that needs pickle (written before model.safetensors, or a scConcept "
        "model.ckpt with other objects): only for files you trust",
    )
    args = p.parse_args(argv)
    try:
        export(args.run_or_checkpoint, args.out, trust_pickle=args.trust_checkpoint)
    except UserError as exc:
        print(f"concept-export: {exc.paragraph()}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
