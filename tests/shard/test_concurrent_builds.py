"""Two builds over one project (a re-submitted array while the first still runs) never share a
part: the second skips what the first holds, and every published dataset accounts for every
source cell. Leftovers of a killed join are cleaned and never counted."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from helpers import ADVANCED, REPO, dataset_dirs, shard

from concept_shard.layout import exclusive

LUNG = "shards/hsapiens/synth_hsapiens/hs_lung_b"


def _locks(project):
    return project / "shards/hsapiens/synth_hsapiens/.locks"


def test_rows_held_by_another_build_are_skipped_not_shared(project, capsys):
    part_lock = _locks(project) / f"hs_lung_b.part_{0:012d}_{300:012d}"
    with exclusive(part_lock) as mine:
        assert mine
        assert shard("build", project, *ADVANCED, "--no-progress") == 0
        out = " ".join(capsys.readouterr().out.split())
        assert "hs_lung_b: rows 0-300 are being written by another build; skipped here" in out
        assert not (project / LUNG / "dataset.json").exists()
        assert len(dataset_dirs(project)) == 8
    assert shard("build", project, *ADVANCED, "--no-progress") == 0
    assert "1 built, 8 up to date" in capsys.readouterr().out
    record = json.loads((project / LUNG / "dataset.json").read_text())
    assert (
        record["cells_written"] + record["cells_dropped"]["no_nonzero_in_vocabulary"] == record["n_cells_source"] == 300
    )


def test_a_file_another_build_is_joining_is_left_to_it(project, capsys):
    with exclusive(_locks(project) / "hs_lung_b.join") as mine:
        assert mine
        assert shard("build", project, *ADVANCED, "--no-progress") == 0
        assert "another build is joining it" in " ".join(capsys.readouterr().out.split())
        assert not (project / LUNG / "dataset.json").exists()
    assert shard("build", project, *ADVANCED, "--no-progress") == 0
    assert (project / LUNG / "dataset.json").exists()


def test_two_builds_at_once_publish_every_cell(project):
    """Once published hs_lung_b with 8 of its 300 cells ("292 dropped: no nonzero"), and later
    builds called it up to date."""
    env = {"PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "concept_shard.cli",
        "build",
        str(project),
        *ADVANCED,
        "--no-progress",
        "shard.chunk_size=64",
        "shard.part_size=100",
    ]
    for trial in range(3):
        shutil.rmtree(project / "shards", ignore_errors=True)
        procs = [
            subprocess.Popen(
                cmd,
                env=dict(__import__("os").environ, **env),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        errs = [p.communicate(timeout=300)[1] for p in procs]
        assert all(p.returncode == 0 for p in procs), errs
        assert shard("build", project, *ADVANCED, "--no-progress", "shard.chunk_size=64", "shard.part_size=100") == 0
        for ds in dataset_dirs(project):
            rec = json.loads((ds / "dataset.json").read_text())
            dropped = rec["cells_dropped"]["no_nonzero_in_vocabulary"]
            assert rec["cells_written"] + dropped == rec["n_cells_source"], (trial, ds.name, rec["cells_written"])
            index = json.loads((ds / "index.json").read_text())
            assert sum(s["samples"] for s in index["shards"]) == rec["cells_written"]
        assert not list(project.glob("shards/*/*/.parts/*")), trial


def test_a_killed_join_leaves_nothing_that_is_counted(sharded_project_copy, capsys):
    """`<stem>.old.<pid>.tmp` of a join killed between its renames stayed forever, and the species
    index listed its samples too (360 instead of 260)."""
    project = sharded_project_copy  # built: the build below finds it up to date
    assert shard("build", project, *ADVANCED, "--no-progress") == 0
    capsys.readouterr()
    ds = project / LUNG
    stale = ds.with_name("hs_lung_b.old.4242.tmp")
    shutil.copytree(ds, stale)
    (ds / "dataset.json").unlink()  # the kill came before the new dataset.json
    assert shard("build", project, *ADVANCED, "--no-progress") == 0
    assert "1 built, 8 up to date" in capsys.readouterr().out
    assert not stale.exists()
    species = json.loads((project / "shards/hsapiens/datasets.json").read_text())
    index = json.loads((project / "shards/hsapiens/index.json").read_text())
    assert sum(d["cells"] for d in species["datasets"]) == sum(s["samples"] for s in index["shards"])
    assert not any(".tmp" in d["path"] for d in species["datasets"])


def test_species_index_ignores_leftovers_even_before_the_next_build(sharded_project_copy):
    project = sharded_project_copy  # built: the build below finds it up to date
    assert shard("build", project, *ADVANCED, "--no-progress") == 0
    shutil.copytree(project / LUNG, (project / LUNG).with_name("hs_lung_b.old.99.tmp"))
    assert shard("merge", project, *ADVANCED) == 0
    species = json.loads((project / "shards/hsapiens/datasets.json").read_text())
    assert len(species["datasets"]) == 6
