"""scConcept's state-dict names and architecture keys <-> ours (docs/migrating.md, "scConcept's models").

Both directions use one table, so a model read from scConcept and written back (`concept-export`)
has exactly the tensors it came with. scConcept's layout differs from ours in a few places that
`ModelConfig.scconcept_layout` reproduces: its value encoder (Linear, ReLU, Linear, LayerNorm), its
float32 position table (a saved buffer, `positional_encoder.pe`), which <cls> takes row 0 of, and a
projection without bias; `logit_scale` is a 0-d tensor there and 1-d here (FSDP2 shards no scalars).
"""

from __future__ import annotations

import re

import torch

from concept_shard.errors import TrainError

from ..model.model import ModelConfig

PE = "positional_encoder.pe"  # scConcept's position table [1, pe_max_len, dim_model], a saved buffer

# (scConcept's prefix, ours): the gene tables depend on whether the model has pretrained vectors
_PRETRAINED = [
    ("gene_token_encoder.pretrained_embs.", "gene_embeddings."),
    ("gene_token_encoder.learnable_embs.", "learnable_embeddings."),
]
_LEARNED_ONLY = [("gene_token_encoder.learnable_embs.", "gene_embeddings.")]
_COMMON = [
    ("gene_token_encoder.adapter1.", "adapter."),
    ("gene_token_encoder.adapter2.", "input_proj."),
    ("gene_token_encoder.enc_norm.", "input_norm."),
    ("value_encoder.linear1.", "value_encoder.0."),
    ("value_encoder.linear2.", "value_encoder.2."),
    ("value_encoder.norm.", "value_encoder.3."),
    ("expression_decoder.fc.", "decoder."),
    ("projection.", "projection."),
    ("cls_embedding", "cls"),
    ("logit_scale", "logit_scale"),
]
_BLOCK = [
    ("self_attn.Wqkv.", "attn.qkv."),
    ("self_attn.out_proj.", "attn.out."),
    ("linear1.", "ff.0."),
    ("linear2.", "ff.3."),
    ("norm1.", "norm1."),
    ("norm2.", "norm2."),
]
_THEIR_BLOCK = re.compile(r"transformer_encoder\.layers\.(\d+)\.(.+)")
_OUR_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")


def _swap(name: str, pairs, forward: bool) -> str | None:
    for theirs, ours in pairs:
        src, dst = (theirs, ours) if forward else (ours, theirs)
        if name == src or (src.endswith(".") and name.startswith(src)):
            return dst + name[len(src) :]
    return None


def our_name(name: str, pretrained: bool) -> str | None:
    """scConcept's state-dict name -> ours (None: a name of no tensor we have)."""
    block = _THEIR_BLOCK.fullmatch(name)
    if block:
        inner = _swap(block[2], _BLOCK, True)
        return None if inner is None else f"blocks.{block[1]}.{inner}"
    return _swap(name, (_PRETRAINED if pretrained else _LEARNED_ONLY) + _COMMON, True)


def their_name(name: str, pretrained: bool) -> str | None:
    """Our state-dict name -> scConcept's (None: a tensor scConcept's model has no place for)."""
    block = _OUR_BLOCK.fullmatch(name)
    if block:
        inner = _swap(block[2], _BLOCK, False)
        return None if inner is None else f"transformer_encoder.layers.{block[1]}.{inner}"
    return _swap(name, (_PRETRAINED if pretrained else _LEARNED_ONLY) + _COMMON, False)


def has_pretrained(state: dict) -> bool:
    return any(k.startswith("gene_token_encoder.pretrained_embs.") for k in state)


def to_ours(state: dict, where) -> tuple[dict, torch.Tensor | None]:
    """scConcept's state dict -> (our weights, its position table [pe_max_len, d] or None). A
    tensor with a name of no part of the model is an error naming it (a checkpoint of another
    model, or of a scConcept version whose layout this code does not know)."""
    pretrained = has_pretrained(state)
    out, unknown, table = {}, [], None
    for name, tensor in state.items():
        if name == PE:
            table = tensor.reshape(tensor.shape[-2], tensor.shape[-1]).float()
            continue
        ours = our_name(name, pretrained)
        if ours is None:
            unknown.append(name)
        else:
            out[ours] = tensor.reshape(1) if ours == "logit_scale" else tensor
    if unknown:
        raise TrainError(
            where,
            f"holds tensors that are no part of a scConcept model this code knows (first: {unknown[:3]}).",
            "Check that it is a scConcept model checkpoint (sc-concept 0.2.x); if it is, report its "
            "sc-concept version.",
        )
    return out, table


def to_theirs(state: dict, table: torch.Tensor | None, pretrained: bool) -> dict:
    """Our state dict (a scconcept_layout model's) -> scConcept's, with its position table."""
    out = {}
    for name, tensor in state.items():
        theirs = their_name(name, pretrained)
        if theirs is None:
            raise ValueError(f"{name} has no place in scConcept's model")
        out[theirs] = tensor.reshape(()) if theirs == "logit_scale" else tensor
    if table is not None:
        out[PE] = table[None]
    return out


# the `model` keys a published model's weights fix: a run continuing one takes them (continued.py),
# an export writes them (export.py)
MODEL_KEYS = (
    "dim_model",
    "nlayers",
    "num_head",
    "dim_hid",
    "dim_gene_embs",
    "dim_pretrained_vocab",
    "projection_dim",
    "norm_scheme",
    "activation",
    "input_encoding",
    "pe_max_len",
    "cls_value",
)

# what scConcept fills into a config written before a key existed (its apply_compatibility_changes
# and its model's config.get defaults)
FILLED = {
    "norm_scheme": "post",
    "activation": "relu",
    "pe_max_len": 5000,
    "cls_value": -2,
    "projection_dim": None,
    "logit_scale_init_value": 3.0,
    "dropout": 0.1,
}
CHOICES = {
    "norm_scheme": ("pre", "post"),
    "activation": ("relu", "gelu"),
    "input_encoding": ("rank_encoding", "value_encoding"),
}


def model_config(model: dict, state: dict, vocab_sizes: dict[str, int], where) -> ModelConfig:
    """The architecture of a scConcept model: its config's `model` section (keys it lacks filled
    as scConcept fills them), the tables' sizes from the weights, scConcept's layout."""
    # a key written as null takes scConcept's filled value, but projection_dim, where null means none
    keys = {**FILLED, **{k: v for k, v in model.items() if v is not None or k == "projection_dim"}}
    for key in ("dim_model", "nlayers", "num_head", "dim_hid", "input_encoding"):
        if keys.get(key) is None:
            raise TrainError(where, f"has no model.{key}.", "Use the config.yaml the model was published with.")
    for key, allowed in CHOICES.items():
        if keys[key] not in allowed:
            raise TrainError(
                where, f"has model.{key}={keys[key]!r}.", f"scConcept's models have one of {list(allowed)}."
            )
    pretrained = has_pretrained(state)
    first = next(iter(sorted(vocab_sizes)))
    pre = state.get(f"gene_token_encoder.pretrained_embs.{first}.weight")
    return ModelConfig(
        vocab_sizes=dict(vocab_sizes),
        dim_model=int(keys["dim_model"]),
        nlayers=int(keys["nlayers"]),
        num_head=int(keys["num_head"]),
        dim_hid=int(keys["dim_hid"]),
        dropout=float(keys["dropout"]),
        dim_gene_embs=int(keys.get("dim_gene_embs") or keys["dim_model"]),
        dim_pretrained_vocab=int(pre.shape[1]) if pre is not None else int(keys.get("dim_pretrained_vocab") or 640),
        pretrained=pretrained,
        projection_dim=int(keys["projection_dim"]) if keys["projection_dim"] else None,
        norm_scheme=str(keys["norm_scheme"]),
        activation=str(keys["activation"]),
        input_encoding=str(keys["input_encoding"]),
        pe_max_len=int(keys["pe_max_len"]),
        logit_scale_init_value=float(keys["logit_scale_init_value"]),
        decoder_head="expression_decoder.fc.0.weight" in state,
        cls_value=float(keys["cls_value"]),
        scconcept_layout=True,
    )
