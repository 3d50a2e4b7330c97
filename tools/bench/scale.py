#!/usr/bin/env python
"""Corpus-scale figures of issue 15 (many files, many cells); a benchmark, not a test.

Usage::

    python tools/bench/scale.py [--files 100,1000] [--cells 300] [--genes 2000] [--nnz 300]
                                [--plan-cells 30000000] [--plan-files 2000] [--workdir DIR]

Parts, each with a baseline measured in the same run:

1. `mixed` plan at `--plan-cells` cells in `--plan-files` files (no shards needed: the plan only
   needs sizes): peak Python memory (tracemalloc) and time of the first batch of an epoch and of
   a batch deep inside it, for the on-demand keyed permutation (plan.py) against the materialised
   pool the plan held before (per-file permutations concatenated, then one permutation of the
   pool: what the old `_pool` did, rebuilt here as the baseline).
2. dataset.json at 60,000 genes: write and read time with the project's codec (msgspec) against
   Python's json with the old indent-1 formatting.
3. For each N of `--files`: a project of N small `.h5ad` files (one generated file, hard-linked N
   times under different names; each is its own dataset), then in fresh child processes
   - `concept-shard build` (wall, peak RSS; per file),
   - start to first training batch (compose, catalog check, plan, first batch) with the default
     quick source check (size + mtime) and with `datamodule.check_sources=full`, alternating,
     median of `--repeats`,
   - disk (shards + cache) after one epoch of tokenized training batches read through a cache
     bounded by `datamodule.cache_limit` (a quarter of the shards, at least 4 shards), then in place
     (the baseline: streaming's decompressed copies stay beside the shards).

Prints a table; the LAST line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tools.bench.shard import SPECIES, generate_h5ad, measured, vocabulary_csv, vocabulary_gene_ids  # noqa: E402

SOURCE = "many"

FIRST_BATCH = r"""
import sys, time, json
t0 = time.perf_counter()
from pathlib import Path
from concept_shard.config import compose_config
from concept_train.data import DataModule
project, overrides = Path(sys.argv[1]), sys.argv[2:]
cfg = compose_config(project, ["datamodule=Many", *overrides], config_dir=project / "conf")
t1 = time.perf_counter()
dm = DataModule(cfg, log=lambda *a: None)
t2 = time.perf_counter()
batch = next(iter(dm.train_loader()))
t3 = time.perf_counter()
print(json.dumps({"compose_s": t1 - t0, "catalog_s": t2 - t1, "first_batch_s": t3 - t2, "total_s": t3 - t0,
                  "tokens": int(batch.tokens.shape[0])}))
"""


EPOCH = r"""
import sys, time, json
from pathlib import Path
from concept_shard.config import compose_config
from concept_train.data import DataModule
project, overrides = Path(sys.argv[1]), sys.argv[2:]
cfg = compose_config(project, ["datamodule=Many", *overrides], config_dir=project / "conf")
dm = DataModule(cfg, log=lambda *a: None)
loader = dm.train_loader()
n, t0 = loader.plan.batches_per_epoch, time.perf_counter()
for i, batch in zip(range(n), loader):
    pass
print(json.dumps({"batches": n, "seconds": time.perf_counter() - t0}))
"""


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) if Path(path).exists() else 0


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------- 1. plan
def plan_memory(n_cells: int, n_files: int, batch: int = 128) -> dict:
    from concept_train.data.order.plan import BatchPlan
    from concept_train.data.read.catalog import ShardSet

    rng = np.random.default_rng(0)
    sizes = rng.lognormal(0, 1, n_files)
    sizes = np.maximum(1, (sizes * n_cells / sizes.sum()).astype(np.int64))
    sets = [
        ShardSet(
            dataset_id=f"{SPECIES}/src/f{i}",
            species=SPECIES,
            directory=Path("/nonexistent"),
            n_samples=int(n),
            genes=np.arange(3),
            source_file=f"f{i}.h5ad",
        )
        for i, n in enumerate(sizes)
    ]
    out = {"cells": int(sizes.sum()), "files": n_files}

    # time without tracemalloc (it slows every allocation), then memory with it, in a fresh plan
    t0 = time.perf_counter()
    plan = BatchPlan(sets, batch, seed=0, batching="mixed")
    plan.batch(0)
    first = time.perf_counter() - t0
    middle = range(plan.batches_per_epoch // 2, plan.batches_per_epoch // 2 + 200)
    t0 = time.perf_counter()
    for g in middle:
        plan.batch(g)
    per_batch = (time.perf_counter() - t0) / len(middle)
    tracemalloc.start()
    plan = BatchPlan(sets, batch, seed=0, batching="mixed")
    for g in (0, *middle):
        plan.batch(g)
    out["feistel"] = {
        "peak_MB": tracemalloc.get_traced_memory()[1] / 1e6,
        "first_batch_s": first,
        "batch_ms": per_batch * 1e3,
    }
    tracemalloc.stop()

    # the baseline: the materialised pool of the previous plan (per-file permutations, then one
    # permutation of the whole pool), per process and per epoch
    def materialise():
        ds = np.concatenate([np.full(n, f, np.int32) for f, n in enumerate(sizes)])
        rows = np.concatenate([np.random.default_rng([0, 0, 1, f]).permutation(int(n)) for f, n in enumerate(sizes)])
        perm = np.random.default_rng([0, 0, 2, 0]).permutation(len(rows))
        return ds[perm], rows[perm]

    t0 = time.perf_counter()
    ds, rows = materialise()
    first = time.perf_counter() - t0
    del ds, rows
    tracemalloc.start()
    ds, rows = materialise()
    out["materialised"] = {"peak_MB": tracemalloc.get_traced_memory()[1] / 1e6, "first_batch_s": first}
    tracemalloc.stop()
    del ds, rows
    return out


# ---------------------------------------------------------------------------------- 2. json
def json_codec(genes: int = 60_000, repeats: int = 20) -> dict:
    from concept_shard.layout import decode_json, encode_json

    record = {
        "genes": list(range(0, 2 * genes, 2)),
        "species": SPECIES,
        "cells_written": 1000,
        "cells_dropped": {"no_genes": 0},
        "source_file": "data/x.h5ad",
        "nonzeros": 10**6,
    }
    text = json.dumps(record, indent=1, sort_keys=True)
    fast = encode_json(record)

    def timed(fn) -> float:
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t0) / repeats * 1e3

    return {
        "genes": genes,
        "json_write_ms": timed(lambda: json.dumps(record, indent=1, sort_keys=True)),
        "json_read_ms": timed(lambda: json.loads(text)),
        "msgspec_write_ms": timed(lambda: encode_json(record)),
        "msgspec_read_ms": timed(lambda: decode_json(fast)),
    }


# ---------------------------------------------------------------------------------- 3. files
def many_files_project(workdir: Path, n_files: int, cells: int, genes: int, nnz: int) -> Path:
    project = workdir / f"many_{n_files}_{cells}_{genes}_{nnz}"
    h5ads = project / "data" / SOURCE / "h5ads"
    vocab = vocabulary_csv(workdir)
    template = workdir / f"template_{cells}_{genes}_{nnz}.h5ad"
    if not template.is_file():
        generate_h5ad(template, cells, genes, nnz, vocabulary_gene_ids(vocab), seed=0)
    h5ads.mkdir(parents=True, exist_ok=True)
    names = [f"f{i:05d}.h5ad" for i in range(n_files)]
    for name in names:
        if not (h5ads / name).exists():
            os.link(template, h5ads / name)
    mapping = project / "references/vocabulary/token_mappings_per_specie" / f"{SPECIES}.csv"
    mapping.parent.mkdir(parents=True, exist_ok=True)
    if not mapping.exists():
        os.link(vocab, mapping)
    for sub in ("model_checkpoints", f"panels/{SPECIES}", "references/embeddings"):
        (project / sub).mkdir(parents=True, exist_ok=True)
    conf = project / "conf" / "datamodule"
    (conf / f"split_{SOURCE}_{SPECIES}").mkdir(parents=True, exist_ok=True)
    (conf / f"split_{SOURCE}_{SPECIES}" / "all.yaml").write_text(
        f"source_name: {SOURCE}\nspecies: {SPECIES}\nsource_path: ${{PATH.PROJECT_PATH}}/data/{SOURCE}/h5ads\n"
        "train:\n" + "".join(f"  - {n}\n" for n in names) + "val: []\n"
    )
    (conf / "Many.yaml").write_text(
        f"defaults:\n  - split_{SOURCE}_{SPECIES}: all\n  - _self_\n"
        f"species: [{SPECIES}]\nobs_keys: [dataset, donor_id, tissue, cell_type]\n"
        f"dataset:\n  train:\n    split:\n      - ${{datamodule.split_{SOURCE}_{SPECIES}}}\n    max_tokens: 1000\n"
        "dataloader:\n  train:\n    batch_size: 128\n    num_workers: 0\n"
    )
    return project


def child_json(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def files_figures(workdir: Path, n_files: int, args) -> dict:
    project = many_files_project(workdir, n_files, args.cells, args.genes, args.nnz)
    shutil.rmtree(project / "shards", ignore_errors=True)
    exe = Path(sys.executable).parent / "concept-shard"
    build = [str(exe), "build", str(project), "--config-dir", str(project / "conf"), "datamodule=Many", "--no-progress"]
    rec, text = measured(build, workdir, f"build_{n_files}")
    if rec["rc"] != 0:
        raise SystemExit(f"build of {n_files} files failed:\n{text[-3000:]}")
    noop, _ = measured(build, workdir, f"noop_{n_files}")
    out = {
        "files": n_files,
        "build_s": rec["wall_s"],
        "build_peak_MB": rec["maxrss_kib"] / 1024,
        "build_s_per_file": rec["wall_s"] / n_files,
        "noop_build_s": noop["wall_s"],
    }
    runs = {"quick": [], "full": []}
    for _ in range(args.repeats):
        for mode, extra in (("quick", []), ("full", ["datamodule.check_sources=full"])):
            runs[mode].append(child_json([sys.executable, "-c", FIRST_BATCH, str(project), *extra]))
    for mode, rs in runs.items():
        out[f"first_batch_{mode}"] = {
            k: statistics.median(r[k] for r in rs) for k in ("compose_s", "catalog_s", "first_batch_s", "total_s")
        }
    # disk after one epoch: through a bounded cache, then in place (compressed shards leave a
    # decompressed copy of every shard beside them; the default's uncompressed ones nothing)
    built = du(project / "shards")
    cache = workdir / f"cache_{n_files}"
    shutil.rmtree(cache, ignore_errors=True)
    shards = [s for index in (project / "shards").rglob("index.json") for s in json.loads(index.read_text())["shards"]]
    # (uncompressed shards, the default since varint entries, have no zip_data)
    zipped = [(s.get("zip_data") or {}).get("bytes", 0) for s in shards]
    limit = max(built // 4, 4 * max(s["raw_data"]["bytes"] + z for s, z in zip(shards, zipped)))
    epoch_cached = child_json(
        [sys.executable, "-c", EPOCH, str(project), f"PATH.LOCAL_DIR={cache}", f"datamodule.cache_limit={limit}"]
    )
    cached_disk = du(project / "shards") + du(cache)
    epoch_in_place = child_json([sys.executable, "-c", EPOCH, str(project)])
    out["disk"] = {
        "built_MB": built / 1e6,
        "cache_limit_MB": limit / 1e6,
        "after_epoch_cached_MB": cached_disk / 1e6,
        "after_epoch_in_place_MB": du(project / "shards") / 1e6,
        "epoch_cached_s": epoch_cached["seconds"],
        "epoch_in_place_s": epoch_in_place["seconds"],
    }
    shutil.rmtree(cache, ignore_errors=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", default="100,1000", help="comma-separated file counts")
    p.add_argument("--cells", type=int, default=300, help="cells per file")
    p.add_argument("--genes", type=int, default=2000, help="genes per file")
    p.add_argument("--nnz", type=int, default=300, help="nonzeros per cell")
    p.add_argument("--plan-cells", type=int, default=30_000_000)
    p.add_argument("--plan-files", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "concept_scale_bench")
    args = p.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    result = {}

    log(f"== mixed plan at {args.plan_cells:,} cells in {args.plan_files:,} files")
    plan = result["plan"] = plan_memory(args.plan_cells, args.plan_files)
    for k in ("feistel", "materialised"):
        log(f"  {k:<13} peak {plan[k]['peak_MB']:8.1f} MB   first batch of an epoch {plan[k]['first_batch_s']:.3f} s")
    log(
        f"  ratio (materialised / on demand): "
        f"memory {plan['materialised']['peak_MB'] / plan['feistel']['peak_MB']:.0f}x, "
        f"epoch-start stall {plan['materialised']['first_batch_s'] / plan['feistel']['first_batch_s']:.0f}x; "
        f"a batch inside the epoch {plan['feistel']['batch_ms']:.2f} ms"
    )

    log("== dataset.json at 60,000 genes")
    js = result["json"] = json_codec()
    log(
        f"  write: json {js['json_write_ms']:.1f} ms, msgspec {js['msgspec_write_ms']:.2f} ms "
        f"({js['json_write_ms'] / js['msgspec_write_ms']:.0f}x); read: json {js['json_read_ms']:.1f} ms, "
        f"msgspec {js['msgspec_read_ms']:.2f} ms ({js['json_read_ms'] / js['msgspec_read_ms']:.1f}x)"
    )

    result["files"] = []
    for n in [int(x) for x in args.files.split(",") if x]:
        log(f"== {n:,} files of {args.cells} cells")
        f = files_figures(args.workdir, n, args)
        result["files"].append(f)
        q, full = f["first_batch_quick"], f["first_batch_full"]
        log(
            f"  build {f['build_s']:.1f} s ({f['build_s_per_file'] * 1e3:.0f} ms/file), "
            f"peak RSS {f['build_peak_MB']:.0f} MB; "
            f"no-op re-run {f['noop_build_s']:.1f} s"
        )
        log(
            f"  start to first batch: quick check {q['total_s']:.2f} s (catalog {q['catalog_s']:.2f} s), "
            f"full check {full['total_s']:.2f} s (catalog {full['catalog_s']:.2f} s)"
        )
        d = f["disk"]
        log(
            f"  disk after one epoch: built {d['built_MB']:.0f} MB; through a {d['cache_limit_MB']:.0f} MB cache "
            f"{d['after_epoch_cached_MB']:.0f} MB (x{d['after_epoch_cached_MB'] / d['built_MB']:.2f}, epoch "
            f"{d['epoch_cached_s']:.0f} s); in place {d['after_epoch_in_place_MB']:.0f} MB "
            f"(x{d['after_epoch_in_place_MB'] / d['built_MB']:.2f}, epoch {d['epoch_in_place_s']:.0f} s)"
        )
    if len(result["files"]) > 1:
        a, b = result["files"][0], result["files"][-1]
        added = b["files"] - a["files"]
        quick_ms = (b["first_batch_quick"]["catalog_s"] - a["first_batch_quick"]["catalog_s"]) / added * 1e3
        full_ms = (b["first_batch_full"]["catalog_s"] - a["first_batch_full"]["catalog_s"]) / added * 1e3
        log(
            f"== growth from {a['files']} to {b['files']} files: "
            f"build peak RSS x{b['build_peak_MB'] / a['build_peak_MB']:.2f}; "
            f"catalog per file (quick) {quick_ms:.2f} ms, "
            f"(full) {full_ms:.2f} ms"
        )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
