#!/usr/bin/env python
"""Worker hand-off: shared slots (concept_train/data/deliver/handoff.py) against torch's own, same run (not a test).

Usage::

    python tools/bench/handoff.py PROJECT_PATH [--workers 1,2] [--seconds 5] [--rounds 3] [key=value ...]

Two figures per worker count, each in alternating rounds (slots, torch, slots, torch, ...):
- the training loader (tokenized batches, the composed config) with `handoff_slots` on and off;
- the no-work ceiling: workers that hand over one pre-made batch of the training loader's first
  batch (its tensors and storages as the loader makes them), so the figure is the hand-off alone.
Each run: a fresh DataLoader, one warm-up batch, then batches for --seconds. The LAST line is a
JSON object with every run, the medians and the slots/torch ratio of each figure's medians.
The shards must exist (`concept-shard build PROJECT_PATH` with the same overrides).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed(batches, seconds: float) -> float:
    next(batches)
    cells, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        cells += next(batches).n_cells
    return cells / (time.perf_counter() - t0)


def loader_rate(cfg, workers: int, slots: bool, seconds: float) -> float:
    from concept_train.data import DataModule

    loader = DataModule(cfg, log=lambda *a: None).train_loader()
    loader.num_workers, loader.handoff_slots = workers, slots
    it = iter(loader)
    try:
        return timed(it, seconds)
    finally:
        it.close()


def ceiling_rate(batch, workers: int, slots: bool, seconds: float) -> float:
    """The loader's own hand-off path (_BatchStream's packing, Loader's unpacking) over a maker
    that returns one pre-made batch."""
    from concept_train.data.deliver.loader import Loader

    class Premade:
        seed, plan = 0, None

        def make(self, g):
            batch.index = g
            return batch

    loader = Loader(Premade(), num_workers=workers, handoff_slots=slots)
    it = iter(loader)
    try:
        return timed(it, seconds)
    finally:
        it.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("project_path")
    p.add_argument("--config-dir")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=3)
    args, overrides = p.parse_known_args(argv)
    from concept_shard.config import compose_config
    from concept_train.data import DataModule

    t_start = time.perf_counter()
    cfg = compose_config(args.project_path, overrides, args.config_dir)
    first = next(iter(DataModule(cfg, log=lambda *a: None).train_loader()))
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    log(
        f"hand-off benchmark on {args.project_path} ({machine}); batch of {first.n_cells} cells, "
        f"{sum(t.numel() * t.element_size() for t in first.tensors().values()) / 1e6:.2f} MB of tensors"
    )
    runs: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for w in [int(x) for x in args.workers.split(",")]:
            for figure, rate in (
                ("loader", lambda s, w=w: loader_rate(cfg, w, s, args.seconds)),
                ("ceiling", lambda s, w=w: ceiling_rate(first, w, s, args.seconds)),
            ):
                for slots in (True, False):
                    name = f"{figure} {w} worker(s) {'slots' if slots else 'torch'}"
                    runs.setdefault(name, []).append(rate(slots))
                    log(f"  round {r + 1}: {name}: {runs[name][-1]:,.0f} cells/s")
    medians = {k: statistics.median(v) for k, v in runs.items()}
    ratios = {
        k.replace(" slots", ""): medians[k] / medians[k.replace("slots", "torch")]
        for k in medians
        if k.endswith("slots")
    }
    log("")
    for k, v in ratios.items():
        log(f"{k}: slots {medians[k + ' slots']:,.0f} / torch {medians[k + ' torch']:,.0f} cells/s = {v:.2f}x")
    print(
        json.dumps(
            {
                "runs": {k: [round(x) for x in v] for k, v in runs.items()},
                "medians": {k: round(v) for k, v in medians.items()},
                "slots_over_torch": {k: round(v, 2) for k, v in ratios.items()},
                "overrides": overrides,
                "machine": machine,
                "benchmark_s": round(time.perf_counter() - t_start, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
