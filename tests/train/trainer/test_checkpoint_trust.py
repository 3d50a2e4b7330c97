"""Checkpoints that travel: a model from elsewhere runs no code when loaded, names in the config
cannot lead out of the run directory, and resuming a finished run never removes its checkpoint."""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY

from concept_shard.errors import UserError
from concept_shard.fingerprint import content_hash
from concept_train import embed, load_model
from concept_train.cli import main as train


class _Plant:
    """Unpickling this creates a file: proof that loading ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _run(project: Path, run_id: str = "shared") -> Path:
    assert train([str(project), *TINY, f"initialize.run_id={run_id}"]) == 0
    return project / "model_checkpoints" / run_id


def test_loading_a_shared_model_reads_no_pickle(sharded_project_copy, tmp_path):
    """A crafted DCP `.metadata` (a pickle) once ran code during concept-embed; models load from
    model.safetensors, model.json and config.yaml only."""
    import anndata as ad

    run = _run(sharded_project_copy)
    ckpt = run / "checkpoints" / "step_3"
    assert {"model.safetensors", "model.json", "config.yaml"} <= {p.name for p in ckpt.iterdir()}
    adata = ad.read_h5ad(sharded_project_copy / "data/synth_hsapiens/h5ads/hs_val_e.h5ad")[:40].copy()
    before = embed(adata.copy(), load_model(run, "cpu"))
    marker = tmp_path / "code-ran"
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Plant(marker)))
    after = embed(adata, load_model(run, "cpu"))
    assert not marker.exists()
    np.testing.assert_array_equal(before, after)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the crafted file's, on purpose
def test_a_crafted_rng_file_is_refused_on_resume(sharded_project_copy, tmp_path, capsys):
    """rng.pt was loaded with weights_only=False: a crafted one ran code on initialize.resume=True."""
    run = _run(sharded_project_copy)
    marker = tmp_path / "code-ran"
    ckpt = run / "checkpoints" / "step_3"
    (ckpt / "rng.pt").write_bytes(pickle.dumps(_Plant(marker)))
    # whoever crafts the file can also rewrite the checksums: the load itself must refuse it
    sums = json.loads((ckpt / "checksums.json").read_text())
    sums["rng.pt"] = content_hash(ckpt / "rng.pt")
    (ckpt / "checksums.json").write_text(json.dumps(sums))
    assert (
        train(
            [
                str(sharded_project_copy),
                *TINY,
                "initialize.run_id=shared",
                "initialize.resume=True",
                "model.training.max_steps=4",
            ]
        )
        == 2
    )
    err = " ".join(capsys.readouterr().err.split())
    assert "rng.pt" in err and "not the RNG state" in err
    assert not marker.exists()


def test_a_run_id_is_a_name_not_a_path(sharded_project_copy, capsys):
    outside = sharded_project_copy.parent / "elsewhere"
    assert train([str(sharded_project_copy), *TINY, "initialize.run_id=../../elsewhere"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "initialize.run_id" in err and "not a plain name" in err
    assert not outside.exists()


def test_a_latest_pointer_out_of_the_run_is_no_checkpoint(sharded_project_copy, capsys):
    run = _run(sharded_project_copy)
    (run / "checkpoints" / "latest").write_text("../../../elsewhere\n")
    try:
        load_model(run, "cpu")
        raise AssertionError("load_model followed a pointer out of the run")
    except UserError as err:
        assert "neither a run directory" in str(err)
    # a resume does not follow it either: it takes the run's newest intact checkpoint
    assert (
        train(
            [
                str(sharded_project_copy),
                *TINY,
                "initialize.run_id=shared",
                "initialize.resume=True",
                "model.training.max_steps=4",
            ]
        )
        == 0
    )
    assert "resumed run shared from " + str(run / "checkpoints" / "step_3") in " ".join(capsys.readouterr().out.split())


def test_resuming_a_finished_run_keeps_its_last_checkpoint(sharded_project_copy):
    """The resume re-saved step_N by deleting it first: a kill in that gap left `latest` naming
    nothing."""
    run = _run(sharded_project_copy)
    ckpt = run / "checkpoints" / "step_3"
    stamps = {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()}
    assert train([str(sharded_project_copy), *TINY, "initialize.run_id=shared", "initialize.resume=True"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()} == stamps
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_3"


def test_a_resume_that_changes_the_architecture_is_refused_by_name(sharded_project_copy, capsys):
    """model.activation changed on resume was accepted in silence, and load_model then rebuilt the
    model from the run's first config: wrong embeddings. Shape changes gave raw DCP tracebacks."""
    _run(sharded_project_copy)
    resume = [
        str(sharded_project_copy),
        *TINY,
        "initialize.run_id=shared",
        "initialize.resume=True",
        "model.training.max_steps=4",
    ]
    for change in ("model.activation=relu", "model.dim_hid=64"):
        assert train(resume + [change]) == 2
        err = " ".join(capsys.readouterr().err.split())
        key = change.split("=")[0]
        assert f"{key}: is" in err and "was written with" in err and "initialize.create_new_run=True" in err
    assert train(resume + ["model.training.lr=0.01"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "key(s) changed since the checkpoint" in out and "model.training.lr" in out
    loaded = load_model(sharded_project_copy / "model_checkpoints" / "shared", "cpu")
    assert loaded.step == 4 and float(loaded.cfg.model.training.lr) == 0.01  # the checkpoint's own config


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(sharded_project_copy, capsys):
    """Flipped bytes inside tensor data loaded silently; corrupt files gave raw tracebacks."""
    from helpers import metric_rows

    args = [
        str(sharded_project_copy),
        *TINY,
        "initialize.run_id=shared",
        "model.training.max_steps=4",
        "model.training.checkpoint_every_n_steps=2",
    ]
    assert train(args) == 0
    run = sharded_project_copy / "model_checkpoints" / "shared"
    full = metric_rows(run)
    data = next((run / "checkpoints" / "step_4").glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte inside the tensors
    data.write_bytes(bytes(raw))
    capsys.readouterr()
    assert train(args + ["initialize.resume=True", "model.training.max_steps=6"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert (
        f"checkpoint {run / 'checkpoints' / 'step_4'} is damaged" in out
        and "from " + str(run / "checkpoints" / "step_2") in out
    )
    again = metric_rows(run)
    assert [again[s]["loss"] for s in (3, 4)] == [full[s]["loss"] for s in (3, 4)]  # redone exactly
    (run / "checkpoints" / "step_6" / "model.safetensors").write_bytes(b"\0" * 64)
    try:
        load_model(run, "cpu")
        raise AssertionError("a damaged model.safetensors loaded")
    except UserError as err:
        assert "model.safetensors" in str(err) and "checksum" in str(err)


def test_altered_model_files_are_refused_by_name_before_allocation(sharded_project_copy):
    """Each file altered as someone who can also rewrite checksums.json would: NaN weights embedded
    to 100% NaN with exit 0; unknown or negative model.json values gave raw tracebacks; huge
    dimensions allocated gigabytes before failing (here they would need ~80 GB)."""
    import resource

    import torch
    from safetensors.torch import load_file, save_file

    ckpt = _run(sharded_project_copy) / "checkpoints" / "step_3"
    original = {name: (ckpt / name).read_bytes() for name in ("model.json", "model.safetensors", "config.yaml")}
    model_json = json.loads(original["model.json"])
    weights = load_file(str(ckpt / "model.safetensors"))
    first = sorted(k for k, v in weights.items() if v.is_floating_point())[0]

    def altered(name, data):
        for other, content in original.items():
            (ckpt / other).write_bytes(content)
        (ckpt / name).write_bytes(data)
        sums = json.loads((ckpt / "checksums.json").read_text())
        sums.update({other: content_hash(ckpt / other) for other in original})
        (ckpt / "checksums.json").write_text(json.dumps(sums))
        with pytest.raises(UserError) as err:
            load_model(ckpt, "cpu")
        return " ".join(str(err.value).split())

    nan = dict(weights)
    nan[first] = weights[first].clone()
    nan[first].view(-1)[0] = float("nan")
    save_file(nan, str(ckpt / "nan.safetensors"))
    text = altered("model.safetensors", (ckpt / "nan.safetensors").read_bytes())
    assert "non-finite values" in text and first in text
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    text = altered("model.json", json.dumps(dict(model_json, dim_model=1_000_000, dim_hid=1_000_000)).encode())
    assert "other shapes than the weights hold" in text
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 1_000_000  # KiB: under 1 GiB more
    text = altered("model.json", json.dumps(dict(model_json, nlayers=-2)).encode())
    assert "nlayers=-2" in text and "model.json" in text
    text = altered("model.json", json.dumps(dict(model_json, heads_extra=3)).encode())
    assert "unknown keys ['heads_extra']" in text
    assert "cannot be read as JSON" in altered("model.json", b"{not json")
    # config.yaml is parsed with bounds (a 4.8 KB alias bomb ran for minutes; deep nesting crashed)
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi")
    )
    t0 = time.perf_counter()
    assert "over 100,000 nodes" in altered("config.yaml", bomb.encode())
    assert time.perf_counter() - t0 < 30
    assert "nested" in altered("config.yaml", ("[" * 100_000 + "]" * 100_000).encode())
    # the checksums are checked before any file is parsed: a changed config.yaml is named as such
    (ckpt / "config.yaml").write_bytes(bomb.encode())
    with pytest.raises(UserError) as err:
        load_model(ckpt, "cpu")
    assert "config.yaml" in str(err.value) and "checksum" in str(err.value)
    for name, content in original.items():
        (ckpt / name).write_bytes(content)
    sums = json.loads((ckpt / "checksums.json").read_text())
    (ckpt / "checksums.json").write_text(json.dumps(sums | {n: content_hash(ckpt / n) for n in original}))
    assert torch.isfinite(load_model(ckpt, "cpu").model.state_dict()[first]).all()  # the restored one loads


def test_a_token_mapping_other_than_the_trained_one_is_refused_by_species(sharded_project_copy):
    """A mapping reshuffled at the same size embedded cells with other genes' embeddings, exit 0:
    the checkpoint records each species' mapping (vocabularies.json) and loading checks it."""
    ckpt = _run(sharded_project_copy) / "checkpoints" / "step_3"
    assert json.loads((ckpt / "vocabularies.json").read_text())["hsapiens"].startswith("sha256:")
    mapping = sharded_project_copy / "references/vocabulary/token_mappings_per_specie/hsapiens.csv"
    lines = mapping.read_text().splitlines()
    genes = [line.rsplit(",", 1) for line in lines[3:5]]  # two genes trade tokens: same size
    lines[3], lines[4] = f"{genes[0][0]},{genes[1][1]}", f"{genes[1][0]},{genes[0][1]}"
    original = mapping.read_bytes()
    mapping.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as err:
        load_model(ckpt, "cpu")
    text = " ".join(str(err.value).split())
    assert "hsapiens token mapping this model was trained with" in text and "hsapiens.csv" in text
    mapping.write_bytes(original)
    assert load_model(ckpt, "cpu").step == 3
