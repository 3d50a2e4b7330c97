"""Each bad input gets a clear error naming the file and the fix; the other files complete, the
exit code is non-zero, nothing already written is lost, and a re-run after the fix does only
the failed work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest

from helpers import ADVANCED, read_dataset, shard

HS = "data/synth_hsapiens/h5ads"
MM = "data/synth_mmusculus/h5ads"
MAPPINGS = "references/vocabulary/token_mappings_per_specie"


def _set_value(rel: str, value: float):
    def apply(project: Path):
        with h5py.File(project / rel, "r+") as f:
            f["X/data"][5] = value
    return apply


def _rewrite_var(rel: str, change):
    def apply(project: Path):
        adata = ad.read_h5ad(project / rel)
        names = adata.var_names.to_numpy().copy()
        adata.var_names = change(names)
        adata.write_h5ad(project / rel)
    return apply


def _truncate(rel: str):
    def apply(project: Path):
        path = project / rel
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return apply


def _edit_mapping(species: str, edit):
    def apply(project: Path):
        path = project / MAPPINGS / f"{species}.csv"
        lines = path.read_text().splitlines()
        path.write_text("\n".join(edit(lines)) + "\n")
    return apply


def _dup_ids(names):
    names[1] = names[0] + ".3"      # the same gene once more, with a version suffix
    return names


CASES = {
    # name: (break the project, substring(s) the error must contain, number of files that fail)
    "missing file": (lambda p: (p / HS / "hs_val_e.h5ad").unlink(), ["hs_val_e.h5ad", "does not exist"], 1),
    "truncated h5ad": (_truncate(f"{HS}/hs_blood_a.h5ad"), ["hs_blood_a.h5ad", "truncated"], 1),
    "not an h5ad": (lambda p: (p / MM / "mm_val_c.h5ad").write_text("hello"), ["mm_val_c.h5ad", "cannot be read"], 1),
    "negative counts": (_set_value(f"{MM}/mm_brain_a.h5ad", -3.0), ["mm_brain_a.h5ad", "negative counts", "raw"], 1),
    "NaN counts": (_set_value(f"{MM}/mm_brain_a.h5ad", np.nan), ["mm_brain_a.h5ad", "NaN counts"], 1),
    "non-integral counts": (_set_value(f"{HS}/hs_blood_a.h5ad", 0.5),
                            ["hs_blood_a.h5ad", "non-integral", "allow_non_integral"], 1),
    "no vocabulary overlap": (_rewrite_var(f"{MM}/mm_kidney_b.h5ad", lambda n: np.array([f"Gene{i}" for i in range(len(n))])),
                              ["mm_kidney_b.h5ad", "shares no gene id", "var_gene_id_column"], 1),
    "duplicate gene ids": (_rewrite_var(f"{HS}/hs_val_e.h5ad", _dup_ids), ["hs_val_e.h5ad", "duplicate gene ids"], 1),
    "mapping without <cls>": (_edit_mapping("mmusculus", lambda l: [l[0]] + l[2:]),
                              ["mmusculus.csv", "<cls> to 0"], 3),
    "mapping with duplicate tokens": (_edit_mapping("mmusculus", lambda l: l[:5] + [l[5].rsplit(",", 1)[0] + ",3"] + l[6:]),
                                      ["mmusculus.csv", "same token"], 3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_alone_and_rerun_does_only_that(case, project, capsys):
    break_it, expected, n_failed = CASES[case]
    pristine = project.parent / "pristine"
    shutil.copytree(project / "data", pristine / "data")
    shutil.copytree(project / "references", pristine / "references")
    break_it(project)
    assert shard("build", project, *ADVANCED, "--no-progress") == 1
    err = " ".join(capsys.readouterr().err.split())     # messages are wrapped at the terminal width
    for text in expected:
        assert text in err, f"{case}: {text!r} not in\n{err}"
    assert f"{n_failed} input(s) failed" in err
    done = list(project.glob("shards/*/*/*/dataset.json"))
    assert len(done) == 9 - n_failed                 # the other files completed
    stamps = {p: p.stat().st_mtime_ns for p in done}
    # fix: restore the original inputs; the re-run builds only what failed
    shutil.rmtree(project / "data")
    shutil.rmtree(project / "references")
    shutil.copytree(pristine / "data", project / "data")
    shutil.copytree(pristine / "references", project / "references")
    assert shard("build", project, *ADVANCED, "--no-progress") == 0
    assert f"{n_failed} built, {9 - n_failed} up to date" in capsys.readouterr().out
    assert stamps == {p: p.stat().st_mtime_ns for p in done}


def _config_dir_with_split(tmp: Path, split_yaml: str) -> Path:
    conf = tmp / "conf"
    (conf / "datamodule/split_extra_hsapiens").mkdir(parents=True)
    (conf / "datamodule/split_extra_hsapiens/extra.yaml").write_text(split_yaml)
    (conf / "datamodule/WithExtra.yaml").write_text(
        "defaults:\n  - DataModuleAdvanced\n  - split_extra_hsapiens: extra\n  - _self_\n"
        "dataset:\n  train:\n    split:\n      - ${datamodule.split_synth_hsapiens}\n"
        "      - ${datamodule.split_celltypist_hsapiens}\n      - ${datamodule.split_synth_mmusculus}\n"
        "      - ${datamodule.split_extra_hsapiens}\n")
    return conf


@pytest.mark.parametrize("split_yaml,expected", [
    ("source_name: extra\nspecies: hsapien\nsource_path: ${PATH.PROJECT_PATH}/data/extra\ntrain: [a.h5ad]\n",
     ["datamodule.split_extra_hsapiens", "species 'hsapien'", "hsapiens"]),
    ("source_name: extra\nspecies: hsapiens\nsource_path: ${PATH.PROJECT_PATH}/data/synth_hsapiens/h5ads\n"
     "train: [../../celltypist/h5ads/celltypist_sample.h5ad]\n",
     ["datamodule.split_extra_hsapiens", "escapes source_path", "celltypist_sample.h5ad"]),
])
def test_bad_split_entry_fails_alone(split_yaml, expected, project, tmp_path, capsys):
    conf = _config_dir_with_split(tmp_path, split_yaml)
    assert shard("build", project, "--config-dir", conf, "datamodule=WithExtra", "--no-progress") == 1
    err = " ".join(capsys.readouterr().err.split())     # messages are wrapped at the terminal width
    for text in expected:
        assert text in err, err
    assert len(list(project.glob("shards/*/*/*/dataset.json"))) == 9


def test_failure_after_a_good_build_keeps_the_old_dataset(project, capsys):
    assert shard("build", project, *ADVANCED, "--no-progress") == 0
    ds = project / "shards/mmusculus/synth_mmusculus/mm_brain_a"
    before = read_dataset(ds)
    _set_value(f"{MM}/mm_brain_a.h5ad", -1.0)(project)
    assert shard("build", project, *ADVANCED, "--no-progress") == 1
    assert "negative counts" in " ".join(capsys.readouterr().err.split())
    after = read_dataset(ds)
    assert len(after) == len(before) and all((a["genes"] == b["genes"]).all() for a, b in zip(after, before))
    assert json.loads((ds / "dataset.json").read_text())["cells_written"] == len(before)
    assert not list(project.glob("shards/**/*.tmp"))


def test_unknown_override_key_is_a_clear_error(project, capsys):
    assert shard("build", project, "shard.chunksize=10") == 2
    err = " ".join(capsys.readouterr().err.split())     # messages are wrapped at the terminal width
    assert "shard.chunksize" in err and "override" in err.lower()


def test_missing_var_gene_id_column_names_the_column(project, tmp_path, capsys):
    conf = _config_dir_with_split(tmp_path, "source_name: extra\nspecies: hsapiens\n"
                                  "source_path: ${PATH.PROJECT_PATH}/data/synth_hsapiens/h5ads\n"
                                  "var_gene_id_column: ensembl\ntrain: [hs_val_e.h5ad]\n")
    assert shard("build", project, "--config-dir", conf, "datamodule=WithExtra", "--no-progress") == 1
    err = " ".join(capsys.readouterr().err.split())     # messages are wrapped at the terminal width
    assert "no var column 'ensembl'" in err and "var_gene_id_column" in err
