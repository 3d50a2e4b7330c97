"""Rank, world size and rendezvous from SLURM's variables when srun (not torchrun) starts the tasks."""

from concept_train.trainer.distributed import _first_host, slurm_environment


def test_slurm_variables_become_torchrun_variables():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_NNODES": "2",
        "SLURM_NTASKS_PER_NODE": "4(x2)",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_JOB_ID": "123456",
    }
    out = slurm_environment(env)
    assert out == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(20000 + 123456 % 20000),
    }


def test_torchrun_or_a_single_task_wins():
    assert slurm_environment({"RANK": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "4"}) == {}
    assert slurm_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == {}


def test_first_host_of_a_nodelist():
    assert _first_host("node12") == "node12"
    assert _first_host("gpu[01-04,07],cpu3") == "gpu01"
    assert _first_host("a[3,5]") == "a3"


def _train_and_report(rank: int, project: str, store: str, out: dict) -> None:
    import gc
    import os
    import weakref

    import torch.distributed as dist
    from helpers import TINY

    from concept_train.cli import main

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)  # concept-train keeps it
    world = weakref.ref(dist.group.WORLD)
    rc = main(
        [
            project,
            *TINY,
            "model.training.max_steps=2",
            "datamodule.dataloader.train.num_workers=0",
            "initialize.run_id=freed",
        ]
    )
    gc.collect()
    out[rank] = (rc, world() is None)


def test_a_finished_run_frees_the_default_process_group(sharded_project_copy, tmp_path):
    """gloo's worker threads must be joined before Python exits: one still dropping the tensors of
    the last collective then aborts the process (exit -6) after a run that finished. They are
    joined when the group is freed, so the default group must not outlive concept-train."""
    import torch.multiprocessing as mp

    out = mp.Manager().dict()
    mp.spawn(_train_and_report, args=(str(sharded_project_copy), str(tmp_path / "store"), out), nprocs=2, join=True)
    assert dict(out) == {0: (0, True), 1: (0, True)}
