"""`concept-shard build | merge | status | gene-vectors PROJECT_PATH [--config-dir DIR] [key=value ...]`."""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

from .config import groups_help
from .console import program
from .errors import ConfigError, ShardError, UserError
from .workers import cpu_cap, default_workers, run_workers

USAGE_EPILOG = """\
examples:
  concept-shard build /data/project                                 # everything, one process
  concept-shard build /data/project datamodule=DataModuleAdvanced   # another data module
  sbatch --array=0-63 tools/slurm/shard_array.sbatch /data/project  # SLURM array job
  concept-shard merge /data/project                                 # after the array job
  concept-shard status /data/project
  concept-shard status /data/project --verify                       # hash every shard file too
  concept-shard build /data/project --verify                        # and rebuild the damaged ones
  concept-shard gene-vectors /data/project --dim 64                 # co-expression vectors from the training shards
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="concept-shard",
        description="Shard a project's .h5ad/.zarr files into per-species MDS datasets.",
        epilog=groups_help() + "\n\n" + USAGE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in [
        ("build", "shard every file listed by the split YAMLs (skips complete ones)"),
        ("merge", "join row-range parts written by array tasks; write species indexes"),
        ("status", "list files as done, pending, stale, damaged or failed"),
        ("gene-vectors", "co-expression gene vectors from the training shards, for PATH.PRETRAINED_VOCABULARY"),
    ]:
        s = sub.add_parser(name, help=help_)
        s.add_argument("project_path", metavar="PROJECT_PATH")
        s.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra overrides, e.g. shard.chunk_size=4096")
        s.add_argument("--config-dir", help="your own config directory, searched before the packaged conf/")
        s.add_argument("--cfg", choices=["job", "all"], help="print the composed config and exit (Hydra's habit)")
        s.add_argument("--resolve", action="store_true", help="with --cfg: resolve ${...} interpolations")
        if name == "gene-vectors":
            s.add_argument("--dim", type=int, default=64, help="vector length (model.dim_pretrained_vocab; default 64)")
            s.add_argument("--name", default="coexpression", help="output: PROJECT/references/embeddings/NAME/")
            s.add_argument(
                "--max-cells", type=int, default=50_000, help="training cells sampled per species (default 50,000)"
            )
            s.add_argument(
                "--min-cells", type=int, default=10, help="genes seen in fewer sampled cells get no vector (default 10)"
            )
            s.add_argument(
                "--spread",
                type=int,
                default=4,
                help="read only the shards of spread x max-cells cells (at most all) and sample among "
                "them: a larger spread reads more shards and files (default 4)",
            )
            s.add_argument("--seed", type=int, default=0)
            s.add_argument("--no-progress", action="store_true", help="no progress bar")
            continue
        s.add_argument(
            "--lamindb", action="store_true", help="register sources and shards in the current lamindb instance"
        )
        if name in ("build", "status"):
            s.add_argument(
                "--verify",
                action="store_true",
                help="hash every shard file of every complete dataset against its index.json (a full read); "
                "build rebuilds each damaged one",
            )
        if name == "build":
            s.add_argument(
                "--task-index", type=int, default=None, help="this task (default: from $SLURM_ARRAY_TASK_ID)"
            )
            s.add_argument(
                "--num-tasks", type=int, default=None, help="number of tasks (default: $SLURM_ARRAY_TASK_COUNT)"
            )
            s.add_argument("--no-progress", action="store_true", help="no progress bar")
            s.add_argument(
                "--workers",
                type=int,
                default=None,
                help="build processes on this node (default: the CPUs granted, SLURM_CPUS_PER_TASK or those "
                "of this process, but one per 100,000 cells to write at most; 1 in a SLURM array task and "
                "with --lamindb)",
            )
    return p


@program
def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # overrides may come before or after options; argparse leaves the later ones unparsed
    args, extra = parser.parse_known_args(argv)
    unknown = [x for x in extra if x.startswith("-") or "=" not in x]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = list(args.overrides) + extra
    from .build import ShardJob
    from .config import PACKAGED_CONF_DIR, compose_config, composed_yaml
    from .plan import array_task

    try:
        if args.command == "build":  # before any work: a SLURM array that cannot share it is refused
            task, count = args.task_index, args.num_tasks
            if task is None or count is None:
                env_task, env_count = array_task() or (0, 1)
                task = env_task if task is None else task
                count = env_count if count is None else count
            if not 0 <= task < count:
                raise ConfigError(
                    "--task-index", f"is {task} but --num-tasks is {count}.", "Use 0 <= task-index < num-tasks."
                )
        if args.cfg:
            print(composed_yaml(args.project_path, args.overrides, args.config_dir, args.resolve), end="")
            return 0
        cfg = compose_config(args.project_path, args.overrides, args.config_dir)
        if args.command == "gene-vectors":
            return _gene_vectors(cfg, args)
        use_lamin = args.lamindb or cfg.lamindb.enabled
        lamin = None
        if use_lamin:  # status only resolves `lamindb:` keys; build and merge also register
            from .lineage import ShardLineage

            lamin = ShardLineage(cfg.PATH.PROJECT_PATH, cfg.datamodule.name, args.command)
        progress = args.command == "build" and not args.no_progress
        t0 = time.time()
        verify = getattr(args, "verify", False)
        job = ShardJob(cfg.PATH, cfg.shard, cfg.datamodule, progress=progress, lamin=lamin, verify=verify)
        if args.command == "status":
            return _print_status(job)  # no run was created, so nothing to close
        code = 0
        if args.command == "build":
            workers, pending = _workers(args, job, count, lamin)
            if workers > 1:  # tasks 0..workers-1 of this build side by side, then the merge (workers.py)
                print(f"[concept-shard] {workers} workers over {_cells(pending):,} cells, then the merge")
                code = run_workers(list(sys.argv[1:] if argv is None else argv), workers)
                job.verify = False  # the workers hashed what --verify asks for
                report = _after_workers(job.merge(), pending)
            else:
                report = job.run_task(task, count)
        else:
            report = job.merge()
        if lamin is not None:
            lamin.close(failed=bool(report.failed))
    except UserError as err:
        print(f"\nconcept-shard: error\n{err.paragraph()}", file=sys.stderr)
        return 2
    _print_report(report, time.time() - t0, args.command)
    if report.failed and _only_packaged_configs(args) and all(e.problem == "does not exist." for e in report.failed):
        print(
            f"\nEvery listed file is missing: the split files used are the packaged example's ({PACKAGED_CONF_DIR}/"
            "datamodule). Put your own split YAMLs and data module in PROJECT_PATH/conf/datamodule/ (used "
            "automatically), or pass --config-dir DIR, and select your data module with datamodule=<name>.",
            file=sys.stderr,
        )
    return max(report.exit_code, code)


def _workers(args, job, count: int, lamin) -> tuple[int, dict]:
    """How many build processes this command runs (the --workers help), and the files they would
    write ({dataset id: row ranges}; empty for one process)."""
    if args.workers is not None and args.workers < 1:
        raise ConfigError("--workers", f"is {args.workers}.", "Use 1 or more (default: the CPUs granted).")
    if count > 1 or lamin is not None or args.workers == 1:  # an array task is one worker; lamindb records one run
        return 1, {}
    if args.workers is None and _default_workers({j.sf.dataset_id: j.ranges for j in job.jobs}) == 1:
        return 1, {}  # one worker even if every file were to be written: no file's state is read here
    pending = job.pending()
    if args.workers is not None:
        return args.workers, pending
    workers = _default_workers(pending)
    return workers, pending if workers > 1 else {}


def _cells(ranges_by_dataset: dict) -> int:
    return sum(b - a for ranges in ranges_by_dataset.values() for a, b in ranges)


def _default_workers(ranges_by_dataset: dict) -> int:
    """default_workers for these row ranges to write ({dataset id: ranges}) and the CPUs granted."""
    units = sum(len(ranges) for ranges in ranges_by_dataset.values())
    return default_workers(_cells(ranges_by_dataset), cpu_cap()[0], units)


def _after_workers(report, pending: dict):
    """The merge's report as this build's: what the workers wrote is built, not up to date; a file
    still waiting for parts was left unfinished by a failed worker (nothing else is running)."""
    report.built += [d for d in report.up_to_date if d in pending]
    report.up_to_date = [d for d in report.up_to_date if d not in pending]
    for ds_id in report.waiting:
        report.failed.append(
            ShardError(
                ds_id, "was left unfinished by a failed worker.", "Re-run the same command: finished parts are kept."
            )
        )
        report.failed_ids.add(ds_id)
    report.waiting = []
    return report


def _only_packaged_configs(args) -> bool:
    return args.config_dir is None and not (Path(args.project_path) / "conf").is_dir()


def _gene_vectors(cfg, args) -> int:
    from .gene_vectors import GeneVectorSettings, write_gene_vectors

    settings = GeneVectorSettings(
        name=args.name,
        dim=args.dim,
        max_cells=args.max_cells,
        min_cells=args.min_cells,
        seed=args.seed,
        spread=args.spread,
    )
    out_dir = write_gene_vectors(cfg.PATH, cfg.datamodule, settings, progress=not args.no_progress)
    print(
        f"\nconcept-shard gene-vectors: wrote {out_dir}\nTrain from them with: "
        f"PATH.PRETRAINED_VOCABULARY={out_dir} model.dim_pretrained_vocab={settings.dim}"
    )
    return 0


def _print_report(report, seconds: float, command: str) -> None:
    rows = defaultdict(lambda: [0, 0, 0, 0, 0])
    for d in report.datasets:
        r = rows[d["species"]]
        r[0] += 1
        r[1] += d["cells_written"]
        r[2] += d["nonzeros"]
        r[3] += d["shard_bytes"]
        r[4] += sum(d["cells_dropped"].values())
    print(
        f"\nconcept-shard {command}: {len(report.built)} built, {len(report.up_to_date)} up to date, "
        f"{len(report.waiting)} waiting for other tasks/merge, {len(report.failed)} failed ({seconds:.1f} s)"
    )
    if rows:
        header = f"{'species':<12}{'files':>7}{'cells':>12}{'nonzeros':>15}{'MB':>10}{'B/nnz':>7}{'dropped':>9}"
        print(header)
        print("-" * len(header))
        for species in sorted(rows):
            f, c, nnz, b, drop = rows[species]
            print(f"{species:<12}{f:>7}{c:>12,}{nnz:>15,}{b / 1e6:>10.1f}{b / max(nnz, 1):>7.2f}{drop:>9,}")
    if report.waiting and command == "build":
        print("Some files span several tasks: run `concept-shard merge PROJECT_PATH` after all tasks finish.")
    for err in report.failed:
        print(f"\nFAILED {err.paragraph()}", file=sys.stderr)
    if report.failed:
        print(
            f"\n{len(report.failed)} input(s) failed; the others are complete. Fix them and re-run the same "
            "command: finished work is kept.",
            file=sys.stderr,
        )


def _print_status(job) -> int:
    from .finalize import finished_parts

    counts = defaultdict(int)
    print(f"shards: {job.remote.url if job.remote is not None else job.shards_root}")
    for err in job.config_errors:
        print(f"invalid  {err.paragraph()}")
        counts["invalid"] += 1
    for j in job.jobs:
        if j.error is not None:
            state, detail = "failed", j.error.problem
        else:
            state, _, why = job.state(j)
            detail = why or ""
            if state == "absent" and job.staged(j):
                state, detail = "pending", "built, not uploaded yet (re-run build to upload)"
            elif state == "absent":
                failures = j.layout.failures()
                n_done = len([r for r in j.ranges if r in finished_parts(j.layout, job.identity(j))])
                state = "failed" if failures else "pending"
                detail = failures[0]["problem"] if failures else f"{n_done}/{len(j.ranges)} parts done"
        counts[state] += 1
        print(f"{state:<8} {j.sf.dataset_id:<50} {detail}")
    print("\n" + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return 0 if set(counts) <= {"done"} else 1


if __name__ == "__main__":
    sys.exit(main())
