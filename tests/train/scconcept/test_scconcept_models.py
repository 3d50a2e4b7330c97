"""scConcept's published models, loaded and used here, held to scConcept's own outputs.

The fixtures in data/ were made by scConcept's code (sc-concept 0.2.5; tools/make_scconcept_models.py):
a model directory per shape in its published layout (a Lightning checkpoint after one real training
step, its config.yaml, gene mappings), the cells it embedded, and reference.npz: its embeddings in
float32 and under the bf16 autocast its extract_embeddings always uses, and the contrastive loss of
one training batch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from concept_shard.errors import TrainError
from concept_train.embedding import embed
from concept_train.embedding import main as embed_main
from concept_train.model.loss import contrastive_loss
from concept_train.model.model import adds_learnable_embs, learnable_embs_freq
from concept_train.scconcept import model_dir
from concept_train.trainer.checkpoint import load_model

DATA = Path(__file__).parent / "data"
SHAPES = ["human30m", "multispecies170m", "older_value"]
FP32_TOLERANCE = 1e-4  # the bound, float32 on the CPU


@pytest.fixture(scope="module", params=SHAPES)
def shape(request):
    name = request.param
    ref = dict(np.load(DATA / name / "reference.npz"))
    facts = json.loads((DATA / name / "facts.json").read_text())
    return name, load_model(DATA / name / "model", device="cpu"), ref, facts


def test_embeddings_equal_scconcepts_own(shape):
    name, loaded, ref, facts = shape
    assert loaded.model.cfg.scconcept_layout and loaded.vocabs.keys() == set(loaded.cfg.datamodule.species)
    adata = ad.read_h5ad(DATA / name / "cells.h5ad")
    z = embed(adata, loaded)  # defaults: scConcept's (its training max_tokens, learnable tables on)
    assert z.shape == ref["fp32"].shape
    fp32 = np.abs(z - ref["fp32"]).max()
    bf16 = np.abs(z - ref["bf16"]).max()
    print(f"{name}: max |ours - scConcept fp32| = {fp32:.2e}; vs its bf16 extract_embeddings {bf16:.2e}")
    assert fp32 <= FP32_TOLERANCE
    # its bf16 output is its float32 one plus its own rounding, no more
    assert bf16 <= 2 * facts["bf16_vs_fp32_max_abs"] + FP32_TOLERANCE
    assert adata.uns["concept"]["X_concept"]["max_tokens"] == facts["max_tokens"]


def _packed_views(ref: dict) -> tuple:
    """The training batch's two views as one packed batch: <cls> first, positions 0, 1, 2, ..."""
    tokens, values, positions, lengths = [], [], [], []
    for v in (1, 2):
        for row, n in zip(ref[f"tokens_{v}"], ref[f"seq_length_{v}"]):
            tokens += [0, *row[:n]]
            values += [0.0, *ref[f"values_{v}"][len(lengths) % len(ref[f"seq_length_{v}"])][:n]]
            positions += list(range(n + 1))
            lengths.append(n + 1)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return (
        torch.tensor(tokens),
        torch.tensor(values, dtype=torch.float32),
        torch.tensor(positions),
        torch.from_numpy(cu),
        max(lengths),
    )


def test_training_loss_equals_scconcepts_own(shape):
    name, loaded, ref, facts = shape
    model = loaded.model
    tokens, values, positions, cu, longest = _packed_views(ref)
    add = adds_learnable_embs(learnable_embs_freq(loaded.cfg.model), None)
    with torch.no_grad():
        z, _, scale = model(tokens, values, positions, cu, longest, facts["species"], add_learnable=add)
    n = len(ref["seq_length_1"])
    loss, _ = contrastive_loss(z[:n], z[n:], scale, torch.ones(n, dtype=torch.bool))
    assert abs(float(loss) - float(ref["loss"])) <= FP32_TOLERANCE


def test_fabric_checkpoint_and_files_named_one_by_one():
    # train_fabric.py's checkpoint, with the config and mappings named as load_config_and_model takes them
    home = DATA / "human30m"
    loaded = model_dir.load(
        config=home / "model" / "config.yaml",
        model_path=home / "fabric.ckpt",
        gene_mappings_path=home / "model" / "gene_mappings",
        device="cpu",
    )
    z = embed(ad.read_h5ad(home / "cells.h5ad"), loaded)
    assert np.abs(z - np.load(home / "reference.npz")["fp32"]).max() <= FP32_TOLERANCE


class NotATensor:  # what a checkpoint must not make us import and run
    pass


def test_checkpoint_with_code_is_refused_unless_trusted(tmp_path):
    home = tmp_path / "model"
    shutil.copytree(DATA / "human30m" / "model", home)
    state = torch.load(home / "model.ckpt", weights_only=True)["state_dict"]
    torch.save({"state_dict": state, "callbacks": {"x": NotATensor()}}, home / "model.ckpt")
    with pytest.raises(TrainError) as err:
        load_model(home, device="cpu")
    assert str(home / "model.ckpt") in str(err.value) and "trust_pickle=True" in str(err.value)
    assert load_model(home, device="cpu", trust_pickle=True).model.cfg.scconcept_layout


def test_wrong_mappings_and_damaged_checkpoint_are_named(tmp_path):
    home = tmp_path / "model"
    shutil.copytree(DATA / "human30m" / "model", home)
    csv = home / "gene_mappings" / "hsapiens.csv"
    original = csv.read_text()
    csv.write_text("\n".join(original.splitlines()[:-5]) + "\n")
    with pytest.raises(TrainError) as err:
        load_model(home, device="cpu")
    said = " ".join(str(err.value).split())
    assert said.startswith(str(csv.parent)) and "395 tokens" in said and "a table of 400" in said
    csv.write_text(original)
    data = (home / "model.ckpt").read_bytes()
    (home / "model.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(TrainError) as err:
        load_model(home, device="cpu")
    said = " ".join(str(err.value).split())
    assert said.startswith(f"{home / 'model.ckpt'}: cannot be read as a PyTorch checkpoint") and "copy it again" in said


def test_concept_embed_takes_a_model_directory(tmp_path, capsys):
    out = tmp_path / "embedded.h5ad"
    home = DATA / "multispecies170m"
    assert embed_main([str(home / "model"), str(home / "cells.h5ad"), "--out", str(out)]) == 0
    z = ad.read_h5ad(out).obsm["X_concept"]
    assert np.abs(z - np.load(home / "reference.npz")["fp32"]).max() <= FP32_TOLERANCE


def test_continued_training_starts_from_the_published_weights(tmp_path):
    # adaptation (a new run from the model's weights) through concept-train's own loop: at lr=0 the
    # run's checkpoint is the published model, so it embeds the cells as scConcept does
    from concept_train.adapt import train

    home = DATA / "multispecies170m"
    lines = []
    run = train(
        [home / "cells.h5ad"], tmp_path / "work", model=home / "model", steps=2, batch_size=8, lr=0.0, log=lines.append
    )
    assert run.model.cfg.scconcept_layout and run.model.cfg.pretrained and run.cfg.model.layout == "scconcept"
    assert any("starts from the weights of scConcept model" in line for line in lines)
    z = embed(ad.read_h5ad(home / "cells.h5ad"), run)
    assert np.abs(z - np.load(home / "reference.npz")["fp32"]).max() <= FP32_TOLERANCE

    # the command it prints continues the run: a resume builds the same (scConcept-layout) model
    from concept_train.cli import main as train_main

    command = next(line for line in lines if "to continue it: concept-train" in line).split("concept-train ", 1)[1]
    args = [a.replace("<N>", "3") for a in command.split()]
    assert train_main(args) == 0
    resumed = load_model(run.checkpoint.parent.parent, device="cpu")
    assert resumed.step == 3 and resumed.model.cfg.scconcept_layout and resumed.model.cfg.pretrained


def test_export_gives_back_scconcepts_own_checkpoint(tmp_path):
    # read in and written out, a scConcept model is the same tensors, bit for bit, and loads again
    from concept_train.scconcept.export import main as export_main

    home = DATA / "multispecies170m"
    out = tmp_path / "exported"
    assert export_main([str(home / "model"), str(out)]) == 0
    original = torch.load(home / "model" / "model.ckpt", weights_only=True)["state_dict"]
    written = torch.load(out / "model.ckpt", weights_only=True)["state_dict"]
    assert written.keys() == original.keys()
    assert all(torch.equal(written[k], original[k]) for k in original)
    assert sorted(p.name for p in (out / "gene_mappings").iterdir()) == ["drerio.csv", "hsapiens.csv", "mmusculus.csv"]
    assert sorted(p.name for p in (out / "pretrained_vocabulary").iterdir()) == sorted(
        p.name for p in (out / "gene_mappings").iterdir()
    )
    z = embed(ad.read_h5ad(home / "cells.h5ad"), load_model(out, device="cpu"))
    assert np.abs(z - np.load(home / "reference.npz")["fp32"]).max() <= FP32_TOLERANCE
    assert export_main([str(home / "model"), str(out)]) == 2  # never over an export


def test_scconcept_api_names(tmp_path):
    # code written for sc-concept, its import changed: a model by name from the local cache
    # directory, its embeddings, its gene-name mapping, its adaptation
    from concept_train.scconcept import load_config_and_model, scConcept

    cache = tmp_path / "cache"
    shutil.copytree(DATA / "human30m" / "model", cache / "corpus40M-model30M")
    with pytest.raises(TrainError) as err:
        scConcept(cache_dir=str(cache)).load_config_and_model("corpus360M-model170M")
    assert "models are not downloaded here" in " ".join(str(err.value).split())
    model = load_config_and_model("corpus40M-model30M", cache_dir=str(cache))
    assert model.species == ["hsapiens"]
    adata = ad.read_h5ad(DATA / "human30m" / "cells.h5ad")
    out = model.extract_embeddings(adata, batch_size=5)
    assert set(out) == {"cls_cell_emb"}
    assert np.abs(out["cls_cell_emb"] - np.load(DATA / "human30m" / "reference.npz")["fp32"]).max() <= FP32_TOLERANCE
    assert torch.is_tensor(model.extract_embeddings(adata[:4], return_type="torch")["cls_cell_emb"])
    ids = model.map_gene_names_to_ids("hsapiens", ["hsg0", "HSG1", "no-such-gene"])
    assert ids[:2] == ["ENSG00000000000", "ENSG00000000001"] and np.isnan(ids[2])

    # files one by one, as load_config_and_model takes them
    files = scConcept(work_dir=tmp_path / "from_files").load_config_and_model(
        config=DATA / "human30m" / "model" / "config.yaml",
        model_path=DATA / "human30m" / "fabric.ckpt",
        gene_mappings_path=DATA / "human30m" / "model" / "gene_mappings",
    )
    assert files.model.cfg.scconcept_layout
    files.train(adata, max_steps=1, batch_size=8)  # its files are first written out as a model directory
    assert files.loaded.step == 1 and (tmp_path / "from_files" / "base_model" / "model.ckpt").is_file()

    adapted = scConcept(cache_dir=str(cache), work_dir=tmp_path / "work")
    adapted.load_config_and_model("corpus40M-model30M")
    adapted.train(adata, max_steps=2, batch_size=8)
    assert adapted.loaded.step == 2 and adapted.loaded.model.cfg.scconcept_layout
    assert (tmp_path / "work" / "model_checkpoints" / adapted.loaded.run_id).is_dir()


def test_keys_of_a_later_version(tmp_path, capsys):
    # a published config with keys this code does not know: left out (said on stderr), unless they
    # are architecture keys, which may change what the model computes
    home = tmp_path / "model"
    shutil.copytree(DATA / "human30m" / "model", home)
    config = home / "config.yaml"
    config.write_text(config.read_text() + "future_section:\n  knob: 1\n")
    assert load_model(home, device="cpu").model.cfg.scconcept_layout
    assert "keys unknown here, left out: future_section" in capsys.readouterr().err
    config.write_text(config.read_text().replace("  dim_model: 32\n", "  dim_model: 32\n  rotary_positions: true\n"))
    with pytest.raises(TrainError, match="model.rotary_positions"):
        load_model(home, device="cpu")


def test_scconcept_layout_with_value_encoding_needs_a_cls_value():
    # scConcept's model always gives <cls> a value; an export of such a model must say which
    from concept_train.model.model import ModelConfig

    with pytest.raises(TrainError, match="model.cls_value"):
        ModelConfig(vocab_sizes={"hsapiens": 10}, input_encoding="value_encoding", scconcept_layout=True)
    assert ModelConfig({"hsapiens": 10}, input_encoding="value_encoding", scconcept_layout=True, cls_value=-2.0)
