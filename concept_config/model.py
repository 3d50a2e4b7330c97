"""The config keys of the model's architecture and loss (`model.*` but `model.training`): types,
ranges, choices and defaults, here only (scConcept's 30M model)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .fields import key

# Each choice list lives here once; the model and the loss import them.
NORM_SCHEMES = ("pre", "post")
ACTIVATIONS = ("gelu", "relu")
INPUT_ENCODINGS = ("rank_encoding", "value_encoding")
CONTRASTIVE_LOSSES = ("multiclass", "binary")
LAYOUTS = ("concept", "scconcept")


@dataclass
class ModelKeys:
    name: str = key("ContrastiveModel", inert="the reference's model class; there is one here")
    dim_model: int = key(512, "transformer width", ge=1)
    nlayers: int = key(8, "encoder blocks", ge=1)
    num_head: int = key(8, "attention heads", ge=1)
    dim_hid: int = key(1024, "feed-forward hidden width", ge=1)
    dropout: float = key(0.1, "dropout on the residual branches", ge=0, lt=1)
    dim_gene_embs: int = key(512, "gene-embedding width", ge=1)
    dim_pretrained_vocab: int = key(640, "width of the pretrained gene vectors", ge=1)
    projection_dim: Optional[int] = key(None, "a Linear head to this size before L2 normalisation", ge=1)
    norm_scheme: str = key("pre", "LayerNorm before or after each residual branch", choices=NORM_SCHEMES)
    activation: str = key("gelu", "feed-forward activation", choices=ACTIVATIONS)
    flash_attention: bool = key(True, "the fastest exact varlen attention available")
    input_encoding: str = key("rank_encoding", "how values enter the model", choices=INPUT_ENCODINGS)
    pe_max_len: int = key(5000, "size of the rank-encoding table", ge=1)
    contrastive_loss: str = key(
        "multiclass", "InfoNCE (multiclass) or sigmoid BCE (binary)", choices=CONTRASTIVE_LOSSES
    )
    cont_loss_weight: float = key(1.0, "weight of the contrastive loss", ge=0)
    mlm_loss_weight: float = key(0.0, "weight of the masked-value loss", ge=0)
    decoder_head: bool = key(False, "a per-token head that predicts values (MLM)")
    mask_value: float = key(-1.0, "what a masked value becomes (model.training.masking_rate)")
    cls_value: Optional[float] = key(
        None,
        "the value <cls> carries into the value encoding (scConcept's key, its trees say -2); "
        "null: <cls> takes no value encoding",
    )
    layout: str = key(
        "concept",
        "concept: ours; scconcept: scConcept's own (its value encoder, float32 position table that <cls> "
        "takes row 0 of, projection without bias), set by a run that starts from one of its models",
        choices=LAYOUTS,
    )
    logit_scale_init_value: float = key(3.0, "initial log of the learnable logit scale")
    loss_switch_step: Optional[int] = key(10000, "from this step on, SimCLR's 2N x 2N loss", ge=0)
    # scConcept's keys with no effect here
    mask_padding: bool = key(True, inert="there is no padding: sequences are packed (varlen attention)")
    values_only_sanity_check: bool = key(False, inert="a debugging switch of the reference")
    data_loading_speed_sanity_check: bool = key(False, inert="a debugging switch of the reference")
