#!/usr/bin/env python
"""What checking shards against their hashes costs the training loader (issue 23); not a test.

Usage::

    python tools/bench/verify.py PROJECT_PATH [--config-dir DIR] [--rounds 5] [--batches N] [key=value ...]

A process checks each shard file the first time it maps it (xxh3_64 over its decompressed bytes,
concept_train/data/read/store.py) and streaming checks each file it downloads or decompresses, so
the whole cost falls on a process's first pass over the shards. Each round therefore runs the
composed config's training loader (no DataLoader workers: the loading process pays every check on
the batches' path) in two fresh processes, one with the checks and one without
(`store.VERIFY = False`, the baseline), in alternating order, and times the first `--batches`
tokenized batches from the loader's creation (catalog check, plan, every first map included). One
warm-up process first decompresses the shards in place, so neither side pays decompression. The
shards must exist (`concept-shard build PROJECT_PATH` with the same overrides).

Prints a table; the LAST line is a JSON object: median batches/s with and without, their ratio,
and the shard bytes a pass hashed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def child(args, overrides) -> dict:
    from concept_shard.config import compose_config
    from concept_train.data import DataModule
    from concept_train.data.read import store

    store.VERIFY = args.child == "on"
    t0 = time.perf_counter()
    cfg = compose_config(args.project_path, overrides, args.config_dir)
    loader = DataModule(cfg, log=lambda *a: None).train_loader()
    cells = batches = 0
    for batch in loader:
        cells += batch.n_cells
        batches += 1
        if batches == args.batches:
            break
    seconds = time.perf_counter() - t0
    sample_store = loader.maker.store
    hashed = sum(sample_store.dataset.shards[i].raw_data.bytes for i in sample_store._verified)
    return {"verify": args.child, "batches": batches, "cells": cells, "seconds": seconds, "hashed_bytes": hashed}


def hash_seconds(args, overrides) -> float:
    """The time xxh3_64 takes over the raw shard files a pass checked (read into memory first):
    the checks' own cost, apart from the machine's noise."""
    from concept_shard.config import compose_config
    from concept_shard.integrity import shard_hash

    cfg = compose_config(args.project_path, overrides, args.config_dir)
    files = sorted(Path(cfg.PATH.SHARDS_PATH).glob("*/*/*/shard.*.mds"))
    data = [f.read_bytes() for f in files]
    t0 = time.perf_counter()
    for d in data:
        shard_hash(d)
    return time.perf_counter() - t0


def run_child(args, overrides, mode: str) -> dict:
    cmd = [sys.executable, __file__, args.project_path, "--child", mode, "--batches", str(args.batches)]
    cmd += ["--config-dir", args.config_dir] if args.config_dir else []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd + overrides, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"child ({mode}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("project_path")
    p.add_argument("--config-dir")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batches", type=int, default=200, help="batches timed per process (default 200)")
    p.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args, overrides = p.parse_known_args(argv)
    # in the loading process itself, where all of the checks' cost is on the batches' path
    overrides = ["datamodule.dataloader.train.num_workers=0", *overrides]
    if args.child:
        print(json.dumps(child(args, overrides)))
        return 0
    run_child(args, overrides, "off")  # warm-up: decompress the shards in place, fill the page cache
    runs = {"on": [], "off": []}
    for r in range(args.rounds):
        for mode in ("on", "off") if r % 2 == 0 else ("off", "on"):
            result = run_child(args, overrides, mode)
            runs[mode].append(result)
            print(
                f"round {r}  verify={mode:<3}  {result['batches']} batches in {result['seconds']:.2f} s  "
                f"({result['batches'] / result['seconds']:.1f}/s, hashed {result['hashed_bytes'] / 1e6:.1f} MB)",
                file=sys.stderr,
            )
    rate = {m: statistics.median(x["batches"] / x["seconds"] for x in runs[m]) for m in runs}
    # each round's two processes ran back to back: their ratio is robust to the machine drifting
    paired = [off["seconds"] / on["seconds"] for on, off in zip(runs["on"], runs["off"])]
    summary = {
        "batches_per_s_verified": rate["on"],
        "batches_per_s_unverified": rate["off"],
        "ratio_verified_to_unverified": rate["on"] / rate["off"],
        "paired_ratio_median": statistics.median(paired),
        "paired_ratios": paired,
        "hash_seconds_per_pass": hash_seconds(args, overrides),
        "batches": runs["on"][0]["batches"],
        "cells": runs["on"][0]["cells"],
        "hashed_bytes_per_pass": runs["on"][0]["hashed_bytes"],
        "rounds": args.rounds,
        "overrides": overrides,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}",
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
