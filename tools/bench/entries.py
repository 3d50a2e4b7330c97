"""Varint entries (the default shard format) against the earlier format (zstd-compressed arrays),
measured in one run on the same synthetic file: conversion (cells/s, peak RSS, bytes per nonzero),
raw and tokenized batches (cells/s, 0 and 2 workers), and disk after an epoch read in place.

Both formats are read by the same code (the store reads either), so the loading ratios are the
format's own cost. The file and the measurements are peers.py's (tools/bench/shard.py's generator,
peers.py's child tasks, alternating rounds, medians, the load of each run).

    .venv/bin/python tools/bench/entries.py                 # 200,000 cells, 3 rounds: ~12 min
    .venv/bin/python tools/bench/entries.py --cells 20000   # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402  (tools/bench/peers.py: the harness's tasks)

EARLIER = ("shard.entries=arrays", "shard.compression=zstd:1")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", type=int, default=200_000)
    p.add_argument("--nnz", type=int, default=1500)
    p.add_argument("--genes", type=int, default=20000)
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--seconds", type=float, default=6.0, help="timed seconds per loading run (default 6)")
    p.add_argument("--workdir", default="/tmp/concept_peers_bench", help="shared with peers.py (its files)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    shard = peers.bench_shard()
    peers.log(f"entries benchmark: {args.cells:,} cells, {args.repeats} rounds; machine: {shard.machine()}")
    vocab = shard.vocabulary_csv(workdir)
    project, _, facts = shard.ensure_project(workdir, args.cells, args.genes, args.nnz, peers.SEED, vocab, [])
    formats = {"varint": (project, ()), "earlier": (peers.sibling_project(project, "_earlier"), EARLIER)}
    convert: dict[str, list] = {f: [] for f in formats}
    for rnd in range(args.repeats):  # the last round's shards stay for the loading runs
        for name, (proj, extra) in formats.items():
            r = shard.shard_run(proj, args.cells, workdir, extra)
            convert[name].append(
                {k: r[k] for k in ("cells_per_s", "peak_rss_mb", "bytes_per_nnz", "user_s", "sys_s", "build_wall_s")}
            )
        shown = [
            f"{k} {v[-1]['cells_per_s']:,.0f} cells/s, {v[-1]['bytes_per_nnz']:.3f} B/nnz" for k, v in convert.items()
        ]
        peers.log(f"  conversion round {rnd + 1}: " + ", ".join(shown))
    jobs = {}
    for name, (proj, _) in formats.items():
        jobs[f"raw {name}"] = (sys.executable, "raw_ours", {"project": str(proj), "seconds": args.seconds})
        jobs[f"tokenized {name}"] = (sys.executable, "tok_ours", {"project": str(proj), "seconds": args.seconds})
    loading = peers.loading(jobs, args.cells, [0, 2], args.repeats, workdir, title="batches")
    disk = {name: peers.disk_after_epoch(proj, args.cells, workdir) for name, (proj, _) in formats.items()}
    result = {
        "conversion": {k: peers.medians(v) for k, v in convert.items()},
        "loading": loading,
        "disk_after_epoch": disk,
        "cells": args.cells,
        "nonzeros": facts["nonzeros"],
        "repeats": args.repeats,
        "seconds": args.seconds,
        "benchmark_s": round(time.perf_counter() - t0, 1),
        "machine": shard.machine(),
    }
    conv = result["conversion"]
    print("\nformat    build cells/s  peak RSS MB  B/nnz | disk after epoch", file=sys.stderr)
    for name in formats:
        c = conv[name]
        print(
            f"{name:8s}  {c['cells_per_s']:13,.0f}  {c['peak_rss_mb']:11,.0f}  {c['bytes_per_nnz']:.3f} |"
            f" {disk[name]['ratio']:.2f}x",
            file=sys.stderr,
        )
    for key, res in loading.items():
        print(f"{key:24s} {peers.fmt_rate(res)}", file=sys.stderr)
    print(json.dumps(peers.rounded(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
