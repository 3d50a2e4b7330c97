"""Start-up cost of `within_group_sampling`: reading one obs column of every cell in bulk
(concept_train/data/read/obs.py), from compressed shards and from shards streaming has decompressed.

    python tools/bench/obs_columns.py OUT_DIR [N_CELLS]

Writes N_CELLS (default 200,000) synthetic cells in the shard layout (1,000-2,000 nonzeros each,
uint16 genes, uint8 counts, four obs columns) to OUT_DIR once, then times the reads.
"""

import sys
import time
from pathlib import Path

import numpy as np

from concept_shard.mds import MDSDatasetWriter, read_rows
from concept_train.data.order.groups import obs_groups
from concept_train.data.read.obs import column_codes


def write(out: Path, n: int) -> None:
    cols = {
        "cell_id": "str",
        "counts": "ndarray:uint8",
        "genes": "ndarray:uint16",
        "n_counts": "float64",
        "row": "int64",
        "obs.cell_type": "str",
        "obs.dataset": "str",
        "obs.donor_id": "str",
        "obs.tissue": "str",
    }
    rng = np.random.default_rng(0)
    with MDSDatasetWriter(out, cols, "zstd:1", 1 << 25) as w:
        for i in range(n):
            nnz = int(rng.integers(1000, 2000))
            genes = np.sort(rng.choice(60000, nnz, replace=False)).astype(np.uint16)
            counts = np.minimum(rng.geometric(0.4, nnz), 255).astype(np.uint8)
            w.add(
                w.encode_sample(
                    {
                        "cell_id": f"cell_{i:08d}",
                        "counts": counts,
                        "genes": genes,
                        "n_counts": float(counts.sum()),
                        "row": i,
                        "obs.cell_type": f"type {i % 37} of the tissue",
                        "obs.dataset": "bench",
                        "obs.donor_id": f"donor_{(i * 7919) % 113}",
                        "obs.tissue": "blood",
                    }
                )
            )


def main():
    out, n = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 200_000
    if not (out / "index.json").exists():
        write(out, n)
    for raw in out.glob("*.mds"):
        raw.unlink()
    read = lambda name: (out / name).read_bytes()  # noqa: E731
    t = time.perf_counter()
    cats, codes = column_codes(read, "donor_id", "bench")
    dt = time.perf_counter() - t
    print(f"compressed shards: {dt / len(codes) * 1e6:.1f} s per million cells ({len(cats)} donors)")
    import zstd

    for z in out.glob("*.mds.zstd"):
        (out / z.name[:-5]).write_bytes(zstd.decompress(z.read_bytes()))
    t = time.perf_counter()
    cats, codes = column_codes(read, "cell_type", "bench")
    dt = time.perf_counter() - t
    print(f"decompressed shards: {dt / len(codes) * 1e6:.1f} s per million cells")
    t = time.perf_counter()
    k = sum(1 for _ in read_rows(read, np.arange(min(20000, len(codes))), ["obs.donor_id"]))
    print(
        f"per-sample decoding (mds.read_rows), for comparison: "
        f"{(time.perf_counter() - t) / k * 1e6:.1f} s per million cells"
    )
    t = time.perf_counter()
    column_codes(read, "donor_id", "bench", cache_dir=out)
    t1 = time.perf_counter()
    column_codes(read, "donor_id", "bench", cache_dir=out)
    print(f"kept codes (the next start): {(time.perf_counter() - t1) / len(codes) * 1e6:.2f} s per million cells")
    from concept_train.data.read.catalog import ShardSet

    sets = [ShardSet("bench/src/a", "hsapiens", out, len(codes), np.arange(1), "a")]
    t = time.perf_counter()
    obs_groups(sets, ["dataset", "donor_id"], lambda f, k: (cats, codes), "bench", log=lambda *a: None)
    print(f"grouping: {(time.perf_counter() - t) / len(codes) * 1e6:.2f} s per million cells")


if __name__ == "__main__":
    main()
