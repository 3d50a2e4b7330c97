#!/usr/bin/env python
"""Start-up cost of `concept-shard`: wall time and peak RSS of `concept-shard status` and of one
SLURM array task of `concept-shard build` (issue 22: the config path once loaded torch, ~6 s and
~700 MB per task); a benchmark, not a test.

Usage::

    git worktree add /tmp/base <commit>          # the code to compare against
    python tools/bench/startup.py --old /tmp/base [--repeats 3] [--workdir DIR]

Makes the example project (300 cells per file) under --workdir, then alternates the current code
and --old (each run in a fresh interpreter with its checkout first on PYTHONPATH and its own conf/)
over: `status` on the unsharded project, and `build --task-index 0 --num-tasks 9` (one file's
task) on a fresh copy. Peak RSS from wait4's rusage of that child alone. Medians of --repeats; the
LAST line is one JSON object with every figure.
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def timed(cmd: list[str], repo: Path, cwd: Path) -> tuple[float, float, int]:
    """(wall s, peak RSS MB, exit code) of one child process running `cmd` from checkout `repo`."""
    env = dict(os.environ, PYTHONPATH=str(repo), CONCEPT_CONF_DIR=str(repo / "conf"))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss / 1024, proc.returncode


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", type=Path, required=True, help="a checkout of the code to compare against")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "concept_startup_bench")
    args = p.parse_args(argv)
    project = args.workdir / "project"
    if not project.is_dir():
        subprocess.run(
            [sys.executable, str(REPO / "tools/make_example_project.py"), str(project), "--cells", "300"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    shard = [sys.executable, "-m", "concept_shard.cli"]
    figures = {"new": {"status": [], "task": []}, "old": {"status": [], "task": []}}
    for r in range(args.repeats):
        for name, repo in (("new", REPO), ("old", args.old.resolve())):
            figures[name]["status"].append(
                timed(shard + ["status", str(project), "datamodule=DataModuleAdvanced"], repo, args.workdir)
            )
            copy = args.workdir / f"task_{name}"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(project, copy, symlinks=True)
            wall, rss, code = timed(
                shard
                + [
                    "build",
                    str(copy),
                    "datamodule=DataModuleAdvanced",
                    "--task-index",
                    "0",
                    "--num-tasks",
                    "9",
                    "--no-progress",
                ],
                repo,
                args.workdir,
            )
            assert code == 0, f"{name}: build task failed ({code})"
            figures[name]["task"].append((wall, rss, code))
            print(
                f"[startup] round {r + 1}: {name} status {figures[name]['status'][-1][0]:.2f} s, "
                f"task {wall:.2f} s / {rss:.0f} MB",
                flush=True,
            )
    out = {}
    for name, runs in figures.items():
        for what, rows in runs.items():
            out[f"{name}_{what}_s"] = round(statistics.median(w for w, _, _ in rows), 2)
            out[f"{name}_{what}_rss_mb"] = round(statistics.median(m for _, m, _ in rows))
    for what in ("status", "task"):
        out[f"{what}_speedup"] = round(out[f"old_{what}_s"] / out[f"new_{what}_s"], 2)
        out[f"{what}_rss_ratio"] = round(out[f"new_{what}_rss_mb"] / out[f"old_{what}_rss_mb"], 2)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
