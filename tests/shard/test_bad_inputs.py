"""Each bad input gets a clear error naming the file and the fix; the other files complete, the
exit code is non-zero, nothing already written is lost, and a re-run after the fix does only
the failed work."""

from __future__ import annotations

import json
import os
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


@pytest.fixture
def project(small_project):
    """The builds here fail on purpose: the example project at 40 cells a file is enough (the same 9
    files, vocabularies and file formats) and builds in about half the time."""
    return small_project


def _fifo(rel: str):
    """The file replaced by a named pipe (the build waited for a writer, for good)."""

    def apply(project: Path):
        (project / rel).unlink()
        os.mkfifo(project / rel)

    return apply


def _drop_chunk(rel: str, key: str):
    """One chunk file of a .zarr's sparse matrix deleted (a store copied in part)."""

    def apply(project: Path):
        chunks = sorted(p for p in (project / rel / key).iterdir() if not p.name.startswith("."))
        chunks[-1].unlink()

    return apply


def _set_value(rel: str, value: float):
    def apply(project: Path):
        with h5py.File(project / rel, "r+") as f:
            f["X/data"][5] = value

    return apply


def _edit_matrix(rel: str, key: str, edit):
    """Change one array of the file's sparse X in place (a corrupt but readable file)."""

    def apply(project: Path):
        with h5py.File(project / rel, "r+") as f:
            values = f[f"X/{key}"][:]
            edit(values, f["X/indptr"][:])
            f[f"X/{key}"][:] = values

    return apply


def _swap_pointers(values, indptr):
    values[10], values[11] = values[11], values[10]  # rows 9 and 10 overlap: not monotone


def _negative_index(values, indptr):
    values[int(indptr[3])] = -1


def _repeat_index(values, indptr):
    start = int(indptr[4])
    values[start + 1] = values[start]  # row 4 names its first gene twice


def _retype(rel: str, dtype):
    def apply(project: Path):
        adata = ad.read_h5ad(project / rel)
        adata.X = adata.X.astype(dtype)
        adata.write_h5ad(project / rel)

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
    names[1] = names[0] + ".3"  # the same gene once more, with a version suffix
    return names


CASES = {
    # name: (break the project, substring(s) the error must contain, number of files that fail)
    "missing file": (lambda p: (p / HS / "hs_val_e.h5ad").unlink(), ["hs_val_e.h5ad", "does not exist"], 1),
    "truncated h5ad": (_truncate(f"{HS}/hs_blood_a.h5ad"), ["hs_blood_a.h5ad", "truncated"], 1),
    "a FIFO named as a source": (_fifo(f"{HS}/hs_val_e.h5ad"), ["hs_val_e.h5ad", "not a regular file"], 1),
    "not an h5ad": (lambda p: (p / MM / "mm_val_c.h5ad").write_text("hello"), ["mm_val_c.h5ad", "cannot be read"], 1),
    "negative counts": (_set_value(f"{MM}/mm_brain_a.h5ad", -3.0), ["mm_brain_a.h5ad", "negative counts", "raw"], 1),
    "NaN counts": (_set_value(f"{MM}/mm_brain_a.h5ad", np.nan), ["mm_brain_a.h5ad", "NaN counts"], 1),
    "non-integral counts": (
        _set_value(f"{HS}/hs_blood_a.h5ad", 0.5),
        ["hs_blood_a.h5ad", "non-integral", "allow_non_integral"],
        1,
    ),
    # corrupt but readable: refused before a compiled routine sees them (the first aborted the
    # process with "free(): invalid next size", the others stored wrong genes)
    "non-monotone indptr": (
        _edit_matrix(f"{HS}/hs_blood_a.h5ad", "indptr", _swap_pointers),
        ["hs_blood_a.h5ad", "corrupt X/indptr", "decreases"],
        1,
    ),
    "negative column index": (
        _edit_matrix(f"{MM}/mm_brain_a.h5ad", "indices", _negative_index),
        ["mm_brain_a.h5ad", "corrupt X/indices", "row 3 holds index -1"],
        1,
    ),
    "repeated column index": (
        _edit_matrix(f"{HS}/hs_val_e.h5ad", "indices", _repeat_index),
        ["hs_val_e.h5ad", "corrupt X/indices", "row 4 lists index", "twice"],
        1,
    ),
    "zarr without a chunk": (
        _drop_chunk(f"{HS}/hs_gut_d.zarr", "X/data"),
        ["hs_gut_d.zarr", "lacks 1 of the", "chunks of X/data", "Copy the .zarr again"],
        1,
    ),
    "infinite counts": (_set_value(f"{MM}/mm_brain_a.h5ad", np.inf), ["mm_brain_a.h5ad", "infinite counts"], 1),
    "counts beyond 2^53": (_set_value(f"{MM}/mm_kidney_b.h5ad", 1e20), ["mm_kidney_b.h5ad", "add up to 1e+20"], 1),
    "boolean matrix": (_retype(f"{HS}/hs_val_e.h5ad", bool), ["hs_val_e.h5ad", "as bool", "not a count matrix"], 1),
    "no vocabulary overlap": (
        _rewrite_var(f"{MM}/mm_kidney_b.h5ad", lambda n: np.array([f"Gene{i}" for i in range(len(n))])),
        ["mm_kidney_b.h5ad", "shares no gene id", "var_gene_id_column"],
        1,
    ),
    "duplicate gene ids": (_rewrite_var(f"{HS}/hs_val_e.h5ad", _dup_ids), ["hs_val_e.h5ad", "duplicate gene ids"], 1),
    "mapping without <cls>": (
        _edit_mapping("mmusculus", lambda rows: [rows[0]] + rows[2:]),
        ["mmusculus.csv", "<cls> to 0"],
        3,
    ),
    "mapping with a blank gene id": (
        _edit_mapping("mmusculus", lambda rows: rows + [",NOID,99999"]),
        ["mmusculus.csv", "without a gene id"],
        3,
    ),
    "mapping with a token of 3e9": (
        _edit_mapping("mmusculus", lambda rows: rows + ["ENSMUSGFAKE,X,3000000000"]),
        ["mmusculus.csv", "not integers below"],
        3,
    ),
    "mapping with duplicate tokens": (
        _edit_mapping("mmusculus", lambda rows: rows[:5] + [rows[5].rsplit(",", 1)[0] + ",3"] + rows[6:]),
        ["mmusculus.csv", "same token"],
        3,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_alone_and_rerun_does_only_that(case, project, capsys):
    break_it, expected, n_failed = CASES[case]
    pristine = project.parent / "pristine"
    shutil.copytree(project / "data", pristine / "data")
    shutil.copytree(project / "references", pristine / "references")
    break_it(project)
    assert shard("build", project, *ADVANCED, "--no-progress") == 1
    err = " ".join(capsys.readouterr().err.split())  # messages are wrapped at the terminal width
    for text in expected:
        assert text in err, f"{case}: {text!r} not in\n{err}"
    assert f"{n_failed} input(s) failed" in err
    done = list(project.glob("shards/*/*/*/dataset.json"))
    assert len(done) == 9 - n_failed  # the other files completed
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
        "      - ${datamodule.split_extra_hsapiens}\n"
    )
    return conf


@pytest.mark.parametrize(
    "split_yaml,expected",
    [
        (
            "source_name: extra\nspecies: hsapien\nsource_path: ${PATH.PROJECT_PATH}/data/extra\ntrain: [a.h5ad]\n",
            ["datamodule.split_extra_hsapiens", "species 'hsapien'", "hsapiens"],
        ),
        (
            "source_name: extra\nspecies: hsapiens\nsource_path: ${PATH.PROJECT_PATH}/data/synth_hsapiens/h5ads\n"
            "train: [../../celltypist/h5ads/celltypist_sample.h5ad]\n",
            ["datamodule.split_extra_hsapiens", "escapes source_path", "celltypist_sample.h5ad"],
        ),
    ],
)
def test_bad_split_entry_fails_alone(split_yaml, expected, project, tmp_path, capsys):
    conf = _config_dir_with_split(tmp_path, split_yaml)
    assert shard("build", project, "--config-dir", conf, "datamodule=WithExtra", "--no-progress") == 1
    err = " ".join(capsys.readouterr().err.split())  # messages are wrapped at the terminal width
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
    err = " ".join(capsys.readouterr().err.split())  # messages are wrapped at the terminal width
    assert "shard.chunksize" in err and "Did you mean `shard.chunk_size`?" in err


def test_missing_var_gene_id_column_names_the_column(project, tmp_path, capsys):
    conf = _config_dir_with_split(
        tmp_path,
        "source_name: extra\nspecies: hsapiens\n"
        "source_path: ${PATH.PROJECT_PATH}/data/synth_hsapiens/h5ads\n"
        "var_gene_id_column: ensembl\ntrain: [hs_val_e.h5ad]\n",
    )
    assert shard("build", project, "--config-dir", conf, "datamodule=WithExtra", "--no-progress") == 1
    err = " ".join(capsys.readouterr().err.split())  # messages are wrapped at the terminal width
    assert "no var column 'ensembl'" in err and "var_gene_id_column" in err


def test_float16_counts_are_widened_not_refused(project):
    """float16 holds small integers exactly: such a file is sharded as its float32 copy would be."""
    rel = f"{MM}/mm_val_c.h5ad"
    X = ad.read_h5ad(project / rel).X.tocsr().astype(np.float64)
    with h5py.File(project / rel, "r+") as f:  # scipy has no float16 matrices; files can
        data = f["X/data"][:]
        del f["X/data"]
        f["X/data"] = data.astype(np.float16)
    assert shard("build", project, *ADVANCED, "--no-progress") == 0
    cells = read_dataset(project / "shards/mmusculus/synth_mmusculus/mm_val_c")
    first = cells[0]
    row = X[int(first["row"])]
    assert first["counts"].astype(np.float64).sum() == row.sum() and int(first["n_counts"]) == int(row.sum())


@pytest.mark.parametrize(
    "name_key,value", [("source_name", "../../../victim"), ("source_name", ".parts"), ("species", "../hsapiens")]
)
def test_split_names_that_would_leave_the_shards_root_are_refused(name_key, value, project, tmp_path, capsys):
    """A source_name of ../../../victim once made the build delete and replace a directory outside
    the project (exit 0)."""
    victim = project.parent.parent / "victim"
    victim.mkdir(exist_ok=True)
    (victim / "precious.txt").write_text("keep me")
    fields = {"source_name": "extra", "species": "hsapiens"} | {name_key: value}
    conf = _config_dir_with_split(
        tmp_path,
        f"source_name: '{fields['source_name']}'\nspecies: '{fields['species']}'\n"
        "source_path: ${PATH.PROJECT_PATH}/data/synth_hsapiens/h5ads\ntrain: [hs_val_e.h5ad]\n",
    )
    assert shard("build", project, "--config-dir", conf, "datamodule=WithExtra", "--no-progress") == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"datamodule.split_extra_hsapiens.{name_key}" in err and "not a plain name" in err, err
    assert sorted(p.name for p in victim.iterdir()) == ["precious.txt"]
    assert (victim / "precious.txt").read_text() == "keep me"
    assert len(list(project.glob("shards/*/*/*/dataset.json"))) == 9  # the other files completed


@pytest.mark.parametrize(
    "override,key",
    [
        ("shard.chunk_size=-1", "shard.chunk_size"),
        ("shard.part_size=0", "shard.part_size"),
        ("shard.shard_size_limit=10", "shard.shard_size_limit"),
        ("shard.compression=gzip", "shard.compression"),
        ("shard.allow_non_integral=maybe", "shard.allow_non_integral"),
    ],
)
def test_shard_settings_out_of_range_are_refused_before_any_work(override, key, project, capsys):
    """shard.chunk_size=-1 once published every dataset with 0 cells (exit 0), and later builds
    called them up to date."""
    assert shard("build", project, *ADVANCED, override, "--no-progress") == 2
    assert key in " ".join(capsys.readouterr().err.split())
    assert not (project / "shards").exists()


def test_a_torn_last_metrics_line_does_not_stop_a_resume(sharded_project_copy, capsys):
    """A kill while a row was written left a line without its newline: every later resume of the
    run failed at the end (drawing the curves), and the next row was glued to the torn one."""
    import json as json_

    from helpers import TINY

    from concept_train.cli import main as train

    run = [str(sharded_project_copy), *TINY, "initialize.run_id=torn"]
    assert train(run) == 0
    metrics = sharded_project_copy / "model_checkpoints/torn/metrics.jsonl"
    with open(metrics, "a") as fh:
        fh.write('{"kind": "train", "step": 4, "lo')
    assert train(run + ["initialize.resume=True", "model.training.max_steps=5"]) == 0
    rows = [json_.loads(line) for line in metrics.read_text().splitlines()]  # every line is whole
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4, 5]
