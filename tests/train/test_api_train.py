"""`concept_train.train()`: inputs -> shards in a work dir -> the trainer's loop -> a model."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest

from concept_shard.errors import UserError
from concept_train import embed, load_model, train
from concept_train.cli import main as train_main

TINY = ["model.dim_model=16", "model.nlayers=1", "model.num_head=2", "model.dim_hid=32", "model.dim_gene_embs=16"]


def _quiet(*args, **kwargs):
    pass


def test_from_scratch_on_files_and_objects_then_resume_on_the_command_line(example_source, tmp_path):
    data = example_source / "data"
    val = ad.read_h5ad(data / "synth_hsapiens/h5ads/hs_val_e.h5ad")[:300].copy()
    work = tmp_path / "work"
    model = train(
        [data / "synth_hsapiens/h5ads/hs_blood_a.h5ad", val],
        work,
        steps=3,
        run_id="scratch",
        gene_mappings=example_source / "references/vocabulary/token_mappings_per_specie",
        batch_size=16,
        overrides=TINY,
        progress=False,
        log=_quiet,
    )
    assert model.step == 3 and model.run_id == "scratch" and model.cfg.model.dim_model == 16
    run = work / "model_checkpoints/scratch"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"][-1] == 3
    # both inputs were sharded with the sharder's layout; the object under the work dir
    assert sorted(p.parent.name for p in (work / "shards/hsapiens").glob("*/*/dataset.json")) == [
        "adata_1",
        "hs_blood_a",
    ]
    z = embed(val, model)
    assert z.shape == (300, 16) and np.isfinite(z).all()
    # the written configs are ordinary ones: the run resumes from the command line
    conf = ["--config-dir", str(work / "conf"), "datamodule=ApiModule", "model=ContrastiveModelTiny", *TINY]
    assert (
        train_main(
            [
                str(work),
                *conf,
                "initialize.resume=True",
                "initialize.run_id=scratch",
                "model.training.max_steps=5",
                "model.training.val_check_interval=0",
            ]
        )
        == 0
    )
    assert load_model(run, "cpu").step == 5


def test_fine_tuning_starts_from_the_loaded_weights(example_source, tmp_path):
    data = example_source / "data/synth_hsapiens/h5ads"
    mappings = example_source / "references/vocabulary/token_mappings_per_specie"
    base = train(
        [data / "hs_blood_a.h5ad"],
        tmp_path / "base",
        steps=2,
        run_id="base",
        gene_mappings=mappings,
        batch_size=16,
        overrides=TINY,
        progress=False,
        log=_quiet,
    )
    cells = ad.read_h5ad(data / "hs_val_e.h5ad")[:200].copy()
    # lr 0: the new run's weights must be exactly the base run's (weights loaded, nothing else)
    same = train(
        [cells], tmp_path / "ft", model=base, steps=1, lr=0.0, run_id="ft0", batch_size=16, progress=False, log=_quiet
    )
    np.testing.assert_array_equal(embed(cells.copy(), same), embed(cells.copy(), base))
    assert same.cfg.model.dim_model == 16 and list(same.cfg.datamodule.species) == ["hsapiens"]
    # a real fine-tune from the run directory moves the weights
    tuned = train(
        [cells],
        tmp_path / "ft",
        model=base.checkpoint.parent.parent,
        steps=2,
        lr=1e-2,
        run_id="ft1",
        batch_size=16,
        progress=False,
        log=_quiet,
    )
    assert np.abs(embed(cells.copy(), tuned) - embed(cells.copy(), base)).max() > 1e-3


def test_bad_inputs_name_the_problem(example_source, tmp_path):
    mappings = example_source / "references/vocabulary/token_mappings_per_specie"
    with pytest.raises(UserError, match="does not exist"):
        train([tmp_path / "missing.h5ad"], tmp_path / "w", gene_mappings=mappings, log=_quiet)
    with pytest.raises(UserError, match="gene_mappings"):
        train([example_source / "data/synth_hsapiens/h5ads/hs_val_e.h5ad"], tmp_path / "w", log=_quiet)
    adata = ad.read_h5ad(example_source / "data/synth_hsapiens/h5ads/hs_val_e.h5ad")[:10].copy()
    adata.var_names = [f"GENE{i}" for i in range(adata.n_vars)]
    with pytest.raises(UserError, match="species"):
        train([adata], tmp_path / "w", gene_mappings=mappings, log=_quiet)


@pytest.mark.parametrize(
    "kwargs,named",
    [
        ({"steps": -3}, "train(steps=...): is -3"),
        ({"steps": 2.5}, "train(steps=...): is 2.5"),
        ({"batch_size": 0}, "train(batch_size=...): is 0"),
        ({"max_tokens": -1}, "train(max_tokens=...): is -1"),
        ({"lr": float("nan")}, "train(lr=...): is nan"),
        ({"num_workers": -1}, "train(num_workers=...): is -1"),
        ({"inputs": None}, "train(inputs=...): is None"),
        ({"work_dir": None}, "train(work_dir=...): is None"),
    ],
)
def test_wrong_arguments_are_named_before_any_work(example_source, tmp_path, kwargs, named):
    """`train(steps=-3)` blamed `warmup`; None or a wrong type gave a raw traceback."""
    args = {"inputs": [example_source / "data/synth_hsapiens/h5ads/hs_val_e.h5ad"], "work_dir": tmp_path / "w"}
    args.update(kwargs)
    mappings = example_source / "references/vocabulary/token_mappings_per_specie"
    with pytest.raises(UserError) as err:
        train(args.pop("inputs"), args.pop("work_dir"), gene_mappings=mappings, log=_quiet, **args)
    assert named in " ".join(str(err.value).split()) and "It takes" in str(err.value)
    assert not (tmp_path / "w").exists()
