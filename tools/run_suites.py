"""Run pytest suites a few at a time (what `make test` calls), each in its own pytest process.

    python tools/run_suites.py [--jobs N] [--venv DIR] [--marker EXPR] SUITE ... [--venv DIR2 ...] SUITE ...

A SUITE is one argument holding pytest's arguments (paths, --ignore=...), split on spaces. `--venv`
and `--marker` apply to the suites after them, so one call runs the main Python's suites and the
second Python's. Suites start longest first, by the durations of the last run (kept in
.pytest_cache/d/concept-suite-times.json); suites not timed yet start first, the groups (one per
--venv) taken in turn, each in the order given; N at a time (default: the number of cores). Each
suite's output is printed whole when it ends, with its time; the exit status
is 1 if any suite failed, and the failed suites are named again at the end.

Why separate processes: mosaicml-streaming keeps a handle on the shared memory of every live
dataset each time a StreamingDataset is built, so descriptors grow with the square of the datasets
one process builds, and the whole suite in one process passed the 20,000 limit ("Too many open
files"). Why several at once: most tests wait on a child process's start-up (an interpreter that
imports torch, ~4 s) on one core; two suites side by side keep both cores busy.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent
TIMES = REPO / ".pytest_cache" / "d" / "concept-suite-times.json"


class Suite(NamedTuple):
    venv: str
    marker: str
    args: tuple[str, ...]

    @property
    def name(self) -> str:
        python = Path(self.venv).name
        return f"[{python}{' -m ' + shlex.quote(self.marker) if self.marker else ''}] {' '.join(self.args)}"

    def command(self) -> list[str]:
        marker = ["-m", self.marker] if self.marker else []
        return [str(Path(self.venv) / "bin" / "python"), "-m", "pytest", "-q", "--durations=8", *marker, *self.args]


def parse(argv: list[str]) -> tuple[int, list[Suite]]:
    jobs, venv, marker, suites = os.cpu_count() or 1, ".venv", "", []
    it = iter(argv)
    for arg in it:
        if arg in ("--jobs", "--venv", "--marker"):
            value = next(it, None)
            if value is None:
                sys.exit(f"run_suites.py: {arg} needs a value")
            if arg == "--jobs":
                jobs = max(1, int(value))
            elif arg == "--venv":
                venv = value
            else:
                marker = value
        elif arg.strip():
            suites.append(Suite(venv, marker, tuple(arg.split())))
    return jobs, suites


def _load_times() -> dict[str, float]:
    try:
        return json.loads(TIMES.read_text())
    except (OSError, ValueError):
        return {}


def main(argv: list[str] | None = None) -> int:
    jobs, suites = parse(sys.argv[1:] if argv is None else argv)
    last = _load_times()
    # longest first; suites not timed yet first of all, the groups in turn (the slow group of the
    # second Python does not wait for the end), each in the order given
    turn = {}
    for i, suite in enumerate(suites):
        turn[i] = sum(1 for other in suites[:i] if (other.venv, other.marker) == (suite.venv, suite.marker))
    order = sorted(range(len(suites)), key=lambda i: (-last.get(suites[i].name, float("inf")), turn[i], i))
    pending = [suites[i] for i in order]
    running: dict[Suite, tuple[subprocess.Popen, object, float]] = {}
    failed, times, start = [], dict(last), time.monotonic()
    print(f"[test] {len(suites)} suites, {jobs} at a time", flush=True)
    while pending or running:
        while pending and len(running) < jobs:
            suite = pending.pop(0)
            log = tempfile.TemporaryFile("w+")
            env = dict(os.environ, CONCEPT_VENV=suite.venv)
            proc = subprocess.Popen(suite.command(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
            running[suite] = (proc, log, time.monotonic())
            print(f"[test] started {suite.name}", flush=True)
        time.sleep(0.2)
        for suite, (proc, log, began) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[suite]
            times[suite.name] = round(time.monotonic() - began, 1)
            log.seek(0)
            status = "passed" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
            print(f"\n[test] {suite.name}: {status} in {times[suite.name]:.0f} s\n{log.read()}", flush=True)
            log.close()
            if proc.returncode != 0:
                failed.append(suite.name)
    TIMES.parent.mkdir(parents=True, exist_ok=True)
    TIMES.write_text(json.dumps(times, indent=1))
    print(f"[test] {len(suites)} suites in {time.monotonic() - start:.0f} s", flush=True)
    for name in failed:
        print(f"[test] FAILED: {name}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
