"""The model side of scConcept's options: the learnable residual's step schedule, the residual
tables and their loading from older checkpoints, freezing, the decoder head, the binary loss."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from concept_config import ModelSection
from concept_config.training import TrainingKeys
from concept_shard.config import compose_config
from concept_shard.errors import ConfigError, TrainError
from concept_train.model import ContrastiveModel, ContrastiveObjective, ModelConfig, contrastive_loss
from concept_train.model.loss import sample_negative_pairs
from concept_train.model.model import adds_learnable_embs, learnable_embs_freq
from concept_train.trainer.optim import build_optimizer

# ---- the schedule -------------------------------------------------------------------------------
# written out by hand for fractions exact in binary: step s (0-based) adds the residual when
# floor((s+1) f) > floor(s f)
EXPECTED = {
    0.25: lambda s: s % 4 == 3,
    0.5: lambda s: s % 2 == 1,
    0.75: lambda s: s % 4 != 0,
    1.0: lambda s: True,
    0.0: lambda s: False,
}


@pytest.mark.parametrize("freq", sorted(EXPECTED))
def test_the_residual_is_added_on_the_references_steps(freq):
    steps = [s for s in range(400) if adds_learnable_embs(freq, s)]
    assert steps == [s for s in range(400) if EXPECTED[freq](s)]
    assert len(steps) == math.floor(400 * freq)
    assert adds_learnable_embs(freq, None)  # validation: always


def test_fraction_null_never_adds_and_train_vocab_only_forces_one():
    assert not any(adds_learnable_embs(None, s) for s in [None, *range(50)])
    cfg = ModelSection()
    assert learnable_embs_freq(cfg) is None
    cfg.training.train_vocab_only = True
    assert learnable_embs_freq(cfg) == 1.0
    # an odd fraction spreads its steps evenly: 1/3 adds every third step
    third = [s for s in range(30) if adds_learnable_embs(1 / 3, s)]
    assert len(third) == 10 and set(np.diff(third)) == {3}


# ---- the residual tables ----------------------------------------------------------------------------
def _pretrained(**kw):
    cfg = ModelConfig(
        vocab_sizes={"hsapiens": 30, "mmusculus": 20},
        dim_model=16,
        nlayers=1,
        num_head=2,
        dim_hid=32,
        dim_gene_embs=8,
        dim_pretrained_vocab=6,
        pretrained=True,
        dropout=0.0,
        **kw,
    )
    torch.manual_seed(0)
    return ContrastiveModel(cfg).eval()


def _batch(n=4, length=7, vocab=30, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, vocab, (n, length), generator=g)
    tokens[:, 0] = 0
    tokens = tokens.flatten()
    cu = torch.arange(0, n * length + 1, length, dtype=torch.int32)
    positions = torch.arange(length).repeat(n)
    return tokens, torch.rand(len(tokens), generator=g), positions, cu, length


def test_residual_tables_start_at_zero_and_change_the_embedding_once_learnt():
    model = _pretrained()
    assert model.learnable_embeddings["hsapiens"].weight.shape == (30, 8)
    batch = _batch()
    with torch.no_grad():
        plain = model(*batch, "hsapiens", add_learnable=False)[0]
        torch.testing.assert_close(model(*batch, "hsapiens", add_learnable=True)[0], plain, rtol=0, atol=0)
        model.learnable_embeddings["hsapiens"].weight.normal_()
        assert not torch.allclose(model(*batch, "hsapiens", add_learnable=True)[0], plain)
        torch.testing.assert_close(model(*batch, "hsapiens", add_learnable=False)[0], plain, rtol=0, atol=0)
    # without pretrained vectors there are no residual tables: the gene tables are the learnable ones
    plain_model = ContrastiveModel(
        ModelConfig(vocab_sizes={"hsapiens": 30}, dim_model=16, nlayers=1, num_head=2, dim_hid=32, dim_gene_embs=8)
    )
    assert plain_model.learnable_embeddings is None and plain_model.learnable_tables() is plain_model.gene_embeddings


def test_residual_tables_get_a_zero_gradient_on_steps_without_them():
    """Multiplied by 0, not skipped (as the reference): Adam's moments keep moving the table."""
    model = _pretrained().train()
    z, _, _ = model(*_batch(), "hsapiens", add_learnable=False)
    z.sum().backward()
    grad = model.learnable_embeddings["hsapiens"].weight.grad
    assert grad is not None and float(grad.abs().sum()) == 0.0
    # None (a run whose fraction is null): out of the graph, the same embedding
    model.zero_grad(set_to_none=True)
    z_none, _, _ = model(*_batch(), "hsapiens", add_learnable=None)
    z_none.sum().backward()
    assert model.learnable_embeddings["hsapiens"].weight.grad is None
    torch.testing.assert_close(z_none, z, rtol=0, atol=0)


def test_freezing_and_train_vocab_only_choose_what_learns():
    model = _pretrained()
    model.set_trainable(freeze_pretrained=True)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"gene_embeddings.hsapiens.weight", "gene_embeddings.mmusculus.weight"}
    model = _pretrained()
    model.set_trainable(vocab_only=True)
    learning = {n for n, p in model.named_parameters() if p.requires_grad}
    assert learning == {"learnable_embeddings.hsapiens.weight", "learnable_embeddings.mmusculus.weight"}
    opt = build_optimizer(model, TrainingKeys(lr=1e-3, optimizer_class="Adam"))
    assert isinstance(opt, torch.optim.Adam) and sum(len(g["params"]) for g in opt.param_groups) == 2


def test_weights_without_residual_tables_or_with_the_former_mlm_head_load():
    old = _pretrained()
    weights = {k: v for k, v in old.state_dict().items() if not k.startswith("learnable_embeddings.")}
    weights.update(
        {"value_head.weight": torch.zeros(1, 16), "value_head.bias": torch.zeros(1), "mask_value": torch.zeros(16)}
    )
    model = _pretrained()
    with torch.no_grad():
        for p in model.blocks.parameters():
            p.add_(1.0)
    model.load_weights(weights)
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, old.blocks[0].attn.qkv.weight)
    assert float(model.learnable_embeddings["hsapiens"].weight.detach().abs().sum()) == 0.0  # the same model
    with pytest.raises(RuntimeError, match="missing"):
        model.load_weights({k: v for k, v in weights.items() if not k.startswith("blocks.")})


def test_the_decoder_head_comes_with_the_mlm_loss_or_the_key():
    sizes = {"hsapiens": 10}
    base = ModelSection(
        dim_model=16,
        nlayers=1,
        num_head=2,
        dim_hid=16,
        dim_gene_embs=8,
        input_encoding="value_encoding",
        mlm_loss_weight=0.0,
        training=TrainingKeys(masking_rate=0.0),
    )
    assert not ModelConfig.from_config(base, sizes, pretrained=False).decoder_head
    assert ModelConfig.from_config(dataclasses.replace(base, decoder_head=True), sizes, False).decoder_head
    mlm = dataclasses.replace(base, mlm_loss_weight=0.5, training=TrainingKeys(masking_rate=0.15))
    cfg = ModelConfig.from_config(mlm, sizes, pretrained=False)
    model = ContrastiveModel(cfg)
    assert cfg.decoder_head and model.predict_values(torch.zeros(3, 16)).shape == (3,)
    # only masking (no MLM weight): noise on the inputs, no head
    noise = dataclasses.replace(base, training=TrainingKeys(masking_rate=0.15))
    assert not ModelConfig.from_config(noise, sizes, pretrained=False).decoder_head


def test_an_unknown_optimizer_is_a_config_error_naming_the_key(tmp_path):
    """The schema refuses it when the config is composed, before any optimizer is built."""
    with pytest.raises(ConfigError, match="optimizer_class: is 'SGD'") as err:
        compose_config(tmp_path, ["model.training.optimizer_class=SGD"], log=lambda *a: None)
    assert "['AdamW', 'Adam']" in str(err.value)


def test_a_width_not_divisible_by_the_heads_is_a_train_error_naming_both_keys():
    with pytest.raises(TrainError, match="model.dim_model=30") as err:
        ModelConfig.from_config(ModelSection(dim_model=30, num_head=4), {"hsapiens": 10}, pretrained=False)
    assert "model.num_head=4" in str(err.value)


# ---- the binary loss ---------------------------------------------------------------------------------
def _views(n=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1) for _ in range(2))


@pytest.mark.parametrize("simclr", [False, True])
def test_negative_pairs_are_distinct_and_never_a_positive(simclr):
    n = 7
    rows, cols = sample_negative_pairs(n, 2 * n if simclr else n, np.random.default_rng(1), simclr)
    size = 2 * n if simclr else n
    pairs = set(zip(rows.tolist(), cols.tolist()))
    assert len(pairs) == len(rows) == (2 * n if simclr else n)
    assert all(0 <= r < size and 0 <= c < size and r != c for r, c in pairs)
    if simclr:
        assert all(c != (r + n) % size for r, c in pairs)
    # every allowed pair can be drawn: all of them when k is the number of allowed pairs
    allowed = size * (size - 2 if simclr else size - 1)
    rows, cols = sample_negative_pairs(n, allowed, np.random.default_rng(2), simclr)
    assert len(set(zip(rows.tolist(), cols.tolist()))) == allowed


def test_binary_loss_is_bce_of_the_positives_and_the_sampled_negatives():
    z1, z2 = _views()
    s = torch.tensor(1.5, dtype=torch.float64)
    mask = torch.tensor([True, True, False, True, True, True])
    loss, m = contrastive_loss(z1, z2, s, mask, kind="binary", rng=np.random.default_rng(4))
    k1, k2 = z1[mask], z2[mask]
    logits = math.exp(1.5) * k1 @ k2.T
    rows, cols = sample_negative_pairs(5, 5, np.random.default_rng(4))
    p_pos, p_neg = torch.sigmoid(logits.diagonal()), torch.sigmoid(logits[rows, cols])
    want = -(torch.log(p_pos).sum() + torch.log(1 - p_neg).sum()) / 10
    torch.testing.assert_close(loss, want)
    assert m["n_items"] == 5 and "recall@1" in m
    # the objective draws them from (seed, step, batch index): the same call, the same loss
    objective = ContrastiveObjective(None, "binary", seed=3)
    a, _ = objective(z1, z2, s, mask, step=4, key=9)
    b, _ = objective(z1, z2, s, mask, step=4, key=9)
    c, _ = objective(z1, z2, s, mask, step=5, key=9)
    assert float(a) == float(b) and float(a) != float(c)


def test_binary_loss_in_simclr_form_and_learning():
    z1, z2 = _views(n=5)
    s = torch.tensor(1.0, dtype=torch.float64)
    loss, _ = contrastive_loss(
        z1, z2, s, torch.ones(5, dtype=torch.bool), simclr=True, kind="binary", rng=np.random.default_rng(0)
    )
    z = torch.cat([z1, z2])
    logits = math.e * z @ z.T
    rows, cols = sample_negative_pairs(5, 10, np.random.default_rng(0), simclr=True)
    pos = logits[torch.arange(10), (torch.arange(10) + 5) % 10]
    want = -(F.logsigmoid(pos).sum() + F.logsigmoid(-logits[rows, cols]).sum()) / 20
    torch.testing.assert_close(loss, want)
    # a real small optimisation: free embeddings pulled together pairwise, apart otherwise
    a, b = (torch.nn.Parameter(torch.randn(16, 8, generator=torch.Generator().manual_seed(i))) for i in (1, 2))
    scale = torch.nn.Parameter(torch.tensor(1.0))
    opt = torch.optim.Adam([a, b, scale], lr=0.05)
    objective = ContrastiveObjective(None, "binary", seed=0)
    losses = []
    for step in range(60):
        loss, _ = objective(
            F.normalize(a, dim=-1), F.normalize(b, dim=-1), scale, torch.ones(16, dtype=torch.bool), step
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


def test_cls_value_is_the_value_cls_carries_into_the_value_encoding():
    """scConcept's `model.cls_value` (its trees: -2): under value_encoding the <cls> token is its
    learnt vector plus the value encoding of cls_value; null (ours) gives it no value encoding.
    scConcept's current tree was refused at this key."""
    from concept_shard.vocabulary import CLS_TOKEN

    def model(cls_value):
        torch.manual_seed(0)
        cfg = ModelConfig(
            vocab_sizes={"hsapiens": 30},
            dim_model=16,
            nlayers=1,
            num_head=2,
            dim_hid=32,
            dim_gene_embs=8,
            input_encoding="value_encoding",
            cls_value=cls_value,
        )
        return ContrastiveModel(cfg).eval()

    tokens, values = torch.tensor([CLS_TOKEN, 5, 7]), torch.tensor([0.0, 3.0, 1.0])
    positions = torch.tensor([0, 1, 2])
    ours, theirs = model(None), model(-2.0)
    with torch.no_grad():
        a = ours.embed_tokens(tokens, values, positions, "hsapiens")
        b = theirs.embed_tokens(tokens, values, positions, "hsapiens")
        cls_vector = ours.cls.detach()
        torch.testing.assert_close(a[0], cls_vector)  # no value encoding on <cls>
        torch.testing.assert_close(b[0], cls_vector + theirs.value_encoder(torch.tensor([[-2.0]]))[0])
        torch.testing.assert_close(a[1:], b[1:])  # the genes are encoded alike
