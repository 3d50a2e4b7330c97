"""Varint entries (concept_shard/entries.py): the codec against a plain LEB128 reference, and the
example project in both shard formats holding the same cells."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import ADVANCED, dataset_dirs, read_dataset, reference_samples, shard

from concept_shard import entries


def _leb128(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 127, value >> 7
        out.append(byte | (128 if value else 0))
        if not value:
            return bytes(out)


def _cells(rng, n_cells: int, top_gene: int, top_count: int):
    lengths = rng.integers(1, 60, n_cells)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    genes = np.concatenate([np.sort(rng.choice(top_gene, k, replace=False)) for k in lengths])
    counts = rng.integers(1, top_count, int(indptr[-1]), dtype=np.int64)
    return indptr, genes, counts


@pytest.mark.parametrize("top_gene, top_count", [(200, 2), (70_000, 300), (2**20, 70_000), (300, 2**40)])
def test_cells_encode_as_leb128_and_decode_back(top_gene, top_count):
    indptr, genes, counts = _cells(np.random.default_rng(top_count), 40, top_gene, top_count)
    for values, delta in ((genes, True), (counts, False)):
        data, ends = entries.encode_cells(indptr, values, delta)
        reference = entries.encode_cells_numpy(indptr, values, delta)
        assert np.array_equal(data, reference[0]) and np.array_equal(ends, reference[1])
        for i in range(len(indptr) - 1):
            cell = values[indptr[i] : indptr[i + 1]].astype(np.int64)
            steps = np.diff(cell, prepend=0) if delta else cell
            expected = _leb128(len(cell)) + b"".join(_leb128(int(v)) for v in steps)
            got = data[ends[i] : ends[i + 1]].tobytes()
            assert got == expected, i
            for decode in (entries.decode, entries.decode_numpy):  # compiled, and the reference
                back = decode(got, delta, entries.MIN_DTYPE["genes" if delta else "counts"])
                assert np.array_equal(back, cell)
                assert back.dtype == np.min_scalar_type(max(cell.max(), 256 if delta else 0))


@pytest.mark.parametrize(
    "damaged, problem",
    [
        (b"\x03\x01\x02", "says 3 values and holds 2"),
        (b"\x01\x01\x02", "says 1 values and holds 2"),
        (b"\x02\x01\x81", "ends inside a value"),
        (b"\x81", "ends inside a value"),
        (b"", "ends inside a value"),
    ],
)
def test_bytes_that_are_not_a_column_are_refused(damaged, problem):
    """Fewer or more values than the column says, a value cut short, a length cut short, nothing."""
    for decode in (entries.decode, entries.decode_numpy):
        with pytest.raises(ValueError, match=f"a varint column that {problem}"):
            decode(damaged)


def test_both_shard_formats_hold_the_same_cells(sharded_example, sharded_earlier_example):
    """The example project sharded with varint entries (the default) and in the earlier format
    (zstd-compressed arrays): every sample equal, dtypes included, in fewer bytes per nonzero
    than the earlier default, with no compressed files to decompress."""
    varint, earlier = dataset_dirs(sharded_example), dataset_dirs(sharded_earlier_example)
    assert [d.relative_to(sharded_example) for d in varint] == [d.relative_to(sharded_earlier_example) for d in earlier]
    stored = {"varint": 0, "earlier": 0}
    nonzeros = 0
    for a, b in zip(varint, earlier):
        x, y = reference_samples(a), read_dataset(b)
        assert len(x) == len(y) > 0
        for s, t in zip(x, y):
            assert s.keys() == t.keys()
            for key in s:
                if isinstance(s[key], np.ndarray):
                    assert s[key].dtype == t[key].dtype and np.array_equal(s[key], t[key]), (a, key)
                else:
                    assert s[key] == t[key], (a, key)
        index = json.loads((a / "index.json").read_text())
        assert {e["column_encodings"][e["column_names"].index("genes")] for e in index["shards"]} == {"bytes"}
        assert all(e["zip_data"] is None for e in index["shards"])
        stored["varint"] += sum(e["raw_data"]["bytes"] for e in index["shards"])
        earlier_index = json.loads((b / "index.json").read_text())
        stored["earlier"] += sum(e["zip_data"]["bytes"] for e in earlier_index["shards"])
        nonzeros += json.loads((a / "dataset.json").read_text())["nonzeros"]
    assert stored["varint"] < stored["earlier"], stored
    assert stored["varint"] / nonzeros < 2.5, stored["varint"] / nonzeros


def test_a_dataset_in_the_earlier_format_is_rebuilt_with_a_reason(earlier_project_copy, capsys):
    """After the change of default, `status` names the format and how to keep it; `build` rewrites
    the datasets with varint entries; with the earlier keys, they stay as they are."""
    project = earlier_project_copy
    capsys.readouterr()
    assert shard("status", project, *ADVANCED, "shard.entries=arrays", "shard.compression=zstd:1") == 0
    assert shard("status", project, *ADVANCED) == 1
    text = " ".join(capsys.readouterr().out.split())
    assert "earlier shard format" in text and "shard.entries=arrays shard.compression=zstd:1" in text, text
    assert shard("build", project, *ADVANCED, "--no-progress") == 0
    assert "9 built" in capsys.readouterr().out
    assert not list((project / "shards").rglob("shard.*.zstd"))
