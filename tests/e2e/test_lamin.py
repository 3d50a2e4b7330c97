"""concept_shard.lamin against a real, offline, local lamindb instance (no mocks).

Every lamindb step runs in a fresh subprocess: `import lamindb` connects to "the current
instance" once per process (and Django cannot be re-configured in-process), so a pytest process
that imported lamindb would keep whatever instance it saw first. The subprocess also gets
private LAMIN_SETTINGS_DIR / LAMIN_CACHE_DIR / HOME, so ~/.lamin is never read or written.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from doc_blocks import block, replaced
from helpers import REPO

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("lamindb") is None, reason="lamindb is not installed (extra: lamindb)"
)

SOURCE_KEY = "data/synth_hsapiens/h5ads/hs_blood_a.h5ad"
OUTPUT_KEY = "shards/hsapiens/synth_hsapiens/hs_blood_a"


def lamin_env(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAMIN", "LAMINDB"))}
    for name in ("settings", "cache", "home"):
        (root / name).mkdir(parents=True, exist_ok=True)
    env.update(
        LAMIN_SETTINGS_DIR=str(root / "settings"),
        LAMIN_CACHE_DIR=str(root / "cache"),
        HOME=str(root / "home"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    return env


def run_py(code: str, env: dict, cwd: Path) -> dict:
    """Run `code` in a new interpreter; it prints one JSON object as its last stdout line."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def instance(tmp_path_factory):
    """A project dir that is the storage root of a fresh local instance, plus its env."""
    root = tmp_path_factory.mktemp("lamin")
    env = lamin_env(root)
    project = root / "project"
    (project / "data/synth_hsapiens/h5ads").mkdir(parents=True)
    (project / SOURCE_KEY).write_bytes(b"not really an h5ad, lamindb does not parse it\n")
    shards = project / OUTPUT_KEY
    shards.mkdir(parents=True)
    (shards / "index.json").write_text('{"shards": []}\n')
    (shards / "shard.00000.mds.zstd").write_bytes(os.urandom(256))
    (shards / "dataset.json").write_text('{"n_cells": 0}\n')
    # `lamin init` records the instance in <cwd>/.lamin/current_instance, so run it in the project
    proc = subprocess.run(
        [sys.executable, "-m", "lamin_cli", "init", "--storage", "."],
        env=env,
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    elsewhere = root / "elsewhere"  # a working directory with no instance marker above it
    elsewhere.mkdir()
    outside = root / "outside.h5ad"
    outside.write_bytes(b"x\n")
    return {"env": env, "project": project, "elsewhere": elsewhere, "outside": outside}


def test_import_does_not_import_lamindb(instance):
    out = run_py(
        """
        import json, sys
        import concept_shard.lamin
        print(json.dumps({"lamindb": "lamindb" in sys.modules}))
        """,
        instance["env"],
        instance["elsewhere"],
    )
    assert out == {"lamindb": False}


def test_register_lineage_idempotency_and_key_resolution(instance):
    # run from a directory outside the project: the instance is found from PROJECT_PATH's marker
    out = run_py(
        f"""
        import json
        from pathlib import Path
        from concept_shard import lamin

        project = Path({str(instance["project"])!r})
        src_path, out_path = project / {SOURCE_KEY!r}, project / {OUTPUT_KEY!r}

        def build():
            with lamin.LaminRun("concept-shard build", params={{"project": project}}) as r:
                src = r.register_source(src_path, {SOURCE_KEY!r})
                out = r.register_output(out_path, {OUTPUT_KEY!r}, [src], description="MDS shards")
            return src, out, r.run

        lamin.check_instance(project)
        src1, out1, run1 = build()
        src2, out2, run2 = build()  # nothing changed
        with open(src_path, "ab") as fh:
            fh.write(b"changed\\n")
        src3, out3, run3 = build()  # changed source, unchanged shards

        errors = {{}}
        try:
            with lamin.LaminRun("concept-shard build") as failed:
                failed.register_source(Path({str(instance["outside"])!r}), "outside.h5ad")
        except lamin.LaminError as e:
            errors["outside"] = str(e)
        try:
            lamin.resolve_artifact_key("data/missing.h5ad")
        except lamin.LaminError as e:
            errors["missing"] = str(e)

        import lamindb as ln
        out1 = ln.Artifact.get(uid=out1.uid)
        print(json.dumps({{
            "src": [src1.uid, src2.uid, src3.uid],
            "out": [out1.uid, out2.uid, out3.uid],
            "out_run": out1.run.uid,
            "out_run_inputs": sorted(a.uid for a in out1.run.input_artifacts.all()),
            "out_recreating_runs": sorted(x.uid for x in out1.recreating_runs.all()),
            "runs": [run1.uid, run2.uid, run3.uid],
            "run3_inputs": sorted(a.uid for a in ln.Run.get(uid=run3.uid).input_artifacts.all()),
            "statuses": [ln.Run.get(uid=x.uid).status for x in (run1, run2, run3)],
            "failed_status": ln.Run.get(uid=failed.run.uid).status,
            "finished": all(ln.Run.get(uid=x.uid).finished_at is not None for x in (run1, run2, run3)),
            "params": ln.Run.get(uid=run1.uid).params,
            "transforms": [(t.key, t.kind) for t in ln.Transform.filter()],
            "n_source_versions": ln.Artifact.filter(key={SOURCE_KEY!r}).count(),
            "src_latest": ln.Artifact.get(key={SOURCE_KEY!r}).uid,
            "src_path": str(src1.path),
            "resolved": str(lamin.resolve_artifact_key({SOURCE_KEY!r})),
            "resolved_dir": str(lamin.resolve_artifact_key({OUTPUT_KEY!r})),
            "errors": errors,
        }}))
        """,
        instance["env"],
        instance["elsewhere"],
    )
    project = instance["project"]
    # registered in place, one artifact per path; lineage: output <- run -> source
    assert out["src_path"] == str(project / SOURCE_KEY)
    assert out["out_run"] == out["runs"][0]
    assert out["src"][0] in out["out_run_inputs"]
    assert out["statuses"] == ["completed"] * 3 and out["finished"]
    assert out["params"] == {"project": str(project)}
    assert out["transforms"] == [["concept-shard build", "pipeline"]]
    # unchanged file and directory: the same artifacts again; the rerun is a recreating run
    assert out["src"][1] == out["src"][0]
    assert out["out"][1] == out["out"][0]
    assert out["runs"][1] in out["out_recreating_runs"]
    # changed file: a new version of the same key (same uid stem), which is now the latest
    assert out["src"][2] != out["src"][0] and out["src"][2][:16] == out["src"][0][:16]
    assert out["n_source_versions"] == 2 and out["src_latest"] == out["src"][2]
    assert out["run3_inputs"] == [out["src"][2]]
    assert out["out"][2] == out["out"][0]
    # keys resolve to the files in place
    assert out["resolved"] == str(project / SOURCE_KEY)
    assert out["resolved_dir"] == str(project / OUTPUT_KEY)
    assert "outside the storage root" in out["errors"]["outside"]
    assert "--storage" in out["errors"]["outside"]
    assert out["failed_status"] == "errored"  # the exception left the LaminRun block
    assert "No artifact with key 'data/missing.h5ad'" in out["errors"]["missing"]


def test_project_outside_storage_root(instance, tmp_path):
    out = run_py(
        f"""
        import json
        from pathlib import Path
        from concept_shard import lamin
        try:
            lamin.check_instance(Path({str(tmp_path)!r}))
            print(json.dumps({{"error": None}}))
        except lamin.LaminError as e:
            print(json.dumps({{"error": str(e)}}))
        """,
        instance["env"],
        instance["project"],  # the instance is current here
    )
    assert out["error"] and "outside the storage root" in out["error"]
    assert "lamin init --storage" in out["error"]


def test_no_instance_configured(tmp_path):
    env = lamin_env(tmp_path)
    project = tmp_path / "project"
    project.mkdir()
    out = run_py(
        f"""
        import json
        from pathlib import Path
        from concept_shard import lamin
        errors = []
        for call in (lambda: lamin.check_instance(Path({str(project)!r})),
                     lambda: lamin.resolve_artifact_key("data/x.h5ad"),
                     lambda: lamin.LaminRun("concept-shard build")):
            try:
                call()
                errors.append(None)
            except lamin.LaminError as e:
                errors.append(str(e))
        print(json.dumps({{"errors": errors}}))
        """,
        env,
        project,
    )
    for error in out["errors"]:
        assert error and "none is configured" in error and "lamin init --storage" in error
    assert not (tmp_path / "home" / ".lamin").exists()


@pytest.mark.slow
def test_concept_shard_build_registers_lineage_and_reads_lamindb_keys(example_source, tmp_path):
    """`concept-shard build --lamindb` end to end: sources in, shard datasets out, keys as split items."""
    import shutil

    env = lamin_env(tmp_path / "lamin")
    project = tmp_path / "project"
    shutil.copytree(example_source, project)
    subprocess.run(
        [sys.executable, "-m", "lamin_cli", "init", "--storage", "."],
        cwd=project,
        env=env,
        check=True,
        capture_output=True,
        timeout=180,
    )
    # A split that names one file by lamindb key: register it first, as a user would.
    run_py(
        f"""
        import json, lamindb as ln
        ln.Artifact({str(project / "data/synth_mmusculus/h5ads/mm_val_c.h5ad")!r}, key="curated/mm_val_c.h5ad").save()
        print(json.dumps({{}}))
    """,
        env,
        project,
    )
    conf = tmp_path / "conf"
    (conf / "datamodule/split_keyed_mmusculus").mkdir(parents=True)
    (conf / "datamodule/split_keyed_mmusculus/keyed.yaml").write_text(
        "source_name: keyed\nspecies: mmusculus\nsource_path: ${PATH.PROJECT_PATH}/data/${.source_name}/h5ads\n"
        "train: ['lamindb:curated/mm_val_c.h5ad']\nval: []\n"
    )
    (conf / "datamodule/Keyed.yaml").write_text(
        "defaults:\n  - DataModuleAdvanced\n  - split_keyed_mmusculus: keyed\n  - _self_\n"
        "dataset:\n  train:\n    split:\n      - ${datamodule.split_synth_hsapiens}\n"
        "      - ${datamodule.split_keyed_mmusculus}\n"
    )
    cmd = [
        sys.executable,
        "-m",
        "concept_shard.cli",
        "build",
        str(project),
        "--config-dir",
        str(conf),
        "datamodule=Keyed",
        "--lamindb",
        "--no-progress",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (project / "shards/mmusculus/keyed/mm_val_c/dataset.json").exists()
    # the README's lineage block as written, then the same question of both datasets
    readme = block("README.md", "shards = ln.Artifact.get(").text
    asked = """
        import json
        out = {"readme": sorted(i.key for i in shards.run.input_artifacts.all())}
        for key in ("shards/hsapiens/synth_hsapiens/hs_blood_a", "shards/mmusculus/keyed/mm_val_c"):
            a = ln.Artifact.get(key=key)
            out[key] = sorted(i.key for i in a.run.input_artifacts.all())
            out["transform"] = a.run.transform.key
        print(json.dumps(out))
    """
    lineage = run_py(readme + textwrap.dedent(asked), env, project)
    assert lineage["readme"] == lineage["shards/hsapiens/synth_hsapiens/hs_blood_a"]
    assert "data/synth_hsapiens/h5ads/hs_blood_a.h5ad" in lineage["shards/hsapiens/synth_hsapiens/hs_blood_a"]
    assert "curated/mm_val_c.h5ad" in lineage["shards/mmusculus/keyed/mm_val_c"]
    assert lineage["transform"] == "concept-shard build"
    # a re-run registers nothing new and still succeeds
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "0 built" in proc.stdout, proc.stdout + proc.stderr
    # status resolves the keyed file through lamindb too
    status = [c if c != "build" else "status" for c in cmd if c != "--no-progress"]
    proc = subprocess.run(status, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "done     mmusculus/keyed/mm_val_c" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.slow
def test_training_run_is_tracked_with_shard_inputs_and_checkpoint_outputs(sharded_project_copy, tmp_path):
    """`concept-train lamindb.enabled=true`: a lamindb run whose inputs are the shard datasets that
    `concept-shard --lamindb` registered and whose outputs are the checkpoint and the config."""
    project = sharded_project_copy
    env = lamin_env(tmp_path / "lamin")
    subprocess.run(
        [sys.executable, "-m", "lamin_cli", "init", "--storage", "."],
        cwd=project,
        env=env,
        check=True,
        capture_output=True,
        timeout=180,
    )
    shard = subprocess.run(
        [
            sys.executable,
            "-m",
            "concept_shard.cli",
            "build",
            str(project),
            "datamodule=DataModuleAdvanced",
            "--lamindb",
            "--no-progress",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert shard.returncode == 0, shard.stdout + shard.stderr
    tiny = [
        "model.dim_model=16",
        "model.nlayers=1",
        "model.num_head=2",
        "model.dim_hid=32",
        "model.dim_gene_embs=16",
        "model.training.max_steps=2",
        "model.training.val_check_interval=0",
        "model.training.validate_before_training=False",
        "datamodule.dataloader.train.batch_size=16",
        "datamodule=DataModuleAdvanced",
        "initialize.run_id=tracked",
    ]
    train = subprocess.run(
        [sys.executable, "-m", "concept_train.cli", str(project), *tiny, "lamindb.enabled=true"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    # the README's checkpoint block as written (its run and step are this run's), then questions of `ckpt`
    readme = replaced(block("README.md", "ckpt = ln.Artifact.get(").text, [("r1/step_1500", "tracked/step_2")])
    asked = """
        import json
        run = ckpt.run
        shards = ln.Artifact.get(key="shards/hsapiens/synth_hsapiens/hs_blood_a")
        print(json.dumps({
            "transform": run.transform.key, "status": run.status, "params_run_id": run.params["run_id"],
            "inputs": sorted(a.key for a in run.input_artifacts.all()),
            "shards_made_by": shards.run.transform.key,
            "shards_in_inputs": shards.uid in {a.uid for a in run.input_artifacts.all()},
            "outputs": sorted(a.key for a in ln.Artifact.filter(run=run)),
        }))
    """
    out = run_py(readme + textwrap.dedent(asked), env, project)
    assert out["transform"] == "concept-train" and out["status"] == "completed" and out["params_run_id"] == "tracked"
    assert out["shards_made_by"] == "concept-shard build" and out["shards_in_inputs"]  # the same artifact, not a copy
    assert "shards/mmusculus/synth_mmusculus/mm_brain_a" in out["inputs"]
    assert out["outputs"] == [
        "model_checkpoints/tracked/config.yaml",
        "model_checkpoints/tracked/metrics.jsonl",
        "model_checkpoints/tracked/step_2",
    ]
