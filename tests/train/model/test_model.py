"""The model's attention paths, its forward pass and the contrastive loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from concept_shard.gene_vectors import read_gene_vectors
from concept_train.model import ContrastiveModel, ModelConfig, contrastive_loss
from concept_train.model.attention import HAS_FLASH_ATTN, grouped_attention, varlen_attention
from concept_train.trainer.validate import knn_accuracy


def _packed(lengths, heads=2, dim=8, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q, k, v = (torch.randn(T, heads, dim, generator=g, dtype=torch.float64).to(device, dtype) for _ in range(3))
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=device)
    return q, k, v, cu


def _reference(q, k, v, cu):
    """Each sequence on its own, float64, plain softmax attention."""
    out = torch.empty_like(q, dtype=torch.float64)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (x[a:b].double().transpose(0, 1) for x in (q, k, v))
        w = torch.softmax(qs @ ks.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        out[a:b] = (w @ vs).transpose(0, 1)
    return out


def test_grouped_attention_equals_per_sequence_reference():
    lengths = [1, 5, 5, 17, 3, 17, 17, 64, 2]
    q, k, v, cu = _packed(lengths)
    torch.testing.assert_close(grouped_attention(q, k, v, cu), _reference(q, k, v, cu), rtol=1e-10, atol=1e-10)


def test_grouped_attention_gradients_equal_the_reference():
    lengths = [3, 9, 1, 9, 4, 3, 12]  # not in length order: the gather/scatter path
    q, k, v, cu = _packed(lengths)
    inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = [x.clone().requires_grad_() for x in (q, k, v)]
    w = torch.randn_like(q)
    (grouped_attention(*inputs, cu) * w).sum().backward()
    (_reference(*ref, cu) * w).sum().backward()
    for a, b in zip(inputs, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10)


def test_length_order_sorts_sequences_and_keeps_sorted_batches_as_they_are():
    from concept_train.model.attention import length_order

    assert length_order(torch.tensor([0, 1, 3, 5, 9], dtype=torch.int32)) is None  # lengths 1, 2, 2, 4: sorted
    perm, cu, order = length_order(torch.tensor([0, 3, 4, 6], dtype=torch.int32))  # lengths 3, 1, 2
    assert order.tolist() == [1, 2, 0] and cu.tolist() == [0, 1, 3, 6] and cu.dtype == torch.int32
    assert perm.tolist() == [3, 4, 5, 0, 1, 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["varlen", "grouped"] + (["flash"] if HAS_FLASH_ATTN else []))
def test_cuda_attention_paths_agree_with_float64_reference(backend):
    lengths = [1, 200, 37, 999, 5, 64]
    q, k, v, cu = _packed(lengths, heads=8, dim=64, dtype=torch.bfloat16, device="cuda")
    out = varlen_attention(q, k, v, cu, max(lengths), backend=backend)
    torch.testing.assert_close(out.double().cpu(), _reference(q, k, v, cu).cpu(), rtol=2e-2, atol=2e-2)


def _model(**kw):
    cfg = ModelConfig(
        vocab_sizes={"hsapiens": 50, "mmusculus": 40},
        dim_model=32,
        nlayers=2,
        num_head=4,
        dim_hid=64,
        dim_gene_embs=16,
        dropout=0.0,
        **kw,
    )
    torch.manual_seed(0)
    return ContrastiveModel(cfg)


def _batch(lengths, vocab=50, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens, positions = [], []
    for n in lengths:
        tokens += [0] + torch.randint(2, vocab, (n - 1,), generator=g).tolist()
        positions += list(range(n))
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return (torch.tensor(tokens), torch.rand(len(tokens), generator=g), torch.tensor(positions), cu, max(lengths))


@pytest.mark.parametrize(
    "kw",
    [{}, {"norm_scheme": "post", "activation": "relu"}, {"input_encoding": "value_encoding"}, {"projection_dim": 8}],
)
def test_forward_gives_unit_cls_embeddings_and_sequences_do_not_interact(kw):
    model = _model(**kw).eval()
    tokens, values, positions, cu, max_len = _batch([4, 9, 1, 6])
    z, hidden, scale = model(tokens, values, positions, cu, max_len, "hsapiens")
    assert z.shape == (4, kw.get("projection_dim") or 32) and hidden.shape == (len(tokens), 32)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(4))
    assert float(scale.detach()) == pytest.approx(3.0)
    # sequence 2 alone gives the same embedding as inside the packed batch: no cross-sequence attention
    a, b = int(cu[1]), int(cu[2])
    z_alone, _, _ = model(
        tokens[a:b], values[a:b], positions[a:b], torch.tensor([0, b - a], dtype=torch.int32), b - a, "hsapiens"
    )
    torch.testing.assert_close(z_alone[0], z[1], rtol=1e-5, atol=1e-6)


def test_checkpoint_of_one_attention_backend_loads_into_another():
    a, b = _model(), _model(attention_backend="grouped")
    b.load_state_dict(a.state_dict())
    assert set(a.state_dict()) == set(b.state_dict())


def test_infonce_matches_its_definition_and_ignores_masked_items():
    torch.manual_seed(0)
    z1, z2 = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    s = torch.tensor(2.0)
    mask = torch.tensor([True, True, False, True, True, True])
    loss, m = contrastive_loss(z1, z2, s, mask)
    k1, k2 = z1[mask], z2[mask]
    logits = math.exp(2.0) * k1 @ k2.T
    t = torch.arange(5)
    want = (F.cross_entropy(logits, t) + F.cross_entropy(logits.T, t)) / 2
    torch.testing.assert_close(loss, want)
    assert m["n_items"] == 5
    simclr, _ = contrastive_loss(z1, z2, s, mask, simclr=True)
    z = torch.cat([k1, k2])
    sim = math.exp(2.0) * z @ z.T - torch.eye(10) * 1e9
    torch.testing.assert_close(simclr, F.cross_entropy(sim, torch.cat([t + 5, t])), rtol=1e-5, atol=1e-5)
    # identical views are retrieved perfectly
    _, perfect = contrastive_loss(z1, z1.clone(), torch.tensor(4.0), torch.ones(6, dtype=torch.bool))
    assert perfect["recall@1"] == 1.0 and perfect["recall@5"] == 1.0


def test_knn_accuracy_leave_one_out():
    z = F.normalize(
        torch.tensor(
            [
                [1.0, 0],
                [0.99, 0.1],
                [0.98, 0.2],
                [0.97, 0.25],
                [0.96, 0.3],
                [0.95, 0.31],
                [0, 1.0],
                [0.1, 0.99],
                [0.2, 0.98],
                [0.25, 0.97],
                [0.3, 0.96],
                [0.31, 0.95],
            ]
        ),
        dim=-1,
    )
    labels = torch.tensor([1] * 6 + [2] * 6)
    assert knn_accuracy(z, labels) == 1.0
    assert knn_accuracy(z, torch.tensor([1, 2] * 6)) < 0.6
    assert knn_accuracy(z, torch.tensor([-1] * 12)) != knn_accuracy(z, torch.tensor([-1] * 12))  # nan: no labels


def test_pretrained_gene_vectors_fill_the_tables_and_missing_genes_start_at_zero(tmp_path):
    cfg = ModelConfig(
        vocab_sizes={"hsapiens": 5},
        dim_model=16,
        nlayers=1,
        num_head=2,
        dim_hid=16,
        dim_gene_embs=8,
        dim_pretrained_vocab=3,
        pretrained=True,
    )
    model = ContrastiveModel(cfg)
    (tmp_path / "hsapiens.csv").write_text("gene_id,a,b,c\nENSG1.4,1,2,3\nENSG3,4,5,6\nENSG_OTHER,7,8,9\n")
    warnings = []
    ids = ["<cls>", "<pad>", "ENSG1", "ENSG2", "ENSG3"]
    weight = read_gene_vectors(tmp_path / "hsapiens.csv", ids, cfg.dim_pretrained_vocab, warn=warnings.append)
    model.set_gene_vectors("hsapiens", torch.from_numpy(weight))
    w = model.gene_embeddings["hsapiens"].weight.detach()
    torch.testing.assert_close(w[2], torch.tensor([1.0, 2, 3]))
    torch.testing.assert_close(w[4], torch.tensor([4.0, 5, 6]))
    assert float(w[3].abs().sum()) == 0.0
    assert len(warnings) == 1 and "1 of 3" in warnings[0]
    assert model.adapter.in_features == 3 and model.adapter.out_features == 8


def test_mutual_information_estimate_is_log_n_minus_the_loss():
    from concept_train import estimate_mutual_information

    torch.manual_seed(0)
    z = F.normalize(torch.randn(64, 32), dim=-1)
    same = estimate_mutual_information(z, z, logit_scale=math.log(100))
    assert math.log(64) - 0.05 < same <= math.log(64)
    unrelated = estimate_mutual_information(z, F.normalize(torch.randn(64, 32), dim=-1), logit_scale=math.log(100))
    assert unrelated < 0.5


@pytest.mark.parametrize("kw", [{}, {"input_encoding": "value_encoding"}])
def test_forward_in_any_sequence_order_equals_each_sequence_alone(kw):
    """The grouped path sorts the batch by length internally; outputs come back in the input order."""
    model = _model(attention_backend="grouped", **kw).eval()
    lengths = [6, 2, 9, 2, 1, 9, 4]
    tokens, values, positions, cu, max_len = _batch(lengths)
    z, hidden, _ = model(tokens, values, positions, cu, max_len, "hsapiens")
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        z1, h1, _ = model(
            tokens[a:b], values[a:b], positions[a:b], torch.tensor([0, b - a], dtype=torch.int32), b - a, "hsapiens"
        )
        torch.testing.assert_close(z1[0], z[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(h1, hidden[a:b], rtol=1e-5, atol=1e-5)


def test_cells_are_told_apart_at_initialisation():
    """At the demo's size, different cells' embeddings must not start on one direction: when the
    input projection's bias outweighed the small gene vectors and the CLS carried the rank-0
    encoding, every pair of cells had cosine ~0.9996 and the demo sat at loss log(batch) for its first
    ~150 steps."""
    cfg = ModelConfig(
        vocab_sizes={"hsapiens": 20000},
        dim_model=128,
        nlayers=2,
        num_head=4,
        dim_hid=256,
        dim_gene_embs=128,
        dropout=0.0,
    )
    torch.manual_seed(0)
    model = ContrastiveModel(cfg).eval()
    lengths = [49] * 32 + [16] * 32  # views of 48 and 15 genes, as the demo's
    tokens, values, positions, cu, max_len = _batch(lengths, vocab=20000)
    with torch.no_grad():
        z, _, _ = model(tokens, values, positions, cu, max_len, "hsapiens")
    for group in (z[:32], z[32:]):
        cos = group @ group.T
        off_diagonal = cos[~torch.eye(32, dtype=torch.bool)]
        assert float(off_diagonal.mean()) < 0.97, float(off_diagonal.mean())
