"""scConcept's training options on real (tiny) runs: the learnable gene residual over pretrained
vectors and its schedule, freezing, train_vocab_only, the MLM loss, the binary loss, Adam,
fresh_training, check_val_every_n_epoch, and exact resumption with all of them on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import ADVANCED, TINY, metric_rows

from concept_shard.config import compose_config
from concept_shard.errors import ConfigError, TrainError
from concept_train.trainer.loop import Trainer, run_training

VECTOR_DIM = 8


def _quiet(*args, **kwargs):
    pass


def _vectors(project: Path, name: str = "rand", seed: int = 0) -> Path:
    """Random pretrained gene vectors for every gene of every species (a `<species>.csv` each)."""
    out = project / "references" / "embeddings" / name
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for mapping in (project / "references/vocabulary/token_mappings_per_specie").glob("*.csv"):
        ids = pd.read_csv(mapping).gene_id
        ids = ids[~ids.str.startswith("<")]
        table = pd.DataFrame(rng.normal(size=(len(ids), VECTOR_DIM)).round(4), index=pd.Index(ids, name="gene_id"))
        table.to_csv(out / mapping.name)
    return out


def _cfg(project: Path, run_id: str, *overrides, keys: dict | None = None, vectors: Path | None = None):
    args = [*ADVANCED, *TINY, "model.dropout=0", f"initialize.run_id={run_id}", *overrides]
    if vectors is not None:
        args += [f"PATH.PRETRAINED_VOCABULARY={vectors}", f"model.dim_pretrained_vocab={VECTOR_DIM}"]
    cfg = compose_config(project, args, log=_quiet)
    for key, value in (keys or {}).items():  # set on the typed config, as the code reads it
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            node = getattr(node, part)
        setattr(node, leaf, value)
    return cfg


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _fit(cfg) -> tuple[Trainer, dict, dict]:
    """(trainer, parameters before, parameters after) of a whole run."""
    trainer = Trainer(cfg, log=_quiet)
    before = _params(trainer.model)
    trainer.fit()
    return trainer, before, _params(trainer.model)


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


# ---- the learnable residual over pretrained vectors -------------------------------------------------
def test_the_residual_follows_the_step_schedule_and_always_at_validation(sharded_project_copy):
    """Step s (0-based) adds the learnable tables when floor((s+1)/4) > floor(s/4): steps 3, 7, 11
    for a fraction of 0.25 (the expected set is written out, not computed by the code's rule)."""
    vectors = _vectors(sharded_project_copy)
    trainer = Trainer(
        _cfg(sharded_project_copy, "sched", vectors=vectors, keys={"model.training.use_learnable_embs_freq": 0.25}),
        log=_quiet,
    )
    with torch.no_grad():  # a residual that shows: random tables instead of zeros
        for table in trainer.model.learnable_embeddings.values():
            table.weight.normal_()
    batch = next(iter(trainer.train_loader))
    model = trainer.model
    sp = trainer.data.species[int(batch.species[0])]
    with torch.no_grad():
        plain = model(
            batch.tokens, batch.values, batch.positions, batch.cu_seqlens, batch.max_seqlen, sp, add_learnable=False
        )[0]
        added = model(
            batch.tokens, batch.values, batch.positions, batch.cu_seqlens, batch.max_seqlen, sp, add_learnable=True
        )[0]
        assert not torch.allclose(plain, added)
        seen = set()
        for step in range(12):
            trainer.step = step
            z1, z2, _ = trainer.forward_views(batch)
            z = torch.cat([z1, z2])
            if torch.equal(z, added):
                seen.add(step)
            else:
                assert torch.equal(z, plain), step
        assert seen == {3, 7, 11}
        model.eval()  # validation: always
        for step in (0, 1, 5):
            trainer.step = step
            assert torch.equal(torch.cat(trainer.forward_views(batch)[:2]), added)
        model.train()
        trainer.residual_freq = None  # fraction null with vectors: never, validation included
        for training in (True, False):
            model.train(training)
            assert torch.equal(torch.cat(trainer.forward_views(batch)[:2]), plain)


def test_frozen_vectors_with_fraction_null_leave_tables_and_residual_untouched(sharded_project_copy):
    vectors = _vectors(sharded_project_copy)
    cfg = _cfg(
        sharded_project_copy, "frozen", vectors=vectors, keys={"model.training.freeze_pretrained_vocabulary": True}
    )
    trainer, before, after = _fit(cfg)
    changed = _changed(before, after)
    tables = {k for k in before if k.startswith("gene_embeddings.")}
    residual = {k for k in before if k.startswith("learnable_embeddings.")}
    assert tables and residual and not (changed & (tables | residual))
    assert "adapter.weight" in changed and "input_proj.weight" in changed  # the rest still learns
    for k in residual:  # zeros: never added, never moved
        assert float(after[k].abs().sum()) == 0.0
    # never in the graph: no gradient, no optimizer state (the run computes what it did before they existed)
    assert not any(
        p in trainer.optimizer.state
        for n, p in trainer.model.named_parameters()
        if n.startswith("learnable_embeddings.")
    )
    for sp in trainer.data.species:  # the tables are still the CSV's vectors
        table = pd.read_csv(vectors / f"{sp}.csv", index_col=0)
        vocab = trainer.data.catalog.vocab(sp)
        token = vocab.token_of[table.index[0]]
        np.testing.assert_allclose(
            after[f"gene_embeddings.{sp}.weight"][token].numpy(), table.iloc[0].to_numpy(), rtol=1e-6
        )


def test_unfrozen_vectors_learn_and_the_residual_learns_once_added(sharded_project_copy):
    vectors = _vectors(sharded_project_copy)
    cfg = _cfg(
        sharded_project_copy,
        "free",
        "model.training.max_steps=4",
        vectors=vectors,
        keys={"model.training.use_learnable_embs_freq": 0.25},
    )
    _, before, after = _fit(cfg)
    changed = _changed(before, after)
    assert any(k.startswith("gene_embeddings.") for k in changed)
    assert any(k.startswith("learnable_embeddings.") for k in changed)  # added at step 3 (the 4th)
    # three steps only: the first step that adds the residual (3) is not reached, the tables stay zeros
    _, before, after = _fit(
        _cfg(sharded_project_copy, "free3", vectors=vectors, keys={"model.training.use_learnable_embs_freq": 0.25})
    )
    assert not any(k.startswith("learnable_embeddings.") for k in _changed(before, after))


def test_train_vocab_only_changes_only_the_learnable_tables(sharded_project_copy):
    vectors = _vectors(sharded_project_copy)
    trainer, before, after = _fit(
        _cfg(sharded_project_copy, "vocab", vectors=vectors, keys={"model.training.train_vocab_only": True})
    )
    changed = _changed(before, after)
    assert changed and all(k.startswith("learnable_embeddings.") for k in changed), changed
    assert trainer.residual_freq == 1.0  # forced: every step adds them
    # without pretrained vectors the learnable tables are the gene tables themselves
    _, before, after = _fit(_cfg(sharded_project_copy, "vocab2", keys={"model.training.train_vocab_only": True}))
    changed = _changed(before, after)
    assert changed and all(k.startswith("gene_embeddings.") for k in changed), changed


def test_embedding_can_leave_the_residual_out(sharded_project_copy, tmp_path):
    import anndata as ad

    from concept_train import embed, load_model
    from concept_train.embedding import main as embed_main

    vectors = _vectors(sharded_project_copy)
    run_training(
        _cfg(
            sharded_project_copy,
            "emb",
            "model.training.lr=1e-2",
            vectors=vectors,
            keys={"model.training.use_learnable_embs_freq": 1.0},
        ),
        log=_quiet,
    )
    run = sharded_project_copy / "model_checkpoints" / "emb"
    loaded = load_model(run, "cpu")
    assert float(loaded.model.learnable_embeddings["hsapiens"].weight.detach().abs().sum()) > 0
    source = sharded_project_copy / "data/synth_hsapiens/h5ads/hs_val_e.h5ad"
    cells = ad.read_h5ad(source)[:64].copy()
    with_residual = embed(cells, loaded)
    assert cells.uns["concept"]["X_concept"]["learnable_embs"] is True
    without = embed(cells, loaded, use_learnable_embs=False)
    assert cells.uns["concept"]["X_concept"]["learnable_embs"] is False
    assert np.abs(with_residual - without).max() > 1e-4
    out = tmp_path / "no_residual.h5ad"
    assert embed_main([str(run), str(source), "--out", str(out), "--no-learnable-embs"]) == 0
    np.testing.assert_allclose(ad.read_h5ad(out).obsm["X_concept"][:64], without, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_without_residual_tables_still_loads(sharded_project_copy):
    """A model with pretrained vectors saved before the learnable tables existed: load_model,
    weights into a new run, and a resume all load it, the tables starting at zero."""
    from concept_train import load_model
    from concept_train.trainer.optim import build_optimizer

    vectors = _vectors(sharded_project_copy)
    trainer = Trainer(_cfg(sharded_project_copy, "old", vectors=vectors), log=_quiet)
    trainer.model.learnable_embeddings = None  # the former layout
    trainer.optimizer = build_optimizer(trainer.model, trainer.training)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda s: 1.0)
    ckpt = trainer.checkpoint()
    trainer.run_lock.release()  # done writing run "old": the resume below is its next writer
    loaded = load_model(ckpt, "cpu")
    assert float(loaded.model.learnable_embeddings["hsapiens"].weight.detach().abs().sum()) == 0.0
    run_training(
        _cfg(
            sharded_project_copy,
            "from-old",
            vectors=vectors,
            keys={"initialize.checkpoint": str(ckpt), "initialize.create_new_run": True},
        ),
        log=_quiet,
    )
    resumed = Trainer(_cfg(sharded_project_copy, "old", "initialize.resume=True", vectors=vectors), log=_quiet)
    assert resumed.step == 0
    assert float(resumed.model.learnable_embeddings["hsapiens"].weight.detach().abs().sum()) == 0.0
    resumed.fit()


# ---- MLM --------------------------------------------------------------------------------------------
MLM = {"model.input_encoding": "value_encoding", "model.mlm_loss_weight": 1.0}


def test_mlm_loss_only_with_a_masking_rate(sharded_project_copy):
    run_training(_cfg(sharded_project_copy, "mlm", keys={**MLM, "model.training.masking_rate": 0.3}), log=_quiet)
    rows = metric_rows(sharded_project_copy / "model_checkpoints" / "mlm")
    assert all(r["loss_mlm"] > 0 for r in rows.values())
    assert all(r["loss"] > r["loss_mlm"] for r in rows.values())
    run_training(_cfg(sharded_project_copy, "nomask", keys={**MLM, "model.training.masking_rate": 0.0}), log=_quiet)
    rows = metric_rows(sharded_project_copy / "model_checkpoints" / "nomask")
    assert not any("loss_mlm" in r for r in rows.values())
    weights = json.loads((sharded_project_copy / "model_checkpoints/nomask/checkpoints/step_3/model.json").read_text())
    assert weights["decoder_head"] is False
    # a resume that would drop the decoder head of the checkpoint's model is refused by name
    with pytest.raises(TrainError, match="model.decoder_head"):
        Trainer(
            _cfg(
                sharded_project_copy,
                "mlm",
                "initialize.resume=True",
                "model.training.max_steps=4",
                keys={**MLM, "model.training.masking_rate": 0.0},
            ),
            log=_quiet,
        )


def test_the_mlm_mask_is_a_function_of_seed_and_batch(sharded_project_copy):
    trainer = Trainer(_cfg(sharded_project_copy, "mask", keys={**MLM, "model.training.masking_rate": 0.25}), log=_quiet)
    it = iter(trainer.train_loader)
    a, b = next(it), next(it)
    mask = trainer._mlm_mask(a)
    assert torch.equal(mask, trainer._mlm_mask(a)) and not torch.equal(mask[:100], trainer._mlm_mask(b)[:100])
    assert not mask[a.tokens == 0].any()  # <cls> is never masked
    assert 0.2 < float(mask.float().sum() / (a.tokens != 0).sum()) < 0.3
    z1, _, (_, used, values, _) = trainer.forward_views(a, mlm=True)
    assert torch.equal(used, mask) and torch.equal(values, a.values)  # the loss's targets stay unmasked


def test_masking_with_rank_encoding_is_refused_by_name(sharded_project_copy):
    with pytest.raises(TrainError, match="masking_rate"):
        Trainer(_cfg(sharded_project_copy, "rank", keys={"model.training.masking_rate": 0.2}), log=_quiet)


# ---- the binary loss, Adam, bad names ----------------------------------------------------------------
@pytest.mark.parametrize(
    "keys", [{"model.contrastive_loss": "binary"}, {"model.training.optimizer_class": "Adam"}], ids=["binary", "adam"]
)
def test_the_trainer_step_learns(sharded_project_copy, keys):
    """A real small optimisation through the trainer's own step: one fixed batch of 32 cells,
    memorised within 20 steps."""
    trainer = Trainer(
        _cfg(
            sharded_project_copy,
            "learn",
            "model.training.lr=3e-3",
            "model.training.warmup=1",
            "datamodule.dataloader.train.batch_size=32",
            keys=keys,
        ),
        log=_quiet,
    )
    assert type(trainer.optimizer).__name__ == keys.get("model.training.optimizer_class", "AdamW")
    batch = next(iter(trainer.train_loader))
    losses = [trainer.train_step(iter([batch]))["loss"] for _ in range(20)]
    assert losses[-1] < 0.5 * losses[0], losses


def test_an_unknown_optimizer_or_loss_is_named(sharded_project_copy):
    """The schema refuses them when the config is composed, before any work."""
    with pytest.raises(ConfigError, match="optimizer_class") as err:
        _cfg(sharded_project_copy, "sgd", "model.training.optimizer_class=SGD")
    assert "['AdamW', 'Adam']" in str(err.value)
    with pytest.raises(ConfigError, match="contrastive_loss"):
        _cfg(sharded_project_copy, "bce", "model.contrastive_loss=triplet")
    with pytest.raises(ConfigError, match="use_learnable_embs_freq"):
        _cfg(sharded_project_copy, "freq", "model.training.use_learnable_embs_freq=1.5")
    with pytest.raises(ConfigError, match="check_val_every_n_epoch"):
        _cfg(sharded_project_copy, "every", "model.training.check_val_every_n_epoch=0")


# ---- fresh_training -----------------------------------------------------------------------------------
def test_fresh_training_restarts_the_step_with_the_weights_and_optimizer_state(sharded_project_copy):
    root = sharded_project_copy / "model_checkpoints"
    first, _, trained = _fit(_cfg(sharded_project_copy, "first", "model.training.max_steps=4"))
    moments = {k: v["exp_avg"].clone() for k, v in first.optimizer.state_dict()["state"].items()}
    with pytest.raises(TrainError, match="initialize.checkpoint"):
        Trainer(_cfg(sharded_project_copy, "nockpt", keys={"initialize.fresh_training": True}), log=_quiet)
    cfg = _cfg(
        sharded_project_copy,
        "fresh",
        keys={"initialize.checkpoint": str(root / "first"), "initialize.fresh_training": True},
    )
    fresh = Trainer(cfg, log=_quiet)
    assert fresh.step == 0 and fresh.train_loader.position == 0
    assert not _changed(trained, _params(fresh.model))  # the checkpoint's weights
    state = fresh.optimizer.state_dict()["state"]
    assert moments.keys() == state.keys()
    for k in moments:  # and its optimizer state
        torch.testing.assert_close(state[k]["exp_avg"], moments[k], rtol=0, atol=0)
    warm = float(cfg.model.training.lr) / int(cfg.model.training.warmup)
    assert fresh.optimizer.param_groups[0]["lr"] == pytest.approx(warm)  # the schedule from its start
    fresh.fit()
    a, b = metric_rows(root / "first"), metric_rows(root / "fresh")
    assert sorted(b) == [1, 2, 3]
    assert [b[s]["batch_digest"] for s in b] == [a[s]["batch_digest"] for s in (1, 2, 3)]  # data from batch 0
    assert b[1]["lr"] == a[1]["lr"]


# ---- check_val_every_n_epoch -------------------------------------------------------------------------
def test_validation_after_every_nth_epoch(sharded_project_copy):
    big = ["datamodule.dataloader.train.batch_size=256", "datamodule.dataset.train.max_tokens=20"]
    probe = Trainer(_cfg(sharded_project_copy, "probe", *big), log=_quiet)
    per_epoch = probe.train_loader.plan.batches_per_epoch
    assert per_epoch <= 12, per_epoch
    cfg = _cfg(
        sharded_project_copy,
        "epochs",
        *big,
        f"model.training.max_steps={2 * per_epoch + 1}",
        "model.training.log_every_n_steps=1000",
        keys={"model.training.check_val_every_n_epoch": 2},
    )
    for section in (cfg.datamodule.dataset.val, cfg.datamodule.dataloader.val):  # one small validation loader
        for name in [k for k in section if k != "within_P200_B256"]:  # is enough
            del section[name]
    run_training(cfg, log=_quiet)
    rows = [
        json.loads(x)
        for x in (sharded_project_copy / "model_checkpoints/epochs/metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows if r["kind"] == "val"] == [2 * per_epoch]  # not after epoch 0
    # with gradient accumulation an epoch may end inside a step: the step that holds its last batch
    probe.val_every_epochs, probe.step = 1, 0
    probe.cfg.model.training.accumulate_grad_batches = 2
    ends = []
    for position in range(2, 3 * per_epoch + 1, 2):  # after steps of batches (position-2, position-1)
        probe.train_loader.position = position
        if probe._epoch_ended():
            ends.append(position - 1)
    assert ends == [e * per_epoch - 1 + ((e * per_epoch - 1) % 2 == 0) for e in (1, 2, 3)]


# ---- exact resumption with everything on ------------------------------------------------------------------
def test_resume_is_bit_identical_with_the_new_options_on(sharded_project_copy):
    vectors = _vectors(sharded_project_copy)
    keys = {
        **MLM,
        "model.training.masking_rate": 0.2,
        "model.contrastive_loss": "binary",
        "model.training.use_learnable_embs_freq": 0.5,
        "model.training.freeze_pretrained_vocabulary": True,
        "model.training.optimizer_class": "Adam",
        "model.training.accumulate_grad_batches": 2,
        "model.loss_switch_step": 3,
    }
    common = ["model.training.max_steps=6", "model.training.checkpoint_every_n_steps=3", "model.dropout=0.1"]
    root = sharded_project_copy / "model_checkpoints"
    run_training(_cfg(sharded_project_copy, "whole", *common, vectors=vectors, keys=keys), log=_quiet)
    run_training(
        _cfg(sharded_project_copy, "parts", *common, "model.training.max_steps=3", vectors=vectors, keys=keys),
        log=_quiet,
    )
    run_training(
        _cfg(sharded_project_copy, "parts", *common, "initialize.resume=True", vectors=vectors, keys=keys), log=_quiet
    )
    a, b = metric_rows(root / "whole"), metric_rows(root / "parts")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert a[step]["batch_digest"] == b[step]["batch_digest"], step
        assert a[step]["loss"] == b[step]["loss"] and a[step]["loss_mlm"] == b[step]["loss_mlm"], step


# ---- two processes (FSDP2 over gloo) -----------------------------------------------------------------------
def _train_rank(rank: int, project: str, store: str, args: list, out: dict) -> None:
    import os

    import torch.distributed as dist

    from concept_train.cli import main

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    out[rank] = main([project, *args])


@pytest.mark.slow
def test_two_processes_train_the_decoder_and_the_residual_tables(sharded_project_copy, tmp_path):
    """The decoder head runs after forward as an FSDP unit of its own, the residual tables are FSDP
    units per species: every rank must reduce them together, masked positions or not."""
    import torch.multiprocessing as mp

    from concept_train import load_model

    vectors = _vectors(sharded_project_copy)
    args = [
        *ADVANCED,
        *TINY,
        "model.training.max_steps=4",
        "initialize.run_id=two",
        "model.dropout=0",
        f"PATH.PRETRAINED_VOCABULARY={vectors}",
        f"model.dim_pretrained_vocab={VECTOR_DIM}",
        "model.input_encoding=value_encoding",
        "model.mlm_loss_weight=1.0",
        "model.training.masking_rate=0.3",
        "model.contrastive_loss=binary",
        "model.training.use_learnable_embs_freq=0.5",
    ]
    out = mp.Manager().dict()
    mp.spawn(_train_rank, args=(str(sharded_project_copy), str(tmp_path / "store"), args, out), nprocs=2, join=True)
    assert dict(out) == {0: 0, 1: 0}
    run = sharded_project_copy / "model_checkpoints" / "two"
    rows = metric_rows(run)
    assert sorted(rows) == [1, 2, 3, 4] and all(r["loss_mlm"] > 0 for r in rows.values())
    model = load_model(run, "cpu").model
    assert model.decoder is not None
    assert float(model.learnable_embeddings["hsapiens"].weight.detach().abs().sum()) > 0
