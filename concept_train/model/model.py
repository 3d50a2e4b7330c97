"""The contrastive cell encoder (docs/design.md, "Model and loss"): a plain nn.Module that
knows nothing of distribution.

tokens -> per-species gene embedding (optionally pretrained vectors through a shared adapter, plus a
zero-initialised learnable residual table per species) -> shared Linear to dim_model + LayerNorm;
`<cls>` positions take a learnable CLS vector; the gene tokens get a rank encoding (sinusoidal, by
the gene's rank in its view) or a value encoding; encoder blocks (pre- or post-norm) over the packed
batch; no final norm; the CLS outputs, optionally projected, L2-normalised, are the cell embeddings.
An optional per-token decoder head predicts values (the MLM loss, `decoder`).

With pretrained vectors (scConcept's semantics): the pretrained tables (`gene_embeddings`, frozen by
`freeze_pretrained_vocabulary`) go through the shared `adapter`; the learnable tables
(`learnable_embeddings`, dim_gene_embs, zeros at the start) are added after it on a deterministic
fraction of the training steps (`adds_learnable_embs`). Zeros make a checkpoint written before the
tables existed load unchanged: the residual it lacks is exactly the one a new model starts with.
Without pretrained vectors `gene_embeddings` are the learnable tables, as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from concept_config import ModelSection, Root
from concept_shard.errors import TrainError
from concept_shard.vocabulary import CLS_TOKEN

from .attention import inverse_permutation, length_order, resolve_backend, varlen_attention


@dataclass
class ModelConfig:
    vocab_sizes: dict[str, int]  # species -> token count
    dim_model: int = 512
    nlayers: int = 8
    num_head: int = 8
    dim_hid: int = 1024
    dropout: float = 0.1
    dim_gene_embs: int = 512
    dim_pretrained_vocab: int = 640
    pretrained: bool = False  # gene tables of dim_pretrained_vocab through a shared adapter
    projection_dim: int | None = None
    norm_scheme: str = "pre"
    activation: str = "gelu"
    input_encoding: str = "rank_encoding"
    pe_max_len: int = 5000
    logit_scale_init_value: float = 3.0
    attention_backend: str = "auto"  # auto | flash | varlen | grouped
    decoder_head: bool = False  # a per-token value decoder (MLM); absent from older model.json: False
    # value_encoding: <cls> carries this value into the value encoder, as scConcept's model does
    # (its `cls_value`, -2 in its trees); None: <cls> takes no value encoding (ours; older model.json)
    cls_value: float | None = None
    # scConcept's own layout, for its published models (concept_train/scconcept/): its value encoder
    # (Linear, ReLU, Linear, LayerNorm), its float32 position table, whose row 0 <cls> also gets,
    # and a projection without bias. Ours: False (older model.json lack it).
    scconcept_layout: bool = False

    def __post_init__(self):
        # the combinations of architecture keys the schema cannot check key by key
        if self.scconcept_layout and self.input_encoding == "value_encoding" and self.cls_value is None:
            raise TrainError(
                "model.cls_value",
                "is null with model.layout=scconcept and value_encoding, but scConcept's model always gives "
                "<cls> a value.",
                "Set model.cls_value (scConcept's trees: -2), or use model.layout=concept.",
            )
        if self.dim_model % self.num_head:
            raise TrainError(
                f"model.dim_model={self.dim_model}",
                f"is not divisible by model.num_head={self.num_head}.",
                "Set model.dim_model to a multiple of model.num_head.",
            )

    @classmethod
    def from_run_config(cls, root: Root, vocab_sizes: dict[str, int]) -> ModelConfig:
        """From a whole run config: `model`, and `PATH.PRETRAINED_VOCABULARY` (which decides the
        gene tables' layout)."""
        return cls.from_config(root.model, vocab_sizes, pretrained=bool(root.PATH.PRETRAINED_VOCABULARY))

    @classmethod
    def from_config(cls, model: ModelSection, vocab_sizes: dict[str, int], pretrained: bool) -> ModelConfig:
        """The architecture of the typed `model` section (the schema checked every value)."""
        return cls(
            vocab_sizes=dict(vocab_sizes),
            dim_model=model.dim_model,
            nlayers=model.nlayers,
            num_head=model.num_head,
            dim_hid=model.dim_hid,
            dropout=model.dropout,
            dim_gene_embs=model.dim_gene_embs,
            dim_pretrained_vocab=model.dim_pretrained_vocab,
            pretrained=pretrained,
            projection_dim=model.projection_dim,
            norm_scheme=model.norm_scheme,
            activation=model.activation,
            input_encoding=model.input_encoding,
            pe_max_len=model.pe_max_len,
            logit_scale_init_value=model.logit_scale_init_value,
            attention_backend="auto" if model.flash_attention else "grouped",
            decoder_head=model.decoder_head or mlm_loss_on(model),
            cls_value=model.cls_value,
            scconcept_layout=model.layout == "scconcept",
        )


# ---- what the training keys make of the model (read by the trainer and the embedder alike) -----------
def masking_rate(model: ModelSection) -> float:
    """`model.training.masking_rate`: the fraction of gene values replaced by `model.mask_value`."""
    return model.training.masking_rate


def mlm_loss_on(model: ModelSection) -> bool:
    """The MLM loss is computed (and needs the decoder head): values are masked and weighted > 0."""
    return masking_rate(model) > 0 and model.mlm_loss_weight > 0


def learnable_embs_freq(model: ModelSection) -> float | None:
    """The fraction of training steps that add the learnable residual tables (pretrained vectors
    only): `model.training.use_learnable_embs_freq`, forced to 1 by `train_vocab_only` (the
    reference's rule); None = never."""
    training = model.training
    if training.train_vocab_only:
        return 1.0
    return training.use_learnable_embs_freq


def adds_learnable_embs(freq: float | None, step: int | None) -> bool:
    """Whether optimizer step `step` (0-based: the number of steps already taken) adds the learnable
    residual: on a deterministic fraction `freq` of the steps, step s when floor((s+1)f) > floor(sf)
    (scConcept's rule: f = 0.25 adds it on steps 3, 7, 11, ...). `step=None` is validation: always,
    unless `freq` is None (never)."""
    if freq is None:
        return False
    if step is None:
        return True
    return int((step + 1) * freq) > int(step * freq)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, backend: str):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        T, dim = x.shape
        q, k, v = self.qkv(x).view(T, 3, self.heads, dim // self.heads).unbind(1)
        return self.out(varlen_attention(q, k, v, cu_seqlens, max_seqlen, backend=self.backend).reshape(T, dim))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre = cfg.norm_scheme == "pre"
        self.attn = Attention(cfg.dim_model, cfg.num_head, cfg.attention_backend)
        self.norm1, self.norm2 = nn.LayerNorm(cfg.dim_model), nn.LayerNorm(cfg.dim_model)
        self.ff = nn.Sequential(
            nn.Linear(cfg.dim_model, cfg.dim_hid),
            nn.GELU() if cfg.activation == "gelu" else nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.dim_hid, cfg.dim_model),
        )
        self.drop1, self.drop2 = nn.Dropout(cfg.dropout), nn.Dropout(cfg.dropout)

    def forward(self, x, cu_seqlens, max_seqlen):
        if self.pre:
            x = x + self.drop1(self.attn(self.norm1(x), cu_seqlens, max_seqlen))
            return x + self.drop2(self.ff(self.norm2(x)))
        x = self.norm1(x + self.drop1(self.attn(x, cu_seqlens, max_seqlen)))
        return self.norm2(x + self.drop2(self.ff(x)))


def scconcept_table(max_len: int, dim: int) -> torch.Tensor:
    """scConcept's position table, computed as its PositionalEncoding does (float32 throughout, so
    large positions round as in its models; loading one of them copies its saved table anyway)."""
    pos = torch.arange(0, max_len, dtype=torch.float).unsqueeze(1)
    div = torch.exp(torch.arange(0, dim, 2).float() * (-math.log(10000.0) / dim))
    table = torch.zeros(max_len, dim)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)
    return table


def gene_positions(input_encoding: str, pe_max_len: int, scconcept_layout: bool) -> int | None:
    """The gene ranks (1, 2, ...; <cls> is 0) a rank-encoding table of `model.pe_max_len` tells
    apart (None: value encoding, no positions): ours has pe_max_len + 1 rows, scConcept's
    pe_max_len. A higher rank would be clamped to the last row, so views and embeddings longer than
    this are refused, naming the key and `pe_max_len_for` their length."""
    if input_encoding != "rank_encoding":
        return None
    return pe_max_len - 1 if scconcept_layout else pe_max_len


def pe_max_len_for(n_genes: int, scconcept_layout: bool) -> int:
    """The `model.pe_max_len` whose table tells `n_genes` ranks apart (gene_positions' inverse)."""
    return n_genes + 1 if scconcept_layout else n_genes


def sinusoidal_table(max_len: int, dim: int) -> torch.Tensor:
    pos = torch.arange(max_len, dtype=torch.float64)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    table = torch.zeros(max_len, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return table.float()


class ContrastiveModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.species = sorted(cfg.vocab_sizes)
        emb_dim = cfg.dim_pretrained_vocab if cfg.pretrained else cfg.dim_gene_embs
        self.gene_embeddings = nn.ModuleDict({sp: nn.Embedding(n, emb_dim) for sp, n in cfg.vocab_sizes.items()})
        for table in self.gene_embeddings.values():
            # small init (GPT-style): the LayerNorm after the projection removes the scale, so Adam's
            # lr-sized steps move a gene's direction ~50x faster than from N(0, 1); measured on the
            # example project, cross-view learning starts within ~100 steps instead of stalling
            nn.init.normal_(table.weight, std=0.02)
        self.adapter = nn.Linear(cfg.dim_pretrained_vocab, cfg.dim_gene_embs) if cfg.pretrained else None
        self.learnable_embeddings = None
        if cfg.pretrained:  # the residual to the adapted vectors: zeros, so it starts as no change
            # given as zeros, not initialised and zeroed: no draw from torch's RNG, so every other
            # parameter starts as it did before these tables existed (same seed, same model)
            self.learnable_embeddings = nn.ModuleDict(
                {
                    sp: nn.Embedding(n, cfg.dim_gene_embs, _weight=torch.zeros(n, cfg.dim_gene_embs))
                    for sp, n in cfg.vocab_sizes.items()
                }
            )
        self.input_proj = nn.Linear(cfg.dim_gene_embs, cfg.dim_model)
        # a random bias would outweigh the small gene vectors and give every gene nearly the same
        # token after the LayerNorm: all cells would start on one embedding (loss log(batch))
        nn.init.zeros_(self.input_proj.bias)
        self.input_norm = nn.LayerNorm(cfg.dim_model)
        self.cls = nn.Parameter(torch.randn(cfg.dim_model) * 0.02)
        if cfg.input_encoding == "value_encoding" and cfg.scconcept_layout:
            self.value_encoder = nn.Sequential(
                nn.Linear(1, cfg.dim_model),
                nn.ReLU(),
                nn.Linear(cfg.dim_model, cfg.dim_model),
                nn.LayerNorm(cfg.dim_model),
            )
        elif cfg.input_encoding == "value_encoding":
            self.value_encoder = nn.Sequential(
                nn.Linear(1, cfg.dim_model), nn.GELU(), nn.Linear(cfg.dim_model, cfg.dim_model)
            )
        # the reference's GeneExpressionDecoder: a value per token from its output (MLM)
        self.decoder = (
            nn.Sequential(
                nn.Linear(cfg.dim_model, cfg.dim_model),
                nn.LeakyReLU(),
                nn.Linear(cfg.dim_model, cfg.dim_model),
                nn.LeakyReLU(),
                nn.Linear(cfg.dim_model, 1),
            )
            if cfg.decoder_head
            else None
        )
        table = (
            scconcept_table(cfg.pe_max_len, cfg.dim_model)
            if cfg.scconcept_layout
            else sinusoidal_table(cfg.pe_max_len + 1, cfg.dim_model)
        )
        assert len(table) - 1 == gene_positions("rank_encoding", cfg.pe_max_len, cfg.scconcept_layout)
        self.register_buffer("rank_table", table, persistent=False)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.nlayers))
        self.projection = (
            nn.Linear(cfg.dim_model, cfg.projection_dim, bias=not cfg.scconcept_layout) if cfg.projection_dim else None
        )
        self.logit_scale = nn.Parameter(
            torch.full((1,), float(cfg.logit_scale_init_value))
        )  # 1-D: FSDP2 shards no scalars

    @torch.no_grad()
    def set_gene_vectors(self, species: str, weight: torch.Tensor) -> None:
        """Start a species' gene table from pretrained vectors [vocab size, dim_pretrained_vocab]
        (`concept_shard.gene_vectors.read_gene_vectors`)."""
        self.gene_embeddings[species].weight.copy_(weight)

    def learnable_tables(self) -> nn.ModuleDict:
        """The gene tables learnt from scratch: the residual tables with pretrained vectors, else the
        gene tables themselves (what `train_vocab_only` trains)."""
        return self.learnable_embeddings if self.learnable_embeddings is not None else self.gene_embeddings

    def set_trainable(self, freeze_pretrained: bool = False, vocab_only: bool = False) -> None:
        """`freeze_pretrained_vocabulary`: the pretrained tables get no gradient (the adapter and the
        rest still learn); `train_vocab_only`: nothing but the learnable tables does."""
        if vocab_only:
            self.requires_grad_(False)
            self.learnable_tables().requires_grad_(True)
        if freeze_pretrained and self.cfg.pretrained:
            self.gene_embeddings.requires_grad_(False)

    def load_weights(self, weights: dict) -> None:
        """Load a full state dict, also one written before the learnable residual tables existed
        (they stay zeros: the same model) or with the parameters of the former MLM head (dropped:
        they shaped no embedding)."""
        weights = {k: v for k, v in weights.items() if k not in LEGACY_KEYS}
        missing, unexpected = self.load_state_dict(weights, strict=False)
        missing = [k for k in missing if not k.startswith(OPTIONAL_PREFIXES)]
        if missing or unexpected:
            raise RuntimeError(f"the weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")

    @property
    def max_positions(self) -> int | None:
        """The most genes per cell the rank encoding tells apart (None: value encoding, no positions)."""
        return gene_positions(self.cfg.input_encoding, self.cfg.pe_max_len, self.cfg.scconcept_layout)

    def embed_tokens(self, tokens, values, positions, species: str, add_learnable: bool | None = True) -> torch.Tensor:
        x = self.gene_embeddings[species](tokens)
        if self.adapter is not None:
            x = self.adapter(x)
            if add_learnable is not None:
                # False multiplies by 0 rather than skipping (the reference's way): on a training step
                # without the residual the tables get a zero gradient and Adam's moments keep moving
                # them. None (a run that never adds them) leaves them out of the graph altogether.
                x = x + self.learnable_embeddings[species](tokens) * float(add_learnable)
        x = self.input_norm(self.input_proj(x))
        is_cls = (tokens == CLS_TOKEN)[:, None]
        x = torch.where(is_cls, self.cls.to(x.dtype), x)
        if self.cfg.input_encoding == "rank_encoding":
            enc = self.rank_table[positions.clamp(max=len(self.rank_table) - 1)].to(x.dtype)
            if self.cfg.scconcept_layout:  # scConcept's <cls> takes position 0's vector
                return x + enc
        elif self.cfg.cls_value is not None:  # scConcept's: <cls> carries cls_value into the encoder
            values = torch.where(is_cls[:, 0], self.cfg.cls_value, values)
            return x + self.value_encoder(values[:, None].to(x.dtype))
        else:
            enc = self.value_encoder(values[:, None].to(x.dtype))
        # <cls> is not a gene and has no rank or value; its rank-0 vector would be one large offset
        # shared by every cell's embedding (there is no final norm)
        return x + torch.where(is_cls, torch.zeros_like(enc), enc)

    def forward(
        self, tokens, values, positions, cu_seqlens, max_seqlen: int, species: str, add_learnable: bool | None = True
    ):
        """Returns (cell embeddings [S, d], L2-normalised; per-token outputs [T, dim_model]; the logit
        log-scale). The scale is returned rather than read from the attribute by the loss, because
        under FSDP2 parameters are whole only inside forward (and cloned: FSDP2 warns about an
        output that is a view of a parameter). `add_learnable`: add the learnable residual tables
        (pretrained vectors only; see `adds_learnable_embs`): True adds them, False adds them times
        0 (in the graph, zero gradient), None leaves them out. Masked values (MLM) come in `values`."""
        reorder = length_order(cu_seqlens) if self._grouped_attention(tokens) else None
        if reorder is not None:
            # the grouped (CPU) attention works on runs of equal-length sequences: put the batch in
            # length order once here instead of gathering q, k, v in every layer; every other op is
            # per token, so only the outputs are put back
            perm, cu_seqlens, seq_order = reorder
            tokens, values, positions = tokens[perm], values[perm], positions[perm]
        x = self.embed_tokens(tokens, values, positions, species, add_learnable)
        for block in self.blocks:
            x = block(x, cu_seqlens, max_seqlen)
        z = x[cu_seqlens[:-1].long()]
        if reorder is not None:
            z = z.index_select(0, inverse_permutation(seq_order))
            x = x.index_select(0, inverse_permutation(perm))
        if self.projection is not None:
            z = self.projection(z)
        return F.normalize(z.float(), dim=-1), x, self.logit_scale.float().reshape(()).clone()

    def compile_blocks(self) -> None:
        """torch.compile each encoder block (model.training.compile); shapes vary with every batch."""
        for block in self.blocks:
            block.compile(dynamic=True)

    def _grouped_attention(self, tokens: torch.Tensor) -> bool:
        """Whether the blocks will run the `grouped` attention path: varlen_attention's own choice for
        the dtype its q, k, v will have (autocast's, else the weights')."""
        dtype = self.input_proj.weight.dtype
        if tokens.is_cuda and torch.is_autocast_enabled("cuda"):
            dtype = torch.get_autocast_dtype("cuda")
        return resolve_backend(self.cfg.attention_backend, tokens.is_cuda, dtype) == "grouped"

    def predict_values(self, hidden: torch.Tensor) -> torch.Tensor:
        """The decoder head's value for each per-token output [n, dim_model] -> [n]. The trainer
        shards `decoder` as an FSDP unit of its own, so it may run outside `forward`."""
        if self.decoder is None:
            raise RuntimeError("this model has no decoder head (model.decoder_head)")
        return self.decoder(hidden).squeeze(-1)


# Parameters of the former MLM head (a learnable mask vector and a Linear): older value_encoding
# checkpoints hold them; they never shaped an embedding.
LEGACY_KEYS = ("value_head.weight", "value_head.bias", "mask_value")
# Parameters that a checkpoint may lack: the model keeps their initial values (zeros).
OPTIONAL_PREFIXES = ("learnable_embeddings.",)
