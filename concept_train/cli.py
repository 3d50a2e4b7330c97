"""`concept-train [--config-dir DIR] [key=value ...]`: compose the config, train, report where.

PATH.PROJECT_PATH comes from the overrides (or a positional PROJECT_PATH, as for concept-shard).
Launch under `torchrun --nproc_per_node N` or `srun` for several processes.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from concept_shard import console

with console.few_collections():  # torch and the rest: console.PROGRAM_GEN0 says why
    from concept_shard.config import compose_config, composed_yaml, groups_help
    from concept_shard.errors import UserError

    # imported before any process group exists: torch.distributed's tensor modules imported after a
    # caller's init_process_group keep the default group alive past shutdown() (its DeviceMesh stays
    # in their caches), and gloo then aborts the exit (tests/train/trainer/test_train_distributed.py)
    from .trainer.loop import run_training
    from .trainer.preempt import RESUMABLE, StopSignals

EXAMPLES = """\
examples:
  concept-train /data/project                                             # the project's conf/, one process
  concept-train /data/project model=ContrastiveModelTiny model.training.max_steps=300
  concept-train /data/project +experiment=demo initialize.run_id=first
  concept-train /data/project initialize.run_id=first initialize.resume=True  # continue a run
  concept-train /data/project datamodule=DataModuleAdvanced --cfg job      # the composed config, no training
  torchrun --nproc_per_node 4 -m concept_train.cli /data/project           # 4 processes
  sbatch --nodes=2 tools/slurm/train.sbatch /data/project initialize.run_id=big  # SLURM, requeued on preemption"""

_OVERRIDE = re.compile(r"[+~]{0,2}[A-Za-z_][\w.@/-]*=")


@console.program
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="concept-train",
        description=__doc__.split("\n")[0],
        epilog=groups_help() + "\n\n" + EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config-dir", help="your config tree, searched before the packaged conf/")
    p.add_argument("--cfg", choices=["job", "all"], help="print the composed config and exit (Hydra's habit)")
    p.add_argument("--resolve", action="store_true", help="with --cfg: resolve ${...} interpolations")
    p.add_argument("project_path", nargs="?", help="PATH.PROJECT_PATH (or pass PATH.PROJECT_PATH=...)")
    loud = p.add_mutually_exclusive_group()
    loud.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only (CONCEPT_LOG_LEVEL=WARNING)")
    loud.add_argument(
        "-v", "--verbose", action="store_true", help="also every metric of every logged step (CONCEPT_LOG_LEVEL=DEBUG)"
    )
    args, overrides = p.parse_known_args(argv)
    console.setup(quiet=args.quiet, verbose=args.verbose)
    first = args.project_path
    # `key=value` first (PATH.PROJECT_PATH=/p ...) is the first override; a directory is a path,
    # `=` or not (/data/run=1)
    if first and _OVERRIDE.match(first) and not os.path.isdir(first):
        overrides, args.project_path = [first] + overrides, None
    bad = [o for o in overrides if "=" not in o]
    if bad:
        p.error(f"unexpected arguments {bad}: overrides are key=value")
    try:
        # SIGTERM / SIGINT / SIGUSR1 from start-up to exit: recorded, then acted on by the loop
        # (preempt.py); one that comes after the last step is moot and never kills the run's end
        if args.cfg:
            print(composed_yaml(args.project_path, overrides, args.config_dir, args.resolve), end="")
            return 0
        with StopSignals():
            cfg = compose_config(args.project_path, overrides, args.config_dir)
            result = run_training(cfg, log=console.say)
    except UserError as err:
        print(f"concept-train: {err.paragraph()}", file=sys.stderr)
        return 2
    if result["stopped"] is not None:
        if result["is_main"]:
            print(
                f"concept-train: run {result['run_id']} stopped by {result['stopped']} after step {result['step']}; "
                f"resumable from {result['checkpoint']}: run the same command with initialize.resume=True "
                f"(exit status {RESUMABLE})",
                file=sys.stderr,
            )
        return RESUMABLE
    if result["is_main"]:
        print(
            f"concept-train: run {result['run_id']} finished at step {result['step']}\n"
            f"  run directory: {result['run_dir']}\n"
            f"  metrics:       {result['run_dir'] / 'metrics.jsonl'}\n"
            f"  curves:        {result['curves']}\n"
            f"  checkpoint:    {result['checkpoint']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
