#!/usr/bin/env python
"""`concept-shard gene-vectors` on a corpus of many shards: what a sample reads (issue 15); a
benchmark, not a test.

Usage::

    python tools/bench/gene_vectors.py [--files 150] [--cells 4000] [--genes 2000] [--nnz 1500]
                                       [--max-cells 10000] [--repeats 2] [--old PATH] [--workdir DIR]

Makes (once, under --workdir) the many-files project of `tools/bench/scale.py` (--files copies of
one generated `.h5ad`, each its own dataset) and shards it with the default shard size, then runs
`gene-vectors --max-cells N` in fresh child processes and counts, through the shard store's
`read(basename)` callable, the shard files read and their bytes; wall time of the whole command
and of its read phase (from its log line). With `--old DIR` (a checkout of earlier code, e.g.
`git worktree add /tmp/gv-old <commit>`), the same runs with DIR first on PYTHONPATH, alternating
with the current code; medians of --repeats. The LAST line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tools.bench.scale import many_files_project  # noqa: E402

CHILD = r"""
import json, sys, time
from concept_shard import datasets
from concept_shard.cli import main
stats = {"reads": 0, "bytes": 0, "shard_files": 0, "shard_bytes": 0}
reader = datasets.ShardStore.reader

def counting(self, sf):
    read = reader(self, sf)
    def counted(name):
        data = read(name)
        stats["reads"] += 1
        stats["bytes"] += len(data)
        if name.startswith("shard."):
            stats["shard_files"] += 1
            stats["shard_bytes"] += len(data)
        return data
    return counted

datasets.ShardStore.reader = counting
t0 = time.perf_counter()
rc = main(sys.argv[1:])
stats["wall_s"] = time.perf_counter() - t0
stats["code"] = datasets.__file__
print(json.dumps(stats) if rc == 0 else f"rc {rc}")
"""


def run(project: Path, max_cells: int, pythonpath: str | None) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    args = [
        "gene-vectors",
        str(project),
        "--config-dir",
        str(project / "conf"),
        "datamodule=Many",
        "--max-cells",
        str(max_cells),
        "--no-progress",
    ]
    out = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env, cwd="/")
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines or not lines[-1].startswith("{"):
        raise SystemExit(f"gene-vectors failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    rec = json.loads(lines[-1])
    m = re.search(r"\(read (?:[\d,]+ of [\d,]+ shards in )?([\d.]+) s, SVD ([\d.]+) s\)", out.stdout)
    rec["read_s"], rec["svd_s"] = float(m.group(1)), float(m.group(2))
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=150)
    p.add_argument("--cells", type=int, default=4000, help="cells per file")
    p.add_argument("--genes", type=int, default=2000, help="genes per file")
    p.add_argument("--nnz", type=int, default=1500, help="nonzeros per cell")
    p.add_argument("--max-cells", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--old", help="a checkout of the code to compare with (put first on PYTHONPATH)")
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "concept_gv_bench")
    args = p.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    project = many_files_project(args.workdir, args.files, args.cells, args.genes, args.nnz)
    exe = Path(sys.executable).parent / "concept-shard"
    subprocess.run(
        [str(exe), "build", str(project), "--config-dir", str(project / "conf"), "datamodule=Many", "--no-progress"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    indexes = [i for i in (project / "shards").rglob("index.json") if (i.parent / "dataset.json").is_file()]
    shards = [s for index in indexes for s in json.loads(index.read_text())["shards"]]
    corpus = {
        "files": len(indexes),
        "cells": sum(int(s["samples"]) for s in shards),
        "shards": len(shards),
        # the stored files: compressed when built with shard.compression, else the raw shards
        "shard_MB": sum((s.get("zip_data") or s["raw_data"])["bytes"] for s in shards) / 1e6,
    }
    print(
        f"corpus: {corpus['files']} files, {corpus['cells']:,} cells, {corpus['shards']} shards, "
        f"{corpus['shard_MB']:.0f} MB",
        flush=True,
    )
    codes = {"new": None, **({"old": args.old} if args.old else {})}
    runs: dict[str, list[dict]] = {k: [] for k in codes}
    for _ in range(args.repeats):
        for name, path in codes.items():
            rec = run(project, args.max_cells, path)
            runs[name].append(rec)
            print(
                f"  {name}: {rec['shard_files']} shard files, {rec['shard_bytes'] / 1e6:.0f} MB read, "
                f"read {rec['read_s']:.1f} s, wall {rec['wall_s']:.1f} s ({rec['code']})",
                flush=True,
            )
    out = {"corpus": corpus, "max_cells": args.max_cells}
    for name, rs in runs.items():
        out[name] = {
            k: statistics.median(r[k] for r in rs)
            for k in ("shard_files", "shard_bytes", "reads", "bytes", "read_s", "svd_s", "wall_s")
        }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
