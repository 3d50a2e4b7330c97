"""`concept-train`: config errors, data not sharded, new runs from weights, wandb offline, profiler."""

from __future__ import annotations

import json
import re

import pytest
from helpers import TINY

from concept_train.cli import main


def test_unknown_key_is_a_clear_error(sharded_project_copy, capsys):
    assert main([str(sharded_project_copy), *TINY, "model.trainig.lr=1"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "model.trainig.lr" in err or "trainig" in err


def test_a_value_typo_is_an_error_not_the_other_branch(sharded_project_copy, capsys):
    assert main([str(sharded_project_copy), *TINY, "model.norm_scheme=prenorm"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "model.norm_scheme: is 'prenorm'" in err and "['pre', 'post']" in err
    assert main([str(sharded_project_copy), *TINY, "model.contrastive_loss=binaryy"]) == 2
    assert "['multiclass', 'binary']" in " ".join(capsys.readouterr().err.split())


def test_data_not_sharded_says_what_to_run(project, capsys):
    assert main([str(project), *TINY]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "not sharded" in err and "concept-shard build" in err


def test_resume_needs_a_run_id_and_a_checkpoint(sharded_project_copy, capsys):
    assert main([str(sharded_project_copy), *TINY, "initialize.resume=True"]) == 2
    assert "initialize.run_id" in capsys.readouterr().err
    assert main([str(sharded_project_copy), *TINY, "initialize.resume=True", "initialize.run_id=nothing"]) == 2
    assert "no complete checkpoint" in " ".join(capsys.readouterr().err.split())


def test_new_run_from_weights_wandb_offline_and_profiler(sharded_project_copy, capsys):
    root = sharded_project_copy / "model_checkpoints"
    assert (
        main(
            [
                str(sharded_project_copy),
                *TINY,
                "initialize.run_id=first",
                "wandb.enabled=true",
                "wandb.project=concept-tests",
                "profiler.enabled=true",
                "model.training.max_steps=6",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "run directory:" in out and "curves:" in out
    assert re.search(r"\[train\] step=2/6 eta=\d+s loss=", out) and "step=6/6 eta=0s" in out  # progress
    rows = [json.loads(line) for line in (root / "first" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 7))
    for key in ("loss", "lr", "cells_per_s", "tokens_per_s", "batch_digest"):
        assert all(r[key] is not None for r in train), key
    # the wandb id is the run id and a digest of its directory: another project's `first` is another run
    (offline,) = (root / "first" / "wandb").glob("offline-run-*")
    assert re.fullmatch(r"offline-run-\d{8}_\d{6}-first-[0-9a-f]{8}", offline.name), offline.name
    assert list((root / "first" / "profiler").glob("*.json*")), "the profiler wrote no trace"
    # same run id again without resume: refused, nothing overwritten
    assert main([str(sharded_project_copy), *TINY, "initialize.run_id=first"]) == 2
    assert "already holds a run" in " ".join(capsys.readouterr().err.split())
    # weights only, into a new run that starts at step 0
    assert (
        main(
            [
                str(sharded_project_copy),
                *TINY,
                "initialize.run_id=second",
                f"initialize.checkpoint={root / 'first'}",
                "initialize.create_new_run=True",
            ]
        )
        == 0
    )
    assert "starts from the weights of" in capsys.readouterr().out
    second = [json.loads(line) for line in (root / "second" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in second if r["kind"] == "train"] == [1, 2, 3]
    # scConcept's flags for the same: resume=True + create_new_run=True names the SOURCE run (it
    # silently extended run `first`); a new run starts from first's last checkpoint
    before = (root / "first" / "metrics.jsonl").read_bytes()
    scconcept = ["initialize.resume=True", "initialize.run_id=first", "initialize.create_new_run=True"]
    assert main([str(sharded_project_copy), *TINY, *scconcept, "initialize.checkpoint=last.ckpt"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "starting from the weights of run first's step_6" in out
    (third,) = {p.name for p in root.iterdir()} - {"first", "second"}
    assert (root / "first" / "metrics.jsonl").read_bytes() == before
    rows = [json.loads(line) for line in (root / third / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]
    assert main([str(sharded_project_copy), *TINY, *scconcept, "initialize.checkpoint=step_99"]) == 2
    assert "it has: ['step_6']" in " ".join(capsys.readouterr().err.split())
    with pytest.raises(SystemExit):
        main(["--help"])


@pytest.mark.parametrize(
    "override,key",
    [
        ("model.dropout=2", "model.dropout: is 2.0"),
        ("model.dim_hid=0", "model.dim_hid: is 0"),
        ("model.nlayers=2.5", "model.nlayers: cannot take 2.5"),
        ("model.training.lr=-1", "model.training.lr: is -1.0"),
    ],
)
def test_a_bad_value_is_named_by_its_key(sharded_project_copy, capsys, override, key):
    """torch's own ValueErrors ("dropout probability has to be between 0 and 1") lost the key."""
    assert main([str(sharded_project_copy), *TINY, override]) == 2
    assert key in " ".join(capsys.readouterr().err.split())


def test_a_full_dev_shm_is_named_before_the_run_starts(sharded_project_copy, tmp_path):
    """With /dev/shm (nearly) full a run hung before its first batch or ended in a bare "Bus
    error". A real small /dev/shm: a tmpfs of 1 MiB mounted in a private mount namespace."""
    import shutil
    import subprocess
    import sys

    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
        pytest.skip("needs a private mount namespace (unshare -m, as root)")
    cmd = " ".join([sys.executable, "-m", "concept_train.cli", str(sharded_project_copy), *TINY])
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs /dev/shm && {cmd}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    err = " ".join(proc.stderr.split())
    assert proc.returncode == 2, err[-2000:]
    assert "/dev/shm: has" in err and "MiB free" in err and "--shm-size" in err
