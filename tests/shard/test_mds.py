"""Our MDS writer produces exactly the files streaming.MDSWriter produces, and streaming (and our
reader, `read_rows`) reads them."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import streaming_dataset

from concept_shard.integrity import SHARD_HASH
from concept_shard.mds import MDSDatasetWriter, ndarray_prefix, read_rows

COLUMNS = {
    "genes": "ndarray:uint32",
    "counts": "ndarray",
    "n_counts": "int64",
    "cell_id": "str",
    "row": "int64",
    "obs.cell_type": "str",
    "score": "float64",
}


def samples(n=700, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(1, 3000)) if i % 50 else 300  # some lengths cross the uint8 shape limit
        dtype = [np.uint8, np.uint16, np.uint32][i % 3]
        out.append(
            {
                "genes": np.sort(rng.choice(70000, k, replace=False)).astype(np.uint32),
                "counts": rng.integers(1, 200, k).astype(dtype),
                "n_counts": int(rng.integers(0, 10**6)),
                "cell_id": f"cell_{i}_é",
                "row": i,
                "obs.cell_type": "" if i % 7 == 0 else "T cell",
                "score": float(rng.random()),
            }
        )
    return out


@pytest.mark.parametrize("compression", [None, "zstd", "zstd:1"])
def test_identical_to_streaming_mdswriter(tmp_path, compression):
    from streaming import MDSWriter

    data = samples()
    ref = MDSWriter(
        out=str(tmp_path / "ref"), columns=COLUMNS, compression=compression, hashes=[SHARD_HASH], size_limit=1 << 20
    )
    with ref as w:
        for s in data:
            w.write(s)
    with MDSDatasetWriter(tmp_path / "ours", COLUMNS, compression, 1 << 20) as w:
        for s in data:
            w.add(w.encode_sample(s))
    ref = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert ref == sorted(p.name for p in (tmp_path / "ours").iterdir()) and len(ref) > 3
    for name in ref:
        assert (tmp_path / "ref" / name).read_bytes() == (tmp_path / "ours" / name).read_bytes(), name
    ds = streaming_dataset(local=str(tmp_path / "ours"), shuffle=False, batch_size=1)
    for i in (0, 1, 50, 699):
        got = ds[i]
        for key, value in data[i].items():
            np.testing.assert_array_equal(got[key], value)
            assert np.asarray(got[key]).dtype == np.asarray(value).dtype or key in ("cell_id", "obs.cell_type")
    # read_rows: the same values from streaming.MDSWriter's files, rows across several shards
    rows = [0, 1, 2, 50, 333, 334, 698, 699]
    got = list(read_rows(lambda name: (tmp_path / "ref" / name).read_bytes(), rows, list(COLUMNS)))
    assert [r for r, _ in got] == rows
    for r, sample in got:
        for key, value in data[r].items():
            assert np.asarray(sample[key]).dtype == np.asarray(value).dtype or key in ("cell_id", "obs.cell_type")
            np.testing.assert_array_equal(sample[key], value)
    read = lambda name: (tmp_path / "ref" / name).read_bytes()  # noqa: E731
    assert [r for r, _ in read_rows(read, [5], ["row"])] == [5]
    for bad in ([3, 2], [4, 4], [-1], [700]):
        with pytest.raises(ValueError):
            list(read_rows(read, bad, ["row"]))


def test_ndarray_prefix_matches_streaming_encoding():
    from streaming.base.format.mds.encodings import NDArray

    for n in (1, 255, 256, 65535, 65536):
        arr = np.ones(n, np.uint16)
        assert NDArray().encode(arr) == ndarray_prefix("uint16", n) + arr.tobytes()
        assert NDArray("uint16").encode(arr) == ndarray_prefix(None, n) + arr.tobytes()


def test_native_encodings_are_the_ones_written_here(tmp_path):
    """`native_encoding` (also the training kernels' test, decode.py): every encoding the writer
    accepts is decoded here; streaming's others go to its own decoder."""
    from concept_shard.mds import VALUE_DTYPE_CODE, native_encoding

    written = ["str", "bytes", "int64", "float64", "ndarray", *(f"ndarray:{d}" for d in VALUE_DTYPE_CODE)]
    for enc in written:
        MDSDatasetWriter(tmp_path, {"column": enc}, None, 1 << 20).abort()  # the writer takes it
        assert native_encoding(enc), enc
    for enc in ("pkl", "json", "int32", "uint8", "float32", "jpeg", "ndarray:uint8:3", "ndarrays"):
        assert not native_encoding(enc), enc
