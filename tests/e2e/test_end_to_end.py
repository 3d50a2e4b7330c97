"""The whole path a lab takes, through the console programs: example project -> concept-shard ->
concept-train on 2 processes (torchrun, gloo) -> checkpoint -> resume -> concept-embed -> kNN."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest
import torch
from helpers import example_project, free_port

from concept_train.trainer.validate import knn_accuracy

# the demo's data settings (conf/experiment/demo.yaml): batch 96, small views, small panels too
MODEL = [
    "model=ContrastiveModelTiny",
    "model.training.warmup=20",
    "model.training.log_every_n_steps=10",
    "model.training.checkpoint_every_n_steps=30",
    "model.training.val_check_interval=0",
    "model.training.validate_before_training=False",
    "datamodule.dataloader.train.batch_size=96",
    "datamodule.dataloader.train.num_workers=1",
    "datamodule.dataset.train.max_tokens=48",
    "datamodule.dataset.train.panel_size_min=0.01",
]


def _run(*cmd, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", *cmd], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_shard_train_two_processes_resume_embed_knn(tmp_path):
    # the example project at 600 cells per file (the session fixture's 300 are too few for a kNN
    # that means something after a short run; 600 cells of hs_val_e score 0.76 after 60 steps,
    # ~0.8 after 90, ~0.99 after 240, against a threshold of ~0.52), from the fixture cache
    # (helpers.cached_copy)
    project = example_project(tmp_path / "project", "--cells", "600")
    _run("concept_shard.cli", "build", str(project), "--no-progress")
    torchrun = [
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "concept_train.cli",
        str(project),
        *MODEL,
        "initialize.run_id=e2e",
    ]
    out = _run(*torchrun, "model.training.max_steps=30")
    assert "2 processes, FSDP2 over gloo" in out
    run = project / "model_checkpoints" / "e2e"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_30"
    out = _run(*torchrun, "model.training.max_steps=60", "initialize.resume=True")
    assert "resumed run e2e" in out and (run / "checkpoints" / "latest").read_text().strip() == "step_60"
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 60 and (run / "config.resume_step30.yaml").is_file()

    source = project / "data/synth_hsapiens/h5ads/hs_val_e.h5ad"
    out_path = tmp_path / "hs_val_e.embedded.h5ad"
    # 400 of each cell's ~1,500 genes: 9.5 s instead of 23 s at 1,000, kNN 0.765 against 0.758
    _run("concept_train.embedding", str(run), str(source), "--out", str(out_path), "--max-tokens", "400")
    adata = ad.read_h5ad(out_path)
    z = adata.obsm["X_concept"]
    assert z.shape[0] == adata.n_obs and np.isfinite(z).all()
    made = adata.uns["concept"]["X_concept"]
    assert made["run_id"] == "e2e" and int(made["step"]) == 60 and int(made["max_tokens"]) == 400

    labels = torch.as_tensor(adata.obs["cell_type"].cat.codes.to_numpy().copy(), dtype=torch.int64)
    accuracy = knn_accuracy(torch.from_numpy(z), labels)
    chance = float(adata.obs["cell_type"].value_counts(normalize=True).max())  # always the majority type
    print(f"kNN cell_type accuracy {accuracy:.3f}, majority-type rate {chance:.3f}")
    assert accuracy > min(0.95, 2 * chance), (accuracy, chance)
