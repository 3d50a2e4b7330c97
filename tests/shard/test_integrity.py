"""Shards verified and bound to their dataset: damage is found, named and rebuilt, never read.

Each case damages a copy of the sharded example as a disk, a copy or a hand might, then asks
`concept-shard status` (its cheap check, and `--verify`'s full hash pass) and `concept-shard
build` (which rebuilds exactly the damaged datasets, giving the samples of the undamaged build).
Reading damaged shards while training: tests/train/data/test_data_errors.py."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import ADVANCED, dataset_dirs, shard

from concept_shard.integrity import index_digest

LUNG = "hsapiens/synth_hsapiens/hs_lung_b"


def _status(project, capsys, *flags) -> dict[str, tuple[str, str]]:
    """{dataset id: (state, detail)} as `concept-shard status` prints them; its exit code checked."""
    capsys.readouterr()
    code = shard("status", project, *ADVANCED, *flags)
    out = capsys.readouterr().out
    states = {}
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2 and parts[1].count("/") == 2:
            states[parts[1]] = (parts[0], parts[2] if len(parts) > 2 else "")
    assert len(states) == 9, out
    assert code == (0 if all(s == "done" for s, _ in states.values()) else 1)
    return states


def _not_done(states) -> dict[str, tuple[str, str]]:
    return {k: v for k, v in states.items() if v[0] != "done"}


def _build(project, capsys, *flags) -> set[str]:
    """The datasets a build rebuilt (its "rebuilding" lines)."""
    capsys.readouterr()
    assert shard("build", project, *ADVANCED, "--no-progress", *flags) == 0
    out = capsys.readouterr().out
    return {line.split()[1].rstrip(":") for line in out.splitlines() if line.endswith("rebuilding.")}


def _assert_same_files(reference, project) -> None:
    """Every dataset holds the files of the undamaged build, byte for byte (a build is deterministic;
    read without streaming, whose datasets hold descriptors to the end of the process)."""
    ours = {d.relative_to(project) for d in dataset_dirs(project)}
    assert ours == {d.relative_to(reference) for d in dataset_dirs(reference)}
    for rel in ours:
        names = _published(reference / rel)
        assert names == _published(project / rel)
        for name in names:
            assert (reference / rel / name).read_bytes() == (project / rel / name).read_bytes(), rel / name


def _published(directory) -> list[str]:
    """The files a build wrote (not dataset.json, whose created_at differs; not the raw copies that
    reading compressed shards in place leaves beside them, nor a reader's `.obs_codes` cache
    directory, left by a training test that read the same session-wide project)."""
    names = {p.name for p in directory.iterdir() if p.is_file()} - {"dataset.json"}
    return sorted(n for n in names if n + ".zstd" not in names)


def _flip(path, at: int = -40) -> None:
    with open(path, "r+b") as fh:
        fh.seek(at, 2)
        byte = fh.read(1)
        fh.seek(at, 2)
        fh.write(bytes([byte[0] ^ 0x10]))


def test_a_flipped_byte_is_found_by_verify_and_only_that_dataset_is_rebuilt(
    sharded_project_copy, sharded_example, capsys
):
    project = sharded_project_copy
    _flip(project / "shards" / LUNG / "shard.00000.mds")
    assert _not_done(_status(project, capsys)) == {}  # the cheap check reads no shard
    damaged = _not_done(_status(project, capsys, "--verify"))
    assert damaged.keys() == {LUNG}
    state, detail = damaged[LUNG]
    assert state == "damaged" and "shard.00000.mds" in detail and "xxh3_64" in detail
    assert _build(project, capsys) == set()  # a plain build trusts what it cannot see
    assert _build(project, capsys, "--verify") == {LUNG}
    assert _not_done(_status(project, capsys, "--verify")) == {}
    _assert_same_files(sharded_example, project)


def test_shards_swapped_for_another_files_with_as_many_cells_are_seen(sharded_project_copy, sharded_example, capsys):
    """Another dataset's shard and index.json, with the same number of cells: the cell counts agree,
    the index digest does not."""
    project = sharded_project_copy
    records = {
        d.parent.relative_to(project / "shards").as_posix(): json.loads(d.read_text())
        for d in (project / "shards").glob("*/*/*/dataset.json")
    }
    pairs = [
        (a, b)
        for a in records
        for b in records
        if a < b and records[a]["cells_written"] == records[b]["cells_written"] and records[a]["n_shards"] == 1
    ]
    assert pairs, {k: r["cells_written"] for k, r in records.items()}
    victim, donor = pairs[0]
    for name in ("index.json", "shard.00000.mds"):
        shutil.copy(project / "shards" / donor / name, project / "shards" / victim / name)
    damaged = _not_done(_status(project, capsys))
    assert damaged.keys() == {victim}
    assert damaged[victim][0] == "damaged" and "index.json is not the one" in damaged[victim][1]
    assert _build(project, capsys) == {victim}
    _assert_same_files(sharded_example, project)


@pytest.mark.parametrize(
    "damage, words",
    [
        ("missing", "index.json is missing"),
        ("truncated", "index.json is not the one"),
        ("escape", "is not named shard.00000.mds"),
        ("cells", "cells_written is 'many'"),
        ("count", "samples, dataset.json"),
        ("genes", "genes are not ascending token ids"),
        ("object", "does not hold a JSON object"),
    ],
)
def test_damaged_records_are_named_not_tracebacks_and_rebuilt(
    sharded_project_copy, sharded_example, capsys, damage, words
):
    """Every field of index.json and dataset.json is checked before use: a basename that leaves the
    dataset directory (made consistent with dataset.json, as an attacker would), edited counts and
    gene ids, a truncated or missing index.json."""
    project = sharded_project_copy
    where = project / "shards" / LUNG
    record = json.loads((where / "dataset.json").read_text())
    index = where / "index.json"
    if damage == "missing":
        index.unlink()
    elif damage == "truncated":
        index.write_bytes(index.read_bytes()[:100])
    elif damage == "escape":
        entries = json.loads(index.read_text())
        entries["shards"][0]["raw_data"]["basename"] = "../../../../../outside.mds"
        index.write_text(json.dumps(entries))
        record["index_digest"] = index_digest(index.read_bytes())
    elif damage == "cells":
        record["cells_written"] = "many"
    elif damage == "count":
        record["cells_written"] += 1
    elif damage == "genes":
        record["genes"] = [10**9, 3]
    elif damage == "object":
        record = [record]
    (where / "dataset.json").write_text(json.dumps(record))
    damaged = _not_done(_status(project, capsys))
    assert damaged.keys() == {LUNG}
    assert damaged[LUNG][0] == "damaged" and words in damaged[LUNG][1], damaged
    assert _build(project, capsys) == {LUNG}
    assert not list(project.parent.glob("outside*"))
    _assert_same_files(sharded_example, project)


def test_a_dataset_of_an_older_format_is_stale(sharded_project_copy, capsys):
    project = sharded_project_copy
    path = project / "shards" / LUNG / "dataset.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), format_version=1)))
    stale = _not_done(_status(project, capsys))
    assert stale.keys() == {LUNG} and stale[LUNG][0] == "stale" and "older concept-shard" in stale[LUNG][1]
