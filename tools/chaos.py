#!/usr/bin/env python3
"""Kill -9 builds and training runs at random moments, then check that nothing was lost or doubled.

    python tools/chaos.py WORKDIR [--kills 20] [--signals 0] [--damage 0] [--nan] [--twin] [--seed 0]
                          [--cells 300 | --example DIR]

Half the kills come at a random moment, the others as soon as the filesystem shows the moment
aimed at (a part being written, a join, a checkpoint being written).

1. Makes the example project (`tools/make_example_project.py`, `--cells` per synthetic file)
   and, in a copy, builds it uninterrupted and trains a tiny model for a few steps uninterrupted:
   the references.
2. Builds: `--kills` times, starts `concept-shard build` (small chunks, parts and shards, so
   there are many part writes and joins to land in) and kills it with SIGKILL after a random
   delay within the reference build's duration; then one build runs to the end. Every dataset is
   checked against its source (written + dropped cells = source cells, every written row once, in
   order) and against the uninterrupted build, sample for sample.
3. Training: `--kills` times, starts (or resumes) the run and kills it after a random delay
   within the reference run's duration; then it is resumed to the end. Every step's loss and
   batch digest must equal the uninterrupted run's, bit for bit.

4. Signals (`--signals N`): N times, starts (or resumes) another run and, once it is past the step
   it resumed from, sends SIGTERM to its process group at a random moment (what SLURM does at a
   time limit or preemption). The run must finish its step, write a checkpoint of exactly the last
   step it logged (no step lost) and exit 75 (resumable); then it is resumed to the end, and every
   step must equal the uninterrupted run's, bit for bit.

5. Damage (`--damage N`): N times, one shard file of a random dataset gets a flipped bit, or the
   bytes of another dataset's file of the same name. `concept-shard status --verify` must name
   exactly that dataset as damaged (exit 1), `concept-shard build --verify` must rebuild exactly it,
   and every dataset must then equal the uninterrupted build again, sample for sample.
6. Divergence (`--nan`): a run whose lr makes its weights overflow (NaN losses) must stop with the
   error naming model.training.max_nonfinite_steps (exit 2), its latest checkpoint must be one of
   finite weights from before the first skipped step, and no checkpoint after it written.
7. A twin (`--twin`): while a run is training (held with SIGSTOP after its first step, so that the
   two overlap on any machine), the same command (`initialize.resume=auto`, as train.sbatch runs
   it: a requeued job overlapping its old self) is started again; it must be refused by the run's
   lock (exit 2), and the first run must finish equal to the uninterrupted one, bit for bit.

What the filesystem held at each kill (a part, a join, a checkpoint being written) is counted,
so the report says where the kills landed. Exit status 0 when every check passed. This is a
benchmark-style tool, not a unit test; tests/e2e/test_chaos.py runs it with a small --kills.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ADVANCED = ["datamodule=DataModuleAdvanced"]
BUILD = [*ADVANCED, "shard.chunk_size=16", "shard.part_size=100", "shard.shard_size_limit=65536", "--no-progress"]
TRAIN = [
    "model.dim_model=16",
    "model.nlayers=1",
    "model.num_head=2",
    "model.dim_hid=32",
    "model.dim_gene_embs=16",
    "model.training.max_steps=12",
    "model.training.log_every_n_steps=1",
    "model.training.warmup=2",
    "model.training.checkpoint_every_n_steps=2",
    "model.training.val_check_interval=0",
    "model.training.validate_before_training=False",
    "datamodule.dataloader.train.batch_size=16",
    "datamodule.dataloader.train.num_workers=0",
    "datamodule.dataset.train.max_tokens=50",
    *ADVANCED,
]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _build_cmd(project: Path) -> list[str]:
    return [sys.executable, "-m", "concept_shard.cli", "build", str(project), *BUILD]


def _train_cmd(project: Path, run_id: str, resume: bool | str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "concept_train.cli",
        str(project),
        *TRAIN,
        f"initialize.run_id={run_id}",
        f"initialize.resume={resume}",
    ]


def _run(cmd: list[str], timeout: float = 900) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}")
    return time.perf_counter() - t0


def _kill_after(cmd: list[str], delay: float, where, target: str | None = None) -> tuple[bool, str]:
    """Start cmd and SIGKILL its process group after `delay` s or, with `target`, as soon as
    `where()` reports that state (polled every millisecond); (killed before it ended, the state)."""
    proc = subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.perf_counter() + delay
    while proc.poll() is None:
        if target is None and time.perf_counter() >= deadline:
            break
        if target is not None and where() == target:
            break
        time.sleep(0.001 if target is not None else 0.005)
    if proc.poll() is not None:
        return False, "finished"
    state = where()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return True, state


def _build_state(project: Path) -> str:
    shards = project / "shards"
    if list(shards.glob("*/*/*.join.tmp")) or list(shards.glob("*/*/*.old.*.tmp")):
        return "inside a join"
    if list(shards.glob("*/*/.parts/*/part_*.tmp")):
        return "writing a part"
    return "between steps"


def _train_state(run: Path) -> str:
    if list((run / "checkpoints").glob("step_*.tmp")):
        return "inside a checkpoint write"
    return "training" if (run / "checkpoints").is_dir() else "starting up"


def _logged(run: Path) -> int:
    """The last step the run's metrics.jsonl holds (0 before its first)."""
    return max(_rows(run), default=0) if (run / "metrics.jsonl").is_file() else 0


def _latest_step(run: Path) -> int:
    pointer = run / "checkpoints" / "latest"
    return int(pointer.read_text().strip().removeprefix("step_")) if pointer.is_file() else 0


def _signal_when_past(cmd: list[str], run: Path, after: int, rng: random.Random, step_s: float):
    """Start cmd, wait until it has logged a step past `after`, then after a random part of a few
    steps' time send SIGTERM to its process group; (signalled before it ended, exit code)."""
    proc = subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    while proc.poll() is None and _logged(run) <= after:
        time.sleep(0.002)
    time.sleep(rng.uniform(0.0, 4 * step_s))
    if proc.poll() is not None:
        return False, proc.returncode
    os.killpg(proc.pid, signal.SIGTERM)
    return True, proc.wait(timeout=300)


def signal_runs(project: Path, reference: Path, n: int, rng: random.Random) -> dict:
    """--signals: n SIGTERMs at random steps of one run, each resumed (module docstring, 4.)."""
    run = project / "model_checkpoints" / "signalled"
    steps = len(_rows(reference))
    step_s = sorted(r["step_s"] for r in _rows(reference).values())[steps // 2]
    sent, exits, lost, landed = 0, Counter(), [], []
    for _ in range(4 * n):
        if sent == n:
            break
        resumed_from = _latest_step(run)
        if resumed_from >= steps:  # it reached the last step: start again from nothing
            shutil.rmtree(run)
            resumed_from = 0
        # checkpoints every 5 steps: a stop between them must write its own (what SIGTERM saves)
        cmd = _train_cmd(project, "signalled", resume=resumed_from > 0) + ["model.training.checkpoint_every_n_steps=5"]
        hit, code = _signal_when_past(cmd, run, resumed_from, rng, step_s)
        if not hit:
            continue
        sent += 1
        exits[code] += 1
        logged, kept = _logged(run), _latest_step(run)
        landed.append(kept)
        # 75: stopped with a checkpoint of its last step; 0: the signal came after the last step
        if code not in (75, 0) or kept != logged or (code == 0 and logged != steps):
            lost.append(f"signal {sent}: exit {code}, last step logged {logged}, checkpoint step {kept}")
    _run(_train_cmd(project, "signalled", resume=_latest_step(run) > 0) + ["model.training.checkpoint_every_n_steps=5"])
    problems = lost + check_training(run, reference)
    return {
        "signals": sent,
        "exit_codes": dict(exits),
        "signalled_at_steps": landed,  # the step each stop checkpointed
        "signal_problems": problems,
        "signal_steps_compared": len(_rows(run)),
    }


def _shard_cli(*args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "concept_shard.cli", *map(str, args)]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)


def _damage(project: Path, rng: random.Random) -> tuple[str, str]:
    """One shard file of a random dataset damaged; (its dataset, what was done)."""
    datasets = _datasets(project)
    name = rng.choice(sorted(datasets))
    built = datasets[name].glob("shard.*.mds*")  # a `.mds` beside its `.mds.zstd` is a reader's copy
    target = rng.choice(sorted(p for p in built if not (p.suffix == ".mds" and p.with_suffix(".mds.zstd").exists())))
    others = [datasets[o] / target.name for o in sorted(datasets) if o != name]
    others = [o for o in others if o.is_file() and o.read_bytes() != target.read_bytes()]
    if others and rng.random() < 0.5:  # another dataset's file under this name
        source = rng.choice(others)
        target.write_bytes(source.read_bytes())
        return name, f"{target.name} replaced by {source.parent.name}'s"
    data = bytearray(target.read_bytes())
    at, bit = rng.randrange(len(data)), rng.randrange(8)
    data[at] ^= 1 << bit
    target.write_bytes(bytes(data))
    return name, f"{target.name}: bit {bit} of byte {at} flipped"


def damage_rounds(project: Path, reference: Path, n: int, rng: random.Random) -> dict:
    """--damage: n damaged files, each found and rebuilt alone (module docstring, 5.)."""
    problems, done = [], []
    for i in range(n):
        name, what = _damage(project, rng)
        done.append(f"{name}: {what}")
        status = _shard_cli("status", project, *ADVANCED, "--verify")
        named = sorted(line.split()[1] for line in status.stdout.splitlines() if line.startswith("damaged"))
        if status.returncode != 1 or named != [name]:
            problems.append(f"damage {i + 1} ({name}: {what}): status --verify exit {status.returncode}, named {named}")
        build = _shard_cli("build", project, *BUILD, "--verify")
        rebuilt = sorted(
            line.split()[1].rstrip(":") for line in build.stdout.splitlines() if line.endswith("rebuilding.")
        )
        if build.returncode != 0 or rebuilt != [name]:
            problems.append(f"damage {i + 1} ({name}): build --verify exit {build.returncode}, rebuilt {rebuilt}")
    problems += check_build(project, reference)
    return {"damaged": done, "damage_problems": problems}


def diverging_run(project: Path) -> dict:
    """--nan: a run that diverges (module docstring, 6.)."""
    run = project / "model_checkpoints" / "diverged"
    cmd = _train_cmd(project, "diverged", resume=False) + ["model.training.lr=1e30"]
    cmd += ["model.training.checkpoint_every_n_steps=1"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    said = " ".join(proc.stderr.split())
    rows = _rows(run)
    skipped = sorted(s for s, r in rows.items() if r.get("skipped"))
    latest = _latest_step(run)
    problems = []
    if proc.returncode != 2 or "model.training.max_nonfinite_steps" not in said:
        problems.append(f"exit {proc.returncode}, not the named error: {said[-300:]}")
    if not skipped or latest != skipped[0] - 1:
        problems.append(f"skipped steps {skipped}, latest checkpoint step {latest}")
    written = [p.name for p in (run / "checkpoints").glob("step_*")] if (run / "checkpoints").is_dir() else []
    if skipped and any(int(name[5:].split(".")[0]) >= skipped[0] for name in written):
        problems.append("a checkpoint after the first skipped step")
    if latest:
        from concept_train import load_model  # refuses non-finite weights, naming the tensor

        try:
            load_model(run / "checkpoints" / f"step_{latest}")
        except Exception as exc:  # noqa: BLE001 - any refusal is the finding
            problems.append(f"the latest checkpoint does not load: {exc}")
    return {"diverged_skipped_steps": skipped, "diverged_latest_checkpoint": latest, "nan_problems": problems}


def twin_run(project: Path, reference: Path) -> dict:
    """--twin: the same run started twice (module docstring, 7.)."""
    run = project / "model_checkpoints" / "twin"
    # resume=auto, as tools/slurm/train.sbatch runs it (a requeued job overlapping its old self)
    cmd = _train_cmd(project, "twin", resume="auto")
    first = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while first.poll() is None and _logged(run) < 1:
        time.sleep(0.01)
    first.send_signal(signal.SIGSTOP)  # held mid-run while its twin starts: an overlap on any machine
    try:
        t0 = time.perf_counter()
        twin = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
        refused_s = time.perf_counter() - t0
    finally:
        first.send_signal(signal.SIGCONT)
    first.wait(timeout=900)
    problems = []
    if first.returncode != 0:
        problems.append(f"the first run: exit {first.returncode}")
    said = " ".join(twin.stderr.split())
    if twin.returncode != 2 or "is in use by another concept-train" not in said:
        problems.append(f"the twin: exit {twin.returncode}: {said[-300:]}")
    if list(run.glob("config.resume_step*.yaml")):
        problems.append("the twin wrote a resume config into the run")
    problems += check_training(run, reference)  # each step once, equal to the uninterrupted run
    return {"twin_refused_in_s": round(refused_s, 1), "twin_problems": problems}


# ---- checks ----------------------------------------------------------------------------------
def _datasets(project: Path) -> dict[str, Path]:
    return {
        str(p.parent.relative_to(project / "shards")): p.parent
        for p in (project / "shards").glob("*/*/*/dataset.json")
        if not p.parent.name.endswith(".tmp")
    }


def _samples(directory: Path) -> list[dict]:
    from concept_shard.mds import read_rows

    index = json.loads((directory / "index.json").read_text())
    total = sum(s["samples"] for s in index["shards"])
    cols = ["genes", "counts", "n_counts", "row", "cell_id"]
    return [s for _, s in read_rows(lambda name: (directory / name).read_bytes(), range(total), cols)]


def check_build(project: Path, reference: Path) -> list[str]:
    """Problems with the project's datasets: against their sources, and against the reference."""
    problems = []
    mine, ref = _datasets(project), _datasets(reference)
    if mine.keys() != ref.keys():
        problems.append(f"datasets differ: {sorted(mine.keys() ^ ref.keys())}")
    for name in sorted(mine.keys() & ref.keys()):
        record = json.loads((mine[name] / "dataset.json").read_text())
        try:
            cells = _samples(mine[name])
        except (OSError, ValueError, KeyError) as exc:
            problems.append(f"{name}: cannot be read ({type(exc).__name__}: {exc})")
            continue
        rows = [int(s["row"]) for s in cells]
        dropped = sum(record["cells_dropped"].values())
        if len(cells) != record["cells_written"] or len(cells) + dropped != record["n_cells_source"]:
            problems.append(
                f"{name}: {len(cells)} samples, {record['cells_written']} written + {dropped} dropped, "
                f"source has {record['n_cells_source']}"
            )
        if rows != sorted(set(rows)) or (rows and (rows[0] < 0 or rows[-1] >= record["n_cells_source"])):
            problems.append(f"{name}: source rows lost, doubled or out of order")
        want = _samples(ref[name])
        if len(want) != len(cells) or any(
            a["row"] != b["row"]
            or a["cell_id"] != b["cell_id"]
            or a["n_counts"] != b["n_counts"]
            or (a["genes"] != b["genes"]).any()
            or (a["counts"] != b["counts"]).any()
            for a, b in zip(cells, want)
        ):
            problems.append(f"{name}: samples differ from the uninterrupted build")
    leftovers = [p for p in (project / "shards").rglob("*.tmp")]
    if leftovers:
        problems.append(f"leftovers: {leftovers[:3]}")
    return problems


def _rows(run: Path) -> dict[int, dict]:
    from concept_train.trainer.metrics import train_rows_by_step

    return train_rows_by_step(run / "metrics.jsonl")


def check_training(run: Path, reference: Path) -> list[str]:
    mine, ref = _rows(run), _rows(reference)
    if sorted(mine) != sorted(ref):
        return [f"steps differ: {sorted(mine)} vs {sorted(ref)}"]
    return [
        f"step {s}: loss {mine[s]['loss']!r} vs {ref[s]['loss']!r}"
        for s in sorted(ref)
        if mine[s]["loss"] != ref[s]["loss"] or mine[s]["batch_digest"] != ref[s]["batch_digest"]
    ]


# ---- the run ---------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("workdir", type=Path)
    p.add_argument("--kills", type=int, default=20, help="kills of builds, and as many of training runs")
    p.add_argument("--signals", type=int, default=0, help="SIGTERMs sent to a training run at random steps")
    p.add_argument("--damage", type=int, default=0, help="shard files damaged, each to be found and rebuilt alone")
    p.add_argument("--nan", action="store_true", help="a diverging run: stops by name, keeps its last good checkpoint")
    p.add_argument("--twin", action="store_true", help="the run started twice: the twin refused, the first unharmed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cells", type=int, default=300, help="cells per synthetic file of the example project")
    p.add_argument("--example", type=Path, help="an example project made already (--cells is then its own)")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    work = args.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sys.path.insert(0, str(REPO))
    from tools.make_example_project import main as make_example_project

    source = args.example or work / "source"
    if args.example is None:
        make_example_project([str(source), "--cells", str(args.cells)])
    reference, project = work / "reference", work / "project"
    shutil.copytree(source, reference)
    shutil.copytree(source, project)

    t_build = _run(_build_cmd(reference))
    t0 = time.perf_counter()
    _run(_train_cmd(reference, "run", resume=False))
    t_train = time.perf_counter() - t0
    print(f"[chaos] reference build {t_build:.1f} s, reference training {t_train:.1f} s")

    landed = Counter()
    kills, attempts = 0, 0
    while kills < args.kills and attempts < 4 * args.kills:
        attempts += 1
        # a third each: at a random moment, as soon as a part is being written, as soon as a join runs
        target = rng.choice([None, "writing a part", "inside a join"])
        hit, state = _kill_after(_build_cmd(project), rng.uniform(1.0, t_build), lambda: _build_state(project), target)
        kills += hit
        if hit:
            landed["build: " + state] += 1
        if not hit:  # it finished first: start the next round from nothing
            shutil.rmtree(project / "shards", ignore_errors=True)
    build_kills = kills
    _run(_build_cmd(project))
    build_problems = check_build(project, reference)

    shutil.rmtree(project / "shards")  # train from shards equal to the reference's
    shutil.copytree(reference / "shards", project / "shards")
    run = project / "model_checkpoints" / "run"
    kills = attempts = 0
    while kills < args.kills and attempts < 4 * args.kills:
        attempts += 1
        resume = (run / "checkpoints" / "latest").is_file()
        target = rng.choice([None, "inside a checkpoint write"])
        hit, state = _kill_after(
            _train_cmd(project, "run", resume), rng.uniform(2.0, t_train), lambda: _train_state(run), target
        )
        kills += hit
        if hit:
            landed["train: " + state] += 1
        if not hit:  # it reached the last step: start the next round from nothing
            shutil.rmtree(run, ignore_errors=True)
    train_kills = kills
    _run(_train_cmd(project, "run", resume=(run / "checkpoints" / "latest").is_file()))
    train_problems = check_training(run, reference / "model_checkpoints" / "run")

    signalled = {}
    if args.signals:
        signalled = signal_runs(project, reference / "model_checkpoints" / "run", args.signals, rng)
    faults = {}
    if args.twin:
        faults |= twin_run(project, reference / "model_checkpoints" / "run")
    if args.nan:
        faults |= diverging_run(project)
    if args.damage:
        faults |= damage_rounds(project, reference, args.damage, rng)
    n_cells = sum(json.loads((d / "dataset.json").read_text())["n_cells_source"] for d in _datasets(project).values())
    report = {
        "build_kills": build_kills,
        "train_kills": train_kills,
        "where": dict(sorted(landed.items())),
        "datasets": len(_datasets(project)),
        "source_cells": n_cells,
        "build_problems": build_problems,
        "training_problems": train_problems,
        "steps_compared": len(_rows(run)),
        **signalled,
        **faults,
    }
    print(json.dumps(report, indent=1))
    (work / "chaos.json").write_text(json.dumps(report, indent=1) + "\n")
    found = [build_problems, train_problems, signalled.get("signal_problems")]
    found += [faults.get(k) for k in ("twin_problems", "nan_problems", "damage_problems")]
    return 0 if not any(found) else 1


if __name__ == "__main__":
    raise SystemExit(main())
